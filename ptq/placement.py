"""Placement by measured latency: which layers run in int8 and which stay in float, decided by timing the models
on the target runtime (onnxruntime CPU, batch 1), so the written model is not slower than FP32.

Regions are the quantized layers, grouped into patterns that run the same onnxruntime kernel (``pattern``: op,
depthwise or not, kernel size); a pattern is measured and placed once for all its layers:
1. onnxruntime's profiler times every node of the quantized and of the FP32 model (``ptq.speed.node_times``);
   each layer gets its kernel's time in both (the fused QLinearConv ``<name>_token_<k>`` / the float Conv named
   after its output tensor). Patterns whose int8 kernels take longer than their float ones are the candidates,
   the largest loss first.
2. Each candidate, in that order, is kept in float (``in_float``: its weight quantizers removed, then every
   activation quantizer that no int8 node reads, and never a float layer between a DequantizeLinear and a
   QuantizeLinear, where onnxruntime would quantize it itself) and the two whole models are timed in paired,
   interleaved rounds (``ptq.speed.paired_ratio``: open sessions, the current model's kept across the trials,
   about ``TRIAL_BUDGET_S`` of rounds and at least 10); the float placement is kept where it is faster
   (geometric-mean ratio under 1 − ``MIN_GAIN``) with confidence (its 95 % interval under 1): a trial the noise
   leaves undecided keeps the layers in int8.
3. The result is timed against FP32 the same way (the first comparison stands where no pattern went float). Where
   it is faster with confidence (the 95 % interval under 1) it is written. Otherwise a second, independent
   comparison is pooled with the first (``ptq.speed.pooled``): where the pooled ratio is 1 or more, no int8
   placement is faster on this runtime beyond its noise, the model is written in float, and the report says so;
   under 1, the int8 model is written with the pooled interval. Where the all-int8 model is slower with confidence
   and the profile shows that no placement can win (``_hopeless``: every pattern's int8 kernels lose, or floating
   all the losing ones saves less than the gap to FP32), no candidate is tried: the profile is the second verdict.
   Written in float (so too where every pattern went float), it is the faster of ptq's FP32 reference (its folds run
   as fewer ops, SmoothQuant's scales as more) and the model as given, timed against each other: the reference where
   its interval is under 1, else the model as given (not timed where the reference has as many nodes as the model
   given, or more).
Leaving a layer in float only removes rounding, so the fidelity bounds still hold (the caller measures them
again and goes back to the all-int8 placement where they do not).

Timings vary from run to run; the decision is kept in a cache keyed by the all-int8 model's bytes, the target and
the onnxruntime version and threads (``PTQ_CACHE``, else ``~/.cache/ptq``), so the same inputs give the same bytes
on a machine. Models under ``MIN_MS`` of FP32 latency are not placed (their time is the runtime's overhead)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import onnx
import onnxruntime as ort

from .quantizers import raise_quantizers
from .export import export_qdq
from .model import Graph
from .speed import Timed, node_times, paired_ratio, pooled, session
from .weights import layer_kind

MIN_MS = 0.2  # FP32 batch-1 latency under which placement is skipped
MIN_GAIN = 0.02  # a float placement is kept where the model gets at least this much faster
BUDGET_S = 2.0  # seconds of timing per comparison with FP32 (the rounds follow from the models' latency)
TRIAL_BUDGET_S = 1.0  # seconds of timing per trial of a pattern in float
PROFILE_RUNS = 3  # profiled runs of each model for the per-node times
CACHE_VERSION = 9


def pattern(gr: Graph, layer) -> str:
    """The layer's pattern: its op, its kind (conv, depthwise, dense) and kernel size ("Conv depthwise 5×5").
    Layers of one pattern run the same onnxruntime kernel, so they are measured and placed together."""
    kind = layer_kind(gr, layer) or "grouped"
    if layer.op != "Conv":
        return f"{layer.op} {kind}"
    return f"Conv {kind} " + "×".join(str(d) for d in gr.const(layer.weight).shape[2:])


def _base_name(name: str) -> str:
    """A profiled node's name without onnxruntime's fusion suffixes."""
    return re.sub(r"(_token_\d+|_nchwc|/MatMulAddFusion|_fused.*)$", "", name)


def layer_times(state, times: dict, model=None) -> dict[str, float]:
    """{layer name: µs} from ``node_times`` of ptq's model, or of ``model`` (the model as given, whose layers may
    write other tensors: canonicalization makes a layer write what the folded op after it wrote): the node named
    after the layer, its output or its pre-activation, or after the tensor the layer's node writes in ``model``
    (onnxruntime names a convolution it moves to its blocked layout after its output)."""
    writes = {n.output[0]: n.name for n in model.graph.node if n.output} if model is not None else {}
    by_name = {}
    for (name, _), us in times.items():
        base = _base_name(name)
        by_name[base] = by_name.get(base, 0.0) + us
        if writes.get(base, base) != base:
            by_name[writes[base]] = by_name.get(writes[base], 0.0) + us
    out = {}
    for l in state.layers:
        for key in (l.name, l.out, l.pre_act):
            if key in by_name:
                out[l.name] = by_name[key]
                break
    return out


def in_float(state, layer_names) -> object:
    """A copy of the state with the layers ``layer_names`` in float: their weight quantizers removed; then, until
    nothing changes, every activation quantizer that no int8 node reads (a graph output's stays where an int8 layer
    writes it); last, a float layer that still reads a quantized tensor and writes one loses its output's quantizer:
    between a DequantizeLinear and a QuantizeLinear onnxruntime would quantize its float weights itself (and on a
    CPU without VNNI saturate them). A layer at the edge of a float region then runs unfused, in float, on its
    dequantized weights and inputs."""
    sub = raise_quantizers(state, [f"weight:{n}" for n in layer_names], "fp32")
    gr = Graph(state.model)
    root = state.placement.root
    members: dict[str, list[str]] = {}
    for t, r in root.items():
        members.setdefault(r, []).append(t)
    layers = {l.name: l for l in state.layers}
    writer = {t: l.name for l in state.layers for t in (l.out, l.pre_act)}  # through its fused activation
    outputs = {o.name for o in state.model.graph.output}

    def int8(node, r) -> bool:
        """Whether ``node`` (outside quantizer r's tensors) runs on integers: a layer with its weight quantized, or
        another op whose outputs are all quantized."""
        if node.name in layers:
            return node.name in sub.weights
        outs = [o for o in node.output if o]
        return bool(outs) and all(root.get(o) in sub.acts and root.get(o) != r for o in outs)

    changed = True
    while changed:
        changed = False
        for r in list(sub.acts):
            group = set(members.get(r, [r]))
            if any(t in outputs and writer.get(t) in sub.weights for t in group):
                continue
            readers = {id(n): n for t in group for n in gr.consumers.get(t, [])
                       if not all(o in group for o in n.output if o)}
            if not any(int8(n, r) for n in readers.values()):
                del sub.acts[r]
                changed = True
    for name in layer_names:
        l = layers[name]
        if root.get(l.x) in sub.acts and root.get(l.out) in sub.acts:
            del sub.acts[root[l.out]]
    return sub


def _cache_file(qmodel, state) -> Path:
    key = hashlib.sha256(qmodel.SerializeToString()).hexdigest()[:32]
    base = Path(os.environ.get("PTQ_CACHE") or Path.home() / ".cache" / "ptq") / "placement"
    return base / f"{key}.{state.target.name}.ort{ort.__version__}.t{state.config.threads}.v{CACHE_VERSION}.json"


def _settled(lo: float, hi: float) -> bool:
    """Whether a trial's interval already decides it: all of it under 1 − MIN_GAIN (faster) or above 1."""
    return hi < 1 - MIN_GAIN or lo > 1


def _resolved(lo: float, hi: float) -> bool:
    """Whether the interval against FP32 is on one side of 1."""
    return hi < 1 or lo > 1


def _rounds(ms: float, budget_s: float = BUDGET_S) -> int:
    """Paired rounds (two runs each) that fill ``budget_s`` at ``ms`` a run: at least 10 (the first look at the
    interval), at most 400."""
    return int(min(400, max(10, budget_s * 1000 / max(2 * ms, 1e-3))))


def place(original, state, qmodel, feed: dict, progress: bool = False) -> tuple:
    """(state, QDQ model, report dict, ``Timed`` or None) with the patterns whose int8 kernels lose kept in float,
    or everything in float where no placement beats FP32; ``feed``: one batch-1 sample. A cached decision for the
    same quantized model, target and runtime is reused. The ``Timed`` is the last comparison of the model returned
    against ``original`` (None where the decision came from the cache or the model is written in float)."""
    cache = _cache_file(qmodel, state)
    decided, timed = None, None
    if cache.exists():
        try:
            decided = json.loads(cache.read_text())
        except (OSError, ValueError):
            decided = None
    if decided is None:
        decided, timed = _measure(original, state, qmodel, feed)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(decided, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
    else:
        decided = {**decided, "cached": str(cache)}
    if decided.get("all_float"):
        placed = _bare(state)
        if decided.get("float_model") == "original":
            return placed, onnx.ModelProto.FromString(original.SerializeToString()), decided, None
        return placed, export_qdq(placed), decided, None
    names = [l for p in decided.get("float_patterns", []) for l in decided["patterns"][p]["layers"]]
    placed, model = (in_float(state, names), None) if names else (state, qmodel)
    model = model or export_qdq(placed)
    same = timed is not None and (timed.model is model
                                  or timed.model.SerializeToString() == model.SerializeToString())
    return placed, model, decided, dataclasses.replace(timed, model=model) if same else None


def _measure(original, state, qmodel, feed: dict) -> tuple[dict, Timed]:
    """Profile, try the candidates, compare with FP32 (see the module docstring): (the decision as a dict, the
    last comparison with FP32 and the node times taken, as a ``Timed`` of the model compared)."""
    # at most the rounds the report asks for, fewer where the interval is on one side of 1 by a look at 10, 20, …
    first = paired_ratio(original, qmodel, feed, max(3, state.config.latency_runs), until=_resolved)
    info = {"fp32_ms": first["fp32_ms"], "int8_ms": first["quant_ms"], "patterns": {}, "float_patterns": [],
            "trials": [], "all_float": False}
    if first["fp32_ms"] < MIN_MS:
        info["skipped"] = f"FP32 runs in {first['fp32_ms']:.3f} ms (< {MIN_MS} ms): runtime overhead, not placed"
        return info, Timed(qmodel, first)
    gr = Graph(state.model)
    q_nodes, fp_nodes = node_times(qmodel, feed, PROFILE_RUNS), node_times(original, feed, PROFILE_RUNS)
    q_us, fp_us = layer_times(state, q_nodes), layer_times(state, fp_nodes, original)
    for l in state.layers:
        if l.name not in state.weights:
            continue
        p = info["patterns"].setdefault(pattern(gr, l), {"layers": [], "int8_us": 0.0, "fp32_us": 0.0})
        p["layers"].append(l.name)
        p["int8_us"] = round(p["int8_us"] + q_us.get(l.name, 0.0), 1)
        p["fp32_us"] = round(p["fp32_us"] + fp_us.get(l.name, 0.0), 1)
    candidates = sorted((p for p, v in info["patterns"].items() if v["int8_us"] > v["fp32_us"] > 0),
                        key=lambda p: info["patterns"][p]["fp32_us"] - info["patterns"][p]["int8_us"])
    current_state, current = state, qmodel
    hopeless = _hopeless(first, info["patterns"], candidates)
    current_session = trial_session = None  # the current model's stays open through the trials
    for p in ([] if hopeless else candidates):
        trial_state = in_float(current_state, info["patterns"][p]["layers"])
        trial = export_qdq(trial_state)
        current_session = current_session or _opened(current, feed)
        trial_session = _opened(trial, feed)
        r = paired_ratio(current_session, trial_session, feed, _rounds(first["quant_ms"], TRIAL_BUDGET_S),
                         until=_settled)
        kept = r["ratio"] < 1 - MIN_GAIN and r["ratio_ci"][1] < 1  # faster, and with confidence
        info["trials"].append({"pattern": p, "ratio_to_previous": r["ratio"], "ratio_ci": r["ratio_ci"],
                               "rounds": r["runs"], "kept": kept})
        if kept:
            info["float_patterns"].append(p)
            current_state, current, current_session = trial_state, trial, trial_session
    current_session = trial_session = None
    final = first if current is qmodel else paired_ratio(original, current, feed, _rounds(first["fp32_ms"]),
                                                         until=_resolved)
    if hopeless:
        info["confirmation"] = hopeless
    elif final["ratio_ci"][1] >= 1:  # not faster with confidence: a second, independent comparison, pooled
        again = paired_ratio(original, current, feed, _rounds(first["fp32_ms"]), until=_resolved)
        info["confirmation"] = {"ratio": again["ratio"], "ratio_ci": again["ratio_ci"], "rounds": again["runs"]}
        final = {**again, **pooled(final, again)}
    info["ratio_to_fp32"], info["ratio_ci"] = final["ratio"], final["ratio_ci"]
    timed = Timed(current, final, fp_nodes, q_nodes if current is qmodel else None)
    if hopeless or final["ratio"] >= 1:
        info["all_float"] = True
        why = f"; {hopeless['why']}" if hopeless else ", two comparisons"  # a ratio >= 1 was always confirmed
        info["line"] = (f"no int8 placement ran faster than FP32 on this runtime (the fastest: "
                        f"{final['ratio']:.2f}× FP32, 95 % interval {final['ratio_ci'][0]:.2f}–"
                        f"{final['ratio_ci'][1]:.2f}×{why}): the model is written in float; --placement all writes "
                        "the int8 model")
    elif len(info["float_patterns"]) == len(info["patterns"]):
        info["all_float"] = True
        info["line"] = (f"every layer kept in float: no int8 kernel ran faster than float on this runtime "
                        f"({final['ratio']:.2f}× FP32 in float, {first['quant_ms'] / first['fp32_ms']:.2f}× in "
                        "int8); --placement all writes the int8 model")
    elif info["float_patterns"]:
        n = sum(len(info["patterns"][p]["layers"]) for p in info["float_patterns"])
        info["line"] = (f"placement: {n} of {sum(len(v['layers']) for v in info['patterns'].values())} layers "
                        f"({', '.join(info['float_patterns'])}) kept in float, where int8 ran slower "
                        f"({final['ratio']:.2f}× FP32 after); --placement all quantizes them")
    if info["all_float"]:  # ptq's float reference (folds: fewer ops; SmoothQuant's scales: more) or the model given
        reference = export_qdq(_bare(state))
        if len(reference.graph.node) >= len(original.graph.node):  # nothing folded away: the same work, or more
            faster, written = False, "the model as given; ptq's FP32 reference folds no node away"
            info["float_reference_vs_original"] = {"not_timed": f"{len(reference.graph.node)} nodes against "
                                                                f"{len(original.graph.node)}"}
        else:
            r = paired_ratio(original, reference, feed, _rounds(first["fp32_ms"]), until=_resolved)
            faster = r["ratio_ci"][1] < 1  # the model as given is FP32 itself: the reference only where surely faster
            written = ("the folded FP32 reference, faster than the model as given" if faster else
                       "the model as given; the folded FP32 reference was not faster with confidence")
            info["float_reference_vs_original"] = {"ratio": r["ratio"], "ratio_ci": r["ratio_ci"]}
        info["float_model"] = "reference" if faster else "original"
        info["line"] += f" (written: {written})"
    return info, timed


def _hopeless(first: dict, patterns: dict, candidates: list) -> dict | None:
    """Why no mixed placement can beat FP32, from the first comparison and the profile, or None. The all-int8
    model is slower with confidence (its 95 % lower bound lo > 1), and either every pattern's int8 kernels lose
    (a mixed placement keeps some of them and adds Q/DQ), or floating every losing pattern cannot close the gap:
    Σ_losers (t_int8 − t_fp32) < (lo − 1)·t_FP32, the most a placement can save against the least it must."""
    lo, fp_ms = first["ratio_ci"][0], first["fp32_ms"]
    if lo <= 1 or not candidates:
        return None
    losses_ms = sum(patterns[p]["int8_us"] - patterns[p]["fp32_us"] for p in candidates) / 1000
    gap_ms = (lo - 1) * fp_ms
    if len(candidates) == len(patterns):
        why = "every int8 kernel slower than its float one"
    elif losses_ms < gap_ms:
        why = (f"floating every slower int8 kernel saves at most {losses_ms:.2f} ms of the {gap_ms:.2f} ms it "
               "runs over FP32")
    else:
        return None
    return {"why": why, "losses_ms": round(losses_ms, 3), "gap_ms": round(gap_ms, 3)}


def _opened(model, feed: dict):
    """An onnxruntime session of ``model`` that has run ``feed`` once (its first run allocates and packs)."""
    s = session(model)
    s.run(None, feed)
    return s


def _bare(state):
    """The state without any quantizer."""
    return raise_quantizers(state, [f"weight:{k}" for k in state.weights] + [f"act:{k}" for k in state.acts], "fp32")

