"""The README quotes only numbers that bench/results.md holds (its Measured table), and documents every setting."""
import re
from dataclasses import fields
from pathlib import Path

from ptq.pipeline import Config

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- measured", "<!-- /measured -->"


def measured_numbers(readme: str) -> list[str]:
    blocks = [b.split("-->", 1)[1].split(END)[0] for b in readme.split(START)[1:]]
    assert blocks, "the README has no Measured block"
    return [n for b in blocks for n in re.findall(r"(?<![\w.])-?\d+\.\d+(?![\w.])", b)]


def test_every_number_in_the_measured_table_is_in_the_bench_results():
    results = (ROOT / "bench" / "results.md").read_text()
    cells = set(re.findall(r"(?<![\w.])-?\d+\.\d+(?![\w.])", results))
    numbers = measured_numbers((ROOT / "README.md").read_text())
    assert len(numbers) >= 20
    assert [n for n in numbers if n not in cells] == []


def test_a_number_missing_from_the_results_is_caught():
    assert measured_numbers(f"x {START} -->\n| a | 12.34 | 5 |\n{END}") == ["12.34"]


def test_findings_give_a_command_for_each_section():
    text = (ROOT / "docs" / "FINDINGS.md").read_text()
    for section in text.split("\n## ")[1:]:
        assert "ptq run" in section or "bench/run.py" in section, section.splitlines()[0]


def test_readme_names_every_recipe_setting_or_its_flag():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in fields(Config)
               if f.name not in readme and "--" + f.name.replace("_", "-") not in readme]
    assert missing == []
