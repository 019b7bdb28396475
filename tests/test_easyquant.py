"""EasyQuant: the vectorized scale searches against a brute-force loop over the same candidates, the stage end to
end (never worse than the initial scales), INT7 storage and run-time ranges, and EasyQuant followed by AdaRound."""
import numpy as np
import onnx
import pytest
from builders import conv_bn_relu, run, save_npy_samples, zoo

from ptq.data import DataSource, model_inputs
from ptq.errors import InputError
from ptq.model import Graph
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import Encoding, QuantSpec, fake_quant
from ptq.stages.easyquant import candidates, search_act_scale, search_weight_scales


def cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return a @ b / np.sqrt((a @ a) * (b @ b))


def toy_layer(rng, o=6, d=20, r=300):
    x = rng.normal(0, 1, (r, d)).astype(np.float32) * rng.uniform(0.2, 3, d).astype(np.float32)
    w = (rng.normal(0, 1, (o, d)) * rng.uniform(0.1, 2, (o, 1))).astype(np.float32)
    w[0, 0] = 8.0  # an outlier: min-max wastes the grid, so a smaller scale wins
    b = rng.normal(0, 0.1, o).astype(np.float32)
    return x, w, b, x @ w.T + b


def wq(w, scale, bits=4):
    spec = QuantSpec(bits, signed=True, symmetric=True, axis=0 if np.ndim(scale) else None)
    return fake_quant(w, Encoding(spec, np.asarray(scale, np.float32), np.zeros(np.shape(scale), np.int32)))


def test_weight_search_matches_brute_force_per_tensor_and_per_channel(rng):
    x, w, b, t = toy_layer(rng)
    alphas = candidates(60, 0.5, 2.0)
    s0 = np.float32(np.abs(w).max() / 7)
    scale, c = search_weight_scales(x, t, w, b, s0, -8, 7, alphas)
    brute = max(cos(x @ wq(w, a * s0).T + b, t) for a in alphas)
    assert c == pytest.approx(brute, abs=1e-5)
    assert cos(x @ wq(w, scale).T + b, t) == pytest.approx(brute, abs=1e-5)
    assert c >= cos(x @ wq(w, s0).T + b, t) - 1e-6
    s0c = (np.abs(w).max(axis=1) / 7).astype(np.float32)
    scale_c, _ = search_weight_scales(x, t, w, b, s0c, -8, 7, alphas)
    for o in range(w.shape[0]):  # each channel: its own output's cosine, brute force over the same grid
        per = [cos(x @ wq(w[o:o + 1], np.float32(a * s0c[o])).T + b[o], t[:, o]) for a in alphas]
        got = cos(x @ wq(w[o:o + 1], scale_c[o]).T + b[o], t[:, o])
        assert got == pytest.approx(max(per), abs=1e-5)
    assert scale_c[0] < s0c[0]  # the outlier channel clips


@pytest.mark.parametrize("o, d", [(6, 20), (30, 8)])
def test_activation_search_matches_brute_force(rng, o, d):
    """Against forming each candidate's outputs in float64: a narrowing layer (20 → 6) and a widening one (8 → 30),
    which is scored from H = wqᵀwq instead of its outputs."""
    x, w, b, t = toy_layer(rng, o=o, d=d)
    x = np.maximum(x, 0)
    t = x @ w.T + b
    x[0, 0] = 40.0  # one outlier input sets the min-max scale
    spec = QuantSpec(4)
    s0 = np.float32(x.max() / 15)
    w_q = wq(w, np.float32(np.abs(w).max() / 127), 8)
    alphas = candidates(50, 0.2, 2.0)
    scale, c = search_act_scale(x, t, w_q, b, s0, 0, spec.qmin, spec.qmax, alphas)

    def score(s):
        return cos(fake_quant(x, Encoding(spec, np.float32(s), np.int32(0))) @ w_q.T + b, t)
    brute = max(score(np.float32(a) * s0) for a in alphas)
    assert c == pytest.approx(brute, abs=1e-5) and score(scale) == pytest.approx(brute, abs=1e-5)
    assert scale < s0 and c > score(s0)
    capped, _ = search_act_scale(x, t, w_q, b, s0, 0, spec.qmin, spec.qmax, alphas, max_scale=0.9 * s0)
    assert capped <= 0.9 * s0  # a bound (fused Relu6) caps the grid


def test_weight_search_by_moments_picks_each_channels_best_scale(rng):
    """Scored from the rows' moments (G = xᵀx, …), the weight search picks for each output channel a scale whose
    cosine, computed from the formed outputs in float64, is the best of the grid (dense with a bias, depthwise)."""
    import ptq.stages.easyquant as eq
    x, w, b, t = toy_layer(rng, o=12, d=10, r=400)
    xd = rng.normal(0, 1, (400, 6, 9)).astype(np.float32)
    wd, bd = rng.normal(0, 1, (6, 9)).astype(np.float32), rng.normal(0, 0.3, 6).astype(np.float32)
    td = np.einsum("rck,ck->rc", xd, wd) + bd
    alphas = candidates(40, 0.5, 2.0)
    for xx, tt, ww, bb, dw in ((x, t, w, b, False), (xd, td, wd, bd, True)):
        assert eq._by_moments(xx, ww, len(alphas), dw)
        s0 = (np.abs(ww).max(1) / 7).astype(np.float32)
        scale, _ = search_weight_scales(xx, tt, ww, bb, s0, -8, 7, alphas, dw)
        for o in range(ww.shape[0]):
            xo = xx[:, o] if dw else xx

            def channel_cos(s):
                return cos(xo @ wq(ww[o:o + 1], np.float32(s))[0] + bb[o], tt[:, o])
            assert channel_cos(scale[o]) == pytest.approx(max(channel_cos(a * s0[o]) for a in alphas), abs=1e-6)


def test_depthwise_search_equals_per_channel_dense(rng):
    c, k, r = 5, 9, 200
    x = rng.normal(0, 1, (r, c, k)).astype(np.float32)
    w = rng.normal(0, 1, (c, k)).astype(np.float32)
    b = np.zeros(c, np.float32)
    t = np.einsum("rck,ck->rc", x, w)
    s0 = (np.abs(w).max(1) / 7).astype(np.float32)
    alphas = candidates(20, 0.5, 2.0)
    got, _ = search_weight_scales(x, t, w, b, s0, -8, 7, alphas, depthwise=True)
    for ch in range(c):
        s, _ = search_weight_scales(x[:, ch], t[:, ch:ch + 1], w[ch:ch + 1], b[ch:ch + 1], s0[ch:ch + 1], -8, 7,
                                    alphas)
        assert got[ch] == pytest.approx(s[0])


def calib_source(tmp_path, rng, model, shape):
    return DataSource(save_npy_samples(tmp_path / "c", rng, shape, 24), model_inputs(model))


def test_stage_never_worse_than_initial_scales(rng, tmp_path):
    model = zoo(rng)
    src = calib_source(tmp_path, rng, model, (3, 16, 16))
    cfg = Config(weight_bits=4, adaround=False, cle=False, act_bits=6, easyquant=True, easyquant_steps=40,
                 batch_size=8, holdout=0).validate()
    assert cfg.steps == ["smoothquant", "weight_ranges", "activation_ranges", "easyquant", "bias_overflow"]
    state = run_steps(prepare(model, cfg), Context(src), {})
    rep = state.report["easyquant"]["layers"]
    assert set(rep) == {"conv1", "dw", "conv2", "conv3", "fc"}
    for name, r in rep.items():
        assert r["cosine_after"] >= r["cosine_before"] - 1e-9, name
    assert any(r["cosine_after"] > r["cosine_before"] + 1e-4 for r in rep.values())
    assert "act" not in rep["conv3"] or rep["conv3"]["act"] == "cat"
    assert any(w.method.endswith("+easyquant") for w in state.weights.values())


def test_int7_model_keeps_7_bit_integers(rng, tmp_path):
    from ptq_cli.main import main
    path = tmp_path / "m.onnx"
    onnx.save(zoo(rng), str(path))
    calib = save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 24)
    out = tmp_path / "q7.onnx"
    assert main(["run", str(path), "--calib", str(calib), "--weight-bits", "7", "--act-bits", "7", "--easyquant",
                 "-o", str(out), "-q"]) == 0
    q = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and "bias" not in n.input[0]:
            v = inits[n.input[0]]  # stored weights
            assert v.dtype == np.int8 and v.min() >= -64 and v.max() <= 63, n.input[0]
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            assert zp.dtype == np.uint8 and 0 <= zp.min() and zp.max() <= 127
    # at run time, on inputs far outside the calibration range, every activation integer stays in [0, 127]
    q_outs = [n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    q.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in q_outs)
    vals = run(q, {"x": (rng.normal(0, 10, (4, 3, 16, 16))).astype(np.float32)})
    assert all(v.max() <= 127 for v in vals[1:]) and max(v.max() for v in vals[1:]) == 127


def test_easyquant_then_adaround_rounds_on_easyquant_grids(rng, tmp_path):
    model = conv_bn_relu(rng, act="Clip")
    src = calib_source(tmp_path, rng, model, (3, 8, 8))
    cfg = dict(weight_bits=4, adaround=False, cle=False, batch_size=8, holdout=0, easyquant_steps=30)
    eq = run_steps(prepare(model, Config(**cfg, easyquant=True)), Context(src), {})
    both_cfg = Config(**{**cfg, "adaround": True}, easyquant=True, adaround_iters=200).validate()
    assert both_cfg.steps == ["smoothquant", "weight_ranges", "activation_ranges", "easyquant", "adaround",
                              "bias_overflow"]
    both = run_steps(prepare(model, both_cfg), Context(src), {})
    gr = Graph(both.model)
    for layer in both.layers:
        np.testing.assert_array_equal(both.weights[layer.name].scale, eq.weights[layer.name].scale)
        s = np.asarray(both.weights[layer.name].scale).reshape(-1, 1, 1, 1)
        near = np.clip(np.rint(gr.const(layer.weight) / s), -8, 7)
        assert np.all(np.abs(both.rounded[layer.name] - near) <= 1)  # AdaRound rounds up or down on EasyQuant's grid
        r = both.report["adaround"]["layers"][layer.name]
        assert r["loss_adaround"] <= r["loss_nearest"]
    assert both.acts.keys() == eq.acts.keys()
    for k in eq.acts:
        assert float(both.acts[k].scale) == float(eq.acts[k].scale)


def test_easyquant_settings_are_checked():
    with pytest.raises(InputError, match="data-free"):
        Config(easyquant=True, data_free=True).validate()
    with pytest.raises(InputError, match="easyquant"):
        Config(easyquant_range=(1.5, 2.0)).validate()
