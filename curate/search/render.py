"""Search results as a terminal table, JSON, or one self-contained HTML grid (inline thumbnails, no network).

Every string that came from the data (captions, keys, URLs) is HTML-escaped: captions are web alt-text and
may hold markup.
"""

from __future__ import annotations

import html
import json
from typing import Any

Results = list[tuple[str, list[dict[str, Any]]]]  # (query label, hits)


def as_json(results: Results, k: int, modality: str, where: str | None, templates: str | None = None) -> str:
    doc = {"k": k, "modality": modality, "where": where, "templates": templates,
           "queries": [{"query": label, "hits": hits} for label, hits in results]}
    return json.dumps(doc, indent=2, default=str)


def as_table(results: Results) -> str:
    lines = []
    for label, hits in results:
        lines.append(f"query: {label}")
        lines.append(f"{'rank':>4}  {'score':>7}  {'key':<16} {'clip':>6}  caption")
        for h in hits:
            clip = h.get("clip_score")
            caption = " ".join(str(h.get("caption") or "").split())
            lines.append(f"{h['rank']:>4}  {h['score']:>7.4f}  {h['key']:<16} "
                         f"{(f'{clip:.3f}' if isinstance(clip, float) else '-'):>6}  {caption[:80]}")
        if not hits:
            lines.append("  (no hits)")
        lines.append("")
    return "\n".join(lines)


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h2{font-size:1.1em;margin:1.5em 0 .5em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
.tile img{width:100%;height:150px;object-fit:contain;background:#fff}
.noimg{height:150px;display:flex;align-items:center;justify-content:center;color:#999}
.cap{font-size:12px;margin:4px 0;word-break:break-word}
.meta{font-size:11px;color:#666;font-family:monospace}
"""


def as_html(results: Results, thumbs: dict[str, str], title: str = "curate search") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for label, hits in results:
        parts.append(f"<h2>{html.escape(label)}</h2><div class='grid'>")
        for h in hits:
            uri = thumbs.get(h["key"], "")
            img = (f"<img alt='' src='{html.escape(uri, quote=True)}'>" if uri.startswith("data:image/jpeg;base64,")
                   else "<div class='noimg'>no image</div>")
            clip = h.get("clip_score")
            parts.append(
                f"<div class='tile'>{img}<div class='cap'>{html.escape(str(h.get('caption') or ''))}</div>"
                f"<div class='meta'>#{h['rank']} score {h['score']:.4f}"
                f"{f' clip {clip:.3f}' if isinstance(clip, float) else ''}<br>key {html.escape(h['key'])}</div></div>")
        if not hits:
            parts.append("<p>no hits</p>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)
