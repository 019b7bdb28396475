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
