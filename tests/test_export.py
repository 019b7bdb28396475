"""The exported QDQ model: what onnxruntime makes of it, and agreement with a numpy reference of the quantized
network built from the chosen encodings."""
import hashlib
import collections

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from builders import conv_bn_relu, save_npy_samples, two_inputs, zoo
from onnx import numpy_helper

from ptq.data import DataSource, model_inputs
from ptq.export import export_qdq
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import fake_quant
from ptq.run import quantize, run
from ptq.runtime import saturates_u8s8
from ptq.speed import costly_choices


def quantized_state(model, calib, config=None):
    config = config or Config(holdout=0, batch_size=4)
    state = prepare(model, config)
    src = DataSource(calib, model_inputs(model))
    return run_steps(state, Context(src), {})


def ort_run(model, feed, optimize=True, save_to=None):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    if not optimize:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to:
        o.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(None, feed)


def conv2d(x, w, b=None, pad=0):
    """Plain numpy NCHW convolution (stride 1, group 1) by im2col."""
    n, c, h, wd = x.shape
    co, ci, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    cols = np.stack([xp[:, :, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=2)  # [N,C,K,OH,OW]
    y = np.einsum("nckhw,ock->nohw", cols, w.reshape(co, ci, kh * kw).astype(np.float64))
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False)])
def test_exported_conv_net_matches_numpy_reference(rng, tmp_path, bits, symmetric):
    model = conv_bn_relu(rng, act="Clip")
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 12)
    # the integer kernels equal the reference where they do not saturate: built for this machine (target auto),
    # whose saturation 7-bit convolution weights avoid
    state = quantized_state(model, calib, Config(holdout=0, batch_size=4, weight_bits=bits, adaround=False,
                                                 weight_symmetric=symmetric,
                                                 reduce_range="always" if saturates_u8s8() else "never"))
    for layer in state.layers:  # asymmetric: the zero points are stored, and used
        z = np.asarray(state.weights[layer.name].zero_point)
        assert np.any(z != 0) != symmetric
    q = export_qdq(state)
    x = rng.normal(0, 1, (3, 3, 8, 8)).astype(np.float32)

    fm = state.model  # canonical FP32, BN folded
    g = {t.name: numpy_helper.to_array(t) for t in fm.graph.initializer}
    l1, l2 = state.layers
    act = lambda t: state.acts[state.placement.root[t]]  # noqa: E731
    xq = fake_quant(x, act(l1.x))
    w1 = fake_quant(g[l1.weight], state.weights[l1.name])
    b1 = fake_quant(g[l1.bias], _bias_enc(state, l1, act))
    h = np.clip(conv2d(xq, w1, b1, pad=1), 0, 6)
    hq = fake_quant(h.astype(np.float32), act(l1.out))
    w2 = fake_quant(g[l2.weight], state.weights[l2.name])
    y = fake_quant(conv2d(hq, w2).astype(np.float32), act(l2.out))

    sim = ort_run(q, {"x": x}, optimize=False)[0]  # float Q/DQ arithmetic
    step = float(act(l2.out).scale)
    assert np.mean(np.abs(sim - y) > 1e-3 * step) < 0.01  # equal but for float rounding at ties
    assert np.max(np.abs(sim - y)) <= step * 1.001
    fused = ort_run(q, {"x": x})[0]  # integer kernels
    assert np.max(np.abs(fused - y)) <= step * 1.001
    assert np.mean(np.abs(fused - y) < 1e-6) > 0.95


def _bias_enc(state, layer, act):
    from ptq.quant import bias_encoding
    return bias_encoding(state.weights[layer.name], act(layer.x))


def test_two_input_matmul_gemm_matches_numpy_reference(rng, tmp_path):
    model = two_inputs(rng)
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(10):
        np.savez(calib / f"s{k}.npz", a=rng.normal(0, 1, 6).astype(np.float32),
                 b=rng.normal(0, 2, 6).astype(np.float32))
    state = quantized_state(model, calib, Config(holdout=0, batch_size=3, per_channel=False, smoothquant=False))
    q = export_qdq(state)
    a, b = rng.normal(0, 1, (5, 6)).astype(np.float32), rng.normal(0, 2, (5, 6)).astype(np.float32)
    g = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    act = lambda t: state.acts[state.placement.root[t]]  # noqa: E731
    mm, gm = state.layers
    ma = fake_quant(a, act("a")) @ fake_quant(g["wa"], state.weights[mm.name])  # float out: MatMulIntegerToFloat
    gb = fake_quant(b, act("b")) @ fake_quant(g["wb"], state.weights[gm.name]).T \
        if gm.w_axis == 0 else fake_quant(b, act("b")) @ fake_quant(g["wb"], state.weights[gm.name])
    gb = fake_quant(gb + fake_quant(g["bb"], _bias_enc(state, gm, act)), act(gm.out))
    # only float ops read the MatMul's and the Add's outputs: they stay float (the Gemm's is quantized for QGemm)
    assert "ma" not in state.placement.root and "s" not in state.placement.root and gm.out in state.placement.root
    y = np.maximum((ma + gb).astype(np.float32), 0)
    sim = ort_run(q, {"a": a, "b": b}, optimize=False)[0]
    np.testing.assert_allclose(sim, y, atol=1e-5 * float(np.abs(y).max()))


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_fuses_integer_kernels(rng, tmp_path, symmetric):
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 8)
    q = export_qdq(quantized_state(model, calib, Config(holdout=0, batch_size=4, weight_symmetric=symmetric)))
    opt = tmp_path / "opt.onnx"
    ort_run(q, {"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}, save_to=opt)
    count = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert count["QLinearConv"] == 4  # conv1 (+Relu6), depthwise (+Relu), conv2, conv3
    assert count["QLinearAdd"] == 1
    assert count["QGemm"] + count["QLinearMatMul"] == 1
    assert count["Conv"] == 0 and count["Clip"] == 0 and count["Relu"] == 0
    assert count["QLinearGlobalAveragePool"] + count["QLinearAveragePool"] >= 1


@pytest.mark.parametrize("bits,target", [(4, "vnni"), (7, "vnni"), (8, "vnni"), (8, "avx2")])
def test_asymmetric_weights_are_written_at_zero_point_0_where_their_integers_fit(rng, tmp_path, bits, target):
    """s · (q − z) stored as q' = q − z with zero point 0 (what onnxruntime's fast kernels take): the written weight
    equals the asymmetric decision's value exactly; below 8 bits every layer fits, at 8 bits only one whose
    |q − z| stays within int8 (within 64 for a target whose u8 × s8 kernels saturate)."""
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 8)
    state = quantized_state(model, calib, Config(holdout=0, batch_size=4, weight_bits=bits, adaround=False,
                                                 weight_symmetric=False, reduce_range="never", target=target))
    q = export_qdq(state)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ref = {t.name: numpy_helper.to_array(t) for t in state.model.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    limit = 64 if target == "avx2" else 127
    folded = []
    for layer in state.layers:
        wenc = state.weights[layer.name]
        assert np.any(np.asarray(wenc.zero_point) != 0)  # the decision stays asymmetric
        d = dq[next(n for n in q.graph.node if n.name == layer.name).input[1]]
        qi, s, z = (inits[d.input[k]].astype(np.float64) for k in range(3))
        axis = next((a.i for a in d.attribute if a.name == "axis"), 1)
        shape = [1] * qi.ndim
        shape[axis] = -1
        written = (qi - z.reshape(shape)) * s.reshape(shape) if s.ndim else (qi - z) * s
        np.testing.assert_array_equal(written.astype(np.float32), fake_quant(ref[layer.weight], wenc))
        q_int = np.rint(ref[layer.weight] / s.reshape(shape)) if s.ndim else np.rint(ref[layer.weight] / s)
        q_int = np.clip(q_int + np.asarray(wenc.zero_point).reshape(shape if s.ndim else []), wenc.spec.qmin,
                        wenc.spec.qmax)
        fits = np.max(np.abs(q_int - np.asarray(wenc.zero_point).reshape(shape if s.ndim else []))) <= limit
        assert np.all(z == 0) == fits
        folded.append(bool(fits))
    assert all(folded) if bits < 8 else not all(folded)  # zoo's 8-bit grids: some q − z leave int8
    if bits < 8:
        assert not any("asymmetric" in k for k in costly_choices(q))


@pytest.mark.parametrize("target", ["vnni", "avx2"])
def test_weights_and_biases_are_stored_as_integers(rng, tmp_path, target):
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 8)
    q = export_qdq(quantized_state(model, calib, Config(holdout=0, batch_size=4, target=target)))
    inits = {t.name: t for t in q.graph.initializer}
    dq_inputs = [n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    kinds = collections.Counter(inits[n].data_type for n in dq_inputs)
    # five weights; all but the depthwise one's as uint8 + 128 for a target whose u8 × s8 kernels saturate
    assert kinds[onnx.TensorProto.INT8] + kinds[onnx.TensorProto.UINT8] == 5
    assert kinds[onnx.TensorProto.UINT8] == (4 if target == "avx2" else 0)
    assert kinds[onnx.TensorProto.INT32] == 4  # four biases (conv3 has none)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name in ("w1", "w2", "w3", "wd", "wg")
                   for t in q.graph.initializer)


def test_same_seed_gives_byte_identical_model(rng, tmp_path):
    model_path = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(model_path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 20)
    a, _ = run(model_path, calib, tmp_path / "a.onnx", config=Config(holdout=4, calib_size=12))
    b = quantize(model_path, calib, holdout=4, calib_size=12)
    assert (tmp_path / "a.onnx").read_bytes() == b.model.SerializeToString()
    assert a.report["model_sha256"] == hashlib.sha256(b.model.SerializeToString()).hexdigest()


def overflowing_bias_state(model, rng, tmp_path, config, shrink):
    """The pipeline state of ``model`` whose first layer's weight is ``shrink(w)`` and channel 0's bias 50."""
    state = prepare(model, config)
    for t in state.model.graph.initializer:
        if t.name == state.layers[0].weight:
            t.CopyFrom(numpy_helper.from_array(shrink(numpy_helper.to_array(t)), t.name))
        if t.name == state.layers[0].bias:
            b = numpy_helper.to_array(t).copy()
            b[0] = 50.0
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8)
    return run_steps(state, Context(DataSource(calib, model_inputs(model))), {})


def test_bias_overflow_raises_weight_scale_instead_of_clipping(rng, tmp_path):
    model = conv_bn_relu(rng)
    # channel 0 of the folded conv: tiny weights, big bias -> |b| / (s_in * s_w) >> 2^31
    state = overflowing_bias_state(model, rng, tmp_path, Config(holdout=0), lambda w: np.concatenate(
        [np.full_like(w[:1], 1e-9), w[1:]]))
    assert state.report["bias_overflow"]["channels_with_raised_weight_scale"] == {state.layers[0].name: 1}
    q = export_qdq(state)
    bias_q = next(numpy_helper.to_array(t) for t in q.graph.initializer
                  if t.data_type == onnx.TensorProto.INT32 and t.name.startswith(state.layers[0].name))
    x = rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    ref = ort_run(state.model, {"x": x})[0]
    got = ort_run(q, {"x": x})[0]
    assert np.abs(bias_q).max() < 2**31 - 1
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_4bit_weights_are_int4_at_opset_21_and_int8_below(rng, tmp_path):
    from builders import make, init
    from onnx import helper
    w = rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 6, 6), 8)
    x = rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)
    for opset, want in ((21, onnx.TensorProto.INT4), (13, onnx.TensorProto.INT8)):
        model = make([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [None, 3, 6, 6])],
                     [("y", [None, 4, 4, 4])], [init("w", w)], opset=opset)
        state = quantized_state(model, calib, Config(holdout=0, weight_bits=4, adaround=False))
        q = export_qdq(state)
        (wq,) = [t for t in q.graph.initializer if t.name.endswith("weight/quantized")]
        assert wq.data_type == want
        ints = numpy_helper.to_array(wq).astype(np.int32)
        assert ints.min() >= -8 and ints.max() <= 7
        ref = fake_quant(w, state.weights[state.layers[0].name])
        deq = ints * np.asarray(state.weights[state.layers[0].name].scale).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(deq, ref, rtol=1e-6)
        out = ort_run(q, {"x": x})[0]  # onnxruntime loads and runs it
        assert out.shape == (1, 4, 4, 4) and np.isfinite(out).all()


def test_bias_overflow_under_a_per_tensor_spec_raises_the_one_scale(rng, tmp_path):
    model = conv_bn_relu(rng)
    # every weight tiny, one big bias: the one scale must grow
    state = overflowing_bias_state(model, rng, tmp_path, Config(holdout=0, per_channel=False),
                                   lambda w: w * np.float32(1e-9))
    enc = state.weights[state.layers[0].name]
    assert state.report["bias_overflow"]["channels_with_raised_weight_scale"][state.layers[0].name] >= 1
    assert np.ndim(enc.scale) == 0 and enc.spec.axis is None  # still one scale
    x = rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    got = ort_run(export_qdq(state), {"x": x})[0]
    assert np.corrcoef(ort_run(state.model, {"x": x})[0].ravel(), got.ravel())[0, 1] > 0.99


def test_unfused_qdq_are_counted_with_the_op_beside_them():
    from onnx import TensorProto, helper

    from ptq.speed import unfused_qdq
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], "q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], "dq"),
             helper.make_node("Erf", ["d"], ["y"], "erf")]  # no integer kernel for Erf: both stay
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    assert unfused_qdq(m) == {"QuantizeLinear": 1, "DequantizeLinear": 1, "beside": {"graph input": 1, "Erf": 1}}


def test_report_has_the_speed_of_both_models(rng, tmp_path):
    model_path = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(model_path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 12)
    r = quantize(model_path, calib, holdout=4, latency_runs=3)
    sp = r.report["speed"]
    assert sp["fp32_ms"] > 0 and sp["quant_ms"] > 0 and min(sp["cpu_ms"]) > 0 and sp["runs"] == 3
    assert sp["ratio_ci"][0] <= sp["ratio"] <= sp["ratio_ci"][1]
    assert sp["unfused"]["QuantizeLinear"] >= 1  # the graph input's quantizer stays a QuantizeLinear
    assert set(sp["ops"]) == {"fp32", "quantized"}
    assert "QLinearConv" in sp["ops"]["quantized"] and "QLinearConv" not in sp["ops"]["fp32"]
    assert quantize(model_path, calib, holdout=4, latency_runs=0).report["speed"] is None


def test_the_latency_ratio_and_its_interval_by_hand():
    """log ratios 0.1, 0.3, 0.2 (n = 3): mean 0.2, s = 0.1, t(0.975, 2) = 4.303: exp(0.2 ± 4.303 · 0.1 / √3)."""
    from ptq.speed import ratio_interval, verdict
    fp = np.array([1.0, 2.0, 4.0])
    q = fp * np.exp([0.1, 0.3, 0.2])
    ratio, lo, hi = ratio_interval(fp, q)
    half = 4.302653 * 0.1 / np.sqrt(3)
    assert ratio == pytest.approx(np.exp(0.2)) and lo == pytest.approx(np.exp(0.2 - half), rel=1e-5)
    assert hi == pytest.approx(np.exp(0.2 + half), rel=1e-5)
    assert verdict({"ratio": 1.2, "ratio_ci": [0.9, 1.5]}) is None  # not resolved: no warning
    assert verdict({"ratio": 1.2, "ratio_ci": [1.05, 1.3]}) == "slower"
    assert verdict({"ratio": 0.7, "ratio_ci": [0.6, 0.8]}) == "faster"


def test_op_times_cover_the_ops_onnxruntime_runs_and_leave_no_profile(rng, tmp_path, monkeypatch):
    from ptq.speed import op_times
    monkeypatch.chdir(tmp_path)  # onnxruntime writes its profile to the working folder unless told otherwise
    model = zoo(rng)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ran = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    (tmp_path / "optimized.onnx").unlink()
    feed = {"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)}
    times = op_times(model, feed, runs=3, top=100)
    assert set(times) == ran and all(t >= 0 for t in times.values())
    top2 = op_times(model, feed, runs=3, top=2)
    assert len(top2) == 3 and "other" in top2
    assert list(tmp_path.iterdir()) == []


def test_every_written_scale_is_finite_and_normal():
    from ptq.errors import PTQError
    from ptq.export import written_scale
    from ptq.quant import Encoding, QuantSpec
    spec = QuantSpec(8, signed=True, symmetric=True, axis=0)
    floored = written_scale("w", Encoding(spec, np.array([1e-40, 0.5], np.float32), np.zeros(2, np.int32), "x"))
    assert floored[0] == np.finfo(np.float32).tiny and floored[1] == np.float32(0.5)
    for bad in (np.inf, np.nan, 0.0, -1.0):
        with pytest.raises(PTQError, match="the scale of 'w'"):
            written_scale("w", Encoding(spec, np.array([bad, 0.5], np.float32), np.zeros(2, np.int32), "x"))
