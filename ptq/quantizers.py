"""The quantizers of a pipeline state, by id ("weight:<layer>", "act:<tensor>"), and copies of the state with some
of them left out (``subset_state``) or raised to 16 bits or removed (``raise_quantizers``): what the debug flow,
repair and the measured placement change."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .model import Graph
from .quant import QuantSpec, encoding_from_range


@dataclass
class Quantizer:
    id: str  # "weight:<layer>" or "act:<tensor>"
    kind: str  # "weight" | "activation"
    name: str  # the layer or the tensor
    bits: int
    sqnr_db: float | None


def quantizers(state) -> list[Quantizer]:
    """Every quantizer of the state, weights in layer order then activations in placement order."""
    out = [Quantizer(f"weight:{k}", "weight", k, e.spec.bits, e.stats.get("sqnr_db")) for k, e in state.weights.items()]
    out += [Quantizer(f"act:{k}", "activation", k, e.spec.bits, e.stats.get("sqnr_db")) for k, e in state.acts.items()]
    return out


def subset_state(state, keep: set[str] | None = None, weights: bool = True, acts: bool = True):
    """A shallow copy of the state with only some quantizers (``keep``: ids; None = all of the kinds asked)."""
    sub = copy.copy(state)
    sub.weights = {k: v for k, v in state.weights.items() if weights and (keep is None or f"weight:{k}" in keep)}
    sub.acts = {k: v for k, v in state.acts.items() if acts and (keep is None or f"act:{k}" in keep)}
    sub.biases = {k: v for k, v in state.biases.items() if k in sub.weights}  # they belong to the weight grids
    return sub


def raise_quantizers(state, ids, to: str = "16"):
    """A copy of the state with the quantizers ``ids`` at 16 bits (min-max range over what they saw), or removed
    (``to = "fp32"``)."""
    from .ranges import weight_encoding
    ids = set(ids)
    sub = copy.copy(state)
    sub.weights, sub.acts, sub.rounded = dict(state.weights), dict(state.acts), dict(state.rounded)
    sub.biases = dict(state.biases)
    gr = Graph(state.model)
    layers = {l.name: l for l in state.layers}
    for q in ids:
        kind, name = q.split(":", 1)
        table = sub.weights if kind == "weight" else sub.acts
        if name not in table:
            continue
        sub.rounded.pop(name, None)  # AdaRound's integers belong to the old grid
        if kind == "weight":
            sub.biases.pop(name, None)  # so does the bias corrected for it
        if to == "fp32":
            del table[name]
            continue
        enc = table[name]
        if kind == "weight":
            table[name] = weight_encoding(gr.const(layers[name].weight), enc.spec.with_(bits=16), "minmax")
            table[name].method = "minmax (raised to 16 bits)"
        else:
            lo = min(enc.stats.get("observed_min", float(enc.lo)), 0.0)
            hi = max(enc.stats.get("observed_max", float(enc.hi)), 0.0)
            spec = QuantSpec(16, signed=enc.spec.signed, symmetric=enc.spec.symmetric)
            table[name] = encoding_from_range(spec, lo, hi, "minmax (raised to 16 bits)", dict(enc.stats))
    return sub
