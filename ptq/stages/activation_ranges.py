"""Activation range setting (white paper §3.1): one calibration pass over the FP32 model feeds a histogram per
quantizer (and a row sample of the logits); then each quantizer's range is chosen by its method:
``mse`` (default; measured after the float activation that alone reads the tensor, where there is one: SiLU,
HardSwish, Sigmoid, HardSigmoid, Tanh), ``minmax``, ``percentile``, ``bn`` (β ± α·γ of the BatchNorm that
produced the tensor; falls back to ``mse`` where there is none) and ``xent`` for the logits. Each quantizer has
``act_bits`` bits, except where an override says otherwise and, with ``ends_8bit``, at the network's ends
(``end_tensors``: its inputs, its outputs, its head layers' inputs), which keep at least 8.

A quantizer right after a fused Relu / Clip is kept inside the activation's bounds, so the int8 runtime can drop
the activation (its output range already is the quantizer's). After CLE, a ReLU6 is Relu + Min(·, b_c) with a
per-channel bound; its quantizer's top is held within the smallest b_c where that costs at most
``fusable_tolerance`` more MSE (``ranges.capped_encoding``): the exporter then leaves the Min out.
Where the target has no integer Clip (``Target.integer_min_clip``; the exporter otherwise saturates on the
integers, after the fused layer), an activation under 8 bits after ReLU6 gets the grid [0, 6] where that costs at
most ``fusable_tolerance`` (``ranges.saturating_encoding``): its values cannot leave the n-bit range, so it needs no
saturating float Clip.

A Concat's inputs take its output's grid (``share_concat_grids``: onnxruntime's QLinearConcat then copies bytes
instead of requantizing), an input that other ops read too only where that costs it at most ``fusable_tolerance``
more MSE.

Two kinds of tensor stay in float, each with a report line (``state.report["left_float"]``):
- a tensor that carries sentinels (|x| >= 1e30, inf: float min / max used as −∞ in attention masks): any grid
  would turn −∞ into a finite value and let the masked positions through the softmax;
- the output of a Concat whose inputs' ranges differ more than ``range_spread`` times (a detector head
  concatenating boxes in the hundreds with scores below 1): one shared scale would round the small input to a
  few levels or to zero. Its inputs keep their own quantizers;
- likewise the output of a head layer (one whose output reaches a graph output through data movement alone)
  whose output channels' ranges differ more than ``range_spread`` times (boxes and scores from one convolution)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import Graph
from ..observe import Histogram, RowSample, observe
from ..patterns import activation_bounds, float_activation, head_layers, head_outputs
from ..quant import Encoding, QuantSpec
from ..ranges import (activation_encoding, bn_encoding, capped_encoding, encoding_mse, hist_mse_loss, mse_ratio,
                      saturating_encoding, xent_encoding)
from .weight_ranges import weight_quantized


def act_spec(cfg, override: dict, end: bool = False) -> QuantSpec:
    """The grid of an activation quantizer: its override, else the settings; an ``end`` (``end_tensors``) keeps
    at least 8 bits where ``ends_8bit`` is on."""
    symmetric = bool(override.get("symmetric", cfg.act_symmetric))
    bits = cfg.act_bits if not (end and cfg.ends_8bit) else max(cfg.act_bits, 8)
    return QuantSpec(bits=int(override.get("bits", bits)), signed=symmetric, symmetric=symmetric)


def end_tensors(state) -> set[str]:
    """The quantizer roots at the network's ends: its inputs, its outputs, and the inputs of its head layers (those
    whose output reaches a graph output through data movement alone: a classifier's last layer)."""
    root = state.placement.root
    names = [i.name for i in state.model.graph.input] + [o.name for o in state.model.graph.output]
    names += [l.x for l in head_layers(state.model, state.layers)]
    return {root[t] for t in names if t in root}


def set_activation_ranges(state, ctx):
    cfg = state.config
    roots = state.placement.roots
    if not roots:
        return state
    methods = {r: cfg.override_for(r).get("range", cfg.logits_range if r in state.logits else cfg.act_range)
               for r in roots}
    hists = {r: Histogram() for r in roots}
    observers = {r: [hists[r]] for r in roots}
    heads = head_outputs(state.model, state.layers)
    peaks = {t: ChannelPeak() for t in heads if t in roots}
    for t, p in peaks.items():
        observers[t].append(p)
    samples = {}
    for r in roots:
        if methods[r] == "xent":
            samples[r] = RowSample(cfg.xent_rows)
            observers[r].append(samples[r])
    if ctx.calib is None:
        raise InputError("activation ranges need calibration data (--calib)")
    # after AdaRound (white paper Fig. 8: AdaRound comes first) the ranges are those of the network with its
    # rounded weights; otherwise of the FP32 network (with the corrected biases, where bias correction ran)
    model = weight_quantized(state, weights=bool(state.rounded)) if state.rounded or state.biases else state.model
    n = observe(model, ctx.calib, cfg.batch_size, observers, ctx.progress, memory_limit=cfg.memory_bytes)
    state.report.setdefault("calibration", {})["samples"] = n
    gr = Graph(state.model)
    bounds = activation_bounds(state.layers, gr)
    bn_by_out = {l.out: state.bn.get(l.pre_act) for l in state.layers}
    channel_bound = {l.out: float(np.min(gr.const(l.bound))) for l in state.layers if l.bound and l.out in hists}
    bound_report: dict = {}
    ends = end_tensors(state)
    for r in roots:
        spec = act_spec(cfg, cfg.override_for(r), r in ends)
        method = methods[r]
        if method == "xent":
            enc = xent_encoding(samples[r].data, spec, hists[r])
        elif method == "bn" and bn_by_out.get(r) is not None:
            st = bn_by_out[r]
            enc = bn_encoding(st.beta, st.std, spec, bounds.get(r, (-np.inf, np.inf)))
        else:
            enc = activation_encoding(hists[r], spec, "mse" if method == "bn" else method, cfg.percentile,
                                      float_activation(gr, r) if r == _only_tensor(state.placement, r) else None)
            if method == "bn":
                enc.method = "mse (no BN before it)"
        if r in channel_bound:
            enc, facts = capped_encoding(hists[r], enc, channel_bound[r], cfg.fusable_tolerance)
            bound_report[r] = facts
            enc = fit_inside(enc, (0.0, channel_bound[r]) if facts["min_fused"] else None)
        lo_b, hi_b = bounds.get(r, (-np.inf, np.inf))
        if spec.bits < 8 and cfg.saturate_low_bits and lo_b == 0.0 and not state.target.integer_min_clip:
            enc = saturating_encoding(hists[r], enc, hi_b, cfg.fusable_tolerance)
        state.acts[r] = fit_inside(enc, bounds.get(r))
    if bound_report:
        state.report["cle_bounds"] = bound_report
    left = state.report.setdefault("left_float", {})
    for r in roots:
        if hists[r].nonfinite:
            del state.acts[r]
            left[r] = f"carries {hists[r].nonfinite} inf / nan / ±1e30 sentinel values (a mask): kept in float"
    for node, spread in mixed_concats(state.model, state.placement.root, hists, cfg.range_spread):
        r = state.placement.root[node.output[0]]
        if state.acts.pop(r, None) is not None:
            left[r] = (f"Concat '{node.name}': its inputs' ranges differ {spread:.0f}× (more than "
                       f"range_spread = {cfg.range_spread:g}); one scale would crush the smallest: kept in float")
    for t, p in peaks.items():
        spread = p.spread()
        if cfg.range_spread and spread > cfg.range_spread and state.acts.pop(t, None) is not None:
            left[t] = (f"a head layer's output whose channels' ranges differ {spread:.0f}× (more than "
                       f"range_spread = {cfg.range_spread:g}); one scale would crush the smallest: kept in float")
    shared = share_concat_grids(gr, state.placement.root, state.acts, hists, cfg.fusable_tolerance)
    if shared:
        state.report["concat_grids"] = shared
    return state


def share_concat_grids(gr: Graph, root: dict, acts: dict, hists: dict, tolerance: float) -> dict:
    """Put a Concat's inputs on its output's grid, so onnxruntime's QLinearConcat copies their bytes instead of
    requantizing each through a lookup table. What the Concat's readers see does not get worse: without sharing
    an input is rounded onto its own grid and then again onto the output's, with sharing once onto the output's
    (whose range covers every input's). Only an input's other readers (a bottleneck reading the same tensor,
    a graph output) see the coarser grid, so an input that has any is shared only where its histogram MSE on the
    output's grid is within (1 + ``tolerance``) × its MSE on its own grid. Concats are visited from the graph's
    end: one that feeds another first takes the later one's grid, then hands it to its own inputs; an input
    already on another Concat's grid keeps it (the Concat is skipped). Edits ``acts``; returns
    {Concat: {input quantizer: {"error_ratio", "other_readers"}}}. ``gr``: the Graph of the FP32 model."""
    members: dict[str, list[str]] = {}
    for t, r in root.items():
        members.setdefault(r, []).append(t)

    def other_readers(r: str, concat) -> bool:
        for t in members.get(r, []):
            if t in gr.outputs:
                return True
            for c in gr.consumers.get(t, []):
                if c is not concat and not all(root.get(o) == r for o in c.output):
                    return True
        return False
    given: dict[str, str] = {}  # input quantizer -> the Concat output quantizer whose grid it took
    out = {}
    for node in reversed(list(gr.model.graph.node)):
        r_out = root.get(node.output[0]) if node.op_type == "Concat" else None
        if r_out not in acts:
            continue
        ins = list(dict.fromkeys(root.get(i) for i in node.input if i))
        if any(r not in acts or r not in hists for r in ins):
            continue
        enc = acts[r_out]
        facts = {}
        for r in ins:
            if r == r_out or acts[r] is enc:
                continue
            if r in given or enc.spec != acts[r].spec:
                facts = None
                break
            loss = hist_mse_loss(hists[r], enc.spec)
            ratio = mse_ratio(encoding_mse(loss, enc), encoding_mse(loss, acts[r]))
            others = other_readers(r, node)
            if others and ratio > 1 + tolerance:
                facts = None
                break
            facts[r] = {"error_ratio": round(ratio, 4), "other_readers": others}
        if not facts:
            continue
        for r in facts:
            acts[r], given[r] = enc, r_out
        out[node.name] = facts
    return out


def _only_tensor(placement, root: str) -> str | None:
    """``root`` when no other tensor shares its quantizer (then its readers are all that matter), else None."""
    return root if sum(1 for r in placement.root.values() if r == root) == 1 else None


class ChannelPeak:
    """Streaming max |x| per channel (axis 1)."""

    def __init__(self):
        self.peak = None

    def update(self, x):
        x = np.asarray(x)
        if x.ndim < 2:
            return
        finite = np.where(np.isfinite(x), np.abs(x), 0)
        p = finite.max(axis=tuple(a for a in range(x.ndim) if a != 1))
        self.peak = p if self.peak is None else np.maximum(self.peak, p)

    def spread(self) -> float:
        """Largest channel peak over the smallest non-zero one (1 where there is nothing to compare)."""
        if self.peak is None or not np.any(self.peak > 0):
            return 1.0
        live = self.peak[self.peak > 0]
        return float(live.max() / live.min())


def mixed_concats(model, root: dict, hists: dict, spread: float):
    """(Concat node, ratio) for each Concat whose inputs' largest |value| differ more than ``spread`` times."""
    if not spread:
        return []
    out = []
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] not in root:
            continue
        tops = [max(abs(hists[root[i]].min), abs(hists[root[i]].max)) for i in node.input
                if i in root and root[i] in hists and hists[root[i]].n]
        tops = [t for t in tops if t > 0]
        if len(tops) > 1 and max(tops) / min(tops) > spread:
            out.append((node, max(tops) / min(tops)))
    return out


def fit_inside(enc: Encoding, bounds) -> Encoding:
    """Shrink the scale by ulps until the grid's top s·(q_max − z) is <= the activation's upper bound."""
    if bounds is None or not np.isfinite(bounds[1]) or enc.spec.symmetric:
        return enc
    scale = np.float32(enc.scale)
    for _ in range(64):
        if float(scale) * (enc.spec.qmax - int(enc.zero_point)) <= bounds[1]:
            break
        scale = np.nextafter(scale, np.float32(0))
    enc.scale = np.asarray(scale, np.float32)
    return enc
