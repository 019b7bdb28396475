"""SmoothQuant (Xiao et al. 2023, eq. 4): the transformer's analogue of CLE. A few input channels of a MatMul carry
outliers (after LayerNorm, after GELU) that a per-tensor activation grid cannot hold; dividing input channel j by
s_j and multiplying row j of the weight by s_j keeps the product exact,

        Y = X W = (X diag(s)⁻¹) (diag(s) W),      s_j = max|X_j|^α / max|W_j|^(1−α),

and moves the difficulty from the activations into the weights, which are quantized per output channel. Every
MatMul reading the same X (query, key and value) shares s (max|W_j| over all of them).

max|X_j| and the rows come from the first calibration samples (at least PEAK_SAMPLES, and as many as fill ROWS
rows): the step reads a prefix of the calibration set, not all of it (outlier channels are the same channels in
every token, so a prefix finds them). α is searched per input tensor on those rows among 0.3 … 0.8: the one whose
8-bit product (activations per tensor, weights per output channel, min-max grids) is closest to X W, measured on up
to COLUMNS of the layers' output columns (a fixed random sample: the error is a sum over columns, each quantized
on its own, so the sample estimates it without bias); the tensor is left alone unless that error is at least 10 %
under the error without smoothing. Where the smoothed MatMuls are X's only readers and X comes from
a layer that is linear in its output channels — a MatMul / Gemm with a constant weight (through a constant bias
Add and a ReLU, which commute with a positive per-channel scale), a LayerNormalization with constant scale and
bias, as in the paper, or a Mul by a per-channel constant (a LayerNorm exported as ops: x̂ · γ + β) — the
division is folded into that layer (its output column j, bias j or γ_j, β_j divided by s_j) and costs nothing at
run time; otherwise it is a float Mul inserted before the MatMuls (X may have other
readers, such as a residual Add, which keep the unscaled X). Only MatMuls with a constant weight are considered (a
CNN's Conv / Gemm layers are not). A function-preserving step: it edits the FP32 model before the reference is
frozen, like CLE.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..data import require_calibration
from ..model import Graph, attr, set_initializer, unique_name
from ..observe import SENTINEL, RowSample, observe
from ..patterns import place_activation_quantizers
from ..quant import QuantSpec, encoding_from_range, fake_quant

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ROWS = 2048
PEAK_SAMPLES = 32  # calibration samples the per-channel peaks are taken over, at least
COLUMNS = 256  # output columns the product error is measured on, at most
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


def product_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, act_bits: int, w_bits: int,
                  reference: np.ndarray | None = None) -> float:
    """Σ over the layers of ‖X W − Q(X / s) Q(diag(s) W)‖²: activations per tensor (asymmetric), weights per
    output channel (symmetric), min-max grids. The layers' weights are one matrix [W₁ W₂ …] side by side (the
    same sum: each column is its own channel); ``reference``: X [W₁ W₂ …] where it is already known."""
    w = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)
    xs = x / s
    a_spec = QuantSpec(act_bits, signed=False, symmetric=False)
    xq = fake_quant(xs, encoding_from_range(a_spec, min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)))
    ws = w * s[:, None]
    top = np.abs(ws).max(axis=0)
    wq = fake_quant(ws, encoding_from_range(QuantSpec(w_bits, signed=True, symmetric=True, axis=1), -top, top))
    err = (x @ w if reference is None else reference) - xq @ wq
    return float(np.einsum("ij,ij->", err, err))


def sampled_columns(n: int) -> np.ndarray:
    """Up to COLUMNS of ``n`` output columns, a fixed random sample in order (all of them where n <= COLUMNS)."""
    if n <= COLUMNS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, COLUMNS, replace=False))


def _own_const(gr: Graph, name: str, node) -> np.ndarray | None:
    """A float initializer read by ``node`` alone (safe to change), else None."""
    value = gr.const(name)
    if value is None or value.dtype.kind != "f" or [n.name for n in gr.consumers.get(name, [])] != [node.name]:
        return None
    return value


def _per_channel(value: np.ndarray | None, n: int) -> bool:
    return value is not None and value.ndim >= 1 and value.shape[-1] == n and value.size == n


def fold_division(gr: Graph, x: str, readers: set, s: np.ndarray) -> tuple[str, dict] | None:
    """Where X's readers are exactly ``readers`` and X = [Relu](Add(L(·), b)) or [Relu](L(·)) with L a MatMul /
    Gemm with a constant weight, a LayerNormalization over the last axis or a Mul by a per-channel constant γ, all
    their constants used by them alone: (L's name, {initializer: new value}) with L's output channel j, b_j (and
    γ_j, β_j) divided by s_j, so
    that X becomes X / s; else None."""
    n = len(s)
    if x in gr.outputs or {c.name for c in gr.consumers.get(x, [])} != readers:
        return None
    edits = {}
    node = gr.producer.get(x)
    for op in ("Relu", "Add"):
        if node is None or node.op_type != op:
            continue
        if op == "Add":
            k = next((i for i, name in enumerate(node.input[:2]) if gr.is_const(name)), None)
            bias = _own_const(gr, node.input[k], node) if k is not None else None
            if not _per_channel(bias, n):
                return None
            edits[node.input[k]] = bias / s.reshape(bias.shape)
            inner = node.input[1 - k]
        else:
            inner = node.input[0]
        if gr.only_consumer(inner) is not node:
            return None
        node = gr.producer.get(inner)
    if node is None:
        return None
    if node.op_type == "MatMul" and len(node.input) == 2:
        w = _own_const(gr, node.input[1], node)
        if w is None or w.ndim != 2 or w.shape[1] != n:
            return None
        edits[node.input[1]] = w / s[None, :]
    elif node.op_type == "Gemm" and not attr(node, "transA", 0):
        w = _own_const(gr, node.input[1], node)
        trans = attr(node, "transB", 0)
        if w is None or w.ndim != 2 or w.shape[0 if trans else 1] != n:
            return None
        edits[node.input[1]] = w / (s[:, None] if trans else s[None, :])
        if len(node.input) > 2 and node.input[2]:
            c = _own_const(gr, node.input[2], node)
            if not _per_channel(c, n):
                return None
            edits[node.input[2]] = c / s.reshape(c.shape)
    elif node.op_type == "Mul" and len(node.input) == 2 and sum(gr.is_const(i) for i in node.input) == 1:
        k = 0 if gr.is_const(node.input[0]) else 1  # a decomposed LayerNorm's γ: x̂ · γ
        gamma = _own_const(gr, node.input[k], node)
        if not _per_channel(gamma, n):
            return None
        edits[node.input[k]] = gamma / s.reshape(gamma.shape)
    elif node.op_type == "LayerNormalization" and attr(node, "axis", -1) == -1:
        for name in node.input[1:3]:
            if not name:
                continue
            v = _own_const(gr, name, node)
            if not _per_channel(v, n):
                return None
            edits[name] = v / s.reshape(v.shape)
    else:
        return None
    return node.name, {k: v.astype(np.float32) for k, v in edits.items()}


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
            desc="smoothquant", memory_limit=cfg.memory_bytes,
            enough=lambda seen: seen >= PEAK_SAMPLES and all(r.n >= ROWS for r in rows.values()))
    taken = set(gr.inits) | set(gr.producer) | {n.name for n in state.model.graph.node}
    for x, layers in groups.items():
        weights = [gr.const(l.weight).astype(np.float32) for l in layers]
        sample = rows[x].data
        if not np.all(np.abs(sample) < SENTINEL):
            report[x] = {"layers": [l.name for l in layers], "skipped": "carries inf / nan / ±1e30 sentinels"}
            continue
        joined = np.concatenate(weights, axis=1)
        w_peak = np.abs(joined).max(axis=1)
        some = joined[:, sampled_columns(joined.shape[1])]
        reference = sample @ some
        base = product_error(sample, [some], np.ones(sample.shape[1], np.float32), cfg.act_bits, cfg.weight_bits,
                             reference)
        tried = {a: product_error(sample, [some], smoothing_scales(peaks[x].peak, w_peak, a), cfg.act_bits,
                                  cfg.weight_bits, reference) for a in ALPHAS}
        alpha = min(tried, key=tried.get)
        entry = {"layers": [l.name for l in layers], "alpha": alpha,
                 "error_ratio": round(tried[alpha] / max(base, 1e-30), 4)}
        if tried[alpha] < GAIN * base:
            s = smoothing_scales(peaks[x].peak, w_peak, alpha)
            for layer, w in zip(layers, weights):  # row j of the readers' weights times s_j
                set_initializer(state.model, layer.weight, (w * s[:, None]).astype(np.float32))
            folded = fold_division(gr, x, {l.name for l in layers}, s)
            if folded is not None:  # X / s made by the layer before
                for name, value in folded[1].items():
                    set_initializer(state.model, name, value)
                entry["folded_into"] = folded[0]
            else:  # X / s by a float Mul that only the smoothed MatMuls read
                inv = unique_name(taken, x + "/smooth_inv")
                out = unique_name(taken, x + "/smoothed")
                set_initializer(state.model, inv, (1.0 / s).astype(np.float32))
                mul = helper.make_node("Mul", [x, inv], [out], unique_name(taken, x + "/SmoothQuant"))
                nodes = list(state.model.graph.node)
                at = next((k + 1 for k, n in enumerate(nodes) if x in n.output), 0)
                state.model.graph.node.insert(at, mul)
                by_name = {n.name: n for n in state.model.graph.node}
                for layer in layers:
                    by_name[layer.name].input[0] = out
                    layer.x = out
            entry["applied"] = True
        report[x] = entry
    state.placement = place_activation_quantizers(state.model, state.layers)
    state.report["smoothquant"] = report
    return state
