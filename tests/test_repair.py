"""Repair: a default run under the fidelity bounds raises quantizers until they hold (test_any_model's collapsed
head), and where they cannot be met writes the model and exits 3 naming the culprits; --no-repair keeps the
warning and exit 0."""
import json

import onnx
import pytest
from builders import save_npy_samples, zoo

from ptq.repair import margin, segments, shrink
from ptq_cli.main import main

pytestmark = pytest.mark.slow


def test_margin_is_the_worst_distance_to_the_bounds_by_hand():
    result = {"outputs": {"a": {"sqnr_db": 30.0, "cosine": 0.999},
                          "b": {"sqnr_db": 12.0, "cosine": 0.95,
                                "worst_slice": {"sqnr_db": 4.0, "sqnr_db_upper": 7.5}}}}
    assert margin(result, 6.0, 0.9) == pytest.approx(min(30 - 6, 20 * 0.099, 12 - 6, 20 * 0.05, 7.5 - 6))
    result["outputs"]["b"]["worst_slice"]["sqnr_db_upper"] = 5.0
    assert margin(result, 6.0, 0.9) == pytest.approx(-1.0)


def test_segments_cut_the_order_into_contiguous_runs_by_hand():
    order = [f"q{i}" for i in range(10)]
    assert segments(order, 4) == [["q0", "q1"], ["q2", "q3", "q4"], ["q5", "q6"], ["q7", "q8", "q9"]]
    assert segments(order[:3], 8) == [["q0"], ["q1"], ["q2"]]


@pytest.mark.parametrize("needed", [{"q3"}, {"q3", "q11"}, {"q0", "q1", "q2", "q15"}, set()])
def test_shrink_finds_the_smallest_set_that_holds_where_it_has_the_checks(needed):
    """``holds``: every needed quantizer is raised (monotone): the smallest set that holds is ``needed`` itself,
    found with enough checks; with too few, what comes back still holds and keeps the order."""
    raised = [f"q{i}" for i in range(16)]
    calls = []

    def holds(ids):
        calls.append(ids)
        return needed <= set(ids)
    assert shrink(raised, holds, budget=64) == [q for q in raised if q in needed]
    assert len(calls) <= 64
    for budget in (0, 1, 3):
        got = shrink(raised, holds, budget=budget)
        assert needed <= set(got) and got == [q for q in raised if q in set(got)]


def test_bounds_that_cannot_be_met_exit_3_naming_the_culprits_with_the_model_written(rng, tmp_path, capsys):
    model = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(model))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 24)
    recipe = tmp_path / "r.toml"
    recipe.write_text("fidelity_sqnr_db = 200.0\n")  # no 8-bit model is that close to FP32
    args = ["run", str(model), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--recipe", str(recipe)]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ptq: under the fidelity bounds") and "culprits: " in err[-1]
    report = json.loads((tmp_path / "q.report.json").read_text())
    fix = report["repair"]
    assert not fix["met"] and fix["culprits"] and all(c.split(":")[0] in ("weight", "act") for c in fix["culprits"])
    assert fix["culprits"][0] in err[-1] and (tmp_path / "q.onnx").exists()
    assert main(args + ["--no-repair"]) == 0
    assert "ptq: warning: output 'logits'" in capsys.readouterr().err
    assert "repair" not in json.loads((tmp_path / "q.report.json").read_text())
