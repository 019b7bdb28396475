"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"; white paper §3.4).

Per layer, learn whether each weight rounds up or down:
    W̃ = s · clip(⌊W/s⌋ + h(V), n, p),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1      (eq. 22-23)
minimizing  ‖f(W x) − f(W̃ x̃)‖² + λ Σ (1 − |2h(V) − 1|^β)                                           (eq. 25)
with λ = 0.1 on the normalized loss (``adaround_lambda``; see ptq.rounding.solve) and β annealed 20 → 2 after a
20 % warm start (no regularizer); then W̃ rounds up where h(V) >= 0.5. x is the layer's input in the FP32
network, x̃ in the network whose earlier layers carry their quantized (already AdaRounded) weights; f is the
layer's fused Relu / Clip (and CLE's per-channel bound), else the identity. V starts where h(V) equals the
fractional part of W/s; Adam (lr 0.01) as in the paper.

The per-layer problem and its solvers are in ptq/rounding.py. Where f is the identity the loss is a quadratic
form in Gram matrices,
    ‖X̃W̃ᵀ − XWᵀ‖² = tr(W̃ G̃ W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const,   G̃ = X̃ᵀX̃, C = X̃ᵀX   ([D, D], D = Cin·k·k)
accumulated while streaming the calibration set (up to GRAM_ROWS output positions), so an iteration costs
O(Cout·D²) whatever the data size; damped by ε‖W̃ − W‖² (``Problem.damp``). With an activation,
``adaround_rows`` rows (output positions) are sampled, shuffled once, and each Adam step takes the next
contiguous mini-batch. Depthwise layers are one batched problem over channels ([C, k·k]); with an activation
they keep half the rows and half-size batches, without one a 3×3 kernel gets the exact best of its 2⁹ roundings
per channel. Adam's steps run in float32; the reported errors in float64.

Layer inputs: the layers are visited in topological order, each solved before the next, so x̃ is exactly the
input of the network whose earlier layers are AdaRounded. ``Walk`` (ptq/walk.py) keeps both networks'
activations at the last visited layer while they fit in 0.25 × ``memory_limit`` each, so each node runs about once
per network over the calibration set (where a checkpoint does not fit, from the last one that did).
With ``adaround_inputs = "quantized_acts"`` (the default for activations of 4 bits or fewer) that network also
carries every activation quantizer, fake-quantized as the exporter writes it (``activation_sim``; the activation
ranges are then set before AdaRound, on the FP32 network): each layer rounds, and re-fits its bias, for the input
it will get, activation rounding and clipping included (QDrop's point, Wei et al. 2022, made per layer).
``adaround_inputs = "fp32"`` takes x̃ = x instead. Each output channel keeps AdaRound's rounding only where it
beats nearest rounding on the layer's data (channels are independent in the loss).

Three additions of ours, each switchable:
- grid (``adaround_scale_search``): before rounding, each layer's weight scale is chosen again, per channel (or
  per tensor), among clipping ranges f·max|W| (f = 0.4 … 1) and the one range setting gave, by the output error
  of nearest rounding on the layer's data (``search_scale``), not by the weight-space MSE;
- residual target: a layer whose output alone feeds a residual Add reconstructs the block's output, target
  f(W x) + (skip − quantized skip) (``residual_skip``);
- bias (``adaround_bias``): every Conv / Gemm re-fits its bias to the mean output error left after rounding
  (``Problem.center`` / ``bias_shift``: Gram layers round for the bias that follows).
docs/FINDINGS.md has what each measured.

Output (decisions; the FP32 reference is not touched): the integers q per layer (``state.rounded``), which
export stores instead of rounding to nearest, the re-fitted biases (``state.biases``) and the searched grids
(``state.weights``).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
from tqdm import tqdm

from ..data import require_calibration
from ..model import Graph, set_initializer, set_layer_bias, topological_sort
from ..patches import paired_rows, rows_per_sample
from ..patterns import clip_bounds
from ..quant import Encoding, fake_quant, quantize
from ..walk import Walk

WALK_SHARE = 0.25  # of --memory-limit, for each of the two walks' checkpoints
from ..weights import as_matrix, from_matrix, layer_kind, reconstruction_layers
from ..rounding import Problem, brute_force, no_worse_than_nearest, search_scale, solve

BRUTE_FORCE_WEIGHTS = 10  # depthwise kernels up to this size (3×3) get their exact best rounding
DEPTHWISE_ROW_SHARE = 2
GRAM_ROWS = 1 << 19  # output positions (over all images) a Gram matrix accumulates: its cost is O(rows·D²) once


# ---------------------------------------------------------------- the stage

def _activation(gr: Graph, layer):
    if not layer.act_node:
        return None
    lo, hi = clip_bounds(gr, gr.nodes[layer.act_node])
    if layer.bound:
        hi = np.minimum(hi, gr.const(layer.bound).ravel())
    return lo, hi


def adaround(state, ctx):
    """The AdaRound stage: every layer with a weight encoding, in topological order (see module docstring)."""
    cfg = state.config
    require_calibration(ctx, "AdaRound")
    gr = Graph(state.model)
    layers = reconstruction_layers(state, gr, "AdaRound")
    fp32 = onnx.ModelProto.FromString(state.model.SerializeToString())
    topological_sort(fp32)
    position = {n.name: k for k, n in enumerate(fp32.graph.node)}
    done: dict[str, np.ndarray] = {}  # layer -> AdaRounded weight (grid values)
    report, collect_s = {}, 0.0
    budget = int(cfg.memory_bytes * WALK_SHARE)  # per walk: both together stay within most of --memory-limit
    fp_walk = Walk(ctx.calib, cfg.batch_size, budget)
    q_walk, sim = None, None  # x̃ = x (adaround_inputs "fp32")
    if cfg.adaround_inputs in ("quantized", "quantized_acts"):  # earlier layers AdaRounded as they are solved
        q_walk = Walk(ctx.calib, cfg.batch_size, budget)
        sim = activation_sim(state, ctx) if cfg.adaround_inputs == "quantized_acts" \
            else onnx.ModelProto.FromString(fp32.SerializeToString())
        for l in layers:
            set_initializer(sim, l.weight, fake_quant(gr.const(l.weight), state.weights[l.name]))
    q_pos = {n.name: k for k, n in enumerate(sim.graph.node)} if sim is not None else {}
    q_node = {n.name: n for n in sim.graph.node} if sim is not None else {}
    bar = tqdm(total=len(layers), desc="adaround", unit="layer", disable=not ctx.progress, leave=False)
    for l in layers:
        t0 = time.perf_counter()
        at = position[l.name]
        skip = residual_skip(gr, l, position) if q_walk else None
        names = [l.x] + ([skip] if skip else [])
        q_batches = None
        if q_walk:  # the same tensors in the simulated network, under their FP32 names
            q_names = _sim_names(gr, q_node, l, names)
            q_batches = _renamed(q_walk.batches(sim, q_pos[l.name], q_names), dict(zip(q_names, names)))
        problems = _collect(state, gr, [l], fp_walk.batches(fp32, at, names), q_batches, len(ctx.calib),
                            {l.name: skip} if skip else None)
        collect_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        p, kind = problems.pop(l.name)  # freed once solved
        loss_near = p.loss_grad(p.nearest())[0]  # on the grid weight range setting chose
        enc = state.weights[l.name]
        scale0 = enc.scale
        if cfg.adaround_scale_search and not cfg.easyquant:  # else: round on the grids EasyQuant chose
            scale, zp = search_scale(p, enc.spec)
            p.rescale(scale, zp)
            state.weights[l.name] = enc = Encoding(enc.spec, scale, zp, enc.method,
                                                   {**enc.stats, "output_searched": True})
        if p.depthwise and p.gram is not None and p.w.shape[1] <= BRUTE_FORCE_WEIGHTS:
            q = brute_force(p)
        else:
            q = solve(p, cfg.adaround_iters, _row_budget(cfg.adaround_batch, kind), cfg.adaround_lambda,
                      polish_gram=cfg.adaround_polish)
        q, kept_nearest = no_worse_than_nearest(p, q)
        wt = p.s * q
        shift = 0.0
        if _refits_bias(cfg, l):
            delta = p.bias_shift(wt)
            shift = float(np.max(np.abs(delta)))
            base = gr.const(l.bias).astype(np.float64) if l.bias else 0.0
            state.biases[l.name] = bias = (base + delta).astype(np.float32)
            if sim is not None:
                set_layer_bias(sim, l.name, bias)
            if p.gram is None:
                p.shift_bias(delta)
        loss_ada = p.loss_grad(wt)[0]
        w = gr.const(l.weight)
        done[l.name] = from_matrix(wt, w, l, kind).astype(np.float32)
        if sim is not None:
            set_initializer(sim, l.weight, done[l.name])
        report[l.name] = {"loss_nearest": float(f"{loss_near:.6g}"), "loss_adaround": float(f"{loss_ada:.6g}"),
                          "scale_vs_range_setting": round(float(np.mean(np.asarray(enc.scale) / np.maximum(
                              np.asarray(scale0), 1e-30))), 3),
                          "changed_from_nearest": round(float(np.mean(q != p.nearest_q())), 4),
                          "channels_nearest": int(kept_nearest.sum()), "bias_shift_max": round(shift, 6),
                          "seconds": round(time.perf_counter() - t0, 2), "skip_error": bool(skip),
                          "data": "gram" if p.gram is not None else f"{p.n_rows()} rows"}
        bar.update(1)
    bar.close()
    for l in layers:  # the integers, on the weight encoding's grid; the FP32 weights stay as they are
        state.rounded[l.name] = quantize(done[l.name], state.weights[l.name])
    state.report["adaround"] = {"layers": report, "collect_seconds": round(collect_s, 1),
                                "solve_seconds": round(sum(r["seconds"] for r in report.values()), 1),
                                "checkpoint_segments": fp_walk.runs + (q_walk.runs if q_walk else 0)}
    return state


def activation_sim(state, ctx) -> onnx.ModelProto:
    """The FP32 model with every activation quantizer of the state in place (``ctx.simulate``: fake-quant, float
    bounds) and the weights still float: AdaRound's x̃ with quantized activations (``adaround_inputs =
    "quantized_acts"``)."""
    model, _ = ctx.simulate(dataclasses.replace(state, weights={}, rounded={}, biases={}))
    topological_sort(model)
    return model


def _sim_names(gr: Graph, q_node: dict, layer, names: list) -> list:
    """The tensors the simulated network's nodes read where the FP32 network's read ``names`` (the layer's input
    and its residual skip): the same node, the same input slot."""
    out = [q_node[layer.name].input[list(gr.nodes[layer.name].input).index(layer.x)]]
    for t in names[1:]:
        add = gr.only_consumer(layer.out)
        out.append(q_node[add.name].input[list(add.input).index(t)])
    return out


def _renamed(batches, names: dict):
    """The batches with their tensors under the FP32 network's names (``names`` {simulated: FP32})."""
    for b in batches:
        yield {names.get(k, k): v for k, v in b.items()}


def _row_budget(rows: int, kind: str) -> int:
    """Rows kept (or per Adam step) for a layer: a depthwise row holds every channel's k·k inputs at once, and
    each channel has only k·k weights to fit, so half the rows serve it (and bound its memory)."""
    return max(64, rows // DEPTHWISE_ROW_SHARE) if kind == "depthwise" else rows


def _refits_bias(cfg, layer) -> bool:
    """Whether the layer's bias is re-fitted after rounding (Conv / Gemm, with or without a bias; MatMul has none)."""
    return bool(cfg.adaround_bias and layer.op != "MatMul")


def _summed(old, add: tuple) -> tuple:
    """Running sums over the calibration batches, term by term (``old`` None: the first batch; a None term stays
    None: it is absent, as the mean skip error of a layer without a skip)."""
    return add if old is None else tuple(None if v is None else u + v for u, v in zip(old, add))


def _f64(*arrays) -> tuple:
    return tuple(np.asarray(a, np.float64) for a in arrays)


def _output(x, w, b, kind):
    """The layer's pre-activation output from rows of its input ([R, D] or depthwise [R, C, K]) -> [R, O]."""
    y = np.einsum("rck,ck->rc", x, w) if kind == "depthwise" else x @ w.T
    return (y + b).astype(np.float32)


def residual_skip(gr: Graph, layer, position: dict) -> str | None:
    """The other input of the residual Add that the layer's output alone feeds, when it is computed before the
    layer (so both networks' batches at the layer hold it), else None. The quantized network's skip carries the
    earlier layers' errors; the layer's target becomes FP32 output + (skip − quantized skip), so that the sum,
    the block's output, is what is reconstructed (the residual stream's error is otherwise nobody's to fix)."""
    add = gr.only_consumer(layer.out)
    if add is None or add.op_type != "Add" or layer.bound:
        return None
    other = [i for i in add.input if i != layer.out]
    if len(other) != 1 or gr.is_const(other[0]) or other[0] not in gr.producer:
        return None
    src = gr.producer[other[0]].name
    return other[0] if position.get(src, len(position)) < position[layer.name] else None


def _collect(state, gr, group, fp_batches, q_batches, n_samples: int, skips: dict | None = None) -> dict:
    """Pair the layers' inputs in the FP32 and the quantized-so-far networks (per batch, from ``Walk``); build
    each layer's problem. ``skips`` {layer: tensor}: see ``residual_skip``."""
    cfg = state.config
    probs = {}
    for l in group:
        kind = layer_kind(gr, l)
        enc = state.weights[l.name]
        w = as_matrix(gr.const(l.weight), l, kind)
        p = Problem(w, enc.scale, enc.spec.qmin, enc.spec.qmax, kind == "depthwise", enc.zero_point)
        act = _activation(gr, l)
        b = gr.const(l.bias).astype(np.float64) if l.bias else np.zeros(w.shape[0])
        probs[l.name] = (p, kind, act, b, [], [])
    # Gram layers take up to GRAM_ROWS output positions, row-sampled layers spread adaround_rows over the images
    budget = {l.name: _row_budget(cfg.adaround_rows, probs[l.name][1]) for l in group}

    sums: dict = {}  # Gram layers: (Σ x̃, Σ x, Σ e) over their rows
    written: dict = {}  # depthwise layers with an activation: rows written into their channel-major buffer

    def per_sample(layer):
        return rows_per_sample(GRAM_ROWS if probs[layer.name][2] is None else budget[layer.name], n_samples)
    for _, l, xf, xq, e in paired_rows(gr, group, fp_batches, q_batches, {l.name: l.x for l in group}, per_sample,
                                       cfg.seed, skips):
        p, kind, act, b, rows_x, rows_t = probs[l.name]
        xf, xq = xf.astype(np.float32), xq.astype(np.float32)
        kept = written.get(l.name, 0) if kind == "depthwise" else sum(len(r) for r in rows_x)
        if act is None:
            if _refits_bias(cfg, l):  # the means ``Problem.center`` needs
                sums[l.name] = _summed(sums.get(l.name), tuple(
                    None if v is None else np.sum(v, axis=0, dtype=np.float64) for v in (xq, xf, e)))
            if kind == "depthwise":  # [R, C, K] -> [C, R, K]: one small Gram matrix per channel
                a, c = xq.transpose(1, 0, 2), xf.transpose(1, 0, 2)
                at = a.transpose(0, 2, 1)
                p.gram = _summed(p.gram, (*_f64(np.matmul(at, a), np.matmul(at, c),
                                                np.matmul(c.transpose(0, 2, 1), c)), xq.shape[0]))
                if e is not None:  # per channel: Eᵀ X̃, Eᵀ X over its own k·k inputs
                    p.skip = _summed(p.skip, _f64(np.einsum("rc,rck->ck", e, xq), np.einsum("rc,rck->ck", e, xf),
                                                  np.sum(e.astype(np.float64) ** 2, axis=0)))
            else:
                p.gram = _summed(p.gram, (*_f64(xq.T @ xq, xq.T @ xf, xf.T @ xf), xq.shape[0]))
                if e is not None:
                    p.skip = _summed(p.skip, _f64(e.T @ xq, e.T @ xf, np.sum(e.astype(np.float64) ** 2, axis=0)))
        elif kept < budget[l.name]:
            t = np.clip(_output(xf, p.w, b, kind), *act)
            rows_t.append(t if e is None else t + e)
            if kind == "depthwise":  # written channel-major into one buffer (no second copy of the largest data)
                take = min(len(xq), budget[l.name] - kept)
                if not rows_x:
                    rows_x.append(np.empty((xq.shape[1], budget[l.name], xq.shape[2]), np.float32))
                rows_x[0][:, kept:kept + take] = xq[:take].transpose(1, 0, 2)
                written[l.name] = kept + take
            else:
                rows_x.append(xq)
    for l in group:
        p, kind, act, b, rows_x, rows_t = probs[l.name]
        if act is None:
            if _refits_bias(cfg, l):
                p.center(sums[l.name])
            p.damp()
        elif kind == "depthwise":
            n = written[l.name]
            t = np.concatenate(rows_t)[:n]
            x = rows_x[0] if n == rows_x[0].shape[1] else np.ascontiguousarray(rows_x[0][:, :n])
            p.set_rows(x, t, b, act[0], act[1], owned=True)
            rows_x.clear(), rows_t.clear()
            del x, t
        else:
            x, t = np.concatenate(rows_x)[: budget[l.name]], np.concatenate(rows_t)[: budget[l.name]]
            rows_x.clear(), rows_t.clear()  # the batches' copies go before the problem makes its own
            p.rows = (x, t, b, act[0], act[1])
            del x, t
        probs[l.name] = (p, kind)
    return probs
