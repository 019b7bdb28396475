"""A layer's input as the matrix its weight multiplies (im2col), with positions subsampled, so per-layer
optimizations (AdaRound) work on [rows, Cin·k·k] arrays: conv output = X @ W.reshape(Cout, -1).T."""
from __future__ import annotations

import numpy as np

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
    if geom is None:  # Gemm / MatMul: rows of the last axis, like the output's
        return output_rows(x, None, per_sample, rng)
    if len(geom["kernel"]) != 2:
        raise NotImplementedError("only 2-D convolutions")
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = geom["kernel"], geom["strides"], geom["pads"], geom["dilations"]
    n, c, h, w = x.shape
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    pos = _positions(n, oh * ow, per_sample, rng)
    p = pos.shape[1]
    # the input pixels under each sampled window, gathered directly (no padded copy of the whole tensor): row
    # i·s_h − p_top + k·d_h of output row i, zero where that falls in the padding
    ys = (pos // ow)[:, :, None] * sh - pt + np.arange(kh) * dh  # [N, P, kh]
    xs = (pos % ow)[:, :, None] * sw - pl + np.arange(kw) * dw  # [N, P, kw]
    inside = ((ys >= 0) & (ys < h))[:, :, :, None] & ((xs >= 0) & (xs < w))[:, :, None, :]  # [N, P, kh, kw]
    vals = x[np.arange(n)[:, None, None, None], :, np.clip(ys, 0, h - 1)[:, :, :, None],
             np.clip(xs, 0, w - 1)[:, :, None, :]]  # [N, P, kh, kw, C]
    if not inside.all():
        vals = np.where(inside[..., None], vals, np.zeros((), x.dtype))
    rows = vals.transpose(0, 1, 4, 2, 3)  # [N, P, C, kh, kw]
    if depthwise:
        return rows.reshape(n * p, c, kh * kw)
    return rows.reshape(n * p, c * kh * kw)


def _positions(n: int, size: int, per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """[N, P] random output positions (flat indices into OH·OW) per sample, P = min(per_sample, size)."""
    return np.stack([rng.choice(size, min(per_sample, size), replace=False) for _ in range(n)])


def output_rows(y: np.ndarray, geom: dict | None, per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of a tensor shaped like the layer's output ([N, O, OH, OW], dense [..., O]) at the positions that
    ``sample_rows`` draws for the layer's input from the same generator state: [N·P, O]."""
    if geom is None:
        rows = y.reshape(-1, y.shape[-1])
        if rows.shape[0] > per_sample * max(1, y.shape[0]):
            rows = rows[rng.choice(rows.shape[0], per_sample * y.shape[0], replace=False)]
        return rows
    n, o, oh, ow = y.shape
    pos = _positions(n, oh * ow, per_sample, rng)
    return y[np.arange(n)[:, None], :, pos // ow, pos % ow].reshape(-1, o)


def rows_per_sample(total: int, samples: int) -> int:
    """Output positions to take from each sample so that ``total`` rows are spread over ``samples`` samples."""
    return max(1, -(-total // max(samples, 1)))


def paired_rows(gr: Graph, group, fp_batches, q_batches, sim_inputs: dict, per_sample, seed: int,
                skips: dict | None = None):
    """Pair, per calibration batch and per layer of ``group``, the rows of its input in the FP32 network and in a
    quantized-so-far version of it, sampled at the same output positions: yields (batch index, layer, FP32 rows,
    quantized rows, skip error). ``fp_batches`` / ``q_batches``: per batch, {tensor: array} holding each layer's
    input (``l.x`` in the FP32 network, ``sim_inputs[l.name]`` in the quantized one; ``q_batches`` None: the FP32
    rows twice); ``per_sample(layer)``: positions per sample. ``skips`` {layer: tensor}: a tensor shaped like the
    layer's output (the other input of the residual Add it feeds), present in both networks' batches; the skip
    error is its FP32 minus its quantized rows at the same output positions ([R, O]; None for other layers).
    Nothing is kept between batches."""
    import zlib

    from .weights import layer_kind
    geoms = {l.name: conv_geometry(gr, l) if l.op == "Conv" else None for l in group}
    dw = {l.name: layer_kind(gr, l) == "depthwise" for l in group}
    q_iter = iter(q_batches) if q_batches is not None else None
    for k, xf in enumerate(fp_batches):
        xq = next(q_iter) if q_iter is not None else None
        for l in group:
            key = (seed, k, zlib.crc32(l.name.encode()))
            n = per_sample(l)
            a = sample_rows(xf[l.x], l, geoms[l.name], n, np.random.default_rng(key), dw[l.name])
            b = a if xq is None else sample_rows(xq[sim_inputs[l.name]], l, geoms[l.name], n,
                                                 np.random.default_rng(key), dw[l.name])
            e, skip = None, (skips or {}).get(l.name)
            if skip is not None and xq is not None:
                e = (output_rows(xf[skip], geoms[l.name], n, np.random.default_rng(key))
                     - output_rows(xq[skip], geoms[l.name], n, np.random.default_rng(key)))
            yield k, l, a, b, e
