"""Small ONNX models built with onnx.helper for the tests, and helpers to run them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def make(nodes, inputs, outputs, inits, opset=OPSET):
    """inputs / outputs: list of (name, shape) float tensors (None dims are dynamic)."""
    g = helper.make_graph(nodes, "test",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def run(model, feed: dict):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    s = ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def conv_bn_relu(rng, cin=3, cout=8, hw=8, act="Relu"):
    """x -> Conv(3x3, pad 1) -> BatchNormalization -> Relu/Clip(0,6) -> Conv 1x1 -> y"""
    w1 = rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, cout).astype(np.float32)
    gamma = rng.uniform(0.5, 2, cout).astype(np.float32)
    beta = rng.normal(0, 0.5, cout).astype(np.float32)
    mean = rng.normal(0, 0.2, cout).astype(np.float32)
    var = rng.uniform(0.5, 2, cout).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, cout, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], "bn1")]
    inits = [init("w1", w1), init("b1", b1), init("gamma", gamma), init("beta", beta), init("mean", mean),
             init("var", var), init("w2", w2)]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["bn1"], ["a1"], "relu1"))
    else:
        nodes.append(helper.make_node("Clip", ["bn1", "lo", "hi"], ["a1"], "clip1"))
        inits += [init("lo", np.float32(0)), init("hi", np.float32(6))]
    nodes.append(helper.make_node("Conv", ["a1", "w2"], ["y"], "conv2"))
    return make(nodes, [("x", [None, cin, hw, hw])], [("y", [None, 4, hw, hw])], inits)


def zoo(rng):
    """A model with Conv, depthwise Conv, Relu6, Add, Concat, MaxPool, AveragePool, GlobalAveragePool, Gemm."""
    c = 8
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    inits = [init("w1", w(c, 3, 3, 3)), init("b1", w(c)), init("wd", w(c, 1, 3, 3)), init("bd", w(c)),
             init("w2", w(c, c, 1, 1)), init("b2", w(c)), init("lo", np.float32(0)), init("hi", np.float32(6)),
             init("w3", w(c, 2 * c, 1, 1)), init("wg", w(5, c)), init("bg", w(5))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], "relu6_1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], "dw", pads=[1, 1, 1, 1], group=c),
        helper.make_node("Relu", ["cd"], ["rd"], "relu_dw"),
        helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"], "conv2"),
        helper.make_node("Add", ["c2", "r1"], ["add"], "add"),
        helper.make_node("MaxPool", ["add"], ["mp"], "maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["add"], ["ap"], "avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["mp", "ap"], ["cat"], "concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["c3"], "conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], "gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], "fc", transB=1),
    ]
    return make(nodes, [("x", [None, 3, 16, 16])], [("logits", [None, 5])], inits)


def two_inputs(rng):
    """a [N,6], b [N,6] -> MatMul(a, W) + Gemm(b) -> Add -> Relu -> y"""
    inits = [init("wa", rng.normal(0, 0.5, (6, 4)).astype(np.float32)),
             init("wb", rng.normal(0, 0.5, (6, 4)).astype(np.float32)),
             init("bb", rng.normal(0, 0.1, 4).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["ma"], "matmul"),
             helper.make_node("Gemm", ["b", "wb", "bb"], ["gb"], "gemm"),
             helper.make_node("Add", ["ma", "gb"], ["s"], "add"),
             helper.make_node("Relu", ["s"], ["y"], "relu")]
    return make(nodes, [("a", [None, 6]), ("b", [None, 6])], [("y", [None, 4])], inits)


def save_npy_samples(folder, rng, shape, n, scale=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        np.save(folder / f"s{k:03d}.npy", (rng.normal(0, scale, shape)).astype(np.float32))
    return folder
