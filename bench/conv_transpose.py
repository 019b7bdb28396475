"""A ConvTranspose in float against its sub-pixel form (ptq.subpixel: Conv → DepthToSpace → crop) in float and in
int8 (QDQ, the DepthToSpace and the crop on the Conv's output grid, as ptq writes them), batch 1, onnxruntime CPU.

    python bench/conv_transpose.py     # medians of 200 runs, ms; the shapes of ViT-S saliency's and waifu2x's decoders
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ptq.subpixel import subpixel_geometry, subpixel_taps  # noqa: E402
from ptq.threads import ort_options  # noqa: E402

SHAPES = [(384, 256, 14, 4, 2, 1), (256, 128, 28, 4, 2, 1), (128, 64, 56, 4, 2, 1),  # ViT-S decoder
          (64, 64, 40, 2, 2, 0), (64, 3, 40, 4, 2, 3)]  # waifu2x CUNet: 2×2 upsampling (k = s), the last layer


def graph(nodes, inits, c_in, h):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def models(c_in, c_out, h, k, s, p, rng):
    """(ConvTranspose, its sub-pixel form in float, in QDQ int8)."""
    w = rng.normal(0, 0.1, (c_in, c_out, k, k)).astype(np.float32)
    b = rng.normal(0, 0.1, c_out).astype(np.float32)
    ct = graph([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                 pads=[p] * 4)], {"w": w, "b": b}, c_in, h)
    kw, (m, _) = subpixel_taps(w, s)
    pad0, pad1, start, tail = subpixel_geometry(k, s, p, p, 0)
    crop = {"st": np.array([start] * 2, np.int64), "en": np.array([-tail if tail else 2 ** 62] * 2, np.int64),
            "ax": np.array([2, 3], np.int64)}
    conv = dict(kernel_shape=[m, m], pads=[pad0, pad0, pad1, pad1])
    fp = graph([helper.make_node("Conv", ["x", "K", "B"], ["z"], **conv),
                helper.make_node("DepthToSpace", ["z"], ["d"], blocksize=s, mode="CRD"),
                helper.make_node("Slice", ["d", "st", "en", "ax"], ["y"])],
               {"K": kw, "B": np.repeat(b, s * s), **crop}, c_in, h)
    sx, sy = np.float32(0.02), np.float32(0.05)
    sw = (np.abs(kw).reshape(len(kw), -1).max(1) / 127).astype(np.float32)
    qdq = lambda t, sc, zp: [helper.make_node("QuantizeLinear", [t, sc, zp], [t + "q"]),  # noqa: E731
                             helper.make_node("DequantizeLinear", [t + "q", sc, zp], [t + "d"])]
    nodes = qdq("x", "sx", "zx") + [
        helper.make_node("DequantizeLinear", ["Kq", "sw", "zw"], ["Kd"], axis=0),
        helper.make_node("DequantizeLinear", ["Bq", "sb", "zb"], ["Bd"], axis=0),
        helper.make_node("Conv", ["xd", "Kd", "Bd"], ["z"], **conv)] + qdq("z", "sy", "zy") + [
        helper.make_node("DepthToSpace", ["zd"], ["d"], blocksize=s, mode="CRD")] + qdq("d", "sy", "zy") + [
        helper.make_node("Slice", ["dd", "st", "en", "ax"], ["c"])] + qdq("c", "sy", "zy") + [
        helper.make_node("Identity", ["cd"], ["y"])]
    q = graph(nodes, {"sx": sx, "zx": np.uint8(128), "Kq": np.round(kw / sw[:, None, None, None]).astype(np.int8),
                      "sw": sw, "zw": np.zeros(len(sw), np.int8), "Bq": np.round(np.repeat(b, s * s) / (sx * sw))
                      .astype(np.int32), "sb": (sx * sw).astype(np.float32), "zb": np.zeros(len(sw), np.int32),
                      "sy": sy, "zy": np.uint8(128), **crop}, c_in, h)
    return ct, fp, q


def median_ms(model, x, runs=200):
    s = ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
    s.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)), s.run(None, {"x": x})[0]


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}\n")
    print("| C_in → C_out, H, k, s, pad | ConvTranspose ms | Conv + DepthToSpace ms | int8 ms | int8 / ConvTranspose "
          "| max |float difference| |")
    print("|---|---|---|---|---|---|")
    for c_in, c_out, h, k, s, p in SHAPES:
        x = rng.uniform(0, 2, (1, c_in, h, h)).astype(np.float32)
        (a, ya), (b, yb), (c, _) = (median_ms(m, x) for m in models(c_in, c_out, h, k, s, p, rng))
        print(f"| {c_in} → {c_out}, {h}, {k}, {s}, {p} | {a:.2f} | {b:.2f} | {c:.2f} | {c / a:.2f} "
              f"| {np.abs(ya - yb).max():.1e} |")
