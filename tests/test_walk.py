"""Walk: layer inputs from checkpoints equal onnxruntime's run of the whole (edited) network from its inputs."""
import numpy as np
import onnx
import pytest
from builders import save_npy_samples, zoo

from ptq.data import DataSource, model_inputs
from ptq.model import Graph, live_tensors, set_initializer
from ptq.walk import Walk, streamed, streamed_pair


def test_live_tensors_by_hand(rng):
    model = zoo(rng)
    index = [n.name for n in model.graph.node].index("conv2")
    # before conv2: x, c1, r1, cd, rd were computed; conv2 reads rd, the residual Add reads r1
    assert live_tensors(model, index) == ["r1", "rd"]
    assert live_tensors(model, 0) == ["x"]
    assert live_tensors(model, len(model.graph.node)) == ["logits"]


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_walk_equals_a_full_run_while_weights_change(rng, tmp_path, budget):
    model = zoo(rng)
    src = DataSource(save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 10), model_inputs(model))
    walk = Walk(src, 4, budget)
    edited = onnx.ModelProto.FromString(model.SerializeToString())
    gr = Graph(model)
    layers = [(k, n) for k, n in enumerate(model.graph.node) if n.op_type in ("Conv", "Gemm")]
    for k, node in layers:
        got = list(walk.batches(edited, k, [node.input[0]]))
        want = list(streamed(edited, [node.input[0]], src, 4))  # from the inputs, through every node
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            np.testing.assert_allclose(a[node.input[0]], b[node.input[0]], rtol=1e-5, atol=1e-6)
        # as AdaRound does: the visited layer's weights change before the walk moves on
        set_initializer(edited, node.input[1], gr.const(node.input[1]) * 0.5 + 0.01)
    if budget:  # every stretch of nodes run once
        assert walk.runs == len(layers) - 1 and walk.index == layers[-1][0]  # the first layer reads the input
    else:  # nothing fits: every layer streams from the calibration source
        assert walk.saved is None and walk.index == 0


def test_advancing_releases_the_old_checkpoint_as_it_goes(tmp_path, rng, monkeypatch):
    """Moving the checkpoint drops the old one batch by batch: while the new one is computed, the old batches
    still alive and the new ones made never add up to much more than one checkpoint (not two)."""
    import weakref

    import ptq.walk
    from builders import init, make
    from onnx import helper
    nodes = [helper.make_node("Conv", [f"t{k}", f"w{k}"], [f"t{k + 1}"], f"conv{k}") for k in range(3)]
    model = make(nodes, [("t0", [None, 4, 8, 8])], [("t3", [None, 4, 8, 8])],
                 [init(f"w{k}", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)) for k in range(3)])
    src = DataSource(save_npy_samples(tmp_path / "c", rng, (4, 8, 8), 40), model_inputs(model))
    walk = Walk(src, 4, budget=1 << 30)
    convs = [0, 1, 2]  # a chain: the tensor at one checkpoint is not live at the next
    list(walk.batches(model, convs[1], [model.graph.node[convs[1]].input[0]]))
    old = [weakref.ref(a) for b in walk.saved for a in b.values()]
    assert len(walk.saved) == 10
    alive = []
    real = ptq.walk.session

    class Counting:
        def __init__(self, m, **kw):
            self.s = real(m, **kw)

        def get_inputs(self):
            return self.s.get_inputs()

        def run(self, names, feed):
            alive.append(sum(r() is not None for r in old))
            return self.s.run(names, feed)
    monkeypatch.setattr(ptq.walk, "session", Counting)
    list(walk.batches(model, convs[2], [model.graph.node[convs[2]].input[0]]))
    assert walk.index == convs[2] and len(alive) == 10
    # at the k-th batch of the new checkpoint, k batches of it exist: old + new stay within one checkpoint + 1 batch
    assert all(n_old + k <= 10 + 1 for k, n_old in enumerate(alive)), alive


def test_streamed_pair_runs_two_models_on_batches_decoded_once(rng, tmp_path, monkeypatch):
    """Two models' tensors batch by batch, equal to ``streamed`` of each, the source read once for both."""
    model = zoo(rng)
    other = onnx.ModelProto.FromString(model.SerializeToString())
    set_initializer(other, "w1", Graph(model).const("w1") * 0.5)
    src = DataSource(save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 10), model_inputs(model))
    reads = []
    real = src.batches
    monkeypatch.setattr(src, "batches", lambda n: reads.append(n) or real(n))
    a, b = streamed_pair(model, ["r1", "c2"], other, ["r1"], src, 4)
    pairs = [(x, next(b)) for x in a]
    assert reads == [4] and len(pairs) == 3
    for (x, y), want_x, want_y in zip(pairs, streamed(model, ["r1", "c2"], src, 4), streamed(other, ["r1"], src, 4)):
        assert set(x) == {"r1", "c2"} and set(y) == {"r1"}
        np.testing.assert_array_equal(x["c2"], want_x["c2"])
        np.testing.assert_array_equal(y["r1"], want_y["r1"])
        assert not np.array_equal(x["r1"], y["r1"])
