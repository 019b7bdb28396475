"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1; white paper §3.2).

For layers 1 → 2 joined by a positively homogeneous op f (ReLU, identity; f(x/s) = f(x)/s for s > 0), output
channel i of layer 1 is divided by s_i and input channel i of layer 2 multiplied by s_i; the FP32 function is
unchanged. With r1_i, r2_i the ranges (max |w|) of those channels,
        s_i = sqrt(r1_i · r2_i) / r2_i  = sqrt(r1_i / r2_i)                              (eq. 9)
makes both ranges sqrt(r1_i · r2_i): equal, which is what per-tensor quantization needs. Chains
(conv → depthwise → conv) are swept pair by pair until the scales stop changing (the fixed point
r1_i / s_i = r2_i · s_i for every pair).

ReLU6 / Clip(0, b) is not positively homogeneous: clip(x/s, 0, b) ≠ clip(x, 0, b)/s. Two choices
(``cle_relu6``):
- ``clip`` (default): keep FP32 exact. The Clip becomes Relu followed by Min(·, b/s_i), a per-channel bound
  (ONNX's Clip takes only scalar bounds). The Relu output gets a quantizer sharing the Min output's encoding,
  so onnxruntime still fuses Conv+Relu into QLinearConv; only the Min runs in float (docs/FINDINGS.md has what
  the paper's replacement does to EfficientNet-Lite's FP32 function).
- ``relu``: replace it by ReLU, as the paper did for MobileNetV2; the pipeline reports the FP32 change.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..model import Graph, set_initializer, unique_name
from ..patterns import clip_bounds
from ..weights import in_axis, layer_kind, per_channel_absmax, scale_along


def find_cle_pairs(state, gr: Graph):
    """(layer1, layer2) where layer 2 is the only reader of layer 1's output, through ReLU, ReLU6/Clip(0, x)
    or nothing."""
    by_x = {}
    for l in state.layers:
        by_x.setdefault(l.x, []).append(l)
    pairs = []
    for l1 in state.layers:
        k1 = layer_kind(gr, l1)
        if k1 is None:
            continue
        if l1.act == "Clip" and clip_bounds(gr, gr.nodes[l1.act_node])[0] != 0.0:
            continue
        readers = gr.consumers.get(l1.out, [])
        if len(readers) != 1 or l1.out in gr.outputs or len(by_x.get(l1.out, [])) != 1:
            continue
        l2 = by_x[l1.out][0]
        if readers[0].name != l2.name or layer_kind(gr, l2) is None:
            continue
        w1, w2 = gr.const(l1.weight), gr.const(l2.weight)
        if w1.shape[l1.w_axis] != w2.shape[in_axis(layer_kind(gr, l2), l2.w_axis)]:
            continue
        pairs.append((l1, l2))
    return pairs


def replace_relu6(state, pairs, gr: Graph) -> list[str]:
    """Clip activations inside pairs become Relu (see the module docstring)."""
    replaced = []
    for l1, _ in pairs:
        if l1.act == "Clip":
            node = gr.nodes[l1.act_node]
            new = helper.make_node("Relu", [node.input[0]], [node.output[0]], node.name)
            node.CopyFrom(new)
            l1.act = "Relu"
            replaced.append(node.name)
    return replaced


def bound_clips(state, pairs, gr: Graph, scales: dict) -> list[str]:
    """Clip(0, b) after layer 1 of a pair -> Relu then Min(·, b / s) per channel (exact in FP32)."""
    g = state.model.graph
    taken = {n.name for n in g.node} | {o for n in g.node for o in n.output} | set(gr.inits)
    new_nodes, changed = {}, []
    for l1, _ in pairs:
        if l1.act != "Clip":
            continue
        node = gr.nodes[l1.act_node]
        lo, hi = clip_bounds(gr, node)
        s = scales[l1.name]
        if not np.isfinite(hi) or np.allclose(s, 1.0):  # nothing to bound, or the Clip is still exact
            continue
        ndim = gr.const(l1.weight).ndim if l1.op == "Conv" else 2
        bound = (hi / s).astype(np.float32).reshape([1, -1] + [1] * (ndim - 2) if ndim > 2 else [-1])
        bound_name = unique_name(taken, l1.name + "/clip_bound")
        set_initializer(state.model, bound_name, bound)
        relu_out = unique_name(taken, node.output[0] + "/relu")
        relu = helper.make_node("Relu", [node.input[0]], [relu_out], node.name)
        mn = helper.make_node("Min", [relu_out, bound_name], [node.output[0]], unique_name(taken, node.name + "/bound"))
        new_nodes[node.name] = (relu, mn)
        state.placement.root[relu_out] = state.placement.root.get(node.output[0], node.output[0])
        l1.act, l1.bound = "Relu", bound_name
        changed.append(node.name)
    if new_nodes:
        nodes = []
        for n in g.node:
            nodes.extend(new_nodes.get(n.name, (n,)))
        del g.node[:]
        g.node.extend(nodes)
    return changed


def equalize(state, ctx=None, max_sweeps: int = 100, tol: float = 1e-6):
    """The CLE stage: sweep the pairs to the fixed point of eq. 9; then keep ReLU6 exact (per-channel bound)
    or replace it by ReLU, as ``config.cle_relu6`` says."""
    gr = Graph(state.model)
    pairs = find_cle_pairs(state, gr)
    replaced = replace_relu6(state, pairs, gr) if state.config.cle_relu6 == "relu" else []
    layers = {l.name: l for pair in pairs for l in pair}
    weights = {n: gr.const(l.weight).astype(np.float64) for n, l in layers.items()}
    biases = {l1.name: gr.const(l1.bias).astype(np.float64) for l1, _ in pairs if l1.bias}
    total = {l1.name + " -> " + l2.name: np.ones(weights[l1.name].shape[l1.w_axis]) for l1, l2 in pairs}
    before = {n: per_channel_absmax(weights[n], l.w_axis) for n, l in layers.items()}
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        worst = 0.0
        for l1, l2 in pairs:
            k2 = layer_kind(gr, l2)
            r1 = per_channel_absmax(weights[l1.name], l1.w_axis)
            r2 = per_channel_absmax(weights[l2.name], in_axis(k2, l2.w_axis))
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0)
            weights[l1.name] = scale_along(weights[l1.name], l1.w_axis, 1 / s)
            if l1.name in biases:
                biases[l1.name] = biases[l1.name] / s
            weights[l2.name] = scale_along(weights[l2.name], in_axis(k2, l2.w_axis), s)
            bn = state.bn.get(l1.pre_act)
            if bn is not None:
                bn.beta, bn.gamma = (bn.beta / s).astype(np.float32), (bn.gamma / s).astype(np.float32)
            total[l1.name + " -> " + l2.name] *= s
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
        if worst < tol:
            break
    bounded = bound_clips(state, pairs, gr, {l1.name: total[l1.name + " -> " + l2.name] for l1, l2 in pairs})
    for n, l in layers.items():
        set_initializer(state.model, l.weight, weights[n].astype(np.float32))
        if n in biases:
            set_initializer(state.model, l.bias, biases[n].astype(np.float32))
    after = {n: per_channel_absmax(weights[n], l.w_axis) for n, l in layers.items()}
    state.report["cle"] = {
        "pairs": {k: {"scale_min": round(float(v.min()), 6), "scale_max": round(float(v.max()), 6)}
                  for k, v in total.items()},
        "sweeps": sweeps, "relu6_replaced_by_relu": replaced, "relu6_kept_with_channel_bound": bounded,
        "channel_ranges": _most_unbalanced(before, after),
    }
    return state


def _most_unbalanced(before: dict, after: dict, top: int = 3) -> dict:
    """Per-channel weight ranges before/after CLE of the layers whose ranges were most unequal
    (max range / median range), for the report's chart (the paper's Fig. 6)."""
    spread = {n: float(r.max() / max(np.median(r), 1e-12)) for n, r in before.items() if r is not None and r.size > 1}
    worst = sorted(spread, key=spread.get, reverse=True)[:top]
    return {n: {"before": np.round(before[n], 6).tolist(), "after": np.round(after[n], 6).tolist()} for n in worst}
