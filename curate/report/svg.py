"""Inline SVG bar charts for the report: no JavaScript, no fonts or files fetched, a few KB each."""

from __future__ import annotations

from html import escape

PALETTE = ("#2b7bb9", "#d95f43", "#6aa84f", "#8e6bbf", "#c9a227")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3g}"


def histogram(edges: list[float], series: dict[str, list[int]], width: int = 640, height: int = 220,
              xlabel: str = "") -> str:
    """Side-by-side bars per bin for each series; `edges` has one more entry than each series."""
    nbins = len(edges) - 1
    if nbins <= 0 or not series:
        return '<p class="empty">no data</p>'
    left, right, top, bottom = 48, 12, 24, 34
    pw, ph = width - left - right, height - top - bottom
    peak = max(max(c) for c in series.values()) or 1
    bw = pw / nbins
    sub = bw * 0.9 / len(series)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for frac in ((0, 0.5, 1) if peak >= 4 else (0, 1)):
        y = top + ph * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="gl"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(round(peak * frac))}</text>')
    for si, (name, counts) in enumerate(series.items()):
        color = PALETTE[si % len(PALETTE)]
        for i, c in enumerate(counts):
            if not c:
                continue
            h = ph * c / peak
            x = left + i * bw + bw * 0.05 + si * sub
            parts.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{max(sub, 1):.1f}" height="{h:.1f}" '
                         f'fill="{color}"><title>{escape(name)} [{edges[i]:.3f}, {edges[i + 1]:.3f}): {c}</title></rect>')
    for i in range(0, nbins + 1, max(1, nbins // 6)):
        x = left + i * bw
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{edges[i]:.2f}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    for si, name in enumerate(series):
        x = left + 8 + si * 140
        parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="15">{escape(name)} ({sum(series[name]):,})</text>')
    parts.append("</svg>")
    return "".join(parts)


def hbars(labels: list[str], series: dict[str, list[int | float]], width: int = 640, label_width: int = 200) -> str:
    """Horizontal bars, one row per label, series stacked left to right, the total printed at the end."""
    if not labels:
        return '<p class="empty">none</p>'
    row, top = 20, 22 if len(series) > 1 else 4
    height = top + row * len(labels) + 4
    plot = width - label_width - 70
    totals = [sum(s[i] for s in series.values()) for i in range(len(labels))]
    peak = max(totals) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for i, label in enumerate(labels):
        y = top + i * row
        short = label if len(label) <= 34 else label[:33] + "…"
        parts.append(f'<text x="{label_width - 6}" y="{y + 14}" text-anchor="end"><title>{escape(label)}</title>'
                     f'{escape(short)}</text>')
        x = float(label_width)
        for si, (name, values) in enumerate(series.items()):
            w = plot * values[i] / peak
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                             f'fill="{PALETTE[si % len(PALETTE)]}"><title>{escape(label)} {escape(name)}: '
                             f'{_fmt(values[i])}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 14}">{_fmt(totals[i])}</text>')
    if len(series) > 1:
        for si, name in enumerate(series):
            x = label_width + si * 120
            parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>'
                         f'<text x="{x + 14}" y="13">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
