"""Block reconstruction: the torch evaluation of a graph segment against onnxruntime, the blocks found by hand,
and the stage end to end (its integers on the grid, its result no worse than nearest rounding in onnxruntime, the
learned activation steps written to the model). Skipped without torch, the optional recon extra (``make
recon``); the error without it is tested in test_bad_input."""
import weakref

import numpy as np
import pytest
from onnx import helper
from builders import init, make, run, save_npy_samples

from ptq.blocks import cut_points, find_blocks
from ptq.data import DataSource, model_inputs
from ptq.errors import InputError
pytest.importorskip("torch", reason="block reconstruction needs the recon extra (make recon)")
from ptq.export import export_qdq
from ptq.model import Graph
from ptq.patterns import find_layers
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.report import to_markdown
import ptq.stages.block_reconstruction as block_reconstruction
from ptq.stages.block_reconstruction import dsq_round, fisher_weights, step_samples
from ptq.torch_graph import TorchSegment, autograd_bytes, unsupported

import torch  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end (make test-fast leaves it out)


def many_ops(rng):
    """Conv (asymmetric pads, stride 2, groups) → HardSwish → Clip → Add → GlobalAveragePool → Reshape by a
    Shape / Gather chain → Gemm → LayerNormalization → MatMul → Softmax, and a Concat / Transpose branch."""
    f = np.float32
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[0, 1, 1, 0], strides=[2, 2]),
        helper.make_node("HardSwish", ["c1"], ["h1"], "hs"),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], "dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], "clip"),
        helper.make_node("Add", ["r2", "h1"], ["s"], "add"),
        helper.make_node("Concat", ["s", "h1"], ["cat"], "cat", axis=1),
        helper.make_node("Transpose", ["cat"], ["tr"], "tr", perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["tr"], ["side"], "rm", axes=[1, 2], keepdims=0),
        helper.make_node("GlobalAveragePool", ["s"], ["gap"], "gap"),
        helper.make_node("Shape", ["x"], ["shp"], "shape"),
        helper.make_node("Gather", ["shp", "zero"], ["n"], "gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], "unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], "cat_shape", axis=0),
        helper.make_node("Reshape", ["gap", "target"], ["flat"], "reshape"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["g"], "gemm", transB=1),
        helper.make_node("LayerNormalization", ["g", "gamma", "beta"], ["ln"], "ln", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "wm"], ["m"], "matmul"),
        helper.make_node("Softmax", ["m"], ["y"], "softmax", axis=-1),
    ]
    inits = [init("w1", rng.normal(0, .4, (4, 3, 3, 3)).astype(f)), init("b1", rng.normal(0, .1, 4).astype(f)),
             init("w2", rng.normal(0, .4, (4, 1, 3, 3)).astype(f)), init("lo", f(0)), init("hi", f(1.5)),
             init("zero", np.int64(0)), init("ax0", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64)), init("wg", rng.normal(0, .5, (6, 4)).astype(f)),
             init("bg", rng.normal(0, .1, 6).astype(f)), init("gamma", rng.uniform(.5, 1.5, 6).astype(f)),
             init("beta", rng.normal(0, .1, 6).astype(f)), init("wm", rng.normal(0, .5, (6, 5)).astype(f))]
    return make(nodes, [("x", [None, 3, 9, 9])], [("y", [None, 5]), ("side", [None, 8])], inits, opset=17)


def test_torch_segment_computes_what_onnxruntime_computes(rng):
    model = many_ops(rng)
    x = rng.normal(0, 1, (3, 3, 9, 9)).astype(np.float32)
    gr = Graph(model)
    env = TorchSegment(model.graph.node, gr.const).run({"x": torch.from_numpy(x)})
    for name, want in zip(["y", "side"], run(model, {"x": x})):
        np.testing.assert_allclose(env[name].numpy(), want, rtol=1e-5, atol=1e-6)
    made, most = {}, [0]

    def watch(name, v):  # a weak reference to every tensor the nodes write, and the most alive at once
        made[name] = weakref.ref(v)
        most[0] = max(most[0], sum(ref() is not None for ref in made.values()))
        return v
    with torch.no_grad():
        kept = TorchSegment(model.graph.node, gr.const).run({"x": torch.from_numpy(x)}, act=watch, keep=["y"])
    assert list(kept) == ["y"] and torch.equal(kept["y"], env["y"])
    alive = sorted(name for name, ref in made.items() if ref() is not None)
    assert alive == ["y"] and len(made) == 18
    assert most[0] == 4  # at most 4 of the 18 alive at once (without dropping: all 18 by the end)


def upsampling_ops(rng, resize_kw=None):
    """Conv → BatchNormalization → ConvTranspose (stride 2, pads 1, output_padding 1) → Resize by scales (the
    channels too), then Resize to sizes (nearest, asymmetric, floor: a detector's FPN, as PP-OCR's DB detector has
    them)."""
    f = np.float32
    kind = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    kind.update(resize_kw or {})
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"], "bn", epsilon=1e-3),
        helper.make_node("ConvTranspose", ["n", "wt", "bt"], ["u"], "up", strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("Resize", ["u", "", "scales"], ["r"], "resize", **kind),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["y"], "resize_to", **kind),
    ]
    inits = [init("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(f)), init("b", rng.normal(0, 0.1, 4).astype(f)),
             init("g", rng.uniform(0.5, 1.5, 4).astype(f)), init("beta", rng.normal(0, 0.1, 4).astype(f)),
             init("mean", rng.normal(0, 0.2, 4).astype(f)), init("var", rng.uniform(0.5, 2, 4).astype(f)),
             init("wt", rng.normal(0, 0.3, (4, 2, 3, 3)).astype(f)), init("bt", rng.normal(0, 0.1, 2).astype(f)),
             init("scales", np.array([1, 1.5, 2, 3], f)), init("sizes", np.array([3, 3, 50, 70], np.int64))]
    return make(nodes, [("x", [3, 3, 6, 5])], [("y", [3, 3, 50, 70])], inits, opset=13)


def test_torch_segment_upsamples_as_onnxruntime_does(rng):
    model = upsampling_ops(rng)
    x = rng.normal(0, 1, (3, 3, 6, 5)).astype(np.float32)
    env = TorchSegment(model.graph.node, Graph(model).const).run({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(env["y"].numpy(), run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_torch_segment_slices_as_onnxruntime_does(rng):
    """Slice by inputs: negative indices, ends past the axis, steps of 2 and −1 (a reversal), a computed end (a
    text recognizer slices its sequence by a Shape); and an opset-9 Slice by attributes."""
    f, i64 = np.float32, np.int64
    nodes = [helper.make_node("Shape", ["x"], ["shp"], "shape"),
             helper.make_node("Slice", ["shp", "two", "three"], ["w"], "width"),
             helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["a"], "slice"),
             helper.make_node("Slice", ["a", "zero", "w", "three"], ["y"], "by_shape")]
    inits = [init("two", np.array([2], i64)), init("three", np.array([3], i64)), init("zero", np.array([0], i64)),
             init("starts", np.array([-1, 1, 10], i64)), init("ends", np.array([-100, 100, -1], i64)),
             init("axes", np.array([1, 2, -1], i64)), init("steps", np.array([-1, 2, 1], i64))]
    model = make(nodes, [("x", [2, 4, 7, 12])], [("y", [2, 4, None, None])], inits, opset=13)
    x = rng.normal(0, 1, (2, 4, 7, 12)).astype(f)
    env = TorchSegment(model.graph.node, Graph(model).const).run({"x": torch.from_numpy(x)})
    want = run(model, {"x": x})[0]
    assert want.shape == (2, 4, 3, 1)
    np.testing.assert_array_equal(env["y"].numpy(), want)
    old = make([helper.make_node("Slice", ["x"], ["y"], "slice", starts=[1, -3], ends=[3, 1000], axes=[2, 3])],
               [("x", [2, 4, 7, 12])], [("y", [2, 4, None, None])], [], opset=9)
    env = TorchSegment(old.graph.node, Graph(old).const).run({"x": torch.from_numpy(x)})
    np.testing.assert_array_equal(env["y"].numpy(), run(old, {"x": x})[0])


def test_torch_segment_moves_depth_and_space_as_onnxruntime_does(rng):
    """DepthToSpace in both modes (CRD: ptq's sub-pixel ConvTranspose) and SpaceToDepth, exactly."""
    nodes = [helper.make_node("DepthToSpace", ["x"], ["crd"], "crd", blocksize=2, mode="CRD"),
             helper.make_node("DepthToSpace", ["x"], ["dcr"], "dcr", blocksize=2, mode="DCR"),
             helper.make_node("SpaceToDepth", ["crd"], ["back"], "s2d", blocksize=2),
             helper.make_node("Add", ["crd", "dcr"], ["y"], "sum")]
    model = make(nodes, [("x", [2, 12, 3, 5])], [("y", [2, 3, 6, 10]), ("back", [2, 12, 3, 5])], [], opset=13)
    x = rng.normal(0, 1, (2, 12, 3, 5)).astype(np.float32)
    env = TorchSegment(model.graph.node, Graph(model).const).run({"x": torch.from_numpy(x)})
    for name, want in zip(("y", "back"), run(model, {"x": x})):
        np.testing.assert_array_equal(env[name].numpy(), want)


def test_other_resize_kinds_are_refused_by_name(rng):
    model = upsampling_ops(rng, dict(mode="linear", coordinate_transformation_mode="half_pixel"))
    assert unsupported(model.graph.node) == ["Resize(linear, half_pixel)"]
    with pytest.raises(InputError, match=r"Resize\(linear, half_pixel\)"):
        TorchSegment(model.graph.node, Graph(model).const)


def residual_chain(rng, hw=8):
    """stem Conv+Relu → [Conv+Relu → Conv, + skip] → Conv+Relu → Conv+Relu → GlobalAveragePool → Flatten → Gemm"""
    f = np.float32
    c = 6
    w = {k: rng.normal(0, 0.35, shape).astype(f) for k, shape in
         [("ws", (c, 3, 3, 3)), ("wa", (c, c, 3, 3)), ("wb", (c, c, 1, 1)), ("wc", (c, c, 1, 1)),
          ("wd", (c, c, 3, 3)), ("wf", (4, c))]}
    nodes = [helper.make_node("Conv", ["x", "ws"], ["s0"], "stem", pads=[1] * 4),
             helper.make_node("Relu", ["s0"], ["s"], "stem_relu"),
             helper.make_node("Conv", ["s", "wa"], ["a0"], "conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["a0"], ["a"], "relu_a"),
             helper.make_node("Conv", ["a", "wb"], ["b"], "conv_b"),
             helper.make_node("Add", ["b", "s"], ["r"], "add"),
             helper.make_node("Conv", ["r", "wc"], ["c0"], "conv_c"),
             helper.make_node("Relu", ["c0"], ["cc"], "relu_c"),
             helper.make_node("Conv", ["cc", "wd"], ["d0"], "conv_d", pads=[1] * 4),
             helper.make_node("Relu", ["d0"], ["d"], "relu_d"),
             helper.make_node("GlobalAveragePool", ["d"], ["gap"], "gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
             helper.make_node("Gemm", ["flat", "wf"], ["y"], "fc", transB=1)]
    h, w_ = (hw, hw) if np.isscalar(hw) else hw
    return make(nodes, [("x", [None, 3, h, w_])], [("y", [None, 4])], [init(k, v) for k, v in w.items()])


def test_blocks_are_cut_where_one_tensor_carries_everything(rng):
    model = residual_chain(rng)
    names = [n.name for n in model.graph.node]
    # after stem_relu only s is live; inside the residual block s and a / b are; after add only r; and so on
    assert [names[k] for k in cut_points(model)] == ["stem", "stem_relu", "add", "conv_c", "relu_c", "conv_d",
                                                      "relu_d", "gap", "flatten"]
    blocks = find_blocks(model, find_layers(model), max_layers=2)
    assert [[l.name for l in b.layers] for b in blocks] == [["stem"], ["conv_a", "conv_b"], ["conv_c", "conv_d"],
                                                            ["fc"]]
    assert blocks[1].inputs == ["s"] and blocks[1].outputs == ["r"]
    blocks = find_blocks(model, find_layers(model), max_layers=4)  # segments join while they hold <= 4 layers
    assert [([l.name for l in b.layers], b.outputs) for b in blocks] == [
        (["stem", "conv_a", "conv_b", "conv_c"], ["cc"]), (["conv_d", "fc"], ["y"])]


def quantize_state(model, calib, **kw):
    cfg = dict(weight_bits=3, holdout=0, batch_size=8, calib_size=48, recon_iters=150, recon_batch=8, seed=0,
               adaround=False, block_recon=False)  # the block reconstruction starts from nearest rounding
    cfg.update(kw)
    return run_steps(prepare(model, Config(**cfg)), Context(DataSource(calib, model_inputs(model))), {})


def output_error(model, state, x):
    want = run(model, {"x": x})[0]
    got = run(export_qdq(state), {"x": x})[0]
    return float(np.mean((got - want) ** 2))


def test_block_reconstruction_beats_nearest_rounding_in_onnxruntime(rng, tmp_path):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 48)
    near = quantize_state(model, calib)
    recon = quantize_state(model, calib, block_recon=True)
    again = quantize_state(model, calib, block_recon=True)
    rows = recon.report["block_reconstruction"]["blocks"]
    assert [r["layers"] for r in rows] == [["stem", "conv_a", "conv_b", "conv_c"], ["conv_d", "fc"]]
    assert any(r["kept"] for r in rows)
    for r in rows:  # a block keeps its result only where its held-out loss went down
        assert r["kept"] == (r["loss_end"] < r["loss_start"])
    for l in recon.layers:
        enc = recon.weights[l.name]
        if l.name in recon.rounded:
            q = recon.rounded[l.name]
            assert q.min() >= enc.spec.qmin and q.max() <= enc.spec.qmax
            s = np.asarray(enc.scale).reshape(-1, *[1] * (q.ndim - 1))
            down = np.floor(Graph(recon.model).const(l.weight) / s)
            ends = [np.clip(down + k, enc.spec.qmin, enc.spec.qmax) for k in (0, 1)]
            assert np.all((q == ends[0]) | (q == ends[1]))  # each weight rounded down or up, nothing else
    assert export_qdq(recon).SerializeToString() == export_qdq(again).SerializeToString()  # deterministic
    x = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)  # fresh inputs, not the calibration ones
    assert output_error(model, recon, x) < output_error(model, near, x)


def test_learned_activation_steps_are_the_ones_exported(rng, tmp_path):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 48)
    before = quantize_state(model, calib, act_bits=4)
    state = quantize_state(model, calib, block_recon=True, act_bits=4, qdrop=1.0)
    learned = {r: e for r, e in state.acts.items() if "lsq_step_ratio" in e.stats}
    assert learned, "no activation step was learned"
    exported = Graph(export_qdq(state))
    for root, enc in learned.items():
        assert not np.isclose(float(enc.scale), float(before.acts[root].scale), rtol=1e-6)
        assert float(enc.scale) == pytest.approx(float(before.acts[root].scale) * enc.stats["lsq_step_ratio"],
                                                 rel=1e-3)
        assert float(exported.const(root + "/scale")) == float(enc.scale)


@pytest.mark.parametrize("bad", [dict(qdrop=1.5), dict(recon_iters=0), dict(recon_batch=0),
                                 dict(block_recon=True, data_free=True)])
def test_block_reconstruction_settings_are_checked(bad):
    with pytest.raises(InputError):
        Config(**bad).validate()


def test_blocks_of_local_ops_learn_on_crops(rng, tmp_path):
    model = residual_chain(rng, hw=24)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 24, 24), 16)
    state = quantize_state(model, calib, block_recon=True, recon_crop=10, recon_iters=20, calib_size=16)
    rows = state.report["block_reconstruction"]["blocks"]
    assert [r["crop"] for r in rows] == [[10, 10], None]  # the block with the pooling and the Gemm sees whole maps
    assert [r["samples"] for r in rows] == [16, 16]
    model = residual_chain(rng, hw=(8, 30))  # a text line's maps: cropped along the width only
    calib = save_npy_samples(tmp_path / "wide", rng, (3, 8, 30), 16)
    state = quantize_state(model, calib, block_recon=True, recon_crop=10, recon_iters=20, calib_size=16)
    assert [r["crop"] for r in state.report["block_reconstruction"]["blocks"]] == [[8, 10], None]


def test_autograd_bytes_are_the_tensors_backward_needs_by_hand():
    w = torch.nn.Parameter(torch.ones(8, 3, 3, 3))
    x = torch.ones(5, 3, 10, 10)

    def forward(n=5):  # Conv keeps its input and its weight, Relu its output
        return torch.relu(torch.nn.functional.conv2d(x[:n].clone(), w, padding=1)).sum()
    assert autograd_bytes(torch, forward) == 4 * (5 * 3 * 100 + 8 * 27 + 5 * 8 * 100)
    # per sample 4 · (300 + 800) bytes, weights 4 · 216 once; GRAPH_COPIES = 2 of each must fit
    per, fixed = 4 * 1100, 4 * 216
    assert step_samples(torch, forward, 32, 2 * (fixed + 7 * per)) == 7
    assert step_samples(torch, forward, 32, 2 * (fixed + 7 * per) - 1) == 6
    assert step_samples(torch, forward, 5, 1e9) == 5
    assert step_samples(torch, forward, 32, 1) == 1  # never less than one sample


def test_a_step_split_to_fit_the_memory_limit_learns_what_the_whole_step_learns(rng, tmp_path, monkeypatch):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 48)
    kw = dict(block_recon=True, qdrop=1.0, act_bits=4, recon_iters=20)  # longer, Adam's steps on the
    # learned activation steps amplify float rounding differences between the sums over parts and over the whole
    whole = quantize_state(model, calib, **kw)
    monkeypatch.setattr(block_reconstruction, "STEP_SHARE", 1e-12)  # one sample at a time
    parts = quantize_state(model, calib, **kw)
    rows = [s.report["block_reconstruction"]["blocks"] for s in (whole, parts)]
    assert [r["step_samples"] for r in rows[0]] == [8, 8] and [r["step_samples"] for r in rows[1]] == [1, 1]
    for a, b in zip(*rows):
        assert b["loss_start"] == pytest.approx(a["loss_start"], rel=1e-5)
        assert b["loss_end"] == pytest.approx(a["loss_end"], rel=1e-4)
    assert any(r["kept"] for r in rows[0])
    for name, q in whole.rounded.items():
        assert np.mean(parts.rounded[name] == q) > 0.99
    for root, enc in whole.acts.items():
        assert float(parts.acts[root].scale) == pytest.approx(float(enc.scale), rel=1e-5)


def test_one_calibration_sample_runs_and_keeps_nothing(rng, tmp_path):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 1)
    rows = quantize_state(model, calib, block_recon=True, recon_iters=3, calib_size=1).report[
        "block_reconstruction"]["blocks"]
    assert [(r["samples"], r["kept"]) for r in rows] == [(1, False), (1, False)]  # nothing held out to check


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_fisher_weights_of_the_logits_are_the_kl_gradient_by_hand(rng, tmp_path, monkeypatch):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 16)
    state = quantize_state(model, calib, calib_size=16)
    ctx = Context(DataSource(calib, model_inputs(model)))
    gr = Graph(state.model)
    weights, note = fisher_weights(state, ctx, gr, state.model, ["y"], torch)
    assert "from 16 samples" in note
    x = np.concatenate([feed["x"] for _, feed in ctx.calib.batches(16)])
    # ∂KL(p ‖ softmax(z))/∂z = softmax(z) − p: per logit, the mean of its square over the samples
    g2 = np.mean((softmax(run(export_qdq(state), {"x": x})[0]) - softmax(run(model, {"x": x})[0])) ** 2, axis=0)
    np.testing.assert_allclose(weights["y"].numpy(), np.maximum(g2 / g2.mean(), 0.1), rtol=0.05)
    with monkeypatch.context() as m:  # one sample at a time: the same per-sample squared gradients
        m.setattr(block_reconstruction, "STEP_SHARE", 1e-12)
        np.testing.assert_allclose(fisher_weights(state, ctx, gr, state.model, ["y"], torch)[0]["y"].numpy(),
                                   weights["y"].numpy(), rtol=1e-3)
    recon = quantize_state(model, calib, block_recon=True, recon_fisher=True, recon_iters=20)
    rows = recon.report["block_reconstruction"]
    assert rows["fisher"].startswith("per-channel Fisher weights of 2 block outputs")
    assert all(r["fisher"] for r in rows["blocks"])


def test_the_block_starts_from_the_exported_network_with_biases_added_to_bias_free_layers(rng, tmp_path):
    """Conv (no bias) → Relu → Conv (no bias): AdaRound gives both a bias, which the exporter adds; the block's
    starting held-out loss must be the exported model's squared error on those samples in onnxruntime."""
    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], "conv2")]
    inits = [init("w1", rng.normal(0.05, 0.4, (6, 3, 3, 3)).astype(f)),
             init("w2", rng.normal(0.1, 0.4, (4, 6, 1, 1)).astype(f))]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 4, 8, 8])], inits)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 48)
    kw = dict(adaround=True, weight_bits=3, act_bits=4, recon_crop=0, adaround_inputs="quantized")  # biases that
    before = quantize_state(model, calib, **kw)  # fit the weights' error alone: the test below sees them
    assert {"conv1", "conv2"} <= set(before.biases)
    recon = quantize_state(model, calib, block_recon=True, recon_iters=1, **kw)
    row, = recon.report["block_reconstruction"]["blocks"]
    x = np.concatenate([feed["x"] for _, feed in DataSource(calib, model_inputs(model)).batches(8)])[-48 // 8:]
    want = run(model, {"x": x})[0]

    def error(state):
        return float(np.sum((run(export_qdq(state), {"x": x})[0] - want) ** 2)) / len(x)
    assert row["loss_start"] == pytest.approx(error(before), rel=1e-3)
    before.biases.clear()
    # without the added biases the same comparison fails: they matter (0.4-1.6 % of the loss, by CPU)
    assert row["loss_start"] != pytest.approx(error(before), rel=3e-3)


def test_undecided_share_is_that_of_the_fractions_before_any_learning(rng, tmp_path):
    """From nearest rounding h(V) starts at the fractional part of W/s; after one Adam step (lr 0.01) the share of
    h(V) strictly inside (0.02, 0.98) is still that of the fractions, computed here from the weights and grids."""
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 16)
    state = quantize_state(model, calib, block_recon=True, recon_iters=1, calib_size=16)
    gr = Graph(state.model)
    for row in state.report["block_reconstruction"]["blocks"]:
        fracs = []
        for name in row["layers"]:
            l = next(l for l in state.layers if l.name == name)
            w, s = gr.const(l.weight), np.asarray(state.weights[name].scale)
            r = w / (s.reshape(-1, *[1] * (w.ndim - 1)) if s.ndim else s)
            fracs.append((r - np.floor(r)).ravel())
        f = np.concatenate(fracs)
        assert row["undecided"] == pytest.approx(np.mean((f > 0.02) & (f < 0.98)), abs=0.01)
        assert 0 < row["undecided"] < 1 and row["loss_end_soft"] > 0


def test_dsq_rounding_is_the_tanh_of_the_paper_and_becomes_round_as_k_grows():
    """φ_k(v) = ⌊v⌋ + ½ + ½·tanh(k(v − ⌊v⌋ − ½)) / tanh(k/2) (DSQ eq. 3-4 in grid units), worked by hand at a
    few points; monotone within a cell, continuous at the cell edges, differentiable, and ⌊v⌉ for a large k."""
    v = torch.tensor([-1.7, -0.5, 0.0, 0.2, 0.5, 0.75, 2.99], dtype=torch.float64, requires_grad=True)
    k = 4.0
    by_hand = [np.floor(x) + 0.5 + 0.5 * np.tanh(k * (x - np.floor(x) - 0.5)) / np.tanh(k / 2)
               for x in v.detach().numpy()]
    got = dsq_round(torch, v, k)
    np.testing.assert_allclose(got.detach().numpy(), by_hand, rtol=1e-12)
    assert got[2].item() == pytest.approx(0.0) and got[4].item() == pytest.approx(0.5)  # an edge, a middle
    got.sum().backward()
    assert (v.grad > 0).all()  # a real gradient everywhere, not the straight-through one
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    soft = dsq_round(torch, grid, k)
    assert (soft[1:] >= soft[:-1]).all()  # monotone, no jump at the edges
    away = grid[(grid - torch.floor(grid) - 0.5).abs() > 0.05]  # off the cells' middles, where φ is ½ for any k
    np.testing.assert_allclose(dsq_round(torch, away, 200.0).numpy(), torch.round(away).numpy(), atol=1e-6)


def test_block_reconstruction_with_dsq_learns_and_keeps_only_what_lowers_the_held_out_loss(rng, tmp_path):
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 16)
    state = quantize_state(model, calib, block_recon=True, recon_dsq=True, recon_iters=20, calib_size=16,
                           act_bits=4)
    rec = state.report["block_reconstruction"]
    assert rec["dsq"] is True and rec["blocks"]
    for row in rec["blocks"]:
        assert row["kept"] == (row["loss_end"] < row["loss_start"])


def test_block_reconstruction_is_off_by_default_and_the_choices_say_why_at_4_bits():
    off = Config(weight_bits=4, act_bits=4).validate()
    assert off.block_recon is False and "block_reconstruction" not in off.steps
    assert off.choices["block_recon"].startswith("off") and "--block-recon" in off.choices["block_recon"]
    for kw in (dict(weight_bits=4), dict(act_bits=4), dict(weight_bits=4, act_bits=4, block_recon=False)):
        cfg = Config(**kw).validate()
        assert cfg.block_recon is False and "block_reconstruction" not in cfg.steps and "block_recon" not in cfg.choices
    on = Config(weight_bits=4, act_bits=4, block_recon=True).validate()
    assert on.steps[-2:] == ["block_reconstruction", "bias_overflow"] and "block_recon" not in on.choices


def test_the_choices_run_without_block_reconstruction_and_it_runs_once_on_the_kept_model(rng, tmp_path,
                                                                                          monkeypatch):
    from ptq import pipeline
    from ptq.run import quantize
    model = residual_chain(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 24)
    seen = []
    real = pipeline.STEPS["block_reconstruction"]

    def counted(state, ctx):
        seen.append((state.config.cle, state.config.weight_symmetric))
        return real(state, ctx)
    monkeypatch.setitem(pipeline.STEPS, "block_reconstruction", counted)
    res = quantize(model, str(calib), weight_bits=4, act_bits=4, block_recon=True, calib_size=16, holdout=8,
                   batch_size=8, recon_iters=5, recon_batch=4, adaround_iters=20, latency_runs=0)
    stages = res.report["stages"]
    assert "symmetry_choice" in stages and stages["block_reconstruction"]["blocks"]  # three quantizations
    kept = stages["symmetry_choice"]["kept"] == "symmetric"
    assert seen == [(res.report["settings"]["cle"], kept)]  # one reconstruction, of the model kept
    assert res.report["settings"]["block_recon"] is True and "block_reconstruction" in res.report["settings"]["steps"]
    md = to_markdown(res.report).split("## Block reconstruction")[1].splitlines()
    header = next(l for l in md if l.startswith("| block |")).strip("| ").split(" | ")
    first = md[md.index(next(l for l in md if l.startswith("| block |"))) + 2].strip("| ").split(" | ")
    assert first[header.index("per part")] == "4"  # the step's 4 samples at once: they fit in the memory limit
