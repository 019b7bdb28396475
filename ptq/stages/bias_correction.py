"""Bias correction (Nagel et al. 2019, §4.2; white paper §3.3): quantizing W to W̃ = W + ε shifts the expected
output of each layer by E[ε x]; subtracting it from the bias restores the mean:
        b ← b − ε · E[x]      (per output channel; for a conv, summed over its kernel)

- ``empirical``: E[x̃] per input channel, measured on calibration data in the network whose weights are already
  quantized (all layers at once, in one streamed pass: the input shift caused by not-yet-corrected earlier
  biases is second order, ε times a small mean change);
- ``analytic``: no data. E[x] of channel i is the mean of the clipped normal act(N(β_i, γ_i²)) from the
  BatchNorm of the layer producing x (ptq.moments); layers whose input has no BatchNorm before it are skipped
  and listed.
The corrected bias is a decision (``state.biases``): the exporter gives it to the quantized layer (a Conv / Gemm
without a bias gets one); the FP32 reference keeps its own. MatMul layers are skipped (no bias input), and so are
layers that AdaRound rounded.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import Graph
from ..moments import clipped_normal_moments
from ..observe import observe
from ..patterns import clip_bounds
from ..quant import fake_quant
from ..weights import contract_input, layer_kind
from .weight_ranges import weight_quantized


class ChannelMean:
    """Streaming per-channel mean of a tensor (channel axis 1, or the last axis for 2-D / 3-D dense inputs)."""

    def __init__(self, axis: int):
        self.axis, self.sum, self.n = axis, None, 0

    def update(self, x):
        x = np.asarray(x, np.float64)
        axis = self.axis % x.ndim
        other = tuple(a for a in range(x.ndim) if a != axis)
        s = x.sum(axis=other)
        self.sum = s if self.sum is None else self.sum + s
        self.n += x.size // x.shape[axis]

    @property
    def mean(self):
        return self.sum / max(self.n, 1)


def _weight_error(state, gr, layer) -> np.ndarray:
    w = gr.const(layer.weight)
    return fake_quant(w, state.weights[layer.name]).astype(np.float64) - w


def correct_biases(state, ctx, mode: str | None = None):
    """The bias-correction stage (mode from the config: 'empirical' or 'analytic')."""
    mode = mode or state.config.bias_correction
    gr = Graph(state.model)
    rounded = state.rounded  # AdaRound's layers need no correction (white paper Fig. 8)
    todo = [l for l in state.layers if l.name in state.weights and l.op != "MatMul" and layer_kind(gr, l)
            and l.name not in rounded]
    if mode == "empirical":
        if ctx is None or ctx.calib is None:
            raise InputError("empirical bias correction needs calibration data (--calib); use analytic without")
        means = _empirical_means(state, gr, todo, ctx)
    elif mode == "analytic":
        means = _analytic_means(state, gr, todo)
    else:
        raise InputError(f"unknown bias correction {mode!r} (empirical or analytic)")
    shifts, skipped = {}, []
    for layer in todo:
        ex = means.get(layer.name)
        if ex is None:
            skipped.append(layer.name)
            continue
        delta = contract_input(_weight_error(state, gr, layer), layer_kind(gr, layer), layer.w_axis, ex)
        b = state.bias(layer, gr)
        b = np.zeros_like(delta) if b is None else b
        state.biases[layer.name] = (b.astype(np.float64) - delta).astype(np.float32)
        shifts[layer.name] = round(float(np.max(np.abs(delta))), 6)
    state.report["bias_correction"] = {"mode": mode, "max_shift_per_layer": shifts, "skipped": skipped}
    return state


def _empirical_means(state, gr, layers, ctx) -> dict:
    sim = weight_quantized(state)  # every weight quantized (AdaRound's integers where it ran); activations FP32
    obs, means = {}, {}
    for layer in layers:
        means[layer.name] = ChannelMean(1 if layer.op == "Conv" else -1)
        obs.setdefault(layer.x, []).append(means[layer.name])
    observe(sim, ctx.calib, state.config.batch_size, obs, ctx.progress, desc="bias correction",
            memory_limit=state.config.memory_bytes)
    return {name: m.mean for name, m in means.items()}


def _analytic_means(state, gr, layers) -> dict:
    by_out = {l.out: l for l in state.layers}
    out = {}
    for layer in layers:
        prev = by_out.get(layer.x)
        bn = state.bn.get(prev.pre_act) if prev is not None else None
        if bn is None:
            continue
        lo, hi = clip_bounds(gr, gr.nodes[prev.act_node]) if prev.act_node else (-np.inf, np.inf)
        out[layer.name] = clipped_normal_moments(bn.beta, bn.std, lo, hi)[0]
    return out
