"""SmoothQuant (Xiao et al. 2023, eq. 4): the transformer's analogue of CLE. A few input channels of a MatMul carry
outliers (after LayerNorm, after GELU) that a per-tensor activation grid cannot hold; dividing input channel j by
s_j and multiplying row j of the weight by s_j keeps the product exact,

        Y = X W = (X diag(s)⁻¹) (diag(s) W),      s_j = max|X_j|^α / max|W_j|^(1−α),

and moves the difficulty from the activations into the weights, which are quantized per output channel. Every
MatMul reading the same X (query, key and value) shares s (max|W_j| over all of them).

α is searched per input tensor on calibration rows among 0.3 … 0.8: the one whose 8-bit product (activations per
tensor, weights per output channel, min-max grids) is closest to X W; the tensor is left alone unless that error is
at least 10 % under the error without smoothing. The division is a float Mul inserted before the MatMuls (X may
have other readers, such as a residual Add, which keep the unscaled X). Only MatMuls with a constant weight are
considered (a CNN's Conv / Gemm layers are not). A function-preserving step: it edits the FP32 model before the
reference is frozen, like CLE.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..data import require_calibration
from ..model import Graph, set_initializer, unique_name
from ..observe import SENTINEL, RowSample, observe
from ..patterns import place_activation_quantizers
from ..quant import QuantSpec, encoding_from_range, fake_quant

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ROWS = 2048
GAIN = 0.9  # smoothing must bring the error under this share of the unsmoothed one


class LastAxisPeak:
    """Streaming max |x| per channel of the last axis (a transformer's hidden features)."""

    def __init__(self):
        self.peak = None

    def update(self, x):
        x = np.abs(np.asarray(x, np.float32))
        x = np.where(x < SENTINEL, x, 0)  # inf / nan / ±1e30 masks are not values (ptq.observe.Histogram)
        p = x.reshape(-1, x.shape[-1]).max(axis=0)
        self.peak = p if self.peak is None else np.maximum(self.peak, p)


def smoothing_scales(x_peak: np.ndarray, w_peak: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α) (eq. 4), 1 where a channel is all zeros, clipped to [1e-5, 1e5]."""
    s = np.power(np.maximum(x_peak, 1e-8), alpha) / np.power(np.maximum(w_peak, 1e-8), 1 - alpha)
    s = np.where((x_peak > 0) & (w_peak > 0), s, 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def product_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, act_bits: int, w_bits: int) -> float:
    """Σ over the layers of ‖X W − Q(X / s) Q(diag(s) W)‖²: activations per tensor (asymmetric), weights per
    output channel (symmetric), min-max grids."""
    xs = x / s
    a_spec = QuantSpec(act_bits, signed=False, symmetric=False)
    xq = fake_quant(xs, encoding_from_range(a_spec, min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)))
    w_spec = QuantSpec(w_bits, signed=True, symmetric=True, axis=1)
    err = 0.0
    for w in weights:
        ws = w * s[:, None]
        top = np.abs(ws).max(axis=0)
        wq = fake_quant(ws, encoding_from_range(w_spec, -top, top))
        err += float(np.sum((x @ w - xq @ wq) ** 2))
    return err


def smoothquant(state, ctx):
    """The SmoothQuant step (see module docstring): edits the FP32 model and the layers' inputs."""
    cfg = state.config
    require_calibration(ctx, "SmoothQuant")
    gr = Graph(state.model)
    groups: dict[str, list] = {}
    for layer in state.layers:
        w = gr.const(layer.weight)
        if layer.op == "MatMul" and w.ndim == 2 and layer.x not in gr.inits:
            groups.setdefault(layer.x, []).append(layer)
    report = {}
    if not groups:
        state.report["smoothquant"] = report
        return state
    peaks = {x: LastAxisPeak() for x in groups}
    rows = {x: RowSample(ROWS) for x in groups}
    observe(state.model, ctx.calib, cfg.batch_size, {x: [peaks[x], rows[x]] for x in groups}, ctx.progress,
            desc="smoothquant", memory_limit=cfg.memory_bytes)
    taken = set(gr.inits) | set(gr.producer) | {n.name for n in state.model.graph.node}
    for x, layers in groups.items():
        weights = [gr.const(l.weight).astype(np.float32) for l in layers]
        sample = rows[x].data
        if not np.all(np.abs(sample) < SENTINEL):
            report[x] = {"layers": [l.name for l in layers], "skipped": "carries inf / nan / ±1e30 sentinels"}
            continue
        base = product_error(sample, weights, np.ones(sample.shape[1], np.float32), cfg.act_bits, cfg.weight_bits)
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        tried = {a: product_error(sample, weights, smoothing_scales(peaks[x].peak, w_peak, a), cfg.act_bits,
                                  cfg.weight_bits) for a in ALPHAS}
        alpha = min(tried, key=tried.get)
        entry = {"layers": [l.name for l in layers], "alpha": alpha,
                 "error_ratio": round(tried[alpha] / max(base, 1e-30), 4)}
        if tried[alpha] < GAIN * base:
            s = smoothing_scales(peaks[x].peak, w_peak, alpha)
            inv = unique_name(taken, x + "/smooth_inv")
            out = unique_name(taken, x + "/smoothed")
            set_initializer(state.model, inv, (1.0 / s).astype(np.float32))
            mul = helper.make_node("Mul", [x, inv], [out], unique_name(taken, x + "/SmoothQuant"))
            nodes = list(state.model.graph.node)
            at = next((k + 1 for k, n in enumerate(nodes) if x in n.output), 0)
            state.model.graph.node.insert(at, mul)
            by_name = {n.name: n for n in state.model.graph.node}
            for layer, w in zip(layers, weights):
                set_initializer(state.model, layer.weight, (w * s[:, None]).astype(np.float32))
                by_name[layer.name].input[0] = out
                layer.x = out
            entry["applied"] = True
        report[x] = entry
    state.placement = place_activation_quantizers(state.model, state.layers)
    state.report["smoothquant"] = report
    return state
