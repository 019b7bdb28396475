"""Models off the CNN-classifier path: attention masks with float-min sentinels, a detector head concatenating
boxes with scores, shared initializers, outputs that are not class scores, outputs whose shape varies — each
either quantized correctly or flagged loudly, never broken with exit 0."""
import json

import numpy as np
import onnx
import pytest
from builders import init, make, run, save_npy_samples, two_inputs, zoo
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


def masked_pool(rng):
    """x [N, 4, 8] + mask (0 or float32 min) -> MaxPool (windows of 2) -> Flatten -> MatMul -> y [N, 4]: the
    masked tensor is read, through the pool, by an integer kernel."""
    nodes = [helper.make_node("Add", ["x", "mask"], ["masked"], "add_mask"),
             helper.make_node("MaxPool", ["masked"], ["pooled"], "pool", kernel_shape=[2], strides=[2]),
             helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["y"], "dense")]
    return make(nodes, [("x", [None, 4, 8]), ("mask", [None, 4, 8])], [("y", [None, 4])],
                [init("w", rng.normal(0, 1, (16, 4)).astype(np.float32))])


def test_mask_sentinels_never_set_a_scale(rng, tmp_path, capsys):
    path = tmp_path / "pool.onnx"
    onnx.save(masked_pool(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(40):  # one position of each window of two may be masked
        mask = np.zeros((4, 8), np.float32)
        mask[:, 0::2] = np.where(rng.random((4, 4)) < 0.5, FLOAT_MIN, 0)
        np.savez(calib / f"s{k:02d}.npz", x=rng.normal(0, 1, (4, 8)).astype(np.float32), mask=mask)
    for act_range in ("mse", "percentile", "minmax"):
        out = tmp_path / f"q_{act_range}.onnx"
        assert main(["run", str(path), "--calib", str(calib), "-o", str(out), "--act-range", act_range,
                     "--holdout", "8", "-q", "--no-smoothquant"]) == 0, capsys.readouterr().err
        report = json.loads(out.with_name(out.stem + ".report.json").read_text())
        left = report["stages"]["left_float"]
        assert {"mask", "masked"} <= set(left) and "sentinel" in left["masked"]
        assert report["fidelity"]["outputs"]["y"]["cosine"] > 0.99
        q = onnx.load(str(out))
        scales = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/scale")]
        assert scales and all(np.all(np.isfinite(s)) and np.all(np.abs(s) < 1e6) for s in scales)


def test_masked_attention_keeps_the_mask_in_float_and_the_softmax_exact(rng, tmp_path, capsys):
    path = tmp_path / "attn.onnx"
    onnx.save(masked_attention(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(40):
        mask = np.where(rng.random(8) < 0.4, FLOAT_MIN, 0).astype(np.float32)
        np.savez(calib / f"s{k:02d}.npz", x=rng.normal(0, 1, 8).astype(np.float32), mask=mask)
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--holdout", "8",
                 "-q", "--no-smoothquant"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert not {"mask", "masked", "s"} & set(report["activations"])  # only float ops read them
    assert {"x", "p"} <= set(report["activations"])  # the MatMuls' inputs
    assert report["fidelity"]["outputs"]["y"]["cosine"] > 0.99  # masked positions stay masked


def concat_head(rng):
    """Boxes (0 … 300) and scores (0 … 1) concatenated on axis 1, then a 1×1 convolution reads them: a Concat that
    an integer kernel would read."""
    nodes = [helper.make_node("Conv", ["x", "wb"], ["cb"], "box_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["cb"], ["sb"], "box_sigmoid"),
             helper.make_node("Mul", ["sb", "scale"], ["boxes"], "box_scale"),
             helper.make_node("Conv", ["x", "wc"], ["cc"], "cls_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["cc"], ["scores"], "cls_sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], "head_concat", axis=1),
             helper.make_node("Conv", ["cat", "wm"], ["out"], "mix")]
    return make(nodes, [("x", [None, 3, 8, 8])], [("out", [None, 10, 8, 8])],
                [init("wb", rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)),
                 init("wc", rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32)),
                 init("wm", rng.normal(0, 0.5, (10, 10, 1, 1)).astype(np.float32)), init("scale", np.float32(300))])


def conv_head(rng):
    """One convolution makes boxes (channels 0-3, in the hundreds) and scores (4-9, below 1) -> out [N, 10, 64]."""
    w = rng.normal(0, 0.5, (10, 3, 3, 3)).astype(np.float32)
    w[:4] *= 30
    w[4:] *= 0.1
    nodes = [helper.make_node("Conv", ["x", "w"], ["raw"], "head_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["raw", "shape"], ["out"], "flatten_hw")]
    return make(nodes, [("x", [None, 3, 8, 8])], [("out", [None, 10, 64])],
                [init("w", w), init("shape", np.array([0, 10, 64], np.int64))])


def test_concat_of_mixed_ranges_keeps_its_inputs_quantizers_and_stays_float(rng, tmp_path, capsys):
    path = tmp_path / "head.onnx"
    onnx.save(concat_head(rng), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 40)
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--holdout", "8",
                 "--strict", "-q"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert "Concat 'head_concat'" in report["stages"]["left_float"]["cat"]
    assert {"boxes", "scores"} <= set(report["activations"]) and "cat" not in report["activations"]
    assert report["fidelity"]["outputs"]["out"]["worst_slice"]["sqnr_db"] > 20 and report["fidelity_flags"] == []


def test_a_repaired_model_is_placed_again_and_written_in_float_where_it_got_slower(rng, tmp_path, monkeypatch):
    """The repair's 16-bit quantizers change the model's speed: it is placed again. Timings given: the int8 model
    runs faster than FP32 before the repair (placed int8) and slower with confidence after it, so the model written
    is in float, and the report says the placement ran after the repair."""
    import ptq.placement as placement
    import ptq.run as run_module
    path = tmp_path / "head.onnx"
    onnx.save(conv_head(rng), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 40)
    repaired = []
    real_repair = run_module.repair
    monkeypatch.setattr(run_module, "repair", lambda *a, **k: repaired.append(1) or real_repair(*a, **k))

    def paired_ratio(a, b, feed, runs=20, warmup=3, until=None):
        ratio, ci = (2.0, [1.8, 2.2]) if repaired else (0.5, [0.4, 0.6])
        return {"fp32_ms": 1.0, "quant_ms": ratio, "ratio": ratio, "ratio_ci": ci, "runs": 10,
                "cpu_ms": [1.0, ratio], "cpu_ratio": ratio}
    monkeypatch.setattr(placement, "paired_ratio", paired_ratio)
    monkeypatch.setattr(placement, "node_times", lambda model, feed, runs=10: {})
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    result = run_module.quantize(str(path), calib, holdout=8, range_spread=0)
    report = result.report
    assert repaired and report["repair"]["met"] and report["repair"]["raised"]
    assert report["placement"]["after_repair"] and report["placement"]["all_float"]
    assert "placement_after_repair" in report["timings"]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in result.model.graph.node)


def test_a_head_forced_to_one_scale_is_caught_by_the_fidelity_check(rng, tmp_path, capsys):
    path = tmp_path / "head.onnx"
    onnx.save(conv_head(rng), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 40)
    args = ["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--holdout", "8"]
    assert main(args + ["--strict"]) == 0, capsys.readouterr().err  # the guard: the head's output stays float
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert "a head layer's output whose channels' ranges differ" in report["stages"]["left_float"]["raw"]
    assert report["fidelity_flags"] == []
    recipe = tmp_path / "r.toml"
    recipe.write_text("range_spread = 0\n")  # the guard off: one 8-bit scale for boxes and scores
    assert main(args + ["--recipe", str(recipe)]) == 0, capsys.readouterr().err  # repaired by default …
    capsys.readouterr()
    report = json.loads((tmp_path / "q.report.json").read_text())
    fix = report["repair"]
    assert fix["met"] and fix["raised"] == ["act:raw"] and fix["culprits"][0] == "act:raw"
    assert "slice" in fix["flags_before"][0] and report["fidelity_flags"] == []
    assert report["activations"]["raw"]["bits"] == 16
    args.append("--no-repair")  # … and as it was without the repair:
    assert main(args + ["--recipe", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "ptq: warning: output 'out': slice" in err and "nearest quantizer: act:raw" in err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["fidelity"]["outputs"]["out"]["sqnr_db"] > 20  # the whole tensor hides it …
    assert report["fidelity"]["outputs"]["out"]["worst_slice"]["index"] >= 4  # … a score row collapsed
    assert report["fidelity_flags"] and "Warning" in (tmp_path / "q.report.md").read_text()
    assert main(args + ["--recipe", str(recipe), "--strict"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ptq: --strict: output 'out': slice") and (tmp_path / "q.onnx").exists()


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


def outlier_matmuls(rng):
    """x [N, 16] with three outlier channels -> LayerNormalization-free MatMuls q, k (sharing x) and a residual."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], "q"), helper.make_node("MatMul", ["x", "wk"], ["k"], "k"),
             helper.make_node("Add", ["q", "k"], ["qk"], "sum"), helper.make_node("Add", ["qk", "x"], ["y"], "res")]
    return make(nodes, [("x", [None, 16])], [("y", [None, 16])],
                [init("wq", rng.normal(0, 1, (16, 16)).astype(np.float32)),
                 init("wk", rng.normal(0, 1, (16, 16)).astype(np.float32))])


def test_smoothing_scales_by_hand():
    from ptq.stages.smoothquant import smoothing_scales
    np.testing.assert_allclose(smoothing_scales(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]), 0.5),
                               [2.0, 0.5, 1.0])  # √(4/1), √(1/4); an all-zero channel keeps 1


def test_smoothquant_keeps_fp32_and_lowers_the_8_bit_error_of_outlier_channels(rng, tmp_path):
    from ptq.pipeline import Config, Context, prepare, run_steps
    from ptq.stages.smoothquant import ALPHAS, product_error, smoothing_scales
    model = outlier_matmuls(rng)
    calib = tmp_path / "calib"
    calib.mkdir()
    scale = np.ones(16, np.float32)
    scale[[2, 7, 11]] = 40.0  # outlier channels, as after a LayerNorm
    for k in range(64):
        np.save(calib / f"s{k:02d}.npy", (rng.normal(0, 1, 16) * scale).astype(np.float32))
    src = DataSource(calib, model_inputs(model))
    state = run_steps(prepare(model, Config(steps=["smoothquant"])), Context(src), {})
    entry = state.report["smoothquant"]["x"]
    assert entry["applied"] and entry["layers"] == ["q", "k"] and entry["alpha"] in ALPHAS
    assert entry["error_ratio"] < 0.9
    assert {l.x for l in state.layers} == {"x/smoothed"}  # q and k read the smoothed x; the residual reads x
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))])
    np.testing.assert_allclose(run(state.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-3)
    w = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    base = product_error(x, w, np.ones(16, np.float32), 8, 8)
    s = smoothing_scales(np.abs(x).max(0), np.max([np.abs(v).max(1) for v in w], axis=0), entry["alpha"])
    assert product_error(x, w, s, 8, 8) < 0.9 * base  # the same measure, on the whole calibration set


def smoothing_producers(rng, producer: str, residual: bool = False):
    """h [N, 16] with three outlier channels, made by a layer (``producer``: "matmul" = MatMul + bias Add + Relu,
    "gemm" = Gemm with transB and bias, "layernorm" = LayerNormalization, "decomposed" = a LayerNorm written as
    ops, x̂ · γ + β), read by MatMuls q and k (and by a residual Add when ``residual``)."""
    big = np.ones(16, np.float32)
    big[[2, 7, 11]] = 40.0
    if producer == "layernorm":
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], "ln", axis=-1)]
        inits = [init("g", (rng.uniform(0.5, 1.5, 16) * big).astype(np.float32)),
                 init("b", rng.normal(0, 0.1, 16).astype(np.float32))]
    elif producer == "decomposed":
        nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], "mean", axes=[-1]),
                 helper.make_node("Sub", ["x", "mu"], ["xc"], "center"),
                 helper.make_node("Mul", ["xc", "xc"], ["sq"], "square"),
                 helper.make_node("ReduceMean", ["sq"], ["var"], "var", axes=[-1]),
                 helper.make_node("Add", ["var", "eps"], ["ve"], "eps"),
                 helper.make_node("Sqrt", ["ve"], ["sd"], "sqrt"),
                 helper.make_node("Div", ["xc", "sd"], ["xh"], "normalize"),
                 helper.make_node("Mul", ["xh", "g"], ["xg"], "gamma"),
                 helper.make_node("Add", ["xg", "b"], ["h"], "beta")]
        inits = [init("eps", np.float32(1e-5)), init("g", (rng.uniform(0.5, 1.5, 16) * big).astype(np.float32)),
                 init("b", rng.normal(0, 0.1, 16).astype(np.float32))]
    elif producer == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], "fc", transB=1)]
        inits = [init("w0", (rng.normal(0, 0.3, (16, 16)) * big[:, None]).astype(np.float32)),
                 init("b0", rng.normal(0, 0.1, 16).astype(np.float32))]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["m"], "fc"), helper.make_node("Add", ["m", "b0"], ["a"]),
                 helper.make_node("Relu", ["a"], ["h"], "relu")]
        inits = [init("w0", (rng.normal(0, 0.3, (16, 16)) * big[None, :]).astype(np.float32)),
                 init("b0", rng.normal(0.5, 0.1, 16).astype(np.float32))]
    nodes += [helper.make_node("MatMul", ["h", "wq"], ["q"], "q"), helper.make_node("MatMul", ["h", "wk"], ["k"], "k"),
              helper.make_node("Add", ["q", "k"], ["y"], "sum")]
    if residual:
        nodes[-1].output[0] = "qk"
        nodes.append(helper.make_node("Add", ["qk", "h"], ["y"], "res"))
    inits += [init("wq", rng.normal(0, 1, (16, 16)).astype(np.float32)),
              init("wk", rng.normal(0, 1, (16, 16)).astype(np.float32))]
    return make(nodes, [("x", [None, 16])], [("y", [None, 16])], inits, opset=17)


def smoothquant_on_samples(model, rng, tmp_path):
    """(the 64 calibration rows [64, 16], the state after the SmoothQuant step alone on them)."""
    from ptq.pipeline import Config, Context, prepare, run_steps
    calib = save_npy_samples(tmp_path / "calib", rng, (16,), 64)
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))])
    return x, run_steps(prepare(model, Config(steps=["smoothquant"])),
                        Context(DataSource(calib, model_inputs(model))), {})


@pytest.mark.parametrize("producer,into", [("matmul", "fc"), ("gemm", "fc"), ("layernorm", "ln"),
                                           ("decomposed", "gamma")])
def test_smoothquant_folds_the_division_into_the_producing_layer(rng, tmp_path, producer, into):
    """X / s taken by the layer making X (its output channels, bias, γ and β divided by s): no Mul is added, the
    FP32 function is kept, and the values are the ones the inserted Mul would have given."""
    model = smoothing_producers(rng, producer)
    x, state = smoothquant_on_samples(model, rng, tmp_path)
    entry = state.report["smoothquant"]["h"]
    assert entry["applied"] and entry["folded_into"] == into
    assert not any(n.op_type == "Mul" and "h" in n.input for n in state.model.graph.node)  # no Mul on h
    assert {n.input[0] for n in state.model.graph.node if n.name in ("q", "k")} == {"h"}
    np.testing.assert_allclose(run(state.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-3)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in state.model.graph.initializer}
    s = after["wq"][:, 0] / before["wq"][:, 0]  # row j of the readers' weights times s_j
    assert np.all(s > 0) and not np.allclose(s, 1)
    np.testing.assert_allclose(after["wk"], before["wk"] * s[:, None], rtol=1e-5)
    for name, value in before.items():
        if name in ("b0", "g", "b"):
            np.testing.assert_allclose(after[name] * s, value, rtol=1e-5)
        elif name == "w0":  # output channel j divided by s_j (its rows may carry x's own smoothing too)
            r = after[name] * (s[:, None] if producer == "gemm" else s[None, :]) / value
            np.testing.assert_allclose(r, np.broadcast_to(r[:1, :] if producer == "gemm" else r[:, :1], r.shape),
                                       rtol=1e-4)


def test_smoothquant_keeps_the_mul_where_the_tensor_has_other_readers(rng, tmp_path):
    model = smoothing_producers(rng, "layernorm", residual=True)
    x, state = smoothquant_on_samples(model, rng, tmp_path)
    entry = state.report["smoothquant"]["h"]
    assert entry["applied"] and "folded_into" not in entry
    assert [n.op_type for n in state.model.graph.node].count("Mul") == 1
    np.testing.assert_allclose(run(state.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-3)
