"""Old opsets: a model at opset 9 (Upsample, LeakyRelu, BatchNormalization of that opset) is converted to 13,
checked equal on the calibration samples and quantized; a conversion that changes the outputs, and an opset
before 7, are refused with one line."""
import json

import numpy as np
import onnx
import pytest
from builders import init, make, run, save_npy_samples
from onnx import helper, numpy_helper

import ptq.opset
from ptq.errors import InputError
from ptq.opset import upgraded
from ptq_cli.main import main


def opset9_model(rng, opset=9):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["bn"], "bn"),
             helper.make_node("LeakyRelu", ["bn"], ["a1"], "leaky", alpha=0.1),
             helper.make_node("Upsample", ["a1", "scales"], ["up"], "up", mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["y"], "conv2")]
    f = np.float32
    inits = [init("w1", rng.normal(0, 0.3, (6, 3, 3, 3)).astype(f)), init("b1", rng.normal(0, 0.1, 6).astype(f)),
             init("g", rng.uniform(0.5, 2, 6).astype(f)), init("beta", rng.normal(0, 0.1, 6).astype(f)),
             init("mu", rng.normal(0, 0.1, 6).astype(f)), init("var", rng.uniform(0.5, 2, 6).astype(f)),
             init("scales", np.array([1, 1, 2, 2], f)), init("w2", rng.normal(0, 0.3, (4, 6, 1, 1)).astype(f))]
    return make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 4, 16, 16])], inits, opset=opset)


def test_an_opset_9_model_is_converted_checked_and_quantized(rng, tmp_path, capsys):
    path = tmp_path / "old.onnx"
    onnx.save(opset9_model(rng), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 16)
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["stages"]["choices"]["opset"].startswith("converted from opset 9 to 13 (onnx.version_converter)")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert report["fidelity"]["outputs"]["y"]["sqnr_db"] > 20  # 8 bits of a small CNN: close to FP32
    x = np.load(sorted(calib.glob("*.npy"))[0])[None]
    assert np.allclose(run(q, {"x": x})[0], run(opset9_model(np.random.default_rng(0)), {"x": x})[0], atol=0.2)


def test_a_conversion_that_changes_the_outputs_is_refused(rng, monkeypatch):
    model = opset9_model(rng)
    real = ptq.opset.version_converter.convert_version

    def off_by_a_little(m, version):
        new = real(m, version)
        w = next(t for t in new.graph.initializer if t.name == "w2")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.001, "w2"))
        return new
    monkeypatch.setattr(ptq.opset.version_converter, "convert_version", off_by_a_little)
    with pytest.raises(InputError, match="changes its outputs .* re-export it at opset 13"):
        upgraded(model, None)
    monkeypatch.undo()
    new, note = upgraded(model, None)  # random inputs of the static shapes where no data is given: unchanged
    assert "outputs equal on 1 samples" in note and "largest difference 0.0e+00" in note


def test_an_opset_before_7_is_refused_naming_what_to_do(rng, tmp_path, capsys):
    model = opset9_model(rng)
    model.opset_import[0].version = 6
    path = tmp_path / "ancient.onnx"
    onnx.save(model, str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8)
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opset 6 is not supported" in err[0] and "re-export" in err[0]
    assert not (tmp_path / "q.onnx").exists()
