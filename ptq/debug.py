"""The white paper's quantization debugging flow (§3.7, Fig. 9) on a quantized pipeline state:

1. FP32 sanity: the exported model with every quantizer bypassed must reproduce the FP32 model's outputs
   (CLE's ReLU6 → ReLU option, or a canonicalization bug, would show here);
2. weights only vs activations only: quantize one kind, keep the other FP32, and see which one dominates;
3. per-quantizer analysis: each quantizer alone at its bit width, the rest FP32, ranked by the metric drop;
4. visualization of the worst: per-channel ranges (one box per channel) and the histogram with the clipping range;
and ``auto_fix``: raise quantizers to 16 bits (or leave them FP32) in that sensitivity order, re-checking the
metric after each, until the drop meets the bound (ranked once, then reverted greedily, as OpenVINO's accuracy
control does). Every score comes from a ptq.metric.Scorer: the FP32 outputs are computed once and the decoded
inputs cached, so each toggle costs one run of one model.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
from tqdm import tqdm

from .errors import AccuracyGateError
from .evaluate import check_gate
from .export import export_qdq
from .model import Graph
from .quantizers import quantizers, raise_quantizers, subset_state


def fp32_sanity(original, state, scorer, tol: float = 1e-4) -> dict:
    """Step 1: all quantizers bypassed. ``ok`` when every output is within ``tol`` (relative to its max)."""
    from .observe import session
    bypass = export_qdq(subset_state(state, set()))
    s0, s1 = session(original), session(bypass)
    names = [o.name for o in s0.get_outputs()]
    worst = 0.0
    for _, feed in scorer.batches():
        for a, b in zip(s0.run(names, feed), s1.run(names, feed)):
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return {"ok": worst <= tol, "max_relative_change": worst, "tolerance": tol}


def weights_vs_activations(state, scorer) -> dict:
    """Step 2: the metric with only the weights quantized and with only the activations quantized."""
    out = {}
    for label, w, a in (("weights only", True, False), ("activations only", False, True), ("both", True, True)):
        r = scorer.score(export_qdq(subset_state(state, None, w, a)))
        out[label] = {"score": r["score"], "drop": r.get("drop")}
    d = {k: (v["drop"] if v["drop"] is not None else -v["score"]) for k, v in out.items()}
    out["dominant"] = "weights" if d["weights only"] >= d["activations only"] else "activations"
    out["metric"] = scorer.kind
    return out


def per_quantizer(state, scorer, progress: bool = False) -> list[dict]:
    """Step 3: each quantizer alone; rows sorted from the most harmful (lowest score) down."""
    rows = []
    qs = quantizers(state)
    for q in tqdm(qs, desc="per-quantizer", unit="q", disable=not progress, leave=False):
        t0 = time.perf_counter()
        r = scorer.score(export_qdq(subset_state(state, {q.id})))
        rows.append({"id": q.id, "kind": q.kind, "name": q.name, "bits": q.bits, "sqnr_db": q.sqnr_db,
                     "score": r["score"], "drop": r.get("drop"), "seconds": round(time.perf_counter() - t0, 2)})
    rows.sort(key=lambda r: r["score"])
    return rows


def visualize(state, worst: list[dict], source, batch_size: int = 16) -> list[dict]:
    """Step 4: for the worst quantizers, per-channel boxes and the value histogram with the clipping range (one
    calibration pass over the FP32 model observes the activation tensors among them)."""
    from .charts import boxes_svg, histogram_svg
    from .observe import ChannelStats, Histogram, observe
    gr = Graph(state.model)
    layers = {l.name: l for l in state.layers}
    acts = [r["name"] for r in worst if r["kind"] == "activation"]
    hists = {t: Histogram() for t in acts}
    chans = {t: ChannelStats() for t in acts}
    if acts:
        observe(state.model, source, batch_size, {t: [hists[t], chans[t]] for t in acts})
    out = []
    for r in worst:
        if r["kind"] == "weight":
            enc = state.weights[r["name"]]
            w = gr.const(layers[r["name"]].weight).astype(np.float64)
            axis = layers[r["name"]].w_axis
            rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            boxes = np.stack([rows.min(1), np.percentile(rows, 25, axis=1), np.median(rows, 1),
                              np.percentile(rows, 75, axis=1), rows.max(1)], axis=1)
            lo, hi = np.asarray(enc.lo, float), np.asarray(enc.hi, float)
            vals, counts = np.unique(np.round(w.ravel(), 12), return_counts=True)
            box = boxes_svg(f"{r['name']}: weight per output channel", boxes, (lo, hi),
                            xlabel="output channel (box: quartiles)")
            hist = histogram_svg(f"{r['name']}: weight values", vals, counts, (float(lo.min()), float(hi.max())))
        else:
            enc = state.acts[r["name"]]
            c, n = hists[r["name"]].centers_counts()
            lo, hi = float(enc.lo), float(enc.hi)
            box = boxes_svg(f"{r['name']}: activation per channel", chans[r["name"]].boxes(), (lo, hi))
            hist = histogram_svg(f"{r['name']}: activation values", c, n, (lo, hi))
        out.append({"id": r["id"], "charts": [box, hist]})
    return out


def gate_met(result: dict, max_drop) -> bool:
    try:
        check_gate(result, max_drop)
        return True
    except AccuracyGateError:
        return False


def auto_fix(state, ranking: list[dict], gate_scorer, max_drop, to: str = "16", progress: bool = False,
             precheck=None):
    """Raise quantizers in ``ranking`` order (most harmful first; ranked once) until ``max_drop`` is met on
    ``gate_scorer``'s data. With ``precheck`` (a Scorer on a subset, e.g. the ranking samples) a step is scored
    on the full gate data only once it passes there. Returns (state, raised ids, history of
    {raised, score, drop, on}, the last result on the full gate data or None)."""
    raised, history, last = [], [], None
    current = state
    with tqdm(total=len(ranking), desc="auto-fix", unit="q", disable=not progress, leave=False) as bar:
        for row in ranking:
            raised.append(row["id"])
            current = raise_quantizers(state, raised, to)
            model = export_qdq(current)
            step = {"raised": row["id"]}
            if precheck is not None and precheck is not gate_scorer:
                r = precheck.score(model)
                step.update({"score": r["score"], "drop": r.get("drop"), "on": "ranking samples"})
                if not gate_met(r, max_drop):
                    history.append(step)
                    bar.update(1)
                    continue
            r = last = gate_scorer.score(model)
            step.update({"score": r["score"], "drop": r.get("drop"), "on": "gate data"})
            history.append(step)
            bar.update(1)
            if gate_met(r, max_drop):
                break
    if history and history[-1]["on"] != "gate data":
        last = None  # the final state was never scored on the full gate data
    return current, raised, history, last


def debug(model_path, calib, output=None, config=None, preprocess=None, eval_dir=None, eval_preprocess=None,
          metric=None, worst: int = 5, progress: bool = False, calib_feeds=None, calib_reader=None) -> tuple:
    """``ptq debug``: quantize as ``ptq run`` would, then run steps 1-4 on up to ``config.debug_samples``
    samples of ``eval_dir`` (else of the calibration folder). Writes <output>.html and .json; returns
    (html path, json path, report dict)."""
    from pathlib import Path

    from .data import DataSource, Preprocess, calibration_sources, choose, model_inputs
    from .errors import InputError
    from .feeds import calibration_input
    from .debug_report import debug_paths, render_debug_report
    from .metric import Scorer
    from .model import load_model
    from .observe import check_runnable
    from .outputs import OutputSet
    from .opset import upgraded
    from .pipeline import Config, check_effective
    from .branches import inline_taken, reassemble
    from .choices import build
    from .threads import use_threads
    config = (config or Config()).validate()
    check_effective(config)
    use_threads(config.threads)
    preprocess = preprocess or Preprocess()
    output = Path(output) if output else Path(f"{Path(model_path).stem}.debug.html")
    outputs = OutputSet(debug_paths(output), inputs=[model_path])
    timings = {}
    t0 = time.perf_counter()
    original = load_model(model_path)
    check_runnable(original, str(model_path))
    inputs = model_inputs(original)
    calib = calibration_input(inputs, calib, calib_feeds, calib_reader)
    if calib is None:
        raise InputError("--calib DIR is required (or --calib-feeds DIR, --calib-reader module:function)")
    calib_src, held = calibration_sources(calib, inputs, preprocess, config)
    original, converted = upgraded(original, calib_src, config.batch_size)
    if eval_dir:
        data = DataSource(eval_dir, inputs, eval_preprocess or preprocess, size=config.debug_samples,
                          seed=config.seed)
        data_note = f"{len(data)} samples of {eval_dir}"
    else:
        full = DataSource(calib, inputs, preprocess) if isinstance(calib, (str, Path)) else calib
        data = full.subset(choose(full.files, config.debug_samples, config.seed + 7))
        data_note = f"{len(data)} samples of the calibration data (no --eval given)"
    flat, taken, _ = inline_taken(original, calib_src, config.batch_size)  # the If branch the data take
    state, qmodel, _ = build(flat, config, calib_src, held, progress, timings)  # what ptq run writes
    written = reassemble(original, qmodel, taken) if taken else qmodel
    timings["quantize"] = round(time.perf_counter() - t0, 3)

    def timed(name, fn, *a):
        t = time.perf_counter()
        r = fn(*a)
        timings[name] = round(time.perf_counter() - t, 3)
        return r
    scorer = timed("fp32_reference", Scorer, original, data, config.batch_size, metric, progress)
    report = {"model": str(model_path), "settings": state.config.to_json(), "data": data_note,
              "metric": scorer.kind, "fp32_score": scorer.reference[0],
              "choices": (state.report.get("choices") or {}) | ({"opset": converted} if converted else {}),
              "quantized_sha256": hashlib.sha256(written.SerializeToString()).hexdigest()}
    report["quantized"] = {k: v for k, v in timed("full_model", scorer.score, qmodel, False).items()
                           if k in ("score", "drop", "metric", "top1_agreement", "outputs")}
    report["fp32_sanity"] = timed("fp32_sanity", fp32_sanity, original, state, scorer)
    report["weights_vs_activations"] = timed("weights_vs_activations", weights_vs_activations, state, scorer)
    report["per_quantizer"] = timed("per_quantizer", per_quantizer, state, scorer, progress)
    charts = timed("visualize", visualize, state, report["per_quantizer"][:worst], data, config.batch_size)
    report["timings"] = timings
    paths = debug_paths(output)
    with outputs:
        for path, text in zip(paths, render_debug_report(report, charts)):
            outputs.stage_text(path, text)
        outputs.commit()
    return (*paths, report)
