"""Models off the CNN-classifier path: attention masks with float-min sentinels, a detector head concatenating
boxes with scores, shared initializers, outputs that are not class scores, outputs whose shape varies — each
either quantized correctly or flagged loudly, never broken with exit 0."""
import json

import numpy as np
import onnx
import pytest
from builders import init, make, run, zoo, two_inputs
from onnx import helper

from ptq.canonicalize import canonicalize
from ptq.data import DataSource, model_inputs
from ptq.evaluate import evaluate
from ptq.metric import gathered
from ptq.patterns import class_score_outputs
from ptq_cli.main import main

FLOAT_MIN = np.finfo(np.float32).min


def masked_attention(rng):
    """x [N, 8] -> MatMul -> + mask [N, 8] (0 or float32 min) -> Softmax -> MatMul -> y [N, 4]."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["s"], "scores"),
             helper.make_node("Add", ["s", "mask"], ["masked"], "add_mask"),
             helper.make_node("Softmax", ["masked"], ["p"], "softmax", axis=-1),
             helper.make_node("MatMul", ["p", "wv"], ["y"], "values")]
    return make(nodes, [("x", [None, 8]), ("mask", [None, 8])], [("y", [None, 4])],
                [init("wq", rng.normal(0, 1, (8, 8)).astype(np.float32)),
                 init("wv", rng.normal(0, 1, (8, 4)).astype(np.float32))])


def test_mask_sentinels_never_set_a_scale_and_the_masked_softmax_stays_exact(rng, tmp_path, capsys):
    path = tmp_path / "attn.onnx"
    onnx.save(masked_attention(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(40):
        mask = np.where(rng.random(8) < 0.4, FLOAT_MIN, 0).astype(np.float32)
        np.savez(calib / f"s{k:02d}.npz", x=rng.normal(0, 1, 8).astype(np.float32), mask=mask)
    for act_range in ("mse", "percentile", "minmax"):
        out = tmp_path / f"q_{act_range}.onnx"
        assert main(["run", str(path), "--calib", str(calib), "-o", str(out), "--act-range", act_range,
                     "--holdout", "8", "-q"]) == 0, capsys.readouterr().err
        report = json.loads(out.with_name(out.stem + ".report.json").read_text())
        left = report["stages"]["left_float"]
        assert {"mask", "masked"} <= set(left) and "sentinel" in left["masked"]
        assert report["fidelity"]["outputs"]["y"]["cosine"] > 0.99  # masked positions stay masked
        q = onnx.load(str(out))
        scales = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/scale")]
        assert scales and all(np.all(np.isfinite(s)) and np.all(np.abs(s) < 1e6) for s in scales)


def detector_head(rng, box_scale=300.0):
    """A YOLO-style head: boxes (0 … 300) and class scores (0 … 1) concatenated on axis 1 -> out [N, 10, 64]."""
    nodes = [helper.make_node("Conv", ["x", "wb"], ["cb"], "box_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["cb"], ["sb"], "box_sigmoid"),
             helper.make_node("Mul", ["sb", "scale"], ["boxes4d"], "box_scale"),
             helper.make_node("Reshape", ["boxes4d", "shape_b"], ["boxes"], "box_reshape"),
             helper.make_node("Conv", ["x", "wc"], ["cc"], "cls_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["cc"], ["sc"], "cls_sigmoid"),
             helper.make_node("Reshape", ["sc", "shape_c"], ["scores"], "cls_reshape"),
             helper.make_node("Concat", ["boxes", "scores"], ["out"], "head_concat", axis=1)]
    return make(nodes, [("x", [None, 3, 8, 8])], [("out", [None, 10, 64])],
                [init("wb", rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)),
                 init("wc", rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32)),
                 init("scale", np.float32(box_scale)), init("shape_b", np.array([0, 4, 64], np.int64)),
                 init("shape_c", np.array([0, 6, 64], np.int64))])


@pytest.fixture
def head(rng, tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(detector_head(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(40):
        np.save(calib / f"s{k:02d}.npy", rng.normal(0, 1, (3, 8, 8)).astype(np.float32))
    return path, calib, tmp_path


def test_concat_of_mixed_ranges_keeps_its_inputs_quantizers_and_stays_float(head, capsys):
    path, calib, tmp = head
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp / "q.onnx"), "--holdout", "8",
                 "--strict", "-q"]) == 0, capsys.readouterr().err
    report = json.loads((tmp / "q.report.json").read_text())
    assert "Concat 'head_concat'" in report["stages"]["left_float"]["out"]
    assert {"boxes", "scores"} <= set(report["activations"]) and "out" not in report["activations"]
    worst = report["fidelity"]["outputs"]["out"]["worst_slice"]
    assert worst["sqnr_db"] > 20 and report["fidelity_flags"] == []


def test_a_head_forced_to_one_scale_is_caught_by_the_fidelity_check(head, capsys):
    path, calib, tmp = head
    recipe = tmp / "r.toml"
    recipe.write_text("concat_spread = 0\n")  # the guard off: one 8-bit scale for boxes and scores
    args = ["run", str(path), "--calib", str(calib), "-o", str(tmp / "q.onnx"), "--holdout", "8", "--recipe",
            str(recipe)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "ptq: warning: output 'out': slice" in err and "nearest quantizer: act:out" in err
    report = json.loads((tmp / "q.report.json").read_text())
    assert report["fidelity"]["outputs"]["out"]["sqnr_db"] > 20  # the whole tensor hides it …
    assert report["fidelity"]["outputs"]["out"]["worst_slice"]["index"] >= 4  # … a score row collapsed
    assert report["fidelity_flags"] and "Warning" in (tmp / "q.report.md").read_text()
    assert main(args + ["--strict"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ptq: --strict: output 'out': slice") and (tmp / "q.onnx").exists()


def shared_weight_model(rng):
    """Two Conv → Relu → Conv chains reading the same first weight: CLE of one chain must not touch the other."""
    w = rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)
    w[0] *= 20  # uneven channel ranges: CLE rescales
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], "conv_a"), helper.make_node("Relu", ["a"], ["ra"], "relu_a"),
             helper.make_node("Conv", ["ra", "w2"], ["ya"], "conv_a2"),
             helper.make_node("Conv", ["x", "w"], ["b"], "conv_b"), helper.make_node("Relu", ["b"], ["rb"], "relu_b"),
             helper.make_node("Conv", ["rb", "w3"], ["yb"], "conv_b2"),
             helper.make_node("Add", ["ya", "yb"], ["y"], "add")]
    return make(nodes, [("x", [None, 3, 4, 4])], [("y", [None, 2, 4, 4])],
                [init("w", w), init("w2", rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32)),
                 init("w3", rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32))])


def test_shared_initializers_get_a_copy_per_layer_and_cle_keeps_the_function(rng, tmp_path, capsys):
    model = shared_weight_model(rng)
    canon = canonicalize(model)
    convs = {n.name: n.input[1] for n in canon.graph.node if n.op_type == "Conv"}
    assert convs["conv_a"] != convs["conv_b"]
    x = rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(canon, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(16):
        np.save(calib / f"s{k:02d}.npy", rng.normal(0, 1, (3, 4, 4)).astype(np.float32))
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--cle",
                 "--holdout", "4", "-q"]) == 0, capsys.readouterr().err
    change = json.loads((tmp_path / "q.report.json").read_text())["stages"]["fp32_change_from_transforms"]
    assert change["outputs"]["y"]["sqnr_db"] > 100  # CLE preserved the FP32 function


def test_agreement_only_for_class_score_outputs(rng, tmp_path):
    assert class_score_outputs(zoo(rng)) == ["logits"]
    assert class_score_outputs(two_inputs(rng)) == []  # a Relu feature, not class scores
    model = two_inputs(rng)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(8):
        np.savez(folder / f"s{k}.npz", a=rng.normal(0, 1, 6).astype(np.float32),
                 b=rng.normal(0, 1, 6).astype(np.float32))
    result = evaluate(model, model, DataSource(folder, model_inputs(model)), 4)
    assert "top1_agreement" not in result and result["outputs"]["y"]["cosine"] == pytest.approx(1.0)


def test_user_metric_gets_per_batch_lists_where_output_shapes_vary():
    a, b = np.zeros((2, 4, 8, 8)), np.zeros((1, 4, 12, 12))
    got = gathered(["y"], [[a], [b]])
    assert isinstance(got["y"], list) and [x.shape for x in got["y"]] == [a.shape, b.shape]
    assert gathered(["y"], [[a], [a[:1]]])["y"].shape == (3, 4, 8, 8)
