"""If nodes the calibration data always send one way (ptq.branches): the taken branch is quantized and put back
into the If, the other branch stays float, checked in onnxruntime against the FP32 model."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from builders import init
from ptq.run import quantize


def if_model(rng, conv_before: bool = False):
    """x [N, 3, 8, 8], sr [] int64 -> If(sr == 16000): then Conv -> Relu -> Conv, else one Conv (6 channels out);
    with ``conv_before`` a Conv in the main graph feeds both branches."""
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    src = "h" if conv_before else "x"
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["tw1"], value=onnx.numpy_helper.from_array(w(6, 3, 3, 3))),
         helper.make_node("Constant", [], ["tw2"], value=onnx.numpy_helper.from_array(w(6, 6, 1, 1))),
         helper.make_node("Conv", [src, "tw1"], ["t1"], "then_conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["t1"], ["t2"], "then_relu"),
         helper.make_node("Conv", ["t2", "tw2"], ["t3"], "then_conv2")],
        "then", [], [helper.make_tensor_value_info("t3", TensorProto.FLOAT, None)])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["ew"], value=onnx.numpy_helper.from_array(w(6, 3, 1, 1))),
         helper.make_node("Conv", [src, "ew"], ["e1"], "else_conv")],
        "else", [], [helper.make_tensor_value_info("e1", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"], "equal"),
             helper.make_node("If", ["is16k"], ["y"], "if", then_branch=then, else_branch=other)]
    inits = [init("rate", np.array(16000, np.int64))]
    if conv_before:
        nodes.insert(0, helper.make_node("Conv", ["x", "w0"], ["h"], "conv0", pads=[1, 1, 1, 1]))
        inits.append(init("w0", w(3, 3, 3, 3)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8]),
                                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(folder, rng, rates):
    folder.mkdir()
    for k, sr in enumerate(rates):
        np.savez(folder / f"f{k:03d}.npz", x=rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32), sr=np.int64(sr))
    return folder


def qdq(graph) -> int:
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def test_the_taken_branch_is_quantized_and_the_other_stays_float(rng, tmp_path):
    model = if_model(rng)
    result = quantize(model, calib_feeds=feeds(tmp_path / "f", rng, [16000] * 40), holdout=8, repair=False)
    q = result.model
    onnx.checker.check_model(q)
    [node] = [n for n in q.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in node.attribute}
    assert qdq(branches["then_branch"]) > 0 and qdq(branches["else_branch"]) == 0 and qdq(q.graph) == 0
    assert "then branch only" in result.report["stages"]["choices"]["If if"]
    fp, qs = (ort.InferenceSession(m.SerializeToString()) for m in (model, q))
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    for sr in (16000, 8000):
        feed = {"x": x, "sr": np.array(sr, np.int64)}
        a, b = fp.run(None, feed)[0], qs.run(None, feed)[0]
        sqnr = 10 * np.log10((a ** 2).sum() / max(((a - b) ** 2).sum(), 1e-30))
        if sr == 16000:
            assert 20 < sqnr < 80  # quantized, and close
        else:
            assert np.array_equal(a, b)  # the untaken branch is the FP32 one


def test_what_the_untaken_branch_reads_stays_in_the_main_graph(rng, tmp_path):
    """Both branches read the main graph's Conv output: that Conv stays in the main graph (quantized), the 8 kHz
    branch still runs, close to FP32."""
    model = if_model(rng, conv_before=True)
    q = quantize(model, calib_feeds=feeds(tmp_path / "f", rng, [16000] * 40), holdout=8, repair=False).model
    onnx.checker.check_model(q)
    assert "conv0" in {n.name for n in q.graph.node} and qdq(q.graph) > 0
    fp, qs = (ort.InferenceSession(m.SerializeToString()) for m in (model, q))
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    for sr in (16000, 8000):
        a, b = (s.run(None, {"x": x, "sr": np.array(sr, np.int64)})[0] for s in (fp, qs))
        assert 20 < 10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum())


def test_an_if_that_takes_both_branches_keeps_its_bodies_float(rng, tmp_path):
    model = if_model(rng, conv_before=True)
    result = quantize(model, calib_feeds=feeds(tmp_path / "f", rng, [16000, 8000] * 20), holdout=8, repair=False)
    [node] = [n for n in result.model.graph.node if n.op_type == "If"]
    assert all(qdq(a.g) == 0 for a in node.attribute)
    assert qdq(result.model.graph) > 0  # the main graph's Conv is quantized
    assert any("take both branches" in w for w in result.report["stages"]["warnings"])
