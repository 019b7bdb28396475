"""``ptq run`` as a library call: load → prepare → steps → export → save → fidelity → evaluate → report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataSource, Preprocess, model_inputs
from .evaluate import check_gate, evaluate
from .errors import InputError
from .export import export_qdq
from .model import check_writable, load_model, save_model
from .pipeline import Config, Context, prepare, run_steps
from .report import report_paths, write_report


@dataclass
class RunResult:
    output: Path
    report_json: Path
    report_md: Path
    report_html: Path
    report: dict
    gate: str | None = None


def default_output(model_path: str | Path, config: Config) -> Path:
    """``<stem>.w<W>a<A>.onnx`` in the current folder: deterministic, so batch jobs know where it went."""
    return Path(f"{Path(model_path).stem}.w{config.weight_bits}a{config.act_bits}.onnx")


def calibration_sources(folder, inputs, preprocess: Preprocess, config: Config):
    """(range-setting source, held-back source or None): ``calib_size`` samples for range setting plus up to
    ``holdout`` others held back to measure fidelity (at most a quarter of a small folder)."""
    full = DataSource(folder, inputs, preprocess)
    n = len(full)
    holdout = min(config.holdout, n // 4)
    calib_n = min(config.calib_size, n - holdout)
    src = DataSource(folder, inputs, preprocess, size=calib_n + holdout, seed=config.seed)
    if holdout == 0:
        return src, None
    held = set(np.random.default_rng(config.seed + 1).permutation(len(src.files))[:holdout].tolist())
    return (src.subset([f for k, f in enumerate(src.files) if k not in held]),
            src.subset([f for k, f in enumerate(src.files) if k in held]))


def quantize(model_path, calib, output=None, config: Config | None = None, preprocess: Preprocess | None = None,
             eval_dir=None, eval_preprocess: Preprocess | None = None, max_drop=None,
             progress: bool = False, auto_fix: str | None = None, metric=None) -> RunResult:
    """Quantize ``model_path`` with calibration data from ``calib``; write the QDQ model and its report.

    Raises InputError for bad input (before anything is written) and AccuracyGateError after writing, when the
    evaluation on ``eval_dir`` loses more than ``max_drop`` (see ptq.evaluate.parse_max_drop). ``auto_fix``
    ("16" or "fp32"): when the gate fails, raise the most harmful quantizers until it passes (ptq.debug)."""
    config = (config or Config()).validate()
    preprocess = preprocess or Preprocess()
    output = Path(output) if output else default_output(model_path, config)
    check_writable(output)
    for p in report_paths(output):
        check_writable(p)
    t_start = time.perf_counter()
    timings = {}
    t0 = time.perf_counter()
    original = load_model(model_path)
    inputs = model_inputs(original)
    calib_src, held = calibration_sources(calib, inputs, preprocess, config) if calib else (None, None)
    eval_src = DataSource(eval_dir, inputs, eval_preprocess or preprocess) if eval_dir else None
    timings["load"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    state = prepare(original, config)
    timings["prepare"] = round(time.perf_counter() - t0, 3)
    state = run_steps(state, Context(calib_src, progress), timings)

    t0 = time.perf_counter()
    qmodel = export_qdq(state)
    save_model(qmodel, output)
    timings["export"] = round(time.perf_counter() - t0, 3)

    fixed = None
    if auto_fix and max_drop is not None:
        gate_src = eval_src if eval_src is not None else held
        if gate_src is None:
            raise InputError("--auto-fix needs --eval DIR (or calibration data to hold back)")
        t0 = time.perf_counter()
        state, qmodel, fixed = _auto_fix(original, state, qmodel, gate_src, config, max_drop, auto_fix, metric,
                                         progress)
        if fixed["raised"]:
            save_model(qmodel, output)
        timings["auto_fix"] = round(time.perf_counter() - t0, 3)

    fidelity = None
    if held is not None and state.transformed is not None:
        # ReLU6 -> ReLU (cle_relu6 = "relu") and bias absorption may change the FP32 function: measure by how much
        state.report["fp32_change_from_transforms"] = evaluate(original, state.transformed, held, config.batch_size)
    if held is not None:
        t0 = time.perf_counter()
        fidelity = evaluate(original, qmodel, held, config.batch_size, progress=progress, desc="fidelity")
        timings["fidelity"] = round(time.perf_counter() - t0, 3)
    evaluation = None
    if eval_src is not None:
        t0 = time.perf_counter()
        evaluation = evaluate(original, qmodel, eval_src, config.batch_size, eval_src.labels(), progress)
        timings["evaluate"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    report = build_report(model_path, output, state, timings, fidelity, evaluation, original, qmodel)
    if fixed is not None:
        report["auto_fix"] = fixed
    gate_error, gate = None, None
    if max_drop is not None:
        from .errors import AccuracyGateError
        try:
            gate = check_gate(evaluation or fidelity or {}, max_drop)
        except AccuracyGateError as e:
            gate_error, gate = e, str(e)
        report["gate"] = gate
    paths = write_report(report, output)
    if gate_error is not None:
        raise gate_error
    return RunResult(output, *paths, report, gate)


def _auto_fix(original, state, qmodel, gate_src, config, max_drop, to, metric, progress):
    """Gate check on ``gate_src``; when it fails, rank the quantizers (per-quantizer analysis on up to
    ``debug_samples`` of those samples) and raise them in that order until it passes."""
    from .debug import auto_fix, gate_met, per_quantizer
    from .evaluate import latency_ms
    from .metric import Scorer
    gate_scorer = Scorer(original, gate_src, config.batch_size, metric, progress)
    before = gate_scorer.score(qmodel)
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
    lat0, lat1 = latency_ms(qmodel, feed, 20), latency_ms(fixed, feed, 20)
    final = final or gate_scorer.score(fixed)
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


def build_report(model_path, output, state, timings, fidelity, evaluation, original, qmodel) -> dict:
    fp_bytes, q_bytes = original.ByteSize(), Path(output).stat().st_size
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
        "model": str(model_path), "output": str(output),
        "settings": state.config.to_json(),
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "sizes": {"fp32_bytes": fp_bytes, "quant_bytes": q_bytes, "ratio": round(fp_bytes / max(q_bytes, 1), 3)},
        "layers": len(state.layers),
        "bn_folded": len(state.bn),
        "fp32_ops": state.placement.fp32_ops,
        "fidelity": fidelity, "evaluation": evaluation,
        "weights": weights, "activations": acts,
        "stages": state.report,
    }
