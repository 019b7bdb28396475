"""A layer's input as the matrix its weight multiplies (im2col), with positions subsampled, so per-layer
optimizations (AdaRound) work on [rows, Cin·k·k] arrays: conv output = X @ W.reshape(Cout, -1).T."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .model import Graph, attr


def conv_geometry(gr: Graph, layer) -> dict:
    node = gr.nodes[layer.name]
    w = gr.const(layer.weight)
    k = w.shape[2:]
    nd = len(k)
    return {"kernel": tuple(k), "strides": tuple(attr(node, "strides", [1] * nd)),
            "pads": tuple(attr(node, "pads", [0] * 2 * nd)), "dilations": tuple(attr(node, "dilations", [1] * nd)),
            "group": attr(node, "group", 1)}


def sample_rows(x: np.ndarray, layer, geom: dict | None, per_sample: int, rng: np.random.Generator,
                depthwise: bool = False) -> np.ndarray:
    """Rows of the layer's input matrix, ``per_sample`` random output positions per sample (all if fewer).

    Conv: [N·P, Cin·kh·kw] (depthwise: [N·P, C, kh·kw]); dense: [N·P, D] from x [..., D]."""
    if geom is None:  # Gemm / MatMul
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > per_sample * max(1, x.shape[0]):
            rows = rows[rng.choice(rows.shape[0], per_sample * x.shape[0], replace=False)]
        return rows
    if len(geom["kernel"]) != 2:
        raise NotImplementedError("only 2-D convolutions")
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geom["kernel"], geom["strides"], geom["pads"], geom["dilations"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[..., ::dh, ::dw]
    win = win[:, :, ::sh, ::sw]  # [N, C, OH, OW, kh, kw]
    n, c, oh, ow = win.shape[:4]
    p = min(per_sample, oh * ow)
    pos = np.stack([rng.choice(oh * ow, p, replace=False) for _ in range(n)])  # [N, P]
    rows = win[np.arange(n)[:, None], :, pos // ow, pos % ow]  # [N, P, C, kh, kw]
    if depthwise:
        return rows.reshape(n * p, c, kh * kw)
    return rows.reshape(n * p, c * kh * kw)
