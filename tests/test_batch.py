"""`make quantize`, the README's batch job, over three models: one that passes its gate, one that fails it and one
that is not a model. The failed gate keeps its exit status (3, in its .exit file, the summary and make's last
line; make itself exits 2 for any failed recipe) and its model with its reports; the broken one leaves nothing;
the summary always comes, with a result column."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import init, make

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def classifier(weight):
    return make([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], "fc")], [("x", [None, 16])],
                [("y", [None, 16])], [init("w", weight.astype(np.float32))])


@pytest.mark.skipif(shutil.which("make") is None or not (BIN / "ptq").exists(), reason="needs make and the ptq script")
def test_make_quantize_keeps_a_failed_gate_with_its_reports_and_always_writes_the_summary(tmp_path, rng):
    models, calib, out = tmp_path / "models", tmp_path / "calib", tmp_path / "out"
    models.mkdir()
    calib.mkdir()
    onnx.save(classifier(np.eye(16)), str(models / "good.onnx"))  # y = x: the argmax survives 8 bits
    # every class within 0.1 % of the others: 8-bit weights round them to ties, so top-1 agreement collapses
    onnx.save(classifier(1 + 1e-3 * rng.standard_normal((16, 16))), str(models / "tied.onnx"))
    (models / "broken.onnx").write_bytes(b"not a model")
    for k in range(40):
        np.save(calib / f"s{k:02d}.npy", (10 * np.eye(16)[k % 16] + 0.1 * rng.random(16)).astype(np.float32))
    stamp = tmp_path / "stamp"
    stamp.touch()
    env = {**os.environ, "MAKEFLAGS": ""}
    p = subprocess.run(["make", "-s", "-j2", "quantize", f"MODELS={models}", f"CALIB={calib}", f"OUT={out}",
                        f"BIN={BIN}", f"STAMP={stamp}", "PTQ_FLAGS=--max-drop 0 --holdout 16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "the worst run exited 3" in p.stderr, p.stderr  # make's own status: 2
    written = {f.name for f in out.iterdir()}
    report_set = {".q.onnx", ".q.report.json", ".q.report.md", ".q.report.html"}
    assert {"good" + s for s in report_set} <= written and {"tied" + s for s in report_set} <= written
    assert not any(n.startswith("broken") for n in written)  # its status is forgotten: the next make retries it
    assert (out / "tied.q.exit").read_text().strip() == "3" and (out / "good.q.exit").read_text().strip() == "0"
    rows = [r for r in (out / "summary.md").read_text().splitlines()[2:] if r.strip()]
    result = {r.split("|")[2].strip(): r.split("|")[-2].strip() for r in rows}  # by output file
    assert result == {"good.q.onnx": "gate passed", "tied.q.onnx": "**gate failed** (exit 3)",
                      "broken.q.onnx": "**failed, nothing written** (exit 2)"}, rows
