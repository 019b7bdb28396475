"""onnxruntime CPU's int8 depthwise convolution against its FP32 one, layer by layer: a chain of ``--layers``
depthwise convolutions of one shape, written once in FP32 and once in QDQ (uint8 activations, symmetric int8
per-channel weights, int32 bias: the layout ptq writes, which onnxruntime fuses into QLinearConv), timed on one
thread (median of ``--runs``), per layer. The question it answers: is a model's int8 depthwise convolution
faster than the FP32 one it replaces (docs/FINDINGS.md, Speed)?

    python bench/depthwise.py [--shapes 88x5x3x96,96x5x3x96 ...] [--layers 6] [--runs 300]

Each shape is CHANNELS x KERNEL x HEIGHT x WIDTH (stride 1, "same" padding).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DEFAULT = ("88x5x3x96,96x5x3x96,200x5x2x96,208x5x2x96,40x5x3x96,48x5x3x96,"
           "88x3x56x56,96x3x56x56,144x5x28x28,200x3x14x14,208x3x14x14")
SCALE, ZERO = 0.02, 128  # every activation's grid


def chain(channels: int, k: int, h: int, w: int, layers: int, quantized: bool) -> bytes:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(SCALE), "s"), numpy_helper.from_array(np.uint8(ZERO), "z")]
    nodes, cur = [], "x"

    def qdq(t: str) -> str:
        nodes.extend([helper.make_node("QuantizeLinear", [t, "s", "z"], [t + "_q"]),
                      helper.make_node("DequantizeLinear", [t + "_q", "s", "z"], [t + "_dq"])])
        return t + "_dq"

    if quantized:
        cur = qdq(cur)
    for i in range(layers):
        weight = rng.normal(0, 0.1, (channels, 1, k, k)).astype(np.float32)
        if quantized:
            w_scale = (np.abs(weight).reshape(channels, -1).max(1) / 127).astype(np.float32)
            q_weight = np.round(weight / w_scale[:, None, None, None]).astype(np.int8)
            inits += [numpy_helper.from_array(q_weight, f"wq{i}"),
                      numpy_helper.from_array(w_scale, f"ws{i}"),
                      numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}"),
                      numpy_helper.from_array(np.zeros(channels, np.int32), f"bq{i}"),
                      numpy_helper.from_array((SCALE * w_scale).astype(np.float32), f"bs{i}"),
                      numpy_helper.from_array(np.zeros(channels, np.int32), f"bz{i}")]
            nodes += [helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"w{i}"], axis=0),
                      helper.make_node("DequantizeLinear", [f"bq{i}", f"bs{i}", f"bz{i}"], [f"b{i}"], axis=0)]
        else:
            inits += [numpy_helper.from_array(weight, f"w{i}"),
                      numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], group=channels, kernel_shape=[k, k],
                                      pads=[k // 2] * 4))
        cur = qdq(f"c{i}") if quantized else f"c{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def per_layer_us(model: bytes, x: np.ndarray, layers: int, runs: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    for _ in range(20):
        s.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6 / layers


def chain_args(doc: str, shapes: str) -> argparse.Namespace:
    """The command line of a layer-chain benchmark: ``--shapes``, ``--layers`` and ``--runs``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shapes", default=shapes)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=300)
    return ap.parse_args()


def main() -> None:
    a = chain_args(__doc__, DEFAULT)
    print(f"onnxruntime {ort.__version__}, one thread, µs per depthwise layer (median of {a.runs} runs)")
    print("| channels | kernel | H × W | FP32 | int8 | int8 / FP32 |")
    print("|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        c, k, h, w = (int(v) for v in shape.split("x"))
        x = np.abs(np.random.default_rng(1).normal(size=(1, c, h, w))).astype(np.float32)
        fp = per_layer_us(chain(c, k, h, w, a.layers, False), x, a.layers, a.runs)
        q = per_layer_us(chain(c, k, h, w, a.layers, True), x, a.layers, a.runs)
        print(f"| {c} | {k}×{k} | {h} × {w} | {fp:.1f} | {q:.1f} | {q / fp:.2f} |")


if __name__ == "__main__":
    main()
