"""Canonicalization and BN folding keep the FP32 outputs (checked against onnxruntime on the original)."""
import numpy as np
import onnx
from builders import conv_bn_relu, init, make, run, zoo
from onnx import helper

from ptq.canonicalize import canonicalize
from ptq.model import Graph, default_opset, truncate
from ptq.stages.fold_bn import fold_batchnorm


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_bn_folding_keeps_outputs_and_stats(rng):
    for act in ("Relu", "Clip"):
        m = conv_bn_relu(rng, act=act)
        x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
        c = canonicalize(m)
        stats = fold_batchnorm(c)
        assert "BatchNormalization" not in ops(c)
        np.testing.assert_allclose(run(c, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
        (name, st), = stats.items()
        gamma = Graph(m).const("gamma")
        np.testing.assert_array_equal(st.gamma, gamma)
        # folded bias by hand: (b - mu) * gamma / sigma + beta
        g = Graph(c)
        conv = next(n for n in c.graph.node if n.op_type == "Conv")
        gr0 = Graph(m)
        sigma = np.sqrt(gr0.const("var") + 1e-5)
        want = (gr0.const("b1") - gr0.const("mean")) * gamma / sigma + gr0.const("beta")
        np.testing.assert_allclose(g.const(conv.input[2]), want, rtol=1e-6)


def same_padding_model(rng):
    """PyTorch-style "same" padding: pads computed by Concat/Cast of constants, a dynamic flatten by Shape."""
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["p_lo"], value=helper.make_tensor("v", 7, [4], [0, 0, 1, 0])),
        helper.make_node("Constant", [], ["p_hi"], value=helper.make_tensor("v", 7, [4], [0, 0, 1, 2])),
        helper.make_node("Concat", ["p_lo", "p_hi"], ["pads"], axis=0),
        helper.make_node("Cast", ["pads"], ["pads64"], to=7),
        helper.make_node("Pad", ["x", "pads64"], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["c", "newshape"], ["y"]),
    ]
    inits = [init("w", w), init("zero", np.array(0, np.int64)), init("axes0", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    return make(nodes, [("x", [None, 3, 9, 9])], [("y", [None, None])], inits)


def test_constant_folding_and_pad_merge_keep_outputs(rng):
    m = same_padding_model(rng)
    x = rng.normal(0, 1, (2, 3, 9, 9)).astype(np.float32)
    c = canonicalize(m)
    assert "Pad" not in ops(c) and "Cast" not in ops(c) and "Constant" not in ops(c)
    assert "Shape" in ops(c)  # the batch size is dynamic: not foldable
    conv = next(n for n in c.graph.node if n.op_type == "Conv")
    assert list(helper.get_attribute_value(conv.attribute[[a.name for a in conv.attribute].index("pads")])) \
        == [1, 0, 1, 2]
    np.testing.assert_allclose(run(c, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_old_opset_is_converted(rng):
    m = conv_bn_relu(rng)
    m.opset_import[0].version = 11
    m = onnx.shape_inference.infer_shapes(m)
    x = rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    c = canonicalize(m)
    assert default_opset(c) == 13
    np.testing.assert_allclose(run(c, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_truncate_keeps_only_what_the_outputs_need(rng):
    m = zoo(rng)
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    t = truncate(m, ["add", "rd"])
    assert [o.name for o in t.graph.output] == ["add", "rd"]
    assert set(ops(t)) == {"Conv", "Clip", "Relu", "Add"}  # nothing after the Add (pools, Gemm) is left
    assert {i.name for i in t.graph.initializer} == {"w1", "b1", "wd", "bd", "w2", "b2", "lo", "hi"}
    from ptq.observe import session
    ref = session(m, ["add", "rd"]).run(["add", "rd"], {"x": x})
    got = session(t).run(["add", "rd"], {"x": x})
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_bias_adds_and_hardswish_decompositions_are_rewritten_exactly(rng):
    """Paddle's Conv -> Add(per-channel constant) and x · Clip(x + 3, 0, 6) / 6: the Add joins the bias, the
    HardSwish becomes x · HardSigmoid(x); onnxruntime's outputs are unchanged."""
    from onnx import helper

    from builders import init, make, run
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["cb"], "bias_add"),
             helper.make_node("Add", ["cb", "three"], ["a3"], "hs_add"),
             helper.make_node("Clip", ["a3", "zero", "six"], ["r6"], "hs_clip"),
             helper.make_node("Mul", ["cb", "r6"], ["m"], "hs_mul"),
             helper.make_node("Div", ["m", "six_1d"], ["hs"], "hs_div"),  # a [1]-shaped 6, as Paddle writes it
             helper.make_node("Conv", ["hs", "w2"], ["c2"], "conv2"),
             helper.make_node("Add", ["c2", "b_wide"], ["y"], "not_per_channel")]  # varies along W: stays
    inits = [init("w", rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32)), init("three", np.float32(3)),
             init("zero", np.float32(0)), init("six", np.float32(6)), init("six_1d", np.array([6], np.float32)),
             init("w2", rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32)),
             init("b_wide", rng.normal(0, 1, (8,)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 2, 8, 8])], inits)
    out = canonicalize(model)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Conv", "HardSigmoid", "Mul", "Conv", "Add"]
    x = rng.normal(0, 2, (2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_per_channel_mul_after_a_conv_joins_its_weight_and_bias_exactly(rng):
    """PP-LCNetV3's affine blocks: Conv -> Mul(a) -> Add(b). The Mul folds into the weight and bias (a per-channel
    a, a scalar one), then the Add into the bias; a weight shared with another Conv is left as it was for that
    one; outputs unchanged in onnxruntime."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "a"], ["ca"], "lab_scale"),
             helper.make_node("Add", ["ca", "shift"], ["cab"], "lab_shift"),
             helper.make_node("Conv", ["x", "w", "b"], ["d"], "same_weights", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["a1", "d"], ["da"], "scalar_scale"),
             helper.make_node("Add", ["cab", "da"], ["s"], "sum"),
             helper.make_node("Conv", ["s", "w2"], ["e"], "conv2"),
             helper.make_node("Mul", ["e", "a_wide"], ["y"], "not_per_channel")]  # varies along W: stays
    inits = [init("w", rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(0, 1, 4).astype(np.float32)),
             init("a", rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32)),
             init("shift", np.float32(0.3)), init("a1", np.array([-1.7], np.float32)),
             init("w2", rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32)),
             init("a_wide", rng.normal(0, 1, (8,)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 2, 8, 8])], inits)
    out = canonicalize(model)
    assert ops(out) == ["Conv", "Conv", "Add", "Conv", "Mul"]
    weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    assert len(weights) == 3
    x = rng.normal(0, 2, (2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_a_scalar_affine_before_layers_moves_into_their_weights_exactly(rng):
    """Relu -> Mul(c) -> Add(d) -> {padded Conv, depthwise Conv}: the Mul goes (the layers' weights times c, the
    Add's d / c); a Mul whose result a non-layer also reads stays; onnxruntime's outputs unchanged."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0"),
             helper.make_node("Relu", ["c0"], ["r"], "relu"),
             helper.make_node("Mul", ["r", "c"], ["rc"], "lab_scale"),
             helper.make_node("Add", ["rc", "d"], ["rcd"], "lab_shift"),
             helper.make_node("Conv", ["rcd", "w1"], ["y1"], "padded", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["rcd", "wd"], ["y2"], "depthwise", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Mul", ["y2", "c2"], ["y2c"], "read_by_add"),
             helper.make_node("Add", ["y2c", "y2"], ["y3"], "not_a_layer"),
             helper.make_node("Conv", ["y3", "w2"], ["y"], "conv_last")]
    inits = [init("w0", rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)),
             init("c", np.array([-0.7], np.float32)), init("d", np.float32(0.4)),
             init("w1", rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float32)),
             init("wd", rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32)),
             init("c2", np.float32(1.3)), init("w2", rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y1", [None, 4, 8, 8]), ("y", [None, 2, 8, 8])], inits)
    out = canonicalize(model)
    assert ops(out) == ["Conv", "Relu", "Add", "Conv", "Conv", "Mul", "Add", "Conv"]
    x = rng.normal(0, 2, (2, 3, 8, 8)).astype(np.float32)
    for a, b in zip(run(out, {"x": x}), run(model, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def fused_ops(model, tmp_path) -> list[str]:
    """The op types of ``model`` as onnxruntime's CPU graph optimizations leave it."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ops(onnx.load(opts.optimized_model_filepath))


def test_an_erf_gelus_half_stays_so_onnxruntime_fuses_the_gelu(rng, tmp_path):
    """MatMul -> Add(bias) -> 0.5 · x · (1 + erf(x/√2)) -> MatMul: the 0.5 Mul is not moved into the next MatMul's
    weight (onnxruntime fuses Div, Erf, Add, Mul, Mul into one Gelu only while it is there), while a Mul by one
    value before the first MatMul still is; outputs unchanged."""
    nodes = [helper.make_node("Mul", ["x", "c"], ["xc"], "scale"),
             helper.make_node("MatMul", ["xc", "w0"], ["h0"], "fc0"),
             helper.make_node("Add", ["h0", "b0"], ["h"], "fc0_bias"),
             helper.make_node("Div", ["h", "sqrt2"], ["hd"], "gelu_div"),
             helper.make_node("Erf", ["hd"], ["he"], "gelu_erf"),
             helper.make_node("Add", ["he", "one"], ["h1"], "gelu_add"),
             helper.make_node("Mul", ["h", "h1"], ["hm"], "gelu_mul"),
             helper.make_node("Mul", ["hm", "half"], ["g"], "gelu_half"),
             helper.make_node("MatMul", ["g", "w1"], ["y"], "fc1")]
    inits = [init("c", np.float32(0.8)), init("w0", rng.normal(0, 0.3, (16, 32)).astype(np.float32)),
             init("b0", rng.normal(0, 0.1, 32).astype(np.float32)), init("sqrt2", np.float32(np.sqrt(2))),
             init("one", np.float32(1.0)), init("half", np.float32(0.5)),
             init("w1", rng.normal(0, 0.3, (32, 8)).astype(np.float32))]
    model = make(nodes, [("x", [None, 4, 16])], [("y", [None, 4, 8])], inits)
    out = canonicalize(model)
    assert "scale" not in {n.name for n in out.graph.node}  # a Mul by one value before a layer still moves
    assert "gelu_half" in {n.name for n in out.graph.node}
    assert {"Gelu", "BiasGelu"} & set(fused_ops(out, tmp_path))
    x = rng.normal(0, 1, (2, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
