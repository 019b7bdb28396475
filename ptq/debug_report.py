"""The debugging flow's report: one self-contained HTML page (inline SVG charts) and the same data as JSON."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from .charts import bars_svg
from .report import json_safe


def debug_paths(out: Path) -> tuple[Path, Path]:
    out = Path(out)
    return out, out.with_suffix(".json")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(r: dict, charts: list[dict]) -> str:
    san = r["fp32_sanity"]
    verdict = ("<p class='ok'>FP32 sanity holds: with every quantizer bypassed the outputs match the FP32 model "
               f"(max relative change {san['max_relative_change']:.2e}).</p>" if san["ok"] else
               "<p class='bad'><b>FP32 SANITY FAILED:</b> with every quantizer bypassed the outputs differ from the "
               f"FP32 model by {san['max_relative_change']:.2e} (relative) &gt; {san['tolerance']:g}. The pipeline "
               "changed the FP32 function (CLE's ReLU6 replacement, bias absorption or a bug): fix this first.</p>")
    wa = r["weights_vs_activations"]
    rows = [[k, f"{v['score']:.4g}", "" if v["drop"] is None else f"{v['drop']:.4g}"]
            for k, v in wa.items() if isinstance(v, dict)]
    pq = r["per_quantizer"]
    drop_or_score = [(q["drop"] if q["drop"] is not None else q["score"]) for q in pq]
    ranking = [[k + 1, q["id"], q["bits"], q["sqnr_db"], f"{q['score']:.4g}",
                "" if q["drop"] is None else f"{q['drop']:.4g}"] for k, q in enumerate(pq)]
    figs = "".join(f"<h3>{escape(c['id'])}</h3>" + "".join(f"<figure>{svg}</figure>" for svg in c["charts"])
                   for c in charts)
    q = r["quantized"]
    name = escape(Path(r["model"]).name)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ptq debug: {name}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}} .bad{{background:#fdd;border:2px solid #c00;padding:8px}}
.ok{{background:#efe;padding:8px}}</style></head><body>
<h1>ptq debug: {escape(Path(r['model']).name)}</h1>
<p>Metric: {escape(r['metric'])} on {escape(r['data'])}. FP32: {r['fp32_score']:.4g}; quantized
(all quantizers): {q['score']:.4g}{'' if q.get('drop') is None else f" (drop {q['drop']:.4g})"}.</p>
<h2>1. FP32 sanity</h2>{verdict}
<h2>2. Weights only vs activations only</h2>{_table(['quantized', 'score', 'drop'], rows)}
<p>Dominant: <b>{escape(wa['dominant'])}</b>.</p>
<h2>3. Per-quantizer analysis (each alone, the rest FP32)</h2>
<figure>{bars_svg('metric drop per quantizer (worst 20)' if pq and pq[0]['drop'] is not None else
                  'score per quantizer (worst 20)', [x['id'] for x in pq[:20]], drop_or_score[:20])}</figure>
{_table(['rank', 'quantizer', 'bits', 'SQNR dB', 'score', 'drop'], ranking)}
<h2>4. The worst quantizers</h2>{figs}
<h2>Timings (s)</h2>{_table(['step', 'seconds'], [[k, v] for k, v in r['timings'].items()])}
</body></html>
"""


def render_debug_report(report: dict, charts: list[dict]) -> tuple[str, str]:
    """(HTML, JSON) texts of the debug report, in the order of ``debug_paths``."""
    return to_html(report, charts), json.dumps(json_safe(report), indent=1) + "\n"
