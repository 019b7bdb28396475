"""Small inline SVG charts for the reports (no plotting dependency)."""
from __future__ import annotations

from html import escape


def channel_ranges_svg(title: str, series: dict[str, list[float]], width: int = 640, height: int = 180) -> str:
    """Per-channel weight ranges as bars, one row of bars per series (e.g. before / after CLE), on a shared
    y axis: the white paper's Fig. 6."""
    colors = ["#c0504d", "#4f81bd", "#9bbb59", "#8064a2"]
    top = max((max(v) for v in series.values() if v), default=1.0) or 1.0
    n = max(len(v) for v in series.values())
    pad_l, pad_b, pad_t = 48, 18, 22
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    bar_w = plot_w / max(n, 1) / len(series)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{pad_l}" y="14">{escape(title)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 8}" y2="{pad_t + plot_h}" stroke="#888"/>',
             f'<text x="2" y="{pad_t + 8}">{top:.3g}</text><text x="2" y="{pad_t + plot_h}">0</text>']
    for k, (name, vals) in enumerate(series.items()):
        for i, v in enumerate(vals):
            h = plot_h * v / top
            x = pad_l + (i * len(series) + k) * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{max(bar_w * 0.9, 0.5):.1f}" '
                         f'height="{h:.1f}" fill="{colors[k % 4]}"/>')
        parts.append(f'<text x="{width - 150}" y="{14 + 12 * k}" fill="{colors[k % 4]}">■ {escape(name)}</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 4}">output channel</text></svg>')
    return "".join(parts)


def _frame(title, width, height):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">', f'<text x="48" y="14">{escape(title)}</text>']


def boxes_svg(title: str, boxes, clip: tuple[float, float] | None = None, width: int = 640,
              height: int = 200, xlabel: str = "channel") -> str:
    """One box per channel (rows of ``boxes``: low whisker, box low, middle, box high, high whisker), with the
    quantizer's clipping range [lo, hi] as dashed lines (per channel when ``clip`` holds arrays)."""
    import numpy as np
    b = np.asarray(boxes, float)
    lo_c, hi_c = (np.broadcast_to(np.asarray(v, float), (len(b),)) for v in clip) if clip else (None, None)
    ymin = min(b.min(), lo_c.min() if clip else b.min())
    ymax = max(b.max(), hi_c.max() if clip else b.max())
    ymin, ymax = (ymin - 1, ymax + 1) if ymax == ymin else (ymin, ymax)
    pad_l, pad_b, pad_t = 48, 18, 22
    pw, ph = width - pad_l - 8, height - pad_b - pad_t
    y = lambda v: pad_t + ph * (ymax - v) / (ymax - ymin)  # noqa: E731
    step = pw / max(len(b), 1)
    parts = _frame(title, width, height)
    parts.append(f'<text x="2" y="{pad_t + 8}">{ymax:.3g}</text><text x="2" y="{pad_t + ph}">{ymin:.3g}</text>')
    if ymin < 0 < ymax:
        parts.append(f'<line x1="{pad_l}" y1="{y(0):.1f}" x2="{width - 8}" y2="{y(0):.1f}" stroke="#ccc"/>')
    for i, (w0, q1, m, q3, w1) in enumerate(b):
        x = pad_l + i * step
        cx = x + step / 2
        parts.append(f'<line x1="{cx:.1f}" y1="{y(w1):.1f}" x2="{cx:.1f}" y2="{y(w0):.1f}" stroke="#4f81bd"/>')
        parts.append(f'<rect x="{x + step * 0.15:.1f}" y="{y(q3):.1f}" width="{max(step * 0.7, 0.5):.1f}" '
                     f'height="{max(y(q1) - y(q3), 0.5):.1f}" fill="#4f81bd"/>')
        if clip:
            for v in (lo_c[i], hi_c[i]):
                parts.append(f'<line x1="{x:.1f}" y1="{y(v):.1f}" x2="{x + step:.1f}" y2="{y(v):.1f}" '
                             f'stroke="#c0504d" stroke-width="1.5"/>')
    parts.append(f'<text x="{pad_l}" y="{height - 4}">{escape(xlabel)} (box: mean ± std, whiskers: min/max; '
                 f'red: clipping range)</text></svg>')
    return "".join(parts)


def histogram_svg(title: str, centers, counts, clip: tuple[float, float] | None = None, width: int = 640,
                  height: int = 180, bins: int = 80) -> str:
    """A value histogram (log-scaled counts, rebinned to ``bins``) with the clipping range as red lines."""
    import numpy as np
    c, n = np.asarray(centers, float), np.asarray(counts, float)
    lo = min(c.min(initial=0.0), clip[0] if clip else 0.0)
    hi = max(c.max(initial=0.0), clip[1] if clip else 0.0)
    hi = lo + 1 if hi == lo else hi
    edges = np.linspace(lo, hi, bins + 1)
    h, _ = np.histogram(c, edges, weights=n)
    h = np.log1p(h)
    top = h.max() or 1.0
    pad_l, pad_b, pad_t = 48, 18, 22
    pw, ph = width - pad_l - 8, height - pad_b - pad_t
    x = lambda v: pad_l + pw * (v - lo) / (hi - lo)  # noqa: E731
    parts = _frame(title, width, height)
    for i, v in enumerate(h):
        bh = ph * v / top
        parts.append(f'<rect x="{x(edges[i]):.1f}" y="{pad_t + ph - bh:.1f}" width="{max(pw / bins - 0.5, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="#9bbb59"/>')
    if clip:
        for v in clip:
            parts.append(f'<line x1="{x(v):.1f}" y1="{pad_t}" x2="{x(v):.1f}" y2="{pad_t + ph}" stroke="#c0504d" '
                         f'stroke-width="2"/>')
    parts.append(f'<text x="{pad_l}" y="{height - 4}">{lo:.3g} … {hi:.3g} (log counts; red: clipping range '
                 f'[{clip[0]:.3g}, {clip[1]:.3g}])</text></svg>' if clip else
                 f'<text x="{pad_l}" y="{height - 4}">{lo:.3g} … {hi:.3g}</text></svg>')
    return "".join(parts)


def bars_svg(title: str, labels: list[str], values: list[float], width: int = 640, bar_h: int = 14) -> str:
    """Horizontal bars (e.g. the metric drop per quantizer), largest first as given."""
    top = max((abs(v) for v in values), default=1.0) or 1.0
    height = 26 + bar_h * len(values)
    pad_l = 260
    parts = _frame(title, width, height)
    for i, (name, v) in enumerate(zip(labels, values)):
        yy = 22 + i * bar_h
        w = (width - pad_l - 60) * abs(v) / top
        parts.append(f'<text x="2" y="{yy + bar_h - 3}">{escape(name[-40:])}</text>'
                     f'<rect x="{pad_l}" y="{yy + 1}" width="{w:.1f}" height="{bar_h - 3}" '
                     f'fill="{"#c0504d" if v > 0 else "#4f81bd"}"/>'
                     f'<text x="{pad_l + w + 4:.1f}" y="{yy + bar_h - 3}">{v:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)
