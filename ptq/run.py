"""The public Python API: ``quantize`` (load → prepare → steps → export → fidelity → evaluate → report, all in
memory) returns a ``Result``; ``Result.save`` writes the model and its reports together (ptq.outputs). ``run`` is
what ``ptq run`` does: check the outputs first, quantize, save, and raise AccuracyGateError when the gate failed.

    import ptq
    result = ptq.quantize("model.onnx", "calib/", weight_bits=4, adaround=True)
    result.save("model.w4a8.onnx")
    result.fidelity, result.report["timings"]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

from .data import DataSource, Preprocess, calibration_sources, model_inputs
from .errors import AccuracyGateError, FidelityError, InputError
from .evaluate import evaluate, fidelity_flags, gate_verdict, parse_max_drop
from .export import export_qdq
from .external import folder, self_contained, total_bytes
from .branches import inline_taken, reassemble
from .feeds import calibration_input
from .model import load_model
from .observe import check_runnable
from .opset import upgraded
from .repair import repair
from .outputs import OutputSet
from .patterns import class_score_outputs
from .choices import build, measured_placement
from .pipeline import Config, check_effective
from .speed import measure_speed, slowest_ops, verdict as speed_verdict
from .target import this_machine
from .threads import use_threads
from .report import render_reports, report_paths


@dataclass
class Result:
    """What ``quantize`` returns: the QDQ model, the report (a dict, as the JSON report holds it), the output
    fidelity on held-back calibration samples and the evaluation (None where not measured), and the accuracy
    gate's verdict (``gate``: one line; ``gate_passed``: None without --max-drop)."""

    model: onnx.ModelProto
    report: dict
    fidelity: dict | None = None
    evaluation: dict | None = None
    gate: str | None = None
    gate_passed: bool | None = None
    fidelity_flags: list = field(default_factory=list)  # outputs under the fidelity bounds (ptq.evaluate)

    def save(self, output, outputs: OutputSet | None = None, inputs=()) -> tuple[Path, Path, Path, Path]:
        """Write the model to ``output`` and its reports beside it (JSON, Markdown, HTML), all or nothing.
        Returns (model, JSON, Markdown, HTML) paths. ``outputs``: an OutputSet made earlier for these paths."""
        output = Path(output)
        paths = (output, *report_paths(output))
        with (outputs or OutputSet(paths, inputs)) as out:
            self.report["output"] = str(output)
            self.report["model_sha256"] = out.stage_model(output, self_contained(self.model),
                                                          external_data=folder(self.model) is not None)
            for path, text in zip(paths[1:], render_reports(self.report)):
                out.stage_text(path, text)
            out.commit()
        return paths


def default_output(model_path: str | Path, config: Config) -> Path:
    """``<stem>.w<W>a<A>.onnx`` in the current folder: deterministic, so batch jobs know where it went."""
    return Path(f"{Path(model_path).stem}.w{config.weight_bits}a{config.act_bits}.onnx")


def make_config(config: Config | None = None, **settings) -> Config:
    """A validated Config: ``config`` (or the defaults) with ``settings`` (Config field names) replacing fields."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}")
    base = {f.name: getattr(config, f.name) for f in fields(Config)} if config else {}
    out = Config(**{**base, **settings})
    out.choices = {k: why for k, why in getattr(config, "choices", {}).items() if k not in settings}
    out.validate()
    check_effective(out)
    return out


def quantize(model, calib=None, *, config: Config | None = None, preprocess: Preprocess | None = None,
             calib_feeds=None, calib_reader=None, eval_data=None, eval_preprocess: Preprocess | None = None,
             max_drop=None, auto_fix: str | None = None, metric=None, progress: bool = False,
             **settings) -> Result:
    """Quantize ``model`` (a path or a ModelProto) with calibration data from the folder ``calib`` (images or
    .npy / .npz samples, stacked into batches), or complete feeds: ``calib_feeds`` (a folder of .npz files, one
    feed each) or ``calib_reader`` (a function, or "module:function", returning or yielding feed dicts).

    ``settings`` are Config fields (``weight_bits=4, adaround=True``, …) over ``config``. ``eval_data``: a folder to
    evaluate both models on. ``max_drop``: the accuracy gate ("0.5" points of top-1, "2%" relative, or the
    parsed tuple); it is checked on ``eval_data``, else on the held-back calibration samples, with ``metric``
    (a function f(fp32_outputs, quant_outputs, labels) -> float, or "module:function") when given.
    ``auto_fix`` ("16" or "fp32"): when the gate fails, raise the most harmful quantizers until it passes
    (ptq.debug). Raises InputError for bad input; writes nothing."""
    config = make_config(config, **settings)
    use_threads(config.threads)
    if config.block_recon:  # its optional dependency, checked before any work
        from .torch_graph import import_torch
        import_torch()
    preprocess = preprocess or Preprocess()
    gate = max_drop if isinstance(max_drop, tuple) or max_drop is None else parse_max_drop(max_drop)
    if isinstance(metric, str):
        from .metric import load_user_metric
        metric = load_user_metric(metric)
    if auto_fix not in (None, "16", "fp32"):
        raise InputError(f"auto_fix must be '16' or 'fp32', not {auto_fix!r}")
    if auto_fix and gate is None:
        raise InputError("--auto-fix needs --max-drop X (the bound it fixes the model to)")
    if calib is None and calib_feeds is None and calib_reader is None and not config.data_free:
        raise InputError("--calib DIR is required (a folder of images or .npy/.npz samples; or --calib-feeds DIR, "
                         "--calib-reader module:function), or --data-free")
    t_start = time.perf_counter()
    timings = {}
    t0 = time.perf_counter()
    original = model if isinstance(model, onnx.ModelProto) else load_model(model)
    name = str(model) if not isinstance(model, onnx.ModelProto) else (original.graph.name or "model")
    check_runnable(original, name)
    inputs = model_inputs(original)
    calib = calibration_input(inputs, calib, calib_feeds, calib_reader)
    calib_src, held = calibration_sources(calib, inputs, preprocess, config) if calib is not None else (None, None)
    eval_src = DataSource(eval_data, inputs, eval_preprocess or preprocess) if eval_data else None
    gate_src = eval_src if eval_src is not None else held
    if gate is not None:
        check_gate_possible(original, gate, gate_src, metric)

    original, converted = upgraded(original, calib_src if calib_src is not None else held, config.batch_size)
    flat, taken, branch_notes = inline_taken(original, calib_src if calib_src is not None else held,
                                             config.batch_size)
    timings["load"] = round(time.perf_counter() - t0, 3)
    state, qmodel, measured = build(flat, config, calib_src, held, progress, timings)
    written = (lambda m: reassemble(original, m, taken)) if taken else (lambda m: m)  # noqa: E731
    qmodel = written(qmodel)
    for t in taken:
        state.report.setdefault("choices", {})[f"If {t.node.name}"] = (
            f"the calibration data took its {t.branch.split('_')[0]} branch only: that branch is quantized, the "
            "other kept float")
    for note in branch_notes:
        state.report.setdefault("warnings", []).append(note)
    if converted:
        state.report.setdefault("choices", {})["opset"] = converted
    if getattr(calib, "note", None):
        state.report.setdefault("choices", {})["calibration"] = calib.note

    gate_scorer, fixed = None, None
    if gate is not None and (metric is not None or auto_fix):
        from .metric import Scorer
        gate_scorer = Scorer(original, gate_src, config.batch_size, metric, progress)
    if auto_fix:
        t0 = time.perf_counter()
        state, qmodel, fixed = _auto_fix(original, state, qmodel, gate_src, gate_scorer, config, gate, auto_fix,
                                         metric, progress)
        qmodel = written(qmodel)
        timings["auto_fix"] = round(time.perf_counter() - t0, 3)

    here = this_machine()
    if here.saturating_u8s8 != state.target.saturating_u8s8:
        state.report.setdefault("warnings", []).append(
            f"built for target {state.target.name}; the fidelity, evaluation and latency below were measured on "
            f"this machine's onnxruntime ({here.describe()}), whose integer arithmetic differs")
    if held is not None and state.transformed is not None:
        # ReLU6 -> ReLU (cle_relu6 = "relu") and bias absorption may change the FP32 function: measure by how much
        state.report["fp32_change_from_transforms"] = evaluate(original, state.transformed, held, config.batch_size)
    fidelity, repaired = None, None
    if held is not None:
        t0 = time.perf_counter()
        fidelity = measured.of(qmodel).fidelity or evaluate(original, qmodel, held, config.batch_size,
                                                            progress=progress, desc="fidelity")
        timings["fidelity"] = round(time.perf_counter() - t0, 3)
    if config.repair and fidelity_flags(fidelity, config.fidelity_sqnr_db, config.fidelity_cosine):
        t0 = time.perf_counter()
        state, qmodel, repaired = repair(original, state, qmodel, held, config, fidelity, progress)
        timings["repair"] = round(time.perf_counter() - t0, 3)
        if repaired["raised"]:  # 16-bit quantizers change the speed too: placed again (never slower than FP32)
            t0 = time.perf_counter()
            state, qmodel, measured = measured_placement(flat, state, qmodel, held, held, progress, after_repair=True)
            if (state.report.get("placement") or {}).get("after_repair"):
                timings["placement_after_repair"] = round(time.perf_counter() - t0, 3)
        qmodel = written(qmodel)
        if repaired["raised"]:  # the model changed: its fidelity is measured again
            fidelity = measured.of(qmodel).fidelity or evaluate(original, qmodel, held, config.batch_size,
                                                                progress=progress, desc="fidelity")
    timing_src = next((s for s in (held, calib_src, eval_src) if s is not None), None)
    evaluation = None
    if eval_src is not None:
        t0 = time.perf_counter()
        evaluation = evaluate(original, qmodel, eval_src, config.batch_size, eval_src.labels(), progress)
        timings["evaluate"] = round(time.perf_counter() - t0, 3)
    verdict = None
    if gate is not None:
        scored = gate_scorer.score(qmodel, exact=False) if metric is not None else (evaluation or fidelity)
        verdict = gate_verdict(scored, gate)
        verdict["data"] = "evaluation data" if eval_src is not None else "held-back calibration samples"
    speed = None
    if config.latency_runs and timing_src is not None:
        t0 = time.perf_counter()
        _, feed = next(iter(timing_src.batches(1)))
        speed = measure_speed(original, qmodel, feed, config.latency_runs, measured.of(qmodel).timed)
        timings["latency"] = round(time.perf_counter() - t0, 3)
        if speed_verdict(speed) == "slower" or ("ratio_ci" not in speed and speed["ratio"] > 1):
            u = speed["unfused"]
            beside = ", ".join(f"{k} {v}" for k, v in list(u["beside"].items())[:4])
            state.report.setdefault("warnings", []).append(
                f"the quantized model runs {speed['ratio']:.2f}× slower than FP32 (onnxruntime CPU, batch 1"
                + (f"; 95 % interval {speed['ratio_ci'][0]:.2f}–{speed['ratio_ci'][1]:.2f}×" if "ratio_ci" in speed
                   else "") + "); "
                f"{u['QuantizeLinear']} Q / {u['DequantizeLinear']} DQ nodes stay unfused" +
                (f", beside {beside}" if beside else "") + slowest_ops(speed.get("ops")))
        for what, cost in speed["costs"].items():
            if speed["ratio"] - cost["ratio_without"] > 0.1:
                state.report.setdefault("warnings", []).append(
                    f"{cost['count']} × {what}: the model runs at {speed['ratio']:.2f}× FP32 latency, "
                    f"{cost['ratio_without']:.2f}× without them (the report's speed section)")
    flags = []
    for where, measured in (("held-back calibration samples", fidelity), ("evaluation data", evaluation)):
        flags += [f"{line} on the {where}{nearest_quantizer(state, output)}"
                  for output, line in fidelity_flags(measured, config.fidelity_sqnr_db, config.fidelity_cosine)]
    timings["total"] = round(time.perf_counter() - t_start, 3)

    report = build_report(name, state, timings, fidelity, evaluation, original, qmodel)
    report["fidelity_flags"] = flags
    report["speed"] = speed
    if calib_src is not None:
        report["calibration"] = calibration_counts(config, calib_src, held)
    if fixed is not None:
        report["auto_fix"] = fixed
    if repaired is not None:
        report["repair"] = repaired
    if verdict is not None:
        report["gate"] = verdict
    return Result(qmodel, report, fidelity, evaluation, verdict and verdict["line"],
                  verdict and verdict["passed"], flags)


def calibration_counts(config: Config, calib_src, held) -> dict:
    """How many samples calibrated and how many were held back, against the --calib-size asked, with one line
    that says so (the folder may hold fewer)."""
    used, back = len(calib_src), len(held) if held is not None else 0
    line = f"calibration: {used} samples, {back} more held back for fidelity"
    if used < config.calib_size:
        line += f" (--calib-size {config.calib_size}: the data hold {used + back})"
    return {"asked": config.calib_size, "used": used, "held_back": back, "line": line}


def nearest_quantizer(state, tensor: str) -> str:
    """'; nearest quantizer: act:<t>' for the activation quantizer closest upstream of ``tensor`` (its own, or
    the first met walking back through the producers), where the trouble most likely starts."""
    producer = {o: n for n in state.model.graph.node for o in n.output}
    seen, frontier = set(), [tensor]
    while frontier:
        nxt = []
        for t in frontier:
            r = state.placement.root.get(t)
            if r in state.acts:
                return f"; nearest quantizer: act:{r}"
            if t in seen or t not in producer:
                continue
            seen.add(t)
            nxt += [i for i in producer[t].input if i]
        frontier = nxt
    return ""


def run(model_path, calib=None, output=None, strict: bool = False,
        **kw) -> tuple[Result, tuple[Path, Path, Path, Path]]:
    """``ptq run``: check that the outputs can be written (and are not the input) before any work, quantize
    (keywords as ``quantize``), write the model and its reports together; raise AccuracyGateError after writing
    when the gate failed, and FidelityError when an output is under the fidelity bounds (after repair, or with
    ``strict`` where repair is off).
    Returns (result, written paths)."""
    config = make_config(kw.pop("config", None), **{k: kw.pop(k) for k in list(kw) if k in Config.__dataclass_fields__})
    output = Path(output) if output else default_output(model_path, config)
    outputs = OutputSet((output, *report_paths(output)), inputs=[model_path])
    with outputs:
        result = quantize(model_path, calib, config=config, **kw)
        paths = result.save(output, outputs)
    if result.gate_passed is False:
        raise AccuracyGateError(result.gate, result, paths)
    flags = result.fidelity_flags
    if flags and (strict or config.repair):
        more = f" (and {len(flags) - 1} more)" if len(flags) > 1 else ""
        fix = result.report.get("repair") or {}
        if strict and not config.repair:
            raise FidelityError(f"--strict: {flags[0]}{more}", result, paths)
        how = ""  # what repair did, where it ran (it needs held-back samples)
        if fix.get("raised"):
            how = f" after raising {len(fix['raised'])} of {fix['quantizers']} quantizers to 16 bits"
        elif fix:
            how = " and raising quantizers did not bring it back"
        culprits = f"; culprits: {', '.join(fix['culprits'])}" if fix.get("culprits") else ""
        raise FidelityError(f"under the fidelity bounds{how}: {flags[0]}{more}{culprits} (the model and its "
                            "reports are written; --no-repair writes them with a warning and exits 0)",
                            result, paths)
    return result, paths


def check_gate_possible(model: onnx.ModelProto, gate, source, metric) -> None:
    """Refuse, before any work, an accuracy gate that could not be checked."""
    if source is None:
        raise InputError("--max-drop needs --eval DIR, or calibration samples to hold back (--holdout N > 0 with "
                         "at least 4 samples in --calib)")
    if metric is not None:
        return
    if not class_score_outputs(model):
        raise InputError("--max-drop needs a classification output ([N, C] class scores or probabilities of a "
                         "Gemm / MatMul, or a pooled Conv) or --metric module:function; the model's outputs are "
                         + ", ".join(o.name for o in model.graph.output))
    if gate[1] and not (hasattr(source, "labels") and source.labels()):
        raise InputError("a relative --max-drop (X%) needs labels (labels.txt or class subfolders) in the gate data")


def _auto_fix(original, state, qmodel, gate_src, gate_scorer, config, max_drop, to, metric, progress):
    """Gate check on ``gate_src``; when it fails, rank the quantizers (per-quantizer analysis on up to
    ``debug_samples`` of those samples) and raise them in that order until it passes. The gate checks run the
    model as the gate itself does (onnxruntime's default session); the ranking runs each Q/DQ exactly."""
    from .debug import auto_fix, gate_met, per_quantizer
    from .evaluate import latencies_ms
    from .metric import Scorer
    before = gate_scorer.score(qmodel, exact=False)
    out = {"to": "16 bits" if to == "16" else "fp32", "metric": before["metric"], "drop_before": before.get("drop"),
           "raised": [], "quantizers": len(state.weights) + len(state.acts)}
    if gate_met(before, max_drop):
        return state, qmodel, out
    rank_scorer = gate_scorer
    if len(gate_src) > config.debug_samples:
        rank_scorer = Scorer(original, gate_src.subset(gate_src.files[: config.debug_samples]), config.batch_size,
                             metric, progress)
    ranking = per_quantizer(state, rank_scorer, progress)
    fixed_state, raised, history, final = auto_fix(state, ranking, gate_scorer, max_drop, to, progress, rank_scorer)
    fixed = export_qdq(fixed_state)
    _, feed = next(iter(gate_src.batches(1)))
    lat0, lat1 = latencies_ms([qmodel, fixed], feed, 20)
    final = final or gate_scorer.score(fixed, exact=False)
    out.update({"raised": raised, "history": history, "drop_after": final.get("drop"),
                "met": gate_met(final, max_drop),
                "raised_share": round(len(raised) / max(out["quantizers"], 1), 4),
                "size_bytes": [qmodel.ByteSize(), fixed.ByteSize()],
                "latency_ms_batch1": [round(lat0, 3), round(lat1, 3)],
                "ranking": ranking[: max(len(raised), 10)]})
    return fixed_state, fixed, out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_report(model_name, state, timings, fidelity, evaluation, original, qmodel) -> dict:
    fp_bytes, q_bytes = total_bytes(original), total_bytes(qmodel)
    shared = {}
    for t, r in state.placement.root.items():
        if t != r:
            shared.setdefault(r, []).append(t)
    acts = {}
    for r, enc in state.acts.items():
        acts[r] = {**enc.to_json(), "lo": float(enc.lo), "hi": float(enc.hi), "shared_by": shared.get(r, []),
                   "logits": r in state.logits}
    weights = {}
    for layer in state.layers:
        enc = state.weights.get(layer.name)
        if enc is not None:
            weights[layer.name] = {"op": layer.op, "weight": layer.weight, "activation": layer.act,
                                   **enc.to_json()}
    return {
        "model": model_name, "output": None,
        "settings": state.config.to_json(),
        "target": state.target.to_json(),
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "sizes": {"fp32_bytes": fp_bytes, "quant_bytes": q_bytes, "ratio": round(fp_bytes / max(q_bytes, 1), 3)},
        "layers": len(state.layers),
        "bn_folded": len(state.bn),
        "fp32_ops": state.placement.fp32_ops,
        "fidelity": fidelity, "evaluation": evaluation,
        "weights": weights, "activations": acts,
        "placement": state.report.get("placement"),
        "stages": {k: v for k, v in state.report.items() if k != "placement"},
    }
