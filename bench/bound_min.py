"""What CLE's per-channel ReLU6 bound costs onnxruntime CPU as the integer Min ptq writes after each bounded
layer's QuantizeLinear, by the shape of the Min's bound operand. A chain of ``--layers`` bounded 1×1 convolutions
of one shape and one unbounded after them (uint8 activations, symmetric int8 per-channel weights: fused into
QLinearConv), each bounded output clipped per channel by Min(q, b) between its QuantizeLinear and
DequantizeLinear; the Min's own kernel time, µs per layer, from onnxruntime's profiler on one thread
(``ptq.speed.op_times`` over ``--runs`` runs), with b of shape [1, C, 1, 1] and with b tiled along W,
[1, C, 1, W] (the same values; ``ptq.export.tiled_bound``).

    python bench/bound_min.py [--shapes 32x112x112,96x112x112 ...] [--layers 6] [--runs 300]

Each shape is CHANNELS x HEIGHT x WIDTH.
"""
from __future__ import annotations

import numpy as np
import onnx
from depthwise import SCALE, ZERO, chain_args
from onnx import TensorProto, helper, numpy_helper

from ptq.speed import op_times

DEFAULT = "32x112x112,96x112x112,144x56x56,240x28x28,480x14x14"


def chain(channels: int, h: int, w: int, layers: int, bound: str) -> onnx.ModelProto:
    """``bound``: "channel" ([1, C, 1, 1]) or "row" ([1, C, 1, W])."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(SCALE), "s"), numpy_helper.from_array(np.uint8(ZERO), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"])]
    cur = "x_dq"
    for i in range(layers + 1):  # the last convolution is not bounded: every Min runs between two QLinearConvs
        weight = rng.normal(0, 0.1, (channels, channels, 1, 1)).astype(np.float32)
        w_scale = (np.abs(weight).reshape(channels, -1).max(1) / 127).astype(np.float32)
        inits += [numpy_helper.from_array(np.round(weight / w_scale[:, None, None, None]).astype(np.int8), f"wq{i}"),
                  numpy_helper.from_array(w_scale, f"ws{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"w{i}"], axis=0),
                  helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"]),
                  helper.make_node("QuantizeLinear", [f"c{i}", "s", "z"], [f"q{i}"])]
        if i == layers:
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], ["y"]))
            break
        b = rng.integers(ZERO + 20, 255, (1, channels, 1, 1)).astype(np.uint8)
        inits.append(numpy_helper.from_array(np.repeat(b, w, axis=3) if bound == "row" else b, f"b{i}"))
        nodes += [helper.make_node("Min", [f"q{i}", f"b{i}"], [f"m{i}"]),
                  helper.make_node("DequantizeLinear", [f"m{i}", "s", "z"], [f"d{i}"])]
        cur = f"d{i}"
    g = helper.make_graph(nodes, "bound", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def main() -> None:
    a = chain_args(__doc__, DEFAULT)
    print(f"Min kernel time, µs per layer, one thread ({a.runs} runs)")
    print("| C × H × W | b [1, C, 1, 1] | b [1, C, 1, W] | ratio |")
    print("|---|---|---|---|")
    for shape in a.shapes.split(","):
        c, h, w = (int(v) for v in shape.split("x"))
        feed = {"x": np.abs(np.random.default_rng(1).normal(size=(1, c, h, w))).astype(np.float32)}
        per_channel, row = (op_times(chain(c, h, w, a.layers, b), feed, a.runs, top=50).get("Min", 0.0) / a.layers
                            for b in ("channel", "row"))
        print(f"| {c} × {h} × {w} | {per_channel:.1f} | {row:.1f} | {per_channel / row:.1f} |")


if __name__ == "__main__":
    main()
