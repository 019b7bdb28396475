"""Walk: layer inputs from checkpoints equal onnxruntime's run of the whole (edited) network from its inputs."""
import numpy as np
import onnx
import pytest
from builders import save_npy_samples, zoo

from ptq.data import DataSource, model_inputs
from ptq.model import Graph, live_tensors, set_initializer
from ptq.walk import Walk, streamed


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
