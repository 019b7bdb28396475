"""Layouts the int8 runtime can fuse: CLE's ReLU6 bound and sub-8-bit saturation left out only where exact, the
saturating-kernel guard (reduce_range) against onnxruntime's own exact Q/DQ run, and what the report says the
remaining choices cost."""
import dataclasses
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import conv_bn_relu, init, make, run, save_npy_samples
from onnx import TensorProto, helper, numpy_helper
from test_cle_bias import chain

import ptq.export
import ptq.stages.activation_ranges
from ptq.data import DataSource, model_inputs
from ptq.export import export_qdq
from ptq.observe import Histogram, session
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import QuantSpec, encoding_from_range, fake_quant
from ptq.ranges import capped_encoding, hist_mse_loss, saturating_encoding
from ptq.runtime import saturates_u8s8
from ptq.stages.weight_ranges import reduced_range
from ptq.target import resolve_target
from ptq.speed import costly_choices, unfused_qdq


def state_for(model, calib, target_changes=None, **cfg):
    """The state after the steps; ``target_changes``: Target fields replaced (a runtime of other abilities)."""
    config = Config(holdout=0, batch_size=4, **cfg)
    state = prepare(model, config)
    if target_changes:
        state.target = dataclasses.replace(state.target, **target_changes)
    return run_steps(state, Context(DataSource(calib, model_inputs(model))), {})


def ops(model):
    return [n.op_type for n in model.graph.node]


def bounded_state(rng, tmp_path, top_of):
    """A CLE'd ReLU6 chain whose bounded tensors' grids are [0, top_of(bounds)]."""
    model = chain(rng, "Clip")
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8, scale=2.0)
    state = state_for(model, calib, cle=True, fusable_tolerance=0.0)
    bounded = [l for l in state.layers if l.bound]
    assert bounded
    for l in bounded:
        r = state.placement.root[l.out]
        state.acts[r] = encoding_from_range(state.acts[r].spec, 0.0, top_of(Graph_const(state, l.bound)))
    return state, bounded


def same_outputs(rng, a, b):
    x = rng.normal(0, 2, (4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(session(a, exact_qdq=True).run(None, {"x": x})[0],
                                  session(b, exact_qdq=True).run(None, {"x": x})[0])


def test_a_grid_within_every_cle_bound_drops_the_min_and_computes_the_same(rng, tmp_path):
    state, bounded = bounded_state(rng, tmp_path, lambda b: float(b.min()) * 0.999)
    fused = export_qdq(state)
    assert "Min" not in ops(fused)
    with_min = export_qdq(state, integers=False)  # the float Min between two quantizers of the same grid
    assert ops(with_min).count("Min") == len(bounded)
    same_outputs(rng, fused, with_min)  # Q(Relu(x)) = Q(Min(Relu(x), b)) where the grid's top <= every b_c


def Graph_const(state, name):
    return next(numpy_helper.to_array(t) for t in state.model.graph.initializer if t.name == name)


def test_a_grid_beyond_a_cle_bound_bounds_the_integers_and_computes_the_same(rng, tmp_path):
    """min(Q(r), Q(b)) = Q(min(r, b)): the integer Min equals the float one between two quantizers, exactly, and
    leaves every convolution to onnxruntime's QLinearConv (no Q/DQ standing beside a Conv or a Min); its operand
    is the bound tiled along the tensor's known W."""
    state, bounded = bounded_state(rng, tmp_path, lambda b: float(b.max()) * 2)
    q = export_qdq(state)
    mins = [n for n in q.graph.node if n.op_type == "Min"]
    producer = {o: n for n in q.graph.node for o in n.output}
    assert len(mins) == len(bounded) and all(producer[n.input[0]].op_type == "QuantizeLinear" for n in mins)
    operands = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for n, l in zip(mins, bounded):  # tiled along W (8 here), one bound per channel
        b = operands[n.input[1]]
        assert b.shape == (1, 6, 1, 8) and (b == b[..., :1]).all() and len(np.unique(b)) > 1
    floats = export_qdq(state, integers=False)
    assert ops(floats).count("Min") == len(bounded)
    same_outputs(rng, q, floats)
    beside = unfused_qdq(q)["beside"]
    assert not {"Conv", "Min", "Relu"} & set(beside), beside
    assert {"Conv", "Min"} & set(unfused_qdq(floats)["beside"])  # the float layout leaves Q/DQ standing there
    costs = costly_choices(q)
    assert [v[0] for k, v in costs.items() if k.startswith("integer Min")] == [len(bounded)]
    assert not any(k.startswith("float Min") for k in costs)


def test_the_capped_grid_error_is_the_error_of_the_model_without_the_min(rng):
    """The histogram is of Min(Relu(x), b); the Min-free model quantizes Relu(x) with top T <= min b: its error
    against FP32, computed directly per element, is the histogram MSE of that grid."""
    b = np.array([1.5, 2.0, 4.0, 8.0], np.float32)
    relu = np.maximum(rng.normal(1, 2, (4000, 4)), 0).astype(np.float32)
    fp = np.minimum(relu, b)
    h = Histogram()
    h.update(fp)
    spec = QuantSpec(8, signed=False, symmetric=False)
    free = encoding_from_range(spec, 0.0, float(fp.max()))
    enc, facts = capped_encoding(h, free, float(b.min()), tolerance=1e9)
    assert facts["min_fused"] and float(np.max(enc.hi)) <= b.min() * (1 + 1e-6)
    direct = float(((fake_quant(relu, enc) - fp) ** 2).sum())
    hist = float(hist_mse_loss(h, spec)(np.atleast_1d(enc.lo).astype(np.float64),
                                        np.atleast_1d(enc.hi).astype(np.float64))[0])
    assert hist == pytest.approx(direct, rel=0.02)
    kept, facts = capped_encoding(h, free, float(b.min()), tolerance=0.0)
    assert kept is free and not facts["min_fused"] and facts["error_ratio"] > 1


def test_sub_8_bit_after_relu6_needs_no_saturating_clip(rng, tmp_path, monkeypatch):
    """In float (the layout of an onnxruntime without integer Clip, and the one stages simulate), a 7-bit grid
    [0, 6] after a ReLU6 needs no saturating Clip; on the integers the ReLU6 itself moves behind the
    QuantizeLinear (clip(Q(x), Q(0), Q(6)) = Q(clip(x, 0, 6))), which leaves the convolution fused, with the same
    outputs."""
    model = conv_bn_relu(rng, act="Clip")
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8, scale=3.0)
    state = state_for(model, calib, {"integer_min_clip": False}, weight_bits=7, act_bits=7, fusable_tolerance=1e9)
    enc = state.acts[state.placement.root["a1"]]
    assert float(np.max(enc.hi)) == pytest.approx(6.0, rel=1e-6)  # the grid [0, 6]: ReLU6 keeps values inside
    floats = export_qdq(state, integers=False)
    clipped = [n.name for n in floats.graph.node if n.op_type == "Clip" and "/Saturate" in n.name]
    assert clipped and not any(n.startswith("a1/") for n in clipped)  # the input and the output still clip
    state.target = dataclasses.replace(state.target, integer_min_clip=True)  # the same decisions, on integers
    q = export_qdq(state)
    producer = {o: n for n in q.graph.node for o in n.output}
    a1 = [n for n in q.graph.node if n.name.startswith("a1/") and n.op_type == "Clip"]
    assert len(a1) == 1 and producer[a1[0].input[0]].op_type == "QuantizeLinear"
    assert ops(q).count("Clip") == len(clipped) + 1 and ops(floats).count("Clip") == len(clipped) + 1
    same_outputs(rng, q, floats)
    assert not {"Conv", "Clip"} & set(unfused_qdq(q)["beside"])
    assert "Clip" in unfused_qdq(floats)["beside"] or "FusedConv" in unfused_qdq(floats)["beside"]
    monkeypatch.setattr(ptq.export, "_holds", lambda enc, bounds: False)
    with_clip = export_qdq(state, integers=False)
    assert ops(with_clip).count("Clip") == ops(floats).count("Clip") + 1
    same_outputs(rng, floats, with_clip)


def test_saturation_on_the_integers_equals_the_float_clip_and_leaves_the_conv_fused(rng, tmp_path):
    """An activation grid of 5 bits in uint8: Q → Clip(q_min, q_max) → DQ equals Clip(lo, hi) → Q → DQ exactly
    (Q is monotone and maps the grid's ends to q_min / q_max), keeps every value within the 5-bit grid (32
    levels), and leaves the convolution to QLinearConv."""
    model = conv_bn_relu(rng, act="Relu")
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8, scale=3.0)
    state = state_for(model, calib, weight_bits=8, act_bits=5)
    q, floats = export_qdq(state), export_qdq(state, integers=False)
    producer = {o: n for n in q.graph.node for o in n.output}
    sat = [n for n in q.graph.node if n.op_type == "Clip" and "/Saturate" in n.name]
    assert sat and all(producer[n.input[0]].op_type == "QuantizeLinear" for n in sat)
    float_sat = {n.output[0] for n in floats.graph.node if n.op_type == "Clip" and "/Saturate" in n.name}
    assert len(float_sat) == len(sat) and all(n.op_type == "QuantizeLinear" for n in floats.graph.node
                                              if float_sat & set(n.input))
    x = rng.normal(0, 6, (4, 3, 8, 8)).astype(np.float32)  # wider than the calibration: saturation matters
    a = session(q, exact_qdq=True).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, session(floats, exact_qdq=True).run(None, {"x": x})[0])
    out_enc = state.acts[state.placement.root[q.graph.output[0].name]]
    levels = np.round(a / float(out_enc.scale)) + int(out_enc.zero_point)
    assert levels.min() >= 0 and levels.max() <= 31
    assert "Conv" not in unfused_qdq(q)["beside"]


def test_saturating_grid_is_kept_only_within_the_tolerance():
    h = Histogram()
    h.update(np.linspace(0, 0.5, 5000).astype(np.float32))  # after a ReLU6, but far below 6
    spec = QuantSpec(7, signed=False, symmetric=False)
    best = encoding_from_range(spec, 0.0, 0.5)
    assert saturating_encoding(h, best, 6.0, tolerance=0.25) is best  # [0, 6] costs far more than 25 %
    assert float(np.max(saturating_encoding(h, best, 6.0, tolerance=1e9).hi)) == pytest.approx(6.0)


def worst_case_conv(cin=64):
    """A 1x1 convolution whose every weight is the same: its quantized products hit 255 · 127."""
    return make([helper.make_node("Conv", ["x", "w"], ["y"], "conv")], [("x", [None, cin, 2, 2])],
                [("y", [None, 4, 2, 2])], [init("w", np.ones((4, cin, 1, 1), np.float32))])


@pytest.mark.parametrize("setting", ["never", "always"])
def test_reduce_range_keeps_the_runtime_equal_to_its_exact_qdq_run(tmp_path, setting):
    """The fused integer kernel against onnxruntime's own exact Q/DQ computation of the same model: with
    ``always`` they agree on every machine; with ``never`` they differ exactly where the probe says this
    machine's kernels saturate."""
    model = worst_case_conv()
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"s{i}.npy", np.full((64, 2, 2), 1.0 + 0.1 * i, np.float32))
    state = state_for(model, folder, reduce_range=setting, act_range="minmax")
    assert state.weights["conv"].spec.bits == (7 if setting == "always" else 8)
    q = export_qdq(state)
    x = np.full((1, 64, 2, 2), 1.3, np.float32)  # the top of the input grid: every product is 255 · q_max
    fused = session(q).run(None, {"x": x})[0]
    exact = session(q, exact_qdq=True).run(None, {"x": x})[0]
    agree = np.allclose(fused, exact, rtol=0.02)
    assert agree if setting == "always" else agree != saturates_u8s8()


@pytest.mark.parametrize("target", ["vnni", "avx2"])
def test_reduce_range_auto_follows_the_target_and_the_same_target_gives_the_same_bytes(tmp_path, target):
    """``auto``: int8 weights for a target whose integer products are exact; where its u8 × s8 pairs saturate,
    the convolution's 8-bit weights stored as uint8 + 128 (the same values), which onnxruntime computes exactly on
    any machine; the report records the target, and the model does not depend on which machine built it."""
    from ptq.run import quantize
    path = tmp_path / "conv.onnx"
    onnx.save(worst_case_conv(), str(path))
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(12):
        np.save(folder / f"s{i}.npy", np.full((64, 2, 2), 1.0 + 0.02 * i, np.float32))
    r = quantize(path, folder, holdout=4, act_range="minmax", latency_runs=0, target=target)
    rr = r.report["stages"]["reduce_range"]
    assert rr["could"] == 1 and rr["layers"] == 0 and rr["uint8_layers"] == (1 if target == "avx2" else 0)
    assert r.report["target"]["name"] == target and r.report["target"]["saturating_u8s8"] == (target == "avx2")
    w = next(t for t in r.model.graph.initializer if t.name.startswith("conv/weight/quantized"))
    values = numpy_helper.to_array(w)
    assert (values.dtype, int(values.max())) == ((np.uint8, 255) if target == "avx2" else (np.int8, 127))
    if target == "avx2":  # every product pair at 255 · 127: exact all the same
        x = np.full((1, 64, 2, 2), 1.22, np.float32)
        np.testing.assert_allclose(session(r.model).run(None, {"x": x})[0],
                                   session(r.model, exact_qdq=True).run(None, {"x": x})[0], rtol=0.02)
    machine = "avx2" if saturates_u8s8() else "vnni"
    other = quantize(path, folder, holdout=4, act_range="minmax", latency_runs=0, target=machine)
    same = other.model.SerializeToString() == r.model.SerializeToString()
    assert same == (machine == target)
    here = quantize(path, folder, holdout=4, act_range="minmax", latency_runs=0)  # auto: this machine
    assert here.report["target"]["name"] == machine
    assert here.model.SerializeToString() == other.model.SerializeToString()
    assert any("built for target" in w for w in r.report["stages"].get("warnings", [])) == (machine != target)


@pytest.mark.parametrize("target", ["vnni", "avx2"])
def test_reduce_range_always_spares_depthwise(rng, tmp_path, target):
    vnni, avx2 = resolve_target("vnni"), resolve_target("avx2")
    assert reduced_range("auto", vnni)[0] is False and reduced_range("never", avx2)[0] is False
    assert reduced_range("always", vnni)[0] is True and reduced_range("auto", avx2)[0] is False  # uint8 instead
    from builders import zoo
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 4)
    state = state_for(model, calib, reduce_range="always", target=target)
    from ptq.model import Graph
    from ptq.weights import layer_kind
    gr = Graph(state.model)
    kinds = {l.name: layer_kind(gr, l) for l in state.layers}
    assert "depthwise" in kinds.values()
    dense_uint8 = target == "avx2"  # MatMul / Gemm keep 8 bits, stored as uint8, where the target saturates
    for name, enc in state.weights.items():
        assert enc.spec.bits == (8 if kinds[name] == "depthwise" or (kinds[name] == "dense" and dense_uint8) else 7)
    assert state.report["reduce_range"]["layers"] == sum(k == "conv" or (k == "dense" and not dense_uint8)
                                                         for k in kinds.values())
    with pytest.raises(Exception, match="reduce_range"):
        Config(reduce_range="sometimes").validate()


@pytest.mark.parametrize("target", ["vnni", "avx2"])
def test_dense_weights_stored_as_uint8_keep_the_runtime_exact(tmp_path, target):
    """A MatMul whose every product pair would overflow int16: for a saturating target its 8-bit weights are
    written as uint8 + 128 (the same values), and the fused kernel then equals onnxruntime's exact Q/DQ run on any
    machine; int8 weights equal it where this machine does not saturate."""
    model = make([helper.make_node("MatMul", ["x", "w"], ["y"], "matmul")], [("x", [None, 64])], [("y", [None, 8])],
                 [init("w", np.ones((64, 8), np.float32))])
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"s{i}.npy", np.full(64, 1.0 + 0.1 * i, np.float32))
    state = state_for(model, folder, act_range="minmax", target=target)
    q = export_qdq(state)
    w = next(t for t in q.graph.initializer if t.name.startswith("matmul/weight/quantized"))
    assert w.data_type == (TensorProto.UINT8 if target == "avx2" else TensorProto.INT8)
    assert state.weights["matmul"].spec.bits == 8
    x = np.full((2, 64), 1.3, np.float32)
    if target == "vnni" and saturates_u8s8():
        return  # int8 weights on a saturating machine: the case the avx2 target exists for
    np.testing.assert_allclose(session(q).run(None, {"x": x})[0], session(q, exact_qdq=True).run(None, {"x": x})[0],
                               rtol=0.02)


def qdq_model_with_costs():
    """x -> Q/DQ -> Min(·, b) -> narrow Clip -> Q/DQ -> Conv (asymmetric int8 weight) -> Clip(0, 6) -> Q/DQ."""
    s, z = np.float32(0.05), np.uint8(0)
    inits = [init("s", s), init("z", z), init("b", np.full((1, 4, 1, 1), 2.0, np.float32)),
             init("lo", np.float32(0)), init("hi", np.float32(3.0)), init("six", np.float32(6.0)),
             init("wq", np.full((4, 4, 1, 1), 3, np.int8)), init("ws", np.float32(0.1)), init("wz", np.int8(2)),
             init("s6", np.float32(6 / 255))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], "q0"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], "dq0"),
             helper.make_node("Min", ["xd", "b"], ["m"], "bound"),
             helper.make_node("Clip", ["m", "lo", "hi"], ["c"], "saturate"),  # 3 < the grid's 12.75
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], "q1"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], "dq1"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], "dqw"),
             helper.make_node("Conv", ["cd", "w"], ["y0"], "conv"),
             helper.make_node("Clip", ["y0", "lo", "six"], ["y1"], "relu6"),  # [0, 6] = its grid: fusable
             helper.make_node("QuantizeLinear", ["y1", "s6", "z"], ["yq"], "q2"),
             helper.make_node("DequantizeLinear", ["yq", "s6", "z"], ["y"], "dq2")]
    g = helper.make_graph(nodes, "costs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_costly_choices_are_found_and_each_variant_lacks_only_its_choice():
    m = qdq_model_with_costs()
    costs = costly_choices(m)
    assert {k.split(" (")[0]: v[0] for k, v in costs.items()} == {
        "float Min between DQ and Q": 1, "saturating Clip before QuantizeLinear": 1,
        "weight zero points off the grid's middle": 1}
    x = {"x": np.linspace(0, 10, 16, dtype=np.float32).reshape(1, 4, 2, 2)}
    for what, (_, variant) in costs.items():
        onnx.checker.check_model(variant)
        run(variant, x)  # each variant runs
        if "Min" in what:
            assert "Min" not in ops(variant) and ops(variant).count("Clip") == 2
        elif "Clip" in what:
            assert "saturate" not in [n.name for n in variant.graph.node] and "relu6" in \
                [n.name for n in variant.graph.node]  # the ReLU6 before a [0, 6] grid is no cost
        else:
            zp = next(t for t in variant.graph.initializer if t.name == "wz")
            assert numpy_helper.to_array(zp) == 0


def test_uint8_weights_at_zero_point_128_are_symmetric_and_cost_nothing():
    """8-bit weights stored as uint8 q + 128 (where u8 × s8 saturates) are a symmetric grid: not counted as
    asymmetric; a uint8 weight at zero point 127 is, and its timed variant moves it to 128."""
    for wz, counted in ((128, False), (127, True)):
        m = qdq_model_with_costs()
        for t in m.graph.initializer:
            if t.name == "wq":
                t.CopyFrom(numpy_helper.from_array(np.full((4, 4, 1, 1), 131, np.uint8), "wq"))
            elif t.name == "wz":
                t.CopyFrom(numpy_helper.from_array(np.uint8(wz), "wz"))
        costs = {k.split(" (")[0]: v for k, v in costly_choices(m).items()}
        assert ("weight zero points off the grid's middle" in costs) == counted
        if counted:
            variant = costs["weight zero points off the grid's middle"][1]
            assert numpy_helper.to_array(next(t for t in variant.graph.initializer if t.name == "wz")) == 128


def silu_split_affine(rng):
    """x -> Conv -> SiLU (x · Sigmoid(x)) -> Split in two -> Conv, Conv -> Add -> Mul(0.5) -> Add(-0.25) -> Add
    (the first Add's output) -> Conv."""
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c0"], ["sg"], "sigmoid"),
             helper.make_node("Mul", ["c0", "sg"], ["silu"], "silu"),
             helper.make_node("Split", ["silu"], ["s1", "s2"], "split", axis=1),
             helper.make_node("Conv", ["s1", "w1"], ["c1"], "conv1"),
             helper.make_node("Conv", ["s2", "w2"], ["c2"], "conv2"),
             helper.make_node("Add", ["c1", "c2"], ["sum"], "add"),
             helper.make_node("Mul", ["sum", "half"], ["scaled"], "scale"),
             helper.make_node("Add", ["scaled", "shift"], ["shifted"], "shift"),
             helper.make_node("Add", ["shifted", "sum"], ["res"], "residual"),  # not a layer: the Mul stays
             helper.make_node("Conv", ["res", "w3"], ["y"], "conv3")]
    inits = [init("w0", rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)),
             init("b0", rng.normal(0, 0.2, 8).astype(np.float32)),
             init("w1", rng.normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32)),
             init("w2", rng.normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32)),
             init("half", np.array([0.5], np.float32)), init("shift", np.float32(-0.25)),
             init("w3", rng.normal(0, 0.4, (2, 4, 1, 1)).astype(np.float32))]
    return make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 2, 8, 8])], inits)


def test_silu_split_and_scalar_affine_ops_run_on_integers(rng, tmp_path):
    """SiLU becomes QLinearSigmoid · QLinearMul, Split shares its input's grid, the Mul / Add by one constant
    value run as QLinearMul / QLinearAdd with the value written exactly; onnxruntime leaves no Q / DQ but the
    graph input's and the output's, and the fused model computes what the QDQ model computes."""
    model = silu_split_affine(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8)
    # 7-bit convolution weights where this CPU's u8 × s8 kernels saturate, so the comparison below is of rounding
    state = state_for(model, calib, reduce_range="always" if saturates_u8s8() else "never")
    root = state.placement.root
    assert {"sg", "silu", "s1", "s2", "sum", "scaled", "shifted"} <= set(root)
    assert root["s1"] == root["s2"] == root["silu"]
    q = export_qdq(state)
    operands = {}
    for n in q.graph.node:
        if n.op_type in ("Mul", "Add") and n.name in ("scale", "shift"):
            dq = next(d for d in q.graph.node if d.output[0] in n.input and d.op_type == "DequantizeLinear"
                      and d.input[0] in {i.name for i in q.graph.initializer})
            v = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
            operands[n.name] = float(v[dq.input[1]]) * (int(v[dq.input[0]].item()) - int(v[dq.input[2]]))
    assert operands["scale"] == pytest.approx(0.5, rel=1e-6) and operands["shift"] == pytest.approx(-0.25, rel=1e-6)
    assert costly_choices(q) == {}  # -0.25's zero point is 255: an operand's grid, not an asymmetric weight
    opt = tmp_path / "opt.onnx"
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    fused = session(q).run(None, {"x": x})[0]
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.optimized_model_filepath = str(opt)
    ort.InferenceSession(q.SerializeToString(), o, providers=["CPUExecutionProvider"])
    count = collections.Counter(ops(onnx.load(str(opt))))
    assert count["QLinearSigmoid"] == 1 and count["QLinearMul"] == 2 and count["QLinearAdd"] == 3
    assert count["QuantizeLinear"] == 1 and count["DequantizeLinear"] == 1  # the graph input's and the output's
    exact = session(q, exact_qdq=True).run(None, {"x": x})[0]
    step = float(state.acts[root["res"]].scale) * float(np.abs(numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "w3"))).sum(axis=(1, 2, 3)).max())
    assert np.max(np.abs(fused - exact)) <= 2 * step  # integer kernels round where the QDQ model does not
    y = session(model).run(None, {"x": x})[0]
    assert np.corrcoef(fused.ravel(), y.ravel())[0, 1] > 0.99


def test_a_mul_by_a_float_gate_and_a_wide_constant_add_stay_float(rng, tmp_path):
    """HardSigmoid has no integer kernel, so x · HardSigmoid(x) keeps a float Mul (no Q on the gate); an Add of
    a constant with more than one value is not integer either, so its input gets no quantizer of its own."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0"),
             helper.make_node("HardSigmoid", ["c0"], ["hs"], "gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c0", "hs"], ["m"], "hswish"),
             helper.make_node("Add", ["m", "wide"], ["a"], "wide_add"),
             helper.make_node("Conv", ["a", "w1"], ["y"], "conv1")]
    inits = [init("w0", rng.normal(0, 0.4, (4, 3, 1, 1)).astype(np.float32)),
             init("wide", rng.normal(0, 1, (8,)).astype(np.float32)),
             init("w1", rng.normal(0, 0.4, (2, 4, 1, 1)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 2, 8, 8])], inits)
    state = state_for(model, save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8))
    assert "hs" not in state.placement.root and "m" not in state.placement.root
    assert {"c0", "a"} <= set(state.placement.root)


@pytest.mark.parametrize("cfg", [{}, {"act_symmetric": True}, {"act_bits": 5}, {"cle": True, "act_bits": 6},
                                 {"weight_bits": 4, "act_bits": 4, "adaround": False}])
def test_the_integer_layout_computes_what_the_float_layout_does(rng, tmp_path, cfg):
    """Activations, saturation and CLE bounds moved onto the integers change no output (onnxruntime's exact Q/DQ
    run of both layouts, on inputs far beyond the calibration range), leave no more Q/DQ standing, and none beside
    a convolution, Relu, Clip or Min (with uint8 activations)."""
    from builders import zoo
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 8)
    state = state_for(model, calib, **cfg)
    q, floats = export_qdq(state), export_qdq(state, integers=False)
    x = rng.normal(0, 4, (3, 3, 16, 16)).astype(np.float32)
    got, want = (session(m, exact_qdq=True).run(None, {"x": x}) for m in (q, floats))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    u, uf = unfused_qdq(q), unfused_qdq(floats)
    assert u["QuantizeLinear"] + u["DequantizeLinear"] <= uf["QuantizeLinear"] + uf["DequantizeLinear"]
    if not cfg.get("act_symmetric"):  # onnxruntime's CPU QLinearConv reads uint8 activations
        assert not {"Conv", "FusedConv", "Relu", "Clip", "Min"} & set(u["beside"]), u


def concat_model(rng, second_scale, b_read_twice=False):
    """x -> conv a (Relu), conv b (Relu, weights × second_scale) -> Concat -> conv -> y; with ``b_read_twice`` b
    also feeds a convolution of its own (output y2)."""
    w = rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"], "conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ca"], ["a"], "relu_a"),
             helper.make_node("Conv", ["x", "wb"], ["cb"], "conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["cb"], ["b"], "relu_b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], "cat", axis=1),
             helper.make_node("Conv", ["cat", "wc"], ["y"], "conv_c")]
    inits = [init("wa", w), init("wb", (w[::-1] * second_scale).astype(np.float32)),
             init("wc", rng.normal(0, 0.3, (4, 12, 1, 1)).astype(np.float32))]
    outputs = [("y", [None, 4, 8, 8])]
    if b_read_twice:
        nodes.append(helper.make_node("Conv", ["b", "wd"], ["y2"], "conv_d"))
        inits.append(init("wd", rng.normal(0, 0.3, (2, 6, 1, 1)).astype(np.float32)))
        outputs.append(("y2", [None, 2, 8, 8]))
    return make(nodes, [("x", [None, 3, 8, 8])], outputs, inits)


def concat_values(model, calib, names):
    from ptq.walk import streamed
    batches = list(streamed(model, names, DataSource(calib, model_inputs(model)), 8))
    return {t: np.concatenate([b[t] for b in batches]) for t in names}


def test_concat_inputs_read_by_the_concat_alone_take_its_grid(rng, tmp_path, monkeypatch):
    """b's range is 5× below a's: on the Concat's grid it loses resolution, but what the Concat's reader sees
    only gains (one rounding onto the output grid instead of two), so both inputs share the grid: one scale in
    the exported model, QLinearConcat copying, and the Concat's quantized output no farther from FP32 (within 1 %:
    on 6144 values a second rounding from a 5× finer grid adds about as much error as chance moves it)."""
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 16)
    model = concat_model(rng, 0.2)
    state = state_for(model, calib, reduce_range="never")  # 8-bit weights on any target: the grids alone differ
    root = state.placement.root
    facts = state.report["concat_grids"]["cat"]
    assert facts[root["b"]]["error_ratio"] > 2 and not facts[root["b"]]["other_readers"]
    assert state.acts[root["a"]] is state.acts[root["cat"]] is state.acts[root["b"]]
    shared = export_qdq(state)
    monkeypatch.setattr(ptq.stages.activation_ranges, "share_concat_grids", lambda *a: {})
    apart = export_qdq(state_for(model, calib, reduce_range="never"))
    inits = {t.name: numpy_helper.to_array(t) for t in shared.graph.initializer}
    assert len({float(inits[n.input[1]]) for n in shared.graph.node if n.op_type == "QuantizeLinear"}) == 3
    assert "Concat" not in unfused_qdq(shared)["beside"]
    fp = concat_values(model, calib, ["cat"])["cat"]
    err = [float(((concat_values(m, calib, ["cat"])["cat"] - fp) ** 2).sum()) for m in (shared, apart)]
    assert err[0] <= err[1] * 1.01


def test_concat_inputs_with_other_readers_share_only_within_the_tolerance(rng, tmp_path):
    """b also feeds a convolution of its own: at 0.95× a's range it shares the grid (its reported error ratio is
    the MSE ratio computed directly on its values), at 0.2× it keeps its own."""
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 16)
    model = concat_model(rng, 0.95, b_read_twice=True)
    state = state_for(model, calib)
    root = state.placement.root
    facts = state.report["concat_grids"]["cat"][root["b"]]
    assert facts["other_readers"] and 1 < facts["error_ratio"] <= 1.25
    own = state_for(model, calib, fusable_tolerance=0.0)
    assert own.acts[own.placement.root["b"]] is not own.acts[own.placement.root["cat"]]
    vals = concat_values(model, calib, ["b"])["b"].ravel()
    mine, on_cat = own.acts[own.placement.root["b"]], state.acts[root["cat"]]
    direct = ((fake_quant(vals, on_cat) - vals) ** 2).sum() / ((fake_quant(vals, mine) - vals) ** 2).sum()
    assert facts["error_ratio"] == pytest.approx(direct, rel=0.05)
    apart = state_for(concat_model(rng, 0.2, b_read_twice=True), calib)
    assert apart.acts[apart.placement.root["b"]] is not apart.acts[apart.placement.root["cat"]]


def test_a_layer_raised_to_8_bits_is_stored_uint8_on_a_saturating_target_and_the_choices_stay(tmp_path):
    """At 4-bit weights a recipe raises the convolution to 8 bits: on the avx2 target it is stored as uint8 + 128
    (the target's saturation, not a second quantization), and the report still says which settings ptq chose
    (AdaRound at 4 bits) and why."""
    from ptq.run import quantize
    path = tmp_path / "conv.onnx"
    onnx.save(worst_case_conv(), str(path))
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(12):
        np.save(folder / f"s{i}.npy", np.full((64, 2, 2), 1.0 + 0.02 * i, np.float32))
    r = quantize(path, folder, holdout=4, act_range="minmax", latency_runs=0, weight_bits=4, adaround_iters=5,
                 overrides={"conv": {"bits": 8}}, target="avx2")
    assert r.report["stages"]["reduce_range"]["uint8_layers"] == 1
    assert r.report["weights"]["conv"]["bits"] == 8
    w = next(t for t in r.model.graph.initializer if t.name.startswith("conv/weight/quantized"))
    assert w.data_type == TensorProto.UINT8
    assert "adaround" in r.report["stages"]["choices"]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_nearest_resize_and_a_crop_share_their_inputs_grid_and_run_on_integers(rng, tmp_path, mode):
    """Conv → Resize ×2 → Slice (a crop) → Conv: a nearest Resize's output and the crop's take their input's
    quantizer and onnxruntime runs both on the integers (its one DequantizeLinear is the output's); a linear
    Resize, which onnxruntime runs in float whatever the grids, keeps a quantizer of its own after it."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h"], "c0", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["h", "", "sc"], ["up"], "resize", mode=mode),
             helper.make_node("Slice", ["up", "st", "en", "ax"], ["crop"], "crop"),
             helper.make_node("Conv", ["crop", "w1"], ["y"], "c1", pads=[1, 1, 1, 1])]
    inits = [init("w0", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             init("sc", np.array([1, 1, 2, 2], np.float32)), init("st", np.array([1, 1], np.int64)),
             init("en", np.array([-1, -1], np.int64)), init("ax", np.array([2, 3], np.int64)),
             init("w1", rng.normal(0, 0.3, (2, 8, 3, 3)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 2, 14, 14])], inits)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8)
    state = state_for(model, calib, reduce_range="never")
    root = state.placement.root
    assert root["crop"] == root["up"]
    assert (root["up"] == root["h"]) == (mode == "nearest")
    q = export_qdq(state)
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), o, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(o.optimized_model_filepath))
    assert (fused.count("DequantizeLinear") == 1) == (mode == "nearest")
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    y, got = run(model, {"x": x})[0], run(q, {"x": x})[0]
    assert np.corrcoef(got.ravel(), y.ravel())[0, 1] > 0.99
