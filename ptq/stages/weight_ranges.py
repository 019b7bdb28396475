"""Weight range setting (white paper §3.1): one symmetric signed quantizer per layer weight, per output channel
(default) or per tensor, by min-max or MSE (see ptq.ranges.weight_encoding)."""
from __future__ import annotations

from ..model import Graph
from ..quant import QuantSpec


def set_weight_ranges(state, ctx=None):
    from ..ranges import weight_encoding
    cfg = state.config
    gr = Graph(state.model)
    for layer in state.layers:
        o = cfg.override_for(layer.name, layer.weight)
        per_channel = o.get("per_channel", cfg.per_channel)
        spec = QuantSpec(bits=int(o.get("bits", cfg.weight_bits)), signed=True, symmetric=True,
                         axis=layer.w_axis if per_channel else None)
        state.weights[layer.name] = weight_encoding(gr.const(layer.weight), spec, o.get("range", cfg.weight_range))
    return state
