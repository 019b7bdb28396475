"""AdaRound: the Gram-form loss against the data form, the result against nearest rounding and a brute-force
search over every rounding, determinism, and the stage end to end."""
import dataclasses
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper
from builders import conv_bn_relu, init, make, run, save_npy_samples

from ptq.data import DataSource, model_inputs
from ptq.errors import InputError
from ptq.export import export_qdq
from ptq.model import Graph, set_layer_bias
from ptq.pipeline import Config, Context, prepare, run_steps
import ptq.stages.adaround as adaround_stage
from ptq.quant import dequantize
from ptq.stages.weight_ranges import weight_quantized
from ptq.rounding import (Problem, brute_force, init_v, no_worse_than_nearest, polish, rectified_sigmoid,
                          SHUFFLE_BLOCK, solve)


def gram_problem(rng, o, d, s=0.5, mix=0.5, rows=400, qmin=-8, qmax=7):
    w = rng.normal(0, 1, (o, d))
    x = rng.normal(0, 1, (rows, d)) @ (np.eye(d) + mix * rng.normal(0, 1, (d, d)))
    p = Problem(w, s, qmin, qmax)
    g = x.T @ x
    p.gram = (g, g, g, rows)
    return p, x


def test_gram_loss_equals_data_loss(rng):
    p, x = gram_problem(rng, 3, 7)
    xq = x + rng.normal(0, 0.1, x.shape)  # the quantized network's input differs from the FP32 one
    p.gram = (xq.T @ xq, xq.T @ x, x.T @ x, len(x))
    wt = p.nearest()
    data_loss = np.mean((xq @ wt.T - x @ p.w.T) ** 2)
    loss, grad = p.loss_grad(wt)
    assert loss == pytest.approx(data_loss, rel=1e-9)
    num = np.zeros_like(wt)  # numeric gradient
    for idx in np.ndindex(wt.shape):
        e = np.zeros_like(wt)
        e[idx] = 1e-6
        num[idx] = (p.loss_grad(wt + e)[0] - p.loss_grad(wt - e)[0]) / 2e-6
    np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-8)
    rows = Problem(p.w, 0.5, -8, 7)  # the row form with an identity activation gives the same loss
    rows.rows = (xq, x @ p.w.T, np.zeros(3), -np.inf, np.inf)
    assert rows.loss_grad(wt)[0] == pytest.approx(data_loss, rel=1e-9)


def test_damping_adds_a_weight_space_term_by_hand(rng):
    p, x = gram_problem(rng, 3, 7, rows=5)  # fewer rows than weights per channel: a classifier's case
    xq = x + rng.normal(0, 0.1, x.shape)
    p.gram = (xq.T @ xq, xq.T @ x, x.T @ x, len(x))
    p.damp()
    eps = np.sum(xq**2) / len(x)  # tr(X̃ᵀX̃)/R: the mean squared norm of a row
    wt = p.nearest()
    by_hand = (np.sum((xq @ wt.T - x @ p.w.T) ** 2) + eps * np.sum((wt - p.w) ** 2)) / (len(x) * 3)
    assert p.loss_grad(wt)[0] == pytest.approx(by_hand, rel=1e-9)


def test_depthwise_gram_matches_rows(rng):
    c, k, r = 4, 9, 300
    w = rng.normal(0, 1, (c, k))
    x = rng.normal(0, 1, (r, c, k))
    p = Problem(w, 0.3, -8, 7, depthwise=True)
    g = np.einsum("rcm,rck->cmk", x, x)
    p.gram = (g, g, g, r)
    q = Problem(w, 0.3, -8, 7, depthwise=True)
    q.rows = (x, np.einsum("rck,ck->rc", x, w), np.zeros(c), -np.inf, np.inf)
    wt = p.nearest()
    assert p.loss_grad(wt)[0] == pytest.approx(q.loss_grad(wt)[0], rel=1e-9)
    np.testing.assert_allclose(p.loss_grad(wt)[1], q.loss_grad(wt)[1], rtol=1e-9)


def test_skip_error_joins_the_gram_target_by_hand(rng):
    """With a residual skip error E the Gram form is ‖X̃W̃ᵀ − (XWᵀ + E)‖², dense and depthwise."""
    p, x = gram_problem(rng, 3, 7)
    xq = x + rng.normal(0, 0.1, x.shape)
    e = rng.normal(0, 0.5, (len(x), 3))
    p.gram = (xq.T @ xq, xq.T @ x, x.T @ x, len(x))
    p.skip = (e.T @ xq, e.T @ x, np.sum(e**2, axis=0))
    wt = p.nearest()
    by_hand = np.sum((xq @ wt.T - x @ p.w.T - e) ** 2, axis=0)
    np.testing.assert_allclose(p.channel_losses(wt), by_hand, rtol=1e-9)
    assert p.loss_grad(wt)[0] == pytest.approx(by_hand.sum() / e.size, rel=1e-9)
    np.testing.assert_allclose(p.loss_grad(wt)[1], 2 * (xq @ wt.T - x @ p.w.T - e).T @ xq / e.size, rtol=1e-9)
    c, k, r = 4, 9, 300  # depthwise: each channel its own k·k inputs
    w = rng.normal(0, 1, (c, k))
    x, e = rng.normal(0, 1, (r, c, k)), rng.normal(0, 1, (r, c))
    xq = x + rng.normal(0, 0.1, x.shape)
    d = Problem(w, 0.3, -8, 7, depthwise=True)
    d.gram = (np.einsum("rcm,rck->cmk", xq, xq), np.einsum("rcm,rck->cmk", xq, x), np.einsum("rcm,rck->cmk", x, x),
              r)
    d.skip = (np.einsum("rc,rck->ck", e, xq), np.einsum("rc,rck->ck", e, x), np.sum(e**2, axis=0))
    wt = d.nearest()
    by_hand = np.sum((np.einsum("rck,ck->rc", xq, wt) - np.einsum("rck,ck->rc", x, w) - e) ** 2, axis=0)
    np.testing.assert_allclose(d.channel_losses(wt), by_hand, rtol=1e-9)


def test_centred_gram_is_the_loss_after_the_best_bias_by_hand(rng):
    """After ``center`` the Gram form equals min over δ of ‖X̃W̃ᵀ + δ − XWᵀ − E‖², reached at ``bias_shift``."""
    p, x = gram_problem(rng, 3, 7)
    xq = x + rng.normal(0.2, 0.1, x.shape)  # the quantized network's input, shifted in mean
    e = rng.normal(0.3, 0.5, (len(x), 3))
    p.gram = (xq.T @ xq, xq.T @ x, x.T @ x, len(x))
    p.skip = (e.T @ xq, e.T @ x, np.sum(e**2, axis=0))
    p.center((xq.sum(0), x.sum(0), e.sum(0)))
    wt = p.nearest()
    resid = x @ p.w.T + e - xq @ wt.T
    best = resid.mean(axis=0)  # least squares: the mean residual per channel
    np.testing.assert_allclose(p.bias_shift(wt), best, rtol=1e-9)
    np.testing.assert_allclose(p.channel_losses(wt), np.sum((resid - best) ** 2, axis=0), rtol=1e-8)


def test_bias_fit_on_a_clipped_output_matches_a_grid_search(rng):
    """Rows form with ReLU6: the Gauss-Newton bias is the best δ of a fine grid, per channel."""
    x = rng.normal(0, 1, (500, 6))
    w = rng.normal(0, 1, (4, 6))
    b = rng.normal(1, 1, 4)
    p = Problem(w, 0.5, -8, 7)
    p.rows = (x + rng.normal(0.3, 0.2, x.shape), np.clip(x @ w.T + b, 0, 6), b, 0.0, 6.0)
    wt = p.nearest()
    xs, t, *_ = p.rows
    grid = np.linspace(-3, 3, 6001)
    losses = [np.sum((np.clip(xs @ wt.T + b + d, 0, 6) - t) ** 2, axis=0) for d in grid]
    np.testing.assert_allclose(p.bias_shift(wt), grid[np.argmin(losses, axis=0)], atol=2e-3)


def test_rectified_sigmoid_initialization():
    frac = np.array([0.0, 0.25, 0.5, 0.9])
    np.testing.assert_allclose(rectified_sigmoid(init_v(frac))[1:], frac[1:], atol=1e-6)


def test_adaround_beats_nearest_on_a_small_layer(rng):
    p, _ = gram_problem(rng, 6, 24, s=0.4)
    q = solve(p, iters=1000)
    assert p.loss_grad(p.s * q)[0] < 0.8 * p.loss_grad(p.nearest())[0]
    assert np.all((q >= np.floor(p.w / p.s)) & (q <= np.floor(p.w / p.s) + 1))  # only up or down


def test_adaround_near_brute_force_optimum_on_tiny_problems():
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(6):
        p, _ = gram_problem(rng, 1, 10)
        best = min(p.loss_grad(p.s * (p.floor + np.array(b)[None]))[0] for b in itertools.product([0, 1], repeat=10))
        q = solve(p, iters=1000)
        ratios.append(p.loss_grad(p.s * q)[0] / best)
        kept, nearest = no_worse_than_nearest(p, q)  # what the stage keeps
        assert p.loss_grad(p.s * kept)[0] <= min(p.loss_grad(p.nearest())[0], p.loss_grad(p.s * q)[0]) + 1e-12
        assert nearest[0] == (p.loss_grad(p.s * q)[0] > p.loss_grad(p.nearest())[0])
    assert max(ratios) <= 1.45 and np.median(ratios) <= 1.1, ratios


@pytest.mark.parametrize("inputs,symmetric", [("fp32", True), ("quantized", True), ("quantized", False)])
def test_adaround_stage_is_deterministic_and_on_grid(rng, tmp_path, inputs, symmetric):
    model = conv_bn_relu(rng, act="Clip")
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 16)
    cfg = dict(weight_bits=4, adaround=True, adaround_iters=200, holdout=0, batch_size=8, adaround_inputs=inputs,
               weight_symmetric=symmetric, cle=False)  # the FP32 weights stay as they are
    states = [run_steps(prepare(model, Config(**cfg)), Context(DataSource(calib, model_inputs(model))), {})
              for _ in range(2)]
    gr = Graph(prepare(model, Config(**cfg)).model)  # canonical (BN folded), before any step
    for layer in states[0].layers:
        qa, qb = states[0].rounded[layer.name], states[1].rounded[layer.name]
        np.testing.assert_array_equal(qa, qb)
        enc = states[0].weights[layer.name]
        assert qa.min() >= enc.spec.qmin and qa.max() <= enc.spec.qmax
        zp = np.asarray(enc.zero_point).reshape(-1, 1, 1, 1)
        assert np.any(zp != 0) != symmetric
        near = np.clip(np.rint(gr.const(layer.weight) / np.asarray(enc.scale).reshape(-1, 1, 1, 1)) + zp, -8, 7)
        assert np.all(np.abs(qa - near) <= 1)  # only up or down
        np.testing.assert_array_equal(Graph(states[0].model).const(layer.weight), gr.const(layer.weight))  # FP32 kept
        rep = states[0].report["adaround"]["layers"][layer.name]
        assert rep["loss_adaround"] <= rep["loss_nearest"]
    a, b = (export_qdq(s).SerializeToString() for s in states)
    assert a == b
    exported = {t.name: onnx.numpy_helper.to_array(t) for t in export_qdq(states[0]).graph.initializer}
    zp = np.asarray(states[0].weights["conv1"].zero_point).reshape(-1, 1, 1, 1)  # asymmetric: written at zero point 0
    np.testing.assert_array_equal(exported["conv1/weight/quantized"], states[0].rounded["conv1"] - zp)


def depthwise_gram_problem(rng, c=5, k=9, rows=200):
    w = rng.normal(0, 1, (c, k))
    x = rng.normal(0, 1, (rows, c, k))
    xq = x + rng.normal(0, 0.2, x.shape)
    p = Problem(w, rng.uniform(0.2, 0.5, c), -8, 7, depthwise=True)
    p.gram = (np.einsum("rcm,rck->cmk", xq, xq), np.einsum("rcm,rck->cmk", xq, x), np.einsum("rcm,rck->cmk", x, x),
              rows)
    return p


def channel_losses(p, q):
    """Each channel's loss on its own (the depthwise problem is separable)."""
    g, c, gff, _ = p.gram
    wt = p.s * q
    return (np.einsum("cm,cmk,ck->c", wt, g, wt) - 2 * np.einsum("cm,ckm,ck->c", p.w, c, wt)
            + np.einsum("cm,cmk,ck->c", p.w, gff, p.w))


def test_depthwise_brute_force_is_the_exact_optimum(rng):
    p = depthwise_gram_problem(rng, k=6)
    q = brute_force(p)
    got = channel_losses(p, q)
    for ch in range(p.w.shape[0]):  # an independent search: every rounding of every channel, one at a time
        best = min(channel_losses(p, np.clip(p.floor + np.array(b)[None], -8, 7))[ch]
                   for b in itertools.product([0, 1], repeat=6))
        assert got[ch] == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert p.loss_grad(p.s * q)[0] <= p.loss_grad(p.nearest())[0]


def test_polish_never_raises_the_loss(rng):
    for p in (gram_problem(rng, 4, 12)[0], depthwise_gram_problem(rng)):
        near = np.clip(np.rint(p.w / p.s), p.qmin, p.qmax)
        q = polish(p, near)
        assert p.loss_grad(p.s * q)[0] <= p.loss_grad(p.s * near)[0] + 1e-12
        assert np.all((q >= np.clip(p.floor, -8, 7)) & (q <= np.clip(p.floor + 1, -8, 7)))  # up or down


def test_row_order_does_not_change_the_loss(rng):
    """Rows are shuffled once for contiguous mini-batches; the full loss and gradient do not depend on it."""
    w = rng.normal(0, 1, (3, 7))
    x = rng.normal(0, 1, (50, 7))
    a, b = Problem(w, 0.4, -8, 7), Problem(w, 0.4, -8, 7)
    t = np.clip(x @ w.T + 0.1, 0, 6)
    a.rows = (x, t, np.full(3, 0.1), 0.0, 6.0)
    b.rows = (x[::-1], t[::-1], np.full(3, 0.1), 0.0, 6.0)
    la, ga = a.loss_grad(a.nearest())
    lb, gb = b.loss_grad(b.nearest())
    assert la == pytest.approx(lb, rel=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10)
    y = np.clip(x @ a.nearest().T + 0.1, 0, 6)  # the loss written out by hand
    assert la == pytest.approx(np.mean((y - t) ** 2), rel=1e-12)


def test_depthwise_rows_are_one_shuffle_for_every_channel(rng):
    """Depthwise rows are stored channel-major and shuffled once (copied a block of channels at a time): every
    channel, and the targets, see the same permutation of the rows."""
    r, c, k = 60, 2 * SHUFFLE_BLOCK + 6, 9  # more than one block of channels, the last one partial
    x, t = rng.normal(0, 1, (r, c, k)), rng.normal(0, 1, (r, c))
    p = Problem(rng.normal(0, 1, (c, k)), 0.3, -8, 7, depthwise=True)
    p.rows = (x, t, np.zeros(c), 0.0, 6.0)
    xs, ts = p.rows[:2]
    assert xs.shape == (c, r, k) and xs.flags.c_contiguous
    order = [int(np.flatnonzero(x[:, 0, 0] == v)[0]) for v in xs[0, :, 0]]
    assert sorted(order) == list(range(r)) and order != list(range(r))
    np.testing.assert_array_equal(xs, x[order].transpose(1, 0, 2))
    np.testing.assert_array_equal(ts, t[order].T)


@pytest.mark.parametrize("bad", [dict(adaround_iters=0), dict(adaround_batch=0),
                                 dict(adaround_lambda=-1.0), dict(adaround_inputs="float")])
def test_adaround_settings_are_checked(bad):
    with pytest.raises(InputError, match="adaround"):
        Config(adaround=True, **bad).validate()


def test_adaround_cli_flags_reach_the_report(rng, tmp_path):
    from ptq_cli.main import main
    model = conv_bn_relu(rng, act="Clip")
    onnx.save(model, tmp_path / "m.onnx")
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 8)
    out = tmp_path / "q.onnx"
    code = main(["run", str(tmp_path / "m.onnx"), "--calib", str(calib), "-o", str(out), "-q",
                 "--weight-bits", "4", "--adaround", "--adaround-iters", "50",
                 "--adaround-batch", "32", "--no-adaround-scale-search", "--no-adaround-bias"])
    assert code == 0
    import json
    rep = json.loads(out.with_name("q.report.json").read_text())
    assert rep["settings"]["adaround_batch"] == 32
    assert rep["settings"]["adaround_scale_search"] is False
    assert rep["settings"]["adaround_bias"] is False
    assert all(v["scale_vs_range_setting"] == 1.0 for v in rep["stages"]["adaround"]["layers"].values())
    assert "## AdaRound" in out.with_name("q.report.md").read_text()
    bad = main(["run", str(tmp_path / "m.onnx"), "--calib", str(calib), "-o",
                str(tmp_path / "r.onnx"), "--adaround", "--adaround-iters", "0"])
    assert bad == 2 and not (tmp_path / "r.onnx").exists()


def test_activation_ranges_follow_the_rounded_network(rng, tmp_path):
    """After AdaRound the activation ranges are those of the network that runs, with the rounded weights (white
    paper Fig. 8: AdaRound before activation ranges), checked against onnxruntime's outputs of that network."""
    import onnxruntime as ort

    from builders import zoo
    from ptq.model import truncate
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 16)
    cfg = Config(weight_bits=3, adaround=True, adaround_iters=100, act_range="minmax", logits_range="minmax",
                 holdout=0, batch_size=4)
    src = DataSource(calib, model_inputs(model))
    st = run_steps(prepare(model, cfg), Context(src), {})
    ran = onnx.ModelProto.FromString(st.model.SerializeToString())
    gr = Graph(st.model)
    for layer in st.layers:  # the rounded weights, by hand from AdaRound's integers
        scale = np.asarray(st.weights[layer.name].scale, np.float32)
        w = st.rounded[layer.name] * (scale.reshape(-1, *[1] * (gr.const(layer.weight).ndim - 1))
                                      if scale.ndim else scale)
        ran.graph.initializer.remove(next(t for t in ran.graph.initializer if t.name == layer.weight))
        ran.graph.initializer.append(onnx.numpy_helper.from_array(w.astype(np.float32), layer.weight))
        if layer.name in st.biases:  # the re-fitted bias: a decision, not part of the FP32 reference
            set_layer_bias(ran, layer.name, st.biases[layer.name])
    roots = [r for r in st.acts if r not in [i.name for i in model.graph.input]]
    sess = ort.InferenceSession(truncate(ran, roots).SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(roots, feed) for _, feed in src.batches(4)]
    for k, r in enumerate(roots):
        assert st.acts[r].stats["observed_min"] == pytest.approx(min(o[k].min() for o in outs), abs=1e-5)
        assert st.acts[r].stats["observed_max"] == pytest.approx(max(o[k].max() for o in outs), abs=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_scale_search_picks_the_grid_with_least_output_error(rng, per_channel):
    """A kernel with one dominant tap per channel (as in EfficientNet's first depthwise layer), starting from a
    grid that clips it (as weight-space MSE may): the search compares each candidate grid by the output error of
    nearest rounding, computed here by hand from the rows (ReLU6 included), and widens the grid."""
    from ptq.quant import QuantSpec
    from ptq.rounding import search_scale
    c, k, r = 6, 9, 500
    w = rng.normal(0, 0.15, (c, k))
    w[:, 4] = rng.uniform(1.0, 2.0, c)  # the center tap dominates
    x = rng.normal(0.5, 1, (r, c, k))
    t = np.clip(np.einsum("rck,ck->rc", x, w) + 0.3, 0, 6)
    start = 0.45 * (np.abs(w).max(axis=1) / 7 if per_channel else np.abs(w).max() / 7)
    p = Problem(w, start, -8, 7, depthwise=True)
    p.rows = (x, t, np.full(c, 0.3), 0.0, 6.0)

    def by_hand(scale):  # [C] output error of nearest rounding on the grid
        sc = np.reshape(scale, (-1, 1)) if per_channel else scale
        wt = sc * np.clip(np.rint(w / sc), -8, 7)
        return np.sum((np.clip(np.einsum("rck,ck->rc", x, wt) + 0.3, 0, 6) - t) ** 2, axis=0)
    chosen, zp = search_scale(p, QuantSpec(4, signed=True, symmetric=True, axis=0 if per_channel else None))
    assert np.all(zp == 0)
    fractions = np.linspace(0.4, 1.0, 13)
    if per_channel:
        cands = [start] + [f * np.abs(w).max(axis=1) / 7 for f in fractions]
        errs = np.stack([by_hand(np.float32(s).astype(np.float64)) for s in cands])  # [M, C]
        best = np.min(errs, axis=0)
        np.testing.assert_allclose(by_hand(chosen.astype(np.float64)), best, rtol=1e-5)
        assert np.all(by_hand(chosen.astype(np.float64)) < 0.5 * by_hand(start))
        assert np.all(chosen > 1.5 * start)  # clipping the dominant tap cost more than the finer grid saved
    else:
        cands = [start] + [f * np.abs(w).max() / 7 for f in fractions]
        errs = [by_hand(float(np.float32(s))).sum() for s in cands]
        assert by_hand(float(chosen)).sum() == pytest.approx(min(errs), rel=1e-6)
        assert chosen > 1.5 * start


def conv_residual(rng):
    """x → conv1 → c1; conv2(c1) + c1 → y: (the model, conv1's weight)."""
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    model = make([helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", ["c1", "w2"], ["c2"], "conv2"),
                  helper.make_node("Add", ["c2", "c1"], ["y"], "add")],
                 [("x", [None, 3, 8, 8])], [("y", [None, 8, 8, 8])], [init("w1", w1), init("w2", w2)])
    return model, w1


def test_residual_skip_error_is_the_quantized_skip_by_onnxruntime(rng, tmp_path, monkeypatch):
    """x → conv1 → c1; conv2(c1) + c1 → y. conv2's target includes E = c1 − c̃1 (c̃1: conv1 with its AdaRounded
    weights): its ‖E‖² and Eᵀ X̃ must equal onnxruntime's c1 of both networks over every position."""
    model, w1 = conv_residual(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 12)
    seen = []
    keep = adaround_stage.no_worse_than_nearest

    def record(problem, q):
        seen.append(problem)
        return keep(problem, q)
    monkeypatch.setattr(adaround_stage, "no_worse_than_nearest", record)
    cfg = Config(weight_bits=3, adaround=True, adaround_iters=50, holdout=0, batch_size=5, adaround_bias=False)
    state = run_steps(prepare(model, cfg), Context(DataSource(calib, model_inputs(model))), {})
    assert [state.report["adaround"]["layers"][n]["skip_error"] for n in ("conv1", "conv2")] == [False, True]

    def c1_of(w):
        conv = make([helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1])],
                    [("x", [None, 3, 8, 8])], [("c1", [None, 8, 8, 8])], [init("w1", w)])
        return run(conv, {"x": x})[0].transpose(0, 2, 3, 1).reshape(-1, 8).astype(np.float64)  # [positions, C]
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))])
    xq = c1_of(dequantize(state.rounded["conv1"], state.weights["conv1"]).astype(np.float32))
    e = c1_of(w1) - xq
    p = seen[1]
    np.testing.assert_allclose(p.skip[2], np.sum(e**2, axis=0), rtol=1e-4)
    np.testing.assert_allclose(p.skip[0], e.T @ xq, rtol=1e-4, atol=1e-6)


def test_quantized_acts_inputs_carry_the_activation_quantizer_by_hand(rng, tmp_path, monkeypatch):
    """x → conv1 → c1; conv2(c1) + c1 → y, 4-bit activations. With adaround_inputs "quantized_acts" the activation
    ranges are set first, and conv2's x̃ (its input, and the quantized skip) is c̃1, conv1 with its AdaRounded
    weights by onnxruntime on the quantized x, through c1's quantizer by hand: s · (clip(rint(c̃1 / s) + z, q_min,
    q_max) − z)."""
    model, _ = conv_residual(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 12)
    seen = {}
    collect = adaround_stage._collect

    def record(state, gr, group, fp_batches, q_batches, *rest):
        seen[group[0].name] = q = list(q_batches) if q_batches is not None else None
        return collect(state, gr, group, fp_batches, iter(q), *rest)
    monkeypatch.setattr(adaround_stage, "_collect", record)
    cfg = Config(weight_bits=4, act_bits=4, adaround=True, adaround_iters=50, holdout=0, batch_size=12,
                 adaround_bias=False, block_recon=False, ends_8bit=False, cle=False)
    assert cfg.adaround_inputs is None
    src = DataSource(calib, model_inputs(model))
    state = run_steps(prepare(model, cfg), Context(src), {})
    steps = state.config.steps
    assert state.config.adaround_inputs == "quantized_acts" and "adaround_inputs" in state.config.choices
    assert steps.index("activation_ranges") < steps.index("adaround")
    def fake_quant(v, t):  # t's activation quantizer, by hand
        enc = state.acts[state.placement.root[t]]
        s, z = float(enc.scale), float(enc.zero_point)
        return s * (np.clip(np.rint(v / s) + z, enc.spec.qmin, enc.spec.qmax) - z), s
    x = np.concatenate([feed["x"] for _, feed in src.batches(12)])
    conv = make([helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1])],
                [("x", [None, 3, 8, 8])], [("c1", [None, 8, 8, 8])],
                [init("w1", dequantize(state.rounded["conv1"], state.weights["conv1"]).astype(np.float32))])
    c1 = run(conv, {"x": fake_quant(x, "x")[0].astype(np.float32)})[0].astype(np.float64)
    want, s = fake_quant(c1, "c1")
    got = np.concatenate([b["c1"] for b in seen["conv2"]])
    assert got.shape == want.shape and np.abs(want - c1).max() > 0.1 * s  # the quantizer changes c̃1
    np.testing.assert_allclose(got, want, atol=1e-5 * s)


def test_bias_refit_restores_the_mean_output_by_onnxruntime(rng, tmp_path):
    """The last layer has no activation: after AdaRound re-fits its bias, the weight-quantized network's mean
    output per channel over the calibration set equals the FP32 network's (onnxruntime, every position)."""
    model = conv_bn_relu(rng, act="Clip")
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 12)
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))])
    means = {}
    for refit in (False, True):
        cfg = Config(weight_bits=3, adaround=True, adaround_iters=50, holdout=0, batch_size=5, adaround_bias=refit)
        state = run_steps(prepare(model, cfg), Context(DataSource(calib, model_inputs(model))), {})
        means[refit] = run(weight_quantized(state), {"x": x})[0].mean(axis=(0, 2, 3))
    fp = run(model, {"x": x})[0].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means[True], fp, atol=1e-5)
    assert np.max(np.abs(means[False] - fp)) > 1e-3  # without the re-fit the mean is off


def test_depthwise_brute_force_respects_an_asymmetric_grid(rng):
    """With a zero point z per channel the integers q − z live in [q_min − z, q_max − z]: a grid near one end binds
    the roundings; brute force, nearest rounding and Adam stay inside it and brute force is still the optimum."""
    p = depthwise_gram_problem(rng, c=4, k=6)
    zp = np.array([-8, -3, 2, 7])  # bounds of q − z: [0, 15], [-5, 10], [-10, 5], [-15, 0]
    p.rescale(p.s[:, 0] * 0.5, zp)
    lo, hi = (-8 - zp)[:, None], (7 - zp)[:, None]
    q = brute_force(p)
    assert np.all((q >= lo) & (q <= hi))
    got = channel_losses(p, q)
    for ch in range(4):
        best = min(channel_losses(p, np.clip(p.floor + np.array(b)[None], lo, hi))[ch]
                   for b in itertools.product([0, 1], repeat=6))
        assert got[ch] == pytest.approx(best, rel=1e-9, abs=1e-9)
    np.testing.assert_array_equal(p.nearest_q(), np.clip(np.rint(p.w / p.s), lo, hi))
    assert np.any(p.nearest_q() != np.rint(p.w / p.s))  # the grid binds somewhere
    qa = solve(p, iters=100)
    assert np.all((qa >= lo) & (qa <= hi))


@pytest.mark.parametrize("per_channel", [True, False])
def test_asymmetric_scale_search_by_hand(rng, per_channel):
    """Asymmetric grids: the candidates are f·[min W, max W] with the zero point of ptq.quant's
    encoding_from_range; the chosen (scale, zero point) gives the least output error among them, by hand."""
    from ptq.quant import QuantSpec, encoding_from_range
    from ptq.rounding import search_scale
    c, k, r = 5, 9, 400
    w = rng.normal(0.1, 0.1, (c, k))
    w[:, 4] = rng.uniform(1.0, 2.0, c)  # one-signed, skewed kernels: half a symmetric grid would go unused
    x = rng.normal(0.5, 1, (r, c, k))
    t = np.clip(np.einsum("rck,ck->rc", x, w), 0, 6)
    spec = QuantSpec(4, signed=True, symmetric=False)
    lo, hi = (w.min(axis=1), w.max(axis=1)) if per_channel else (w.min(), w.max())
    start = encoding_from_range(spec, 0.5 * lo, 0.5 * hi)
    p = Problem(w, start.scale, -8, 7, depthwise=True, zero_point=start.zero_point)
    p.rows = (x, t, np.zeros(c), 0.0, 6.0)

    def by_hand(scale, zp):  # [C] output error of nearest rounding on the grid
        sc, z = (np.reshape(scale, (-1, 1)), np.reshape(zp, (-1, 1))) if per_channel else (scale, zp)
        wt = sc * (np.clip(np.rint(w / sc) + z, -8, 7) - z)
        return np.sum((np.clip(np.einsum("rck,ck->rc", x, wt), 0, 6) - t) ** 2, axis=0)
    scale, zp = search_scale(p, spec.with_(axis=0 if per_channel else None))
    cands = [start] + [encoding_from_range(spec, f * lo, f * hi) for f in np.linspace(0.4, 1.0, 13)]
    errs = np.stack([by_hand(e.scale.astype(np.float64), e.zero_point) for e in cands])  # [M, C]
    got = by_hand(np.asarray(scale, np.float64), zp)
    if per_channel:
        np.testing.assert_allclose(got, errs.min(axis=0), rtol=1e-5)
        assert np.all(zp < -4)  # mostly positive kernels: the zero point sits near q_min
    else:
        assert got.sum() == pytest.approx(errs.sum(axis=1).min(), rel=1e-5)
    assert np.all(got.sum() < 0.5 * errs[0].sum())


def test_adaround_and_cle_are_chosen_for_four_bit_weights_and_said_so(rng):
    cfg = Config(weight_bits=4).validate()
    assert cfg.adaround and "adaround" in cfg.steps and "--no-adaround" in cfg.choices["adaround"]
    assert cfg.cle and "cle" in cfg.steps and "--no-cle" in cfg.choices["cle"]
    assert cfg.weight_symmetric is True and "--weight-asymmetric" in cfg.choices["weight_symmetric"]
    assert cfg.symmetric_weights(4) is True and cfg.symmetric_weights(8) is True
    asym = dataclasses.replace(cfg, weight_symmetric=False)  # the asymmetric candidate ptq.quantize compares
    asym.choices = dict(cfg.choices)
    assert asym.symmetric_weights(4) is False and asym.symmetric_weights(8) is True  # a layer raised to 8 bits
    assert Config(weight_bits=4).validate().validate().choices == cfg.choices  # validating again keeps the reason
    for kw in (dict(weight_bits=5), dict(weight_bits=4, weight_symmetric=False), dict(weight_bits=4, easyquant=True),
               dict(weight_bits=4, data_free=True)):  # wider weights, the user's setting, EasyQuant, data-free
        c = Config(**kw).validate()
        assert "weight_symmetric" not in c.choices and c.symmetric_weights(8) is c.weight_symmetric
    for kw in (dict(weight_bits=4, adaround=False), dict(weight_bits=5), dict(weight_bits=4, data_free=True)):
        c = Config(**kw).validate()
        assert not c.adaround and "adaround" not in c.choices
    for kw, on in ((dict(weight_bits=4, cle=False), False), (dict(weight_bits=5), False),
                   (dict(weight_bits=4, data_free=True), True), (dict(weight_bits=8, cle=True), True)):
        c = Config(**kw).validate()
        assert c.cle is on and "cle" not in c.choices  # set by the user, or by --data-free: nothing to explain
    state = prepare(conv_bn_relu(rng), Config(weight_bits=3))
    assert state.report["choices"] == {k: state.config.choices[k] for k in ("adaround", "cle", "weight_symmetric")}
    from ptq.run import make_config  # the CLI's path: a validated Config with settings over it
    assert make_config(cfg, holdout=0).choices == cfg.choices
    assert make_config(cfg, adaround=False, cle=False, weight_symmetric=True).choices == {}
