"""What the quantized model costs at run time: batch-1 latency of the FP32 and the quantized model in onnxruntime
CPU (medians of repeated runs, one after the other in this process), and the Q/DQ nodes that onnxruntime's graph
optimizations leave standing (not fused into an integer kernel), with the ops beside them — each one is float
work added around a float op; and, for each choice the integer kernels cannot absorb (``costly_choices``), the
latency of the same model without it — what that choice costs, measured; and where the time goes, op by op, in
both models (``op_times``: onnxruntime's own profiler), so a slower quantized model says which kernels made it so."""
from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .evaluate import latencies_ms
from .external import folder, session_options
from .threads import ort_options

QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Timed:
    """What was measured already of one (FP32, quantized) pair on this runtime with one batch-1 feed, so the report
    does not time the same models again: ``pair`` from ``paired_ratio``, each model's ``node_times`` (None where
    that model was not profiled). ``model``: the quantized model it was measured on (reused only for that one)."""
    model: onnx.ModelProto
    pair: dict
    fp32_nodes: dict | None = None
    quant_nodes: dict | None = None


def unfused_qdq(model: onnx.ModelProto) -> dict:
    """{"QuantizeLinear": n, "DequantizeLinear": m, "beside": {op type: count}} after onnxruntime's optimizations
    (the graph it runs, saved by the session)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = path
        session_options(model, opts)
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path, load_external_data=False)
    g = optimized.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    beside = collections.Counter()
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            p = producer.get(n.input[0])
            beside[p.op_type if p is not None else "graph input"] += 1
        elif n.op_type == "DequantizeLinear":
            for r in readers.get(n.output[0], []):
                if r.op_type not in QDQ:
                    beside[r.op_type] += 1
    counts = collections.Counter(n.op_type for n in g.node if n.op_type in QDQ)
    return {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"],
            "beside": dict(beside.most_common())}


def node_times(model: onnx.ModelProto, feed: dict, runs: int = 10) -> dict[tuple[str, str], float]:
    """{(node name, op type): µs per run} of the graph onnxruntime runs (after its fusions: a quantized
    convolution is one QLinearConv named ``<Conv name>_token_<k>``), from onnxruntime's profiler on one thread
    (each kernel's time is its own, not its share of a pool): the ``*_kernel_time`` events of ``runs`` runs after a
    first, untimed one (which allocates and packs), divided by ``runs``. The profile file goes to a temporary
    folder."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort_options(threads=1)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session_options(model, opts)
        s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            s.run(None, feed)
        with open(s.end_profiling()) as f:
            events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    timed_from = starts[1] if len(starts) > 1 else 0
    total = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= timed_from:
            total[(e["name"][:-len("_kernel_time")], e["args"]["op_name"])] += e["dur"]
    return {k: us / runs for k, us in total.items()}


def op_times(model: onnx.ModelProto, feed: dict, runs: int = 10, top: int = 8) -> dict[str, float]:
    """{op type: µs per run} for the ``top`` op types of ``node_times`` (the quantized model's convolutions
    appear as QLinearConv), the remaining op types together as "other"."""
    return by_op(node_times(model, feed, runs), top)


def by_op(times: dict[tuple[str, str], float], top: int = 8) -> dict[str, float]:
    """``node_times`` summed per op type: the ``top`` op types, the rest together as "other"."""
    total = collections.Counter()
    for (_, op), us in times.items():
        total[op] += us
    ranked = total.most_common()
    out = {op: round(us, 1) for op, us in ranked[:top]}
    rest = sum(us for _, us in ranked[top:])
    if rest:
        out["other"] = round(rest, 1)
    return out


def slowest_ops(ops: dict | None, n: int = 3) -> str:
    """The ``n`` costliest op types of each model from ``op_times``, as a clause for a warning ("" without them)."""
    if not ops:
        return ""
    def few(times):
        return ", ".join(f"{op} {us:.0f} µs" for op, us in list(times.items())[:n] if op != "other")
    return f"; most time in the quantized model: {few(ops['quantized'])}; in FP32: {few(ops['fp32'])}"


def _bypassed(model: onnx.ModelProto, nodes: list) -> onnx.ModelProto:
    """A copy of ``model`` whose readers of each node's output read its first input instead (the node dropped)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    alias = {n.output[0]: n.input[0] for n in nodes}
    names = {n.name for n in nodes}
    kept = [n for n in out.graph.node if n.name not in names]
    for n in kept:
        for k, i in enumerate(n.input):
            n.input[k] = alias.get(i, i)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def _symmetric_zero(zp: np.ndarray) -> int:
    """The zero point of a symmetric weight grid: 0 for int8, 128 for uint8 (8-bit weights stored as q + 128)."""
    return 128 if zp.dtype == np.uint8 else 0


def _symmetric_weights(model: onnx.ModelProto, zero_points: list) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in zero_points:
            zp = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full_like(zp, _symmetric_zero(zp)), init.name))
    return out


def _asymmetric(zp: np.ndarray) -> bool:
    return bool(np.any(zp != _symmetric_zero(zp)))


def _narrower(clip, q, inits) -> bool:
    """Whether ``clip`` bounds values tighter than the QuantizeLinear ``q`` it feeds saturates them (then
    onnxruntime cannot fold the Clip into the quantization, as it does a ReLU6 before a uint8 [0, 6] grid)."""
    try:
        lo, hi = (float(numpy_helper.to_array(inits[clip.input[k]])) for k in (1, 2))
        scale = float(numpy_helper.to_array(inits[q.input[1]]))
        zp = numpy_helper.to_array(inits[q.input[2]])
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    info = np.iinfo(zp.dtype)
    z = float(zp)
    return lo > scale * (info.min - z) * (1 + 1e-6) + 1e-12 or hi < scale * (info.max - z) * (1 - 1e-6) - 1e-12


def costly_choices(q_model: onnx.ModelProto) -> dict:
    """{choice: (count, the model without it)} for what the QDQ layout holds that onnxruntime's integer kernels
    cannot absorb: a float Min between DQ and Q (CLE's per-channel ReLU6 bound), a saturating Clip before a
    QuantizeLinear (activations under 8 bits), the same two on the integers between Q and DQ (cheaper: the
    layer before them stays fused), a weight DequantizeLinear (more than one value) whose zero point
    is off the grid's middle (asymmetric weights: not 0 for int8, not 128 for uint8). The models without them are
    not the same function: they exist only to be timed."""
    g = q_model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)

    def quantized(t):  # read by a QuantizeLinear, directly or through a Clip
        return any(r.op_type == "QuantizeLinear" or (r.op_type == "Clip" and quantized(r.output[0]))
                   for r in readers.get(t, []))

    def between_qdq(n):
        p = producer.get(n.input[0])
        return p is not None and p.op_type == "DequantizeLinear" and quantized(n.output[0])
    def on_integers(n):  # between a QuantizeLinear (directly or through another such node) and DequantizeLinear
        p = producer.get(n.input[0])
        while p is not None and p.op_type in ("Min", "Clip") and p.input[0] in producer:
            p = producer[p.input[0]]
        return p is not None and p.op_type == "QuantizeLinear"
    mins = [n for n in g.node if n.op_type == "Min" and len(n.input) == 2 and n.input[1] in inits and between_qdq(n)]
    clips = [n for n in g.node if n.op_type == "Clip" and readers.get(n.output[0])
             and all(r.op_type == "QuantizeLinear" and _narrower(n, r, inits) for r in readers[n.output[0]])]
    int_mins = [n for n in g.node if n.op_type == "Min" and on_integers(n)]
    int_clips = [n for n in g.node if n.op_type == "Clip" and on_integers(n)]
    zps = [n.input[2] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
           and len(n.input) > 2 and n.input[2] in inits and inits[n.input[0]].data_type != onnx.TensorProto.INT32
           and int(np.prod(inits[n.input[0]].dims)) > 1  # one value is an Add / Mul operand's exact grid
           and _asymmetric(numpy_helper.to_array(inits[n.input[2]]))]
    out = {}
    if mins:
        out["float Min between DQ and Q (CLE's per-channel ReLU6 bound)"] = (len(mins), _bypassed(q_model, mins))
    if clips:
        out["saturating Clip before QuantizeLinear (activations under 8 bits)"] = (len(clips),
                                                                                   _bypassed(q_model, clips))
    if int_mins:
        out["integer Min after QuantizeLinear (CLE's per-channel ReLU6 bound)"] = (len(int_mins),
                                                                                  _bypassed(q_model, int_mins))
    if int_clips:
        out["integer Clip after QuantizeLinear (activations under 8 bits)"] = (len(int_clips),
                                                                              _bypassed(q_model, int_clips))
    if zps:
        out["weight zero points off the grid's middle (asymmetric weights)"] = (len(zps),
                                                                               _symmetric_weights(q_model, zps))
    return out


def paired_ratio(fp_model, q_model, feed: dict, runs: int = 20, warmup: int = 3, until=None) -> dict:
    """The quantized model's batch-1 latency relative to FP32, from ``runs`` paired rounds: each round runs both
    models, in alternating order, and times each run's wall clock and this process's CPU time (every onnxruntime
    thread). With r_i = t_q,i / t_fp,i, the ratio is the geometric mean exp(mean log r_i) and its 95 % interval
    exp(mean ± t_{0.975, n−1} · sd / √n): pairing cancels the machine's drift, the interval says what the noise
    leaves. Also the median wall and CPU ms of each model. ``until(lo, hi)``: checked every 10 rounds (from the
    tenth), stop early once it is true of the interval so far (``runs`` is then the most). Either model may be an
    open onnxruntime session (``session``) that has run already: it is warmed by one run, not ``warmup``."""
    import time

    sessions = [m if hasattr(m, "run") else session(m) for m in (fp_model, q_model)]
    for s, m in zip(sessions, (fp_model, q_model)):
        for _ in range(1 if hasattr(m, "run") else warmup):
            s.run(None, feed)
    wall, cpu = np.zeros((runs, 2)), np.zeros((runs, 2))
    done = runs
    for i in range(runs):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            w0, c0 = time.perf_counter(), time.process_time()
            sessions[k].run(None, feed)
            wall[i, k], cpu[i, k] = time.perf_counter() - w0, time.process_time() - c0
        if until is not None and i >= 9 and (i + 1) % 10 == 0 and until(*ratio_interval(wall[:i + 1, 0],
                                                                                        wall[:i + 1, 1])[1:]):
            done = i + 1
            break
    wall, cpu = wall[:done], cpu[:done]
    ratio, lo, hi = ratio_interval(wall[:, 0], wall[:, 1])
    return {"fp32_ms": round(float(np.median(wall[:, 0])) * 1000, 3),
            "quant_ms": round(float(np.median(wall[:, 1])) * 1000, 3),
            "ratio": round(ratio, 3), "ratio_ci": [round(lo, 3), round(hi, 3)],
            "cpu_ms": [round(float(np.median(cpu[:, 0])) * 1000, 3), round(float(np.median(cpu[:, 1])) * 1000, 3)],
            "cpu_ratio": round(float(np.median(cpu[:, 1]) / max(np.median(cpu[:, 0]), 1e-9)), 3), "runs": done}


def ratio_interval(fp: np.ndarray, q: np.ndarray) -> tuple[float, float, float]:
    """(geometric mean of q_i / fp_i, its 95 % interval): exp(m), exp(m ∓ t_{0.975, n−1} · s / √n) with m, s the
    mean and sample standard deviation of log(q_i / fp_i) over the n pairs."""
    from scipy.special import stdtrit
    logs = np.log(np.maximum(np.asarray(q, float), 1e-12) / np.maximum(np.asarray(fp, float), 1e-12))
    n, m = logs.size, float(logs.mean())
    half = float(stdtrit(n - 1, 0.975) * logs.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return float(np.exp(m)), float(np.exp(m - half)), float(np.exp(m + half))


def pooled(a: dict, b: dict) -> dict:
    """Two independent comparisons (``paired_ratio``'s) as one: the mean of their log ratios weighted by 1 / h², h
    the half-width of each 95 % interval in log space (inverse-variance pooling), with the interval
    exp(m ± (Σ 1 / h²)^(−1/2)) and the rounds of both."""
    m, h = [], []
    for c in (a, b):
        lo, hi = (float(np.log(max(v, 1e-12))) for v in c["ratio_ci"])
        m.append(float(np.log(max(c["ratio"], 1e-12))))
        h.append(max((hi - lo) / 2, 1e-9))
    w = 1 / np.square(h)
    mean, half = float(np.sum(w * m) / np.sum(w)), float(1 / np.sqrt(np.sum(w)))
    return {"ratio": round(float(np.exp(mean)), 3),
            "ratio_ci": [round(float(np.exp(mean - half)), 3), round(float(np.exp(mean + half)), 3)],
            "runs": a["runs"] + b["runs"]}


def verdict(speed: dict) -> str | None:
    """'slower' / 'faster' only where the ratio's 95 % interval excludes 1.0, else None (not resolved)."""
    lo, hi = speed.get("ratio_ci", [speed["ratio"]] * 2)
    return "slower" if lo > 1 else "faster" if hi < 1 else None


def session(model):
    """An onnxruntime CPU session of ``model`` (a ModelProto or a path) for timing, as ``paired_ratio`` opens it."""
    from .observe import session as open_session
    return open_session(model if not hasattr(model, "__fspath__") else str(model))


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether ``b`` is ``a`` byte for byte (a model written in float as given); compared only where ``b`` has no
    QuantizeLinear and as many nodes, so a quantized model costs no serialization."""
    if a is b:
        return True
    if len(a.graph.node) != len(b.graph.node) or any(n.op_type == "QuantizeLinear" for n in b.graph.node):
        return False
    return a.SerializeToString() == b.SerializeToString()


def measure_speed(fp_model: onnx.ModelProto, q_model: onnx.ModelProto, feed: dict, runs: int = 20,
                  timed: Timed | None = None) -> dict:
    """Batch-1 latency of both models (``paired_ratio``: paired, interleaved rounds, the ratio with its 95 %
    interval, wall and CPU time; models kept on disk are timed one at a time, medians, without an interval), the
    unfused Q/DQ, per costly choice (``costly_choices``) how many there are and the ratio to FP32 the model would
    have without it, and each model's time per op type (``op_times``; None for a model kept on disk). ``timed``:
    what was measured of this very pair already (the measured placement's last comparison), used instead of timing
    again."""
    timed = timed if timed is not None and timed.model is q_model else None
    on_disk = folder(fp_model) is not None
    if same_model(fp_model, q_model):  # written as given: 1.0× by construction, not timed against itself
        fp_ms = latencies_ms([fp_model], feed, min(runs, 10), interleave=False)[0]
        return {"fp32_ms": round(fp_ms, 3), "quant_ms": round(fp_ms, 3), "ratio": 1.0, "runs": min(runs, 10),
                "same_model": True, "unfused": unfused_qdq(q_model), "costs": {}, "ops": None}
    choices = costly_choices(q_model)
    if timed is not None:
        pair = dict(timed.pair)
        fp_ms = pair["fp32_ms"]
    elif on_disk:
        fp_ms, q_ms = latencies_ms([fp_model, q_model], feed, runs, interleave=False)
        pair = {"fp32_ms": round(fp_ms, 3), "quant_ms": round(q_ms, 3), "ratio": round(q_ms / max(fp_ms, 1e-9), 3),
                "runs": runs}
    else:
        pair = paired_ratio(fp_model, q_model, feed, runs)
        fp_ms = pair["fp32_ms"]
    if choices:  # each model without one choice, against FP32 timed in the same interleaved rounds
        fp_ms, *without_ms = latencies_ms([fp_model] + [m for _, m in choices.values()], feed, runs,
                                          interleave=not on_disk)
    else:
        without_ms = []
    costs = {what: {"count": count, "ratio_without": round(ms / max(fp_ms, 1e-9), 3)}
             for (what, (count, _)), ms in zip(choices.items(), without_ms)}
    ops = None
    if not on_disk:  # a model kept on disk is not loaded twice more to be profiled
        fp_nodes, q_nodes = (timed.fp32_nodes, timed.quant_nodes) if timed is not None else (None, None)
        ops = {"fp32": by_op(fp_nodes if fp_nodes is not None else node_times(fp_model, feed)),
               "quantized": by_op(q_nodes if q_nodes is not None else node_times(q_model, feed))}
    return {**pair, "unfused": unfused_qdq(q_model), "costs": costs, "ops": ops}
