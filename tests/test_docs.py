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


def unbacked_numbers(readme: str, results: str) -> list[str]:
    """The numbers of the README's Measured blocks that no cell of bench/results.md holds."""
    cells = set(re.findall(r"(?<![\w.])-?\d+\.\d+(?![\w.])", results))
    return [n for n in measured_numbers(readme) if n not in cells]


def test_every_number_in_the_measured_tables_is_in_the_bench_results():
    results = (ROOT / "bench" / "results.md").read_text()
    for page in (ROOT / "README.md", ROOT / "docs" / "measured.md"):
        text = page.read_text()
        assert len(measured_numbers(text)) >= 20, page
        assert unbacked_numbers(text, results) == [], page


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f"(docs/{p})" not in readme] == []


def test_the_layout_names_every_module():
    layout = (ROOT / "docs" / "development.md").read_text().split("## Layout", 1)[1]
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "ptq").glob("*.py") if p.name != "__init__.py"
               and p.name != "__main__.py"]
    assert [m for m in modules if m not in layout] == []
    stages = [p.stem for p in (ROOT / "ptq" / "stages").glob("*.py") if p.name != "__init__.py"]
    assert [s for s in stages if s not in layout] == []


def test_a_number_missing_from_the_results_is_caught():
    readme = f"x 9.99 {START} -->\n| a | 12.34 | 1.50 |\n{END} 7.77"
    assert unbacked_numbers(readme, "| Lite0 | 1.50 | 12.345 |") == ["12.34"]  # 12.345 is another number
    assert unbacked_numbers(readme, "| Lite0 | 1.50 | 12.34 |") == []


def test_findings_give_a_command_for_each_section():
    text = (ROOT / "docs" / "FINDINGS.md").read_text()
    for section in text.split("\n## ")[1:]:
        assert "ptq run" in section or "bench/run.py" in section, section.splitlines()[0]


def documented(name: str, text: str) -> bool:
    """Whether ``text`` documents the setting ``name``: as `name` in code, or its flag (`--name`, `--no-name`,
    `--[no-]name`) — not the word in passing."""
    flag = name.replace("_", "-")
    return bool(re.search(rf"`{name}\b|`--(\[no-\]|no-)?{flag}\b", text))


def test_every_recipe_setting_is_documented_by_name_or_flag():
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert [f.name for f in fields(Config) if not documented(f.name, text)] == []
    assert not documented("seed", "pick a seed of 3") and documented("seed", "`--seed N`")
    assert documented("adaround_bias", "`--[no-]adaround-bias`") and not documented("lsq", "`--lsqx`")
