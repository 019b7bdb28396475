"""High-bias absorption (Nagel et al. 2019, §4.1.1; white paper §3.2).

For layers 1 → ReLU → 2 where layer 1's pre-activation of channel i is ~N(β_i, γ_i²) (its folded BatchNorm),
almost every input to the ReLU exceeds c_i = max(0, β_i − 3γ_i), so ReLU(x − c) = ReLU(x) − c there and
        b1 ← b1 − c,        b2 ← b2 + W2 · c
leave the network's function unchanged (exactly, wherever x ≥ c) while shrinking layer 1's output range.
A per-channel bound m left by CLE (min(ReLU(x), m)) moves with it: m ← m − c.

Only where layer 2 has no zero padding: a padded border reads 0 where the shifted input should read −c, which
on small feature maps changes the output measurably (docs/FINDINGS.md).
"""
from __future__ import annotations

import numpy as np

from ..model import Graph, attr, set_initializer
from ..weights import contract_input, layer_kind
from .cle import find_cle_pairs


def absorb_high_biases(state, ctx=None, n_sigma: float = 3.0):
    gr = Graph(state.model)
    shifts = {}
    for l1, l2 in find_cle_pairs(state, gr):
        bn = state.bn.get(l1.pre_act)
        if bn is None or l1.act != "Relu" or not l1.bias or l2.op == "MatMul" or _padded(gr, l2):
            continue
        c = np.maximum(0.0, bn.beta.astype(np.float64) - n_sigma * bn.std)
        if not np.any(c > 0):
            continue
        w2 = gr.const(l2.weight)
        b1 = gr.const(l1.bias).astype(np.float64)
        b2 = gr.const(l2.bias).astype(np.float64) if l2.bias else np.zeros(w2.shape[l2.w_axis])
        set_initializer(state.model, l1.bias, (b1 - c).astype(np.float32))
        b2_name = l2.bias or _add_bias(state, gr, l2)
        set_initializer(state.model, b2_name, (b2 + contract_input(w2, layer_kind(gr, l2), l2.w_axis, c))
                        .astype(np.float32))
        if l1.bound:
            set_initializer(state.model, l1.bound, gr.const(l1.bound) - c.astype(np.float32).reshape(
                gr.const(l1.bound).shape))
        bn.beta = (bn.beta - c).astype(np.float32)
        shifts[l1.name] = {"into": l2.name, "channels": int(np.count_nonzero(c)), "max_shift": round(float(c.max()), 6)}
    state.report["bias_absorption"] = shifts
    return state


def _padded(gr: Graph, layer) -> bool:
    return layer.op == "Conv" and any(attr(gr.nodes[layer.name], "pads", []) or []) or \
        attr(gr.nodes[layer.name], "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")


def _add_bias(state, gr: Graph, layer) -> str:
    """Give a Conv / Gemm without a bias an (initially zero) bias input; returns its name."""
    name = layer.name + "/bias"
    node = gr.nodes[layer.name]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    layer.bias = name
    return name
