"""The run report: JSON for machines (``<out>.report.json``), Markdown and HTML (tables, inline SVG charts) for
people (``<out>.report.md``, ``<out>.report.html``), rendered from the same sections."""
from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .target import Target


def json_safe(x):
    """JSON has no inf / nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def report_paths(out: Path) -> tuple[Path, Path, Path]:
    """(JSON, Markdown, HTML) report paths beside the output model."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return tuple(out.with_name(stem + ext) for ext in (".report.json", ".report.md", ".report.html"))


def render_reports(report: dict) -> tuple[str, str, str]:
    """(JSON, Markdown, HTML) texts of the run report, in the order of ``report_paths``."""
    secs = sections(report)
    return json.dumps(json_safe(report), indent=1) + "\n", to_markdown(report, secs), to_html(report, secs)


@dataclass
class Section:
    """One part of the report, rendered alike to Markdown and HTML (charts in the HTML only)."""

    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)
    code: str | None = None


def _fmt(v, nd=4):
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    if isinstance(v, list):
        if len(v) > 4:
            return f"{len(v)} channels, {min(v):.3g}…{max(v):.3g}"
        return ", ".join(_fmt(x, nd) for x in v)
    return str(v)


def _worst(o: dict) -> str:
    w = o.get("worst_slice")
    return f"{w['index']} of {w['of']}: {w['sqnr_db']}, {w['cosine']}" if w else "—"


def _sqnr_chart(title: str, table: dict) -> list[str]:
    """Bars of the lowest 30 SQNRs of a quantizer table (weights or activations)."""
    from .charts import bars_svg
    vals = sorted((float(v["sqnr_db"]), k) for k, v in table.items()
                  if isinstance(v.get("sqnr_db"), (int, float)) and math.isfinite(v["sqnr_db"]))[:30]
    return [bars_svg(title, [k for _, k in vals], [v for v, _ in vals])] if vals else []


def _tally(values) -> str:
    """'8' for one value; '7 (33), 8 (17)' where they differ (count of each, most common first)."""
    counts = collections.Counter(values)
    if len(counts) <= 1:
        return str(next(iter(counts), "—"))
    return ", ".join(f"{v} ({n})" for v, n in counts.most_common())


def written_summary(r: dict) -> str:
    """What the model holds, read from its quantizers (not the settings): bits, grids and the range methods that
    ran, with counts where layers differ (reduce-range, raised layers, overrides, data-free ranges)."""
    s = r["settings"]
    w, a = list(r.get("weights", {}).values()), list(r.get("activations", {}).values())
    methods = [str(q.get("method", "?")).split(" ")[0] for q in a]
    return (f"Weights ({len(w)} layers): bits {_tally(q['bits'] for q in w)}; "
            f"{'per-channel' if s['per_channel'] else 'per-tensor'}; grid "
            f"{_tally('symmetric' if q['symmetric'] else 'asymmetric' for q in w)}; range `{s['weight_range']}`. "
            f"Activations ({len(a)} quantizers): bits {_tally(q['bits'] for q in a)}; grid "
            f"{_tally('symmetric' if q['symmetric'] else 'asymmetric' for q in a)}; range method "
            f"{_tally(methods)}")


def sections(r: dict) -> list[Section]:
    s = r["settings"]
    target = r.get("target")
    out = [Section("Summary", text=[
        f"Model: `{r['model']}` → `{r.get('output')}`",
        written_summary(r)] + ([r["calibration"]["line"].capitalize()] if r.get("calibration") else [])
        + ([f"Target: {Target(**target).describe()}"] if target else []) + [
        f"Steps: {', '.join(s['steps'])}"] + [
        f"Chosen by ptq: `{k}` {why}" for k, why in ((r.get("stages") or {}).get("choices") or {}).items()] + [
        f"Sizes: FP32 {r['sizes']['fp32_bytes'] / 1e6:.2f} MB → quantized {r['sizes']['quant_bytes'] / 1e6:.2f} MB "
        f"({r['sizes']['ratio']:.2f}× smaller); peak memory {r.get('peak_rss_mb')} MB; total time "
        f"{r['timings']['total']:.1f} s"] + [f"**Warning:** {w}" for w in (r.get("stages") or {}).get("warnings", [])
                                             + r.get("fidelity_flags", [])])]
    out.append(Section("Wall time per stage", header=["stage", "seconds"],
                       rows=[[k, f"{v:.2f}"] for k, v in r["timings"].items()]))
    if r.get("fidelity"):
        f = r["fidelity"]
        out.append(Section(f"Output fidelity (FP32 vs quantized, {f['samples']} held-back calibration samples)",
                           text=[f"Top-1 agreement with FP32: {f['top1_agreement']} %"] if "top1_agreement" in f
                           else [], header=["output", "SQNR dB", "cosine", "worst feature slice: SQNR dB, cosine"],
                           rows=[[k, v["sqnr_db"], v["cosine"], _worst(v)] for k, v in f["outputs"].items()]))
    sp = r.get("speed")
    if sp:
        u = sp["unfused"]
        out.append(Section("Speed (onnxruntime CPU, batch 1)", text=[
            f"FP32 {sp['fp32_ms']} ms, quantized {sp['quant_ms']} ms (medians): {sp['ratio']}×"
            + (f", 95 % interval {sp['ratio_ci'][0]}–{sp['ratio_ci'][1]}× over {sp['runs']} paired, interleaved "
               f"runs; CPU time {sp['cpu_ms'][0]} → {sp['cpu_ms'][1]} ms ({sp['cpu_ratio']}×)" if "ratio_ci" in sp
               else " (the model written is the FP32 model as given, byte for byte: not timed against itself; "
               f"FP32 median of {sp['runs']} runs)" if sp.get("same_model")
               else f" (median of {sp['runs']} runs each)")
            + f". Q/DQ nodes left unfused by onnxruntime: {u['QuantizeLinear']} QuantizeLinear, "
            f"{u['DequantizeLinear']} DequantizeLinear."], header=["op beside an unfused Q/DQ", "count"],
            rows=[[k, v] for k, v in u["beside"].items()]))
        if sp.get("ops"):
            fp, q = (list(sp["ops"][k].items()) for k in ("fp32", "quantized"))
            rows = [[*(fp[i] if i < len(fp) else ("", "")), *(q[i] if i < len(q) else ("", ""))]
                    for i in range(max(len(fp), len(q)))]
            out.append(Section("Where the time goes (onnxruntime's profiler, one thread, µs per batch-1 run, "
                               "ops after its fusions)", header=["FP32 op", "µs", "quantized op", "µs"], rows=rows))
        if sp.get("costs"):
            out.append(Section("What the layout's choices cost (each measured by timing the model without it)",
                               header=["choice", "count", "latency × FP32 without it", "with it"],
                               rows=[[k, v["count"], v["ratio_without"], sp["ratio"]] for k, v in sp["costs"].items()]))
    if r.get("placement"):
        out.append(placement_section(r["placement"]))
    if r.get("repair"):
        fix = r["repair"]
        lat = fix.get("latency_ms_batch1")
        out.append(Section("Repair (outputs under the fidelity bounds on the held-back samples)", text=[
            f"Before: {'; '.join(fix['flags_before'])}.",
            f"{'Met' if fix['met'] else 'Not met'} after raising {len(fix['raised'])} of {fix['quantizers']} "
            f"quantizers to {fix['to']}: {', '.join(fix['raised']) or 'none'}; worst margin to the bounds "
            f"{fix['margin_db_before']} → {fix['margin_db_after']} dB; size {fix['size_bytes'][0] / 1e6:.2f} → "
            f"{fix['size_bytes'][1] / 1e6:.2f} MB" + (f"; batch-1 latency {lat[0]} → {lat[1]} ms" if lat else "")
            + f"; {fix['seconds']} s. Culprits: {', '.join(fix['culprits'])}."],
            header=["raised (a segment of the graph's quantizers)", "recovers alone, dB", "margin after, dB"],
            rows=[[h["raised"], h["gain_alone_db"], h["margin_db"]] for h in fix["history"]]))
    if r.get("evaluation"):
        e = r["evaluation"]
        sec = Section(f"Evaluation ({e['samples']} samples)")
        if "fp32_top1" in e:
            sec.header, sec.rows = ["", "top-1", "top-5"], [["FP32", e["fp32_top1"], e["fp32_top5"]],
                                                             ["quantized", e["quant_top1"], e["quant_top5"]]]
            sec.text.append(f"Top-1 drop: {e['top1_drop']} ± {e['top1_drop_se']} points (± one paired standard "
                            f"error over {e['labelled']} labelled samples); top-1 agreement {e['top1_agreement']} %")
        elif "top1_agreement" in e:
            sec.text.append(f"Top-1 agreement with FP32: {e['top1_agreement']} %")
        out.append(sec)
    if r.get("gate"):
        out.append(Section("Accuracy gate", text=[r["gate"]["line"] + f" ({r['gate'].get('data', '')})"]))
    fix = r.get("auto_fix")
    if fix:
        out.append(Section("Auto-fix", text=[
            f"Raised {len(fix['raised'])} of {fix['quantizers']} quantizers to {fix['to']} (metric: {fix['metric']}; "
            f"drop {fix['drop_before']} → {fix.get('drop_after', fix['drop_before'])})."],
            header=["raised", "score", "drop", "scored on"],
            rows=[[h["raised"], h["score"], h["drop"], h["on"]] for h in fix.get("history", [])]))
    out.append(Section("Weight quantizers", header=["layer", "op", "bits", "granularity", "method", "scale",
                                                    "SQNR dB"],
                       rows=[[k, w["op"], w["bits"], "channel" if w["axis"] is not None else "tensor", w["method"],
                              _fmt(w["scale"]), w.get("sqnr_db")] for k, w in r["weights"].items()],
                       charts=_sqnr_chart("weight SQNR dB, lowest 30 layers", r["weights"])))
    out.append(Section("Activation quantizers",
                       header=["tensor", "bits", "scale", "zero point", "method", "range", "observed", "SQNR dB",
                               "shared by"],
                       rows=[[k, a["bits"], _fmt(a["scale"]), a["zero_point"], a["method"],
                              f"[{a['lo']:.4g}, {a['hi']:.4g}]",
                              f"[{_fmt(a.get('observed_min', float('nan')))}, "
                              f"{_fmt(a.get('observed_max', float('nan')))}]",
                              a.get("sqnr_db"), ", ".join(a.get("shared_by", [])) or "—"]
                             for k, a in r["activations"].items()],
                       charts=_sqnr_chart("activation SQNR dB, lowest 30 tensors", r["activations"])))
    out.append(Section("Left in floating point", text=[
        "Ops: " + (", ".join(r["fp32_ops"]) if r["fp32_ops"] else "none")] + [
        f"Tensor `{t}`: {why}" for t, why in ((r.get("stages") or {}).get("left_float") or {}).items()]))
    stages = r.get("stages") or {}
    cle = stages.get("cle")
    if cle:
        from .charts import channel_ranges_svg
        out.append(Section("Cross-layer equalization", text=[
            "Per-channel weight ranges of the most unbalanced layers before and after CLE (the white paper's Fig. 6) "
            "are charted in the HTML report."], header=["pair", "scale min", "scale max"],
            rows=[[k, f"{v['scale_min']:.4g}", f"{v['scale_max']:.4g}"] for k, v in cle["pairs"].items()],
            charts=[channel_ranges_svg(f"{layer}: per-channel weight range",
                                       {"before CLE": rng["before"], "after CLE": rng["after"]})
                    for layer, rng in cle.get("channel_ranges", {}).items()]))
    ada = stages.get("adaround")
    if ada:
        out.append(Section("AdaRound", text=[
            f"Layer inputs {ada['collect_seconds']} s ({ada['checkpoint_segments']} network segments run), rounding "
            f"{ada['solve_seconds']} s. Error: mean squared output error of the layer on its calibration rows (after "
            "its activation where it has one; Gram-form layers include the damping term and, with the bias re-fit, "
            "the best bias for each rounding; residual layers: against the FP32 block output)."],
            header=["layer", "error, nearest", "error, AdaRound", "grid scale ÷ range setting's",
                    "rounded away from nearest", "channels left at nearest", "bias re-fit, max", "residual",
                    "seconds", "data"],
            rows=[[k, f"{v['loss_nearest']:.4g}", f"{v['loss_adaround']:.4g}", v["scale_vs_range_setting"],
                   f"{100 * v['changed_from_nearest']:.1f} %", v["channels_nearest"], f"{v['bias_shift_max']:.3g}",
                   "yes" if v["skip_error"] else "", v["seconds"], v["data"]] for k, v in ada["layers"].items()]))
    blk = stages.get("block_reconstruction")
    if blk:
        out.append(Section("Block reconstruction", text=[
            f"{blk['iters']} Adam steps of {blk['batch']} samples per block, QDrop probability {blk['qdrop']}, "
            f"activation steps {'learned (LSQ)' if blk['lsq'] else 'fixed'}; {blk['seconds']} s. "
            + (f"Fisher weighting: {blk['fisher']}. " if blk.get("fisher") else "") + "Loss: squared error "
            "of the block's outputs per held-out sample, at the start (nearest rounding, or AdaRound's) and after; "
            "a block keeps its result only where the loss went down. 'Soft' is the loss after with the relaxed "
            "rounding h(V), 'undecided' the share of h(V) not yet at 0 or 1; 'per part' the samples a step's "
            "forward and backward ran at once (fewer than a step's where they would not fit in the memory limit)."],
            header=["block", "layers", "samples", "crop", "per part", "loss, start", "loss, after", "soft", "undecided",
                    "kept", "seconds"],
            rows=[[f"{b['layers'][0]} … {b['layers'][-1]}" if len(b["layers"]) > 1 else b["layers"][0],
                   len(b["layers"]), b.get("samples", ""), "×".join(map(str, b["crop"])) if b.get("crop") else "",
                   b.get("step_samples", ""),
                   _fmt(b.get("loss_start", "")),
                   _fmt(b.get("loss_end", "")), _fmt(b.get("loss_end_soft", "")), b.get("undecided", ""),
                   "yes" if b.get("kept") else b.get("skipped", "no"), b["seconds"]]
                  for b in blk["blocks"]]))
    rest = {k: v for k, v in stages.items() if k not in ("adaround", "block_reconstruction", "warnings", "choices")}
    if cle:
        rest["cle"] = {k: v for k, v in cle.items() if k != "channel_ranges"}
    if rest:
        out.append(Section("Stage details", code=json.dumps(json_safe(rest), indent=1)))
    return out


def to_markdown(r: dict, secs: list[Section] | None = None) -> str:
    lines = [f"# ptq report: {Path(r['model']).name}"]
    for sec in secs if secs is not None else sections(r):
        lines += ["", f"## {sec.title}", ""]
        lines += [f"- {t}" for t in sec.text] if sec.title == "Summary" else [t for t in sec.text for t in (t, "")]
        if sec.header:
            lines += ["| " + " | ".join(map(str, sec.header)) + " |", "|" + "---|" * len(sec.header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in sec.rows]
        if sec.code is not None:
            lines += ["```", sec.code, "```"]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML, the rest escaped."""
    import re
    from html import escape
    out = escape(text)
    out = re.sub(r"`([^`]*)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", out)


def to_html(r: dict, secs: list[Section] | None = None) -> str:
    from html import escape
    body = [f"<h1>ptq report: {escape(Path(r['model']).name)}</h1>"]
    for sec in secs if secs is not None else sections(r):
        body.append(f"<h2>{escape(sec.title)}</h2>")
        if sec.title == "Summary":
            body.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in sec.text) + "</ul>")
        else:
            body += [f"<p>{_inline(t)}</p>" for t in sec.text]
        body += [f"<figure>{svg}</figure>" for svg in sec.charts]
        if sec.header:
            head = "".join(f"<th>{escape(str(h))}</th>" for h in sec.header)
            rows = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in sec.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if sec.code is not None:
            body.append(f"<pre>{escape(sec.code)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>ptq report: "
            f"{escape(Path(r['model']).name)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _drop(ev: dict) -> str:
    """'1.46 ± 0.57' (drop ± its paired standard error, points), or the drop alone from older reports, or '—'."""
    if "top1_drop" not in ev:
        return "—"
    return f"{ev['top1_drop']} ± {ev['top1_drop_se']}" if "top1_drop_se" in ev else str(ev["top1_drop"])


def summary_table(report_files: list[Path], exit_files: list[Path] = ()) -> str:
    """One Markdown row per run: the batch job's overview. ``exit_files``: ``<output stem>.exit`` files holding a
    run's exit status (the Makefile's batch rule writes them); a run that wrote no report gets a row of its own.
    The result column: the gate's verdict, outputs under the fidelity bounds, or the exit status."""
    rows = ["| model | output | W/A bits | granularity | size ratio | time s | output SQNR dB | "
            "top-1 agreement % | top-1 drop | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    status = {}
    for f in exit_files:
        try:
            status[Path(f).with_suffix("")] = int(Path(f).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            status[Path(f).with_suffix("")] = None
    reported = set()
    for f in sorted(report_files):
        r = json.loads(Path(f).read_text())
        stem = Path(str(f)[: -len(".report.json")])
        reported.add(stem)
        s = r["settings"]
        ev = r.get("evaluation") or r.get("fidelity") or {}
        sqnr = ", ".join(str(v["sqnr_db"]) for v in ev.get("outputs", {}).values()) or "—"
        gate = r.get("gate")
        if isinstance(gate, dict):
            result = "gate passed" if gate["passed"] else "**gate failed**"
        elif r.get("fidelity_flags"):
            result = f"{len(r['fidelity_flags'])} under the fidelity bounds"
        else:
            result = "ok"
        code = status.get(stem)
        if code:
            result += f" (exit {code})"
        rows.append(f"| {Path(r['model']).name} | {Path(r['output']).name} | {s['weight_bits']}/{s['act_bits']} "
                    f"| {'channel' if s['per_channel'] else 'tensor'} | {r['sizes']['ratio']} "
                    f"| {r['timings']['total']} | {sqnr} | {ev.get('top1_agreement', '—')} "
                    f"| {_drop(ev)} | {result} |")
    for stem, code in sorted(status.items()):
        if stem not in reported:
            rows.append(f"| — | {stem.name}.onnx | — | — | — | — | — | — | — | **failed, nothing written** "
                        f"(exit {code}) |")
    return "\n".join(rows) + "\n"


def placement_section(pl: dict) -> "Section":
    """The measured placement: per pattern its layers, its int8 and float kernel time (onnxruntime's profiler),
    the whole-model trial and the decision."""
    trials = {t["pattern"]: t for t in pl.get("trials", [])}
    text = [pl.get("skipped") or pl.get("line") or "every layer stays int8: no float placement ran faster"]
    if pl.get("after_repair"):
        text.append("Placed after the repair: the model with its raised quantizers was timed again.")
    if "ratio_to_fp32" in pl:
        text.append(f"Written placement against FP32: {pl['ratio_to_fp32']}× (95 % interval {pl['ratio_ci'][0]}–"
                    f"{pl['ratio_ci'][1]}×); all-int8 {pl['int8_ms']} ms, FP32 {pl['fp32_ms']} ms batch 1."
                    + (f" Decision from the cache {pl['cached']}." if pl.get("cached") else ""))
    rows = []
    for p, v in pl.get("patterns", {}).items():
        t = trials.get(p)
        tried = f"{t['ratio_to_previous']}× ({t['ratio_ci'][0]}–{t['ratio_ci'][1]})" if t else "—"
        rows.append([p, len(v["layers"]), v["int8_us"], v["fp32_us"], tried,
                     "float" if p in pl.get("float_patterns", []) or pl.get("all_float") else "int8"])
    return Section("Placement by measured latency (onnxruntime CPU, batch 1)", text=text,
                   header=["pattern", "layers", "int8 kernels µs", "float kernels µs", "model with it in float",
                           "written"], rows=rows)
