"""The run report: JSON for machines (``<out>.report.json``) and Markdown for people (``<out>.report.md``)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(x):
    """JSON has no inf / nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def report_paths(out: Path) -> tuple[Path, Path, Path]:
    """(JSON, Markdown, HTML) report paths beside the output model."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return tuple(out.with_name(stem + ext) for ext in (".report.json", ".report.md", ".report.html"))


def write_report(report: dict, out: Path) -> tuple[Path, Path, Path]:
    jpath, mpath, hpath = report_paths(out)
    write_text_atomic(jpath, json.dumps(_clean(report), indent=1) + "\n")
    md = to_markdown(report)
    write_text_atomic(mpath, md)
    write_text_atomic(hpath, to_html(report, md))
    return jpath, mpath, hpath


def charts(r: dict) -> list[str]:
    """Inline SVG charts: per-channel weight ranges before/after CLE of the most unbalanced layers."""
    from .charts import channel_ranges_svg
    out = []
    for layer, rng in ((r.get("stages") or {}).get("cle") or {}).get("channel_ranges", {}).items():
        out.append(channel_ranges_svg(f"{layer}: per-channel weight range",
                                      {"before CLE": rng["before"], "after CLE": rng["after"]}))
    return out


def to_html(r: dict, md: str) -> str:
    from html import escape
    body = "".join(f"<figure>{svg}</figure>" for svg in charts(r))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ptq report: {escape(Path(r['model']).name)}"
            f"</title></head><body>{body}<pre>{escape(md)}</pre></body></html>\n")


def _fmt(v, nd=4):
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    if isinstance(v, list):
        if len(v) > 4:
            return f"{len(v)} channels, {min(v):.3g}…{max(v):.3g}"
        return ", ".join(_fmt(x, nd) for x in v)
    return str(v)


def to_markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"# ptq report: {Path(r['model']).name}", "",
             f"- model: `{r['model']}` → `{r['output']}`",
             f"- weights: {s['weight_bits']}-bit {'per-channel' if s['per_channel'] else 'per-tensor'} "
             f"{'symmetric' if s['weight_symmetric'] else 'asymmetric'}, "
             f"range `{s['weight_range']}`; activations: {s['act_bits']}-bit "
             f"{'symmetric' if s['act_symmetric'] else 'asymmetric'}, range `{s['act_range']}` "
             f"(logits `{s['logits_range']}`)",
             f"- steps: {', '.join(s['steps'])}",
             f"- sizes: FP32 {r['sizes']['fp32_bytes'] / 1e6:.2f} MB → quantized "
             f"{r['sizes']['quant_bytes'] / 1e6:.2f} MB ({r['sizes']['ratio']:.2f}× smaller)",
             f"- total time: {r['timings']['total']:.1f} s", ""]
    lines += [f"> **Warning:** {w}\n" for w in (r.get("stages") or {}).get("warnings", [])]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["timings"].items()]
    if r.get("fidelity"):
        f = r["fidelity"]
        lines += ["", f"## Output fidelity (FP32 vs quantized, {f['samples']} held-back calibration samples)", "",
                  "| output | SQNR dB | cosine |", "|---|---|---|"]
        lines += [f"| {k} | {v['sqnr_db']} | {v['cosine']} |" for k, v in f["outputs"].items()]
        if "top1_agreement" in f:
            lines += ["", f"Top-1 agreement with FP32: {f['top1_agreement']} %"]
    if r.get("evaluation"):
        e = r["evaluation"]
        lines += ["", f"## Evaluation ({e['samples']} samples)", ""]
        if "fp32_top1" in e:
            lines += ["| | top-1 | top-5 |", "|---|---|---|",
                      f"| FP32 | {e['fp32_top1']} | {e['fp32_top5']} |",
                      f"| quantized | {e['quant_top1']} | {e['quant_top5']} |", "",
                      f"Top-1 drop: {e['top1_drop']} ± {e['top1_drop_se']} points (± one paired standard error over "
                      f"{e['labelled']} labelled samples); top-1 agreement {e['top1_agreement']} %"]
        elif "top1_agreement" in e:
            lines += [f"Top-1 agreement with FP32: {e['top1_agreement']} %"]
        if r.get("gate"):
            lines += ["", r["gate"]]
    lines += ["", "## Weight quantizers", "",
              "| layer | op | bits | granularity | method | scale | SQNR dB |", "|---|---|---|---|---|---|---|"]
    for name, w in r["weights"].items():
        lines.append(f"| {name} | {w['op']} | {w['bits']} | {'channel' if w['axis'] is not None else 'tensor'} "
                     f"| {w['method']} | {_fmt(w['scale'])} | {w.get('sqnr_db')} |")
    lines += ["", "## Activation quantizers", "",
              "| tensor | bits | scale | zero point | method | range | observed | SQNR dB | shared by |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, a in r["activations"].items():
        rng = f"[{a['lo']:.4g}, {a['hi']:.4g}]"
        obs = f"[{_fmt(a.get('observed_min', float('nan')))}, {_fmt(a.get('observed_max', float('nan')))}]"
        lines.append(f"| {name} | {a['bits']} | {_fmt(a['scale'])} | {a['zero_point']} | {a['method']} | {rng} "
                     f"| {obs} | {a.get('sqnr_db')} | {', '.join(a.get('shared_by', [])) or '—'} |")
    lines += ["", "## Left in floating point", "",
              ", ".join(r["fp32_ops"]) if r["fp32_ops"] else "nothing"]
    cle = (r.get("stages") or {}).get("cle")
    if cle:
        lines += ["", "## Cross-layer equalization", "", "| pair | scale min | scale max |", "|---|---|---|"]
        lines += [f"| {k} | {v['scale_min']:.4g} | {v['scale_max']:.4g} |" for k, v in cle["pairs"].items()]
        lines += ["", "Per-channel weight ranges of the most unbalanced layers (the white paper's Fig. 6; also in "
                  "the .report.html):", ""] + charts(r)
    ada = (r.get("stages") or {}).get("adaround")
    if ada:
        lines += ["", "## AdaRound", "", f"Layer inputs {ada['collect_seconds']} s ({ada['checkpoint_segments']} "
                  f"network segments run), rounding {ada['solve_seconds']} s. Error: mean squared output error "
                  "of the layer on its calibration rows (after its activation where it has one; Gram-form layers "
                  "include the damping term and, with the bias re-fit, the best bias for each rounding; residual "
                  "layers: against the FP32 block output).", "",
                  "| layer | error, nearest | error, AdaRound | grid scale ÷ range setting's "
                  "| rounded away from nearest | channels left at nearest | bias re-fit, max | residual | seconds "
                  "| data |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['loss_nearest']:.4g} | {v['loss_adaround']:.4g} | {v['scale_vs_range_setting']} "
                  f"| {100 * v['changed_from_nearest']:.1f} % | {v['channels_nearest']} "
                  f"| {v['bias_shift_max']:.3g} | {'yes' if v['skip_error'] else ''} | {v['seconds']} "
                  f"| {v['data']} |" for k, v in ada["layers"].items()]
    rest = {k: v for k, v in (r.get("stages") or {}).items() if k != "adaround"}
    if rest:
        lines += ["", "## Stage details", "", "```", json.dumps(_clean(rest), indent=1), "```"]
    return "\n".join(lines) + "\n"


def _drop(ev: dict) -> str:
    """'1.46 ± 0.57' (drop ± its paired standard error, points), or the drop alone from older reports, or '—'."""
    if "top1_drop" not in ev:
        return "—"
    return f"{ev['top1_drop']} ± {ev['top1_drop_se']}" if "top1_drop_se" in ev else str(ev["top1_drop"])


def summary_table(report_files: list[Path]) -> str:
    """One Markdown row per run report: the batch job's overview."""
    rows = ["| model | output | W/A bits | granularity | size ratio | time s | output SQNR dB | "
            "top-1 agreement % | top-1 drop |", "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(report_files):
        r = json.loads(Path(f).read_text())
        s = r["settings"]
        ev = r.get("evaluation") or r.get("fidelity") or {}
        sqnr = ", ".join(str(v["sqnr_db"]) for v in ev.get("outputs", {}).values()) or "—"
        rows.append(f"| {Path(r['model']).name} | {Path(r['output']).name} | {s['weight_bits']}/{s['act_bits']} "
                    f"| {'channel' if s['per_channel'] else 'tensor'} | {r['sizes']['ratio']} "
                    f"| {r['timings']['total']} | {sqnr} | {ev.get('top1_agreement', '—')} "
                    f"| {_drop(ev)} |")
    return "\n".join(rows) + "\n"
