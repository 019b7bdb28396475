"""Repair: a default run under the fidelity bounds raises quantizers until they hold (test_any_model's collapsed
head), and where they cannot be met writes the model and exits 3 naming the culprits; --no-repair keeps the
warning and exit 0."""
import json

import onnx
import pytest
from builders import save_npy_samples, zoo

from ptq.repair import margin
from ptq_cli.main import main

pytestmark = pytest.mark.slow


def test_margin_is_the_worst_distance_to_the_bounds_by_hand():
    result = {"outputs": {"a": {"sqnr_db": 30.0, "cosine": 0.999},
                          "b": {"sqnr_db": 12.0, "cosine": 0.95,
                                "worst_slice": {"sqnr_db": 4.0, "sqnr_db_upper": 7.5}}}}
    assert margin(result, 6.0, 0.9) == pytest.approx(min(30 - 6, 20 * 0.099, 12 - 6, 20 * 0.05, 7.5 - 6))
    result["outputs"]["b"]["worst_slice"]["sqnr_db_upper"] = 5.0
    assert margin(result, 6.0, 0.9) == pytest.approx(-1.0)


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
