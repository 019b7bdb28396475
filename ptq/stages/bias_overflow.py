"""Keep int32 biases representable: a bias is stored as round(b / (s_in · s_w)); where a tiny per-channel weight
scale makes |b| / (s_in · s_w) exceed 2^31 − 1, raise that channel's weight scale to |b| / (s_in · (2^31 − 1))
instead of clipping the bias (clipping loses accuracy; the larger scale costs almost nothing on such a channel).
A per-tensor scale is raised as a whole, to the largest channel's need."""
from __future__ import annotations

import numpy as np

from ..model import Graph
from ..quant import Encoding

INT32_MAX = 2**31 - 1


def guard_bias_overflow(state, ctx=None):
    gr = Graph(state.model)
    raised = {}
    for layer in state.layers:
        wenc = state.weights.get(layer.name)
        root = state.placement.root.get(layer.x)
        xenc = state.acts.get(root) if root else None
        bias = state.bias(layer, gr)
        if wenc is None or xenc is None or bias is None:
            continue
        b = np.abs(bias.astype(np.float64))
        s_in = float(xenc.scale)
        s_w = np.asarray(wenc.scale, np.float64)
        need = b / (s_in * (INT32_MAX - 1))  # the smallest weight scale that keeps the bias in range
        bad = s_w < need
        if np.any(bad):
            # per channel: each channel that needs it; per tensor: the one scale, to the largest need
            scale = np.where(bad, need * (1 + 1e-6), s_w) if s_w.ndim else np.float64(need.max() * (1 + 1e-6))
            state.weights[layer.name] = Encoding(wenc.spec, np.asarray(scale, np.float32), wenc.zero_point,
                                                 f"{wenc.method} (raised for the int32 bias)", dict(wenc.stats))
            raised[layer.name] = int(np.count_nonzero(bad))
            state.rounded.pop(layer.name, None)  # a new grid: AdaRound's integers no longer apply
    state.report["bias_overflow"] = {"channels_with_raised_weight_scale": raised}
    return state
