"""Build one self-contained HTML report of a dataset: funnel, histograms, sample grids, download health,
train-probe results and accuracy against ground truth. Inline CSS and SVG, thumbnails as data: URIs.

Everything is aggregated in DuckDB over the parquet tables; only the few samples shown in the grids are
read from the tar shards, and random grids draw from a handful of shards, so the cost stays small on
a big dataset.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import pyarrow as pa

from curate.errors import InputError
from curate.export_info import ExportInfo, read_export, resolve_dirs
from curate.inspect import Tables, failures, open_dataset, parquet_source, sql_str, summarize
from curate.io.atomic import write_bytes
from curate.io.ledger import ERROR_CODES
from curate.io.manifest import load
from curate.report import svg
from curate.thumbs import load_thumbnails

log = logging.getLogger(__name__)

MAX_PNG_BYTES = 1_500_000


@dataclass(frozen=True)
class ReportOptions:
    grid_size: int = 24  # thumbnails per grid
    dup_groups: int = 6  # duplicate groups shown
    group_members: int = 8  # members shown per duplicate group
    sample_shards: int = 4  # random grids draw from at most this many shards
    thumb_px: int = 112
    bins: int = 30
    top_hosts: int = 15
    seed: int = 0


@dataclass
class Context:
    ds: Any
    t: Tables
    opts: ReportOptions
    export: ExportInfo | None = None
    views: set[str] = field(default_factory=set)
    thumbs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def has_kept(self) -> bool:
        return "kept" in self.views


ProbeDirs = str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...] | None
GroundTruth = Callable[[Path, "str | os.PathLike | None"], str] | None


def build_report(dataset_dir: str | os.PathLike, out: str | os.PathLike, *,
                 export_dir: str | os.PathLike | None = None, probe_dir: ProbeDirs = None,
                 ground_truth: GroundTruth = None,
                 options: ReportOptions = ReportOptions(), collect: dict[str, Any] | None = None) -> Path:
    """Write the report to `out` (atomically) and return its path; `collect` receives the funnel steps.
    `ground_truth` renders the accuracy section from (dataset root, export dir) (the demo web's, see
    curate.demo.ground_truth.accuracy_section)."""
    html = render_report(dataset_dir, export_dir=export_dir, probe_dir=probe_dir, ground_truth=ground_truth,
                         options=options, collect=collect)
    out = Path(out)
    write_bytes(out, html.encode("utf-8"))
    return out


def render_report(dataset_dir: str | os.PathLike, *, export_dir: str | os.PathLike | None = None,
                  probe_dir: ProbeDirs = None, ground_truth: GroundTruth = None,
                  options: ReportOptions = ReportOptions(), collect: dict[str, Any] | None = None) -> str:
    """The report's HTML; `probe_dir` is one train-probe output folder or several (one section each)."""
    dataset_dir, export_dir = resolve_dirs(dataset_dir, export_dir)
    ds = open_dataset(dataset_dir)
    probe_dirs = [Path(probe_dir)] if isinstance(probe_dir, (str, os.PathLike)) else [Path(p) for p in probe_dir or []]
    for p in probe_dirs:
        if not p.is_dir():
            raise InputError(f"--probe-dir: {p} is not a directory")
    export = read_export(export_dir) if export_dir is not None else None
    t = Tables(ds)
    try:
        ctx = Context(ds, t, options, export, summary=summarize(ds.root))
        if export is not None:
            ctx.views = export.register(t.con)
        if t.has("ledger"):
            _candidates_view(ctx)
        if collect is not None:
            collect["funnel"] = _funnel_steps(ctx)
        sections = [
            ("overview", "Overview", _overview(ctx)),
            ("funnel", "Funnel", _funnel(ctx)),
            ("histograms", "Distributions", _histograms(ctx)),
            ("grids", "Samples", _grids(ctx)),
            ("duplicates", "Duplicate groups", _duplicates(ctx)),
            ("download-health", "Download health", _download_health(ctx)),
        ]
        for i, p in enumerate(probe_dirs):
            sections.append((f"train-probe{f'-{i + 1}' if i else ''}",
                             f"Train-probe: {p.name}" if len(probe_dirs) > 1 else "Train-probe", _train_probe(p)))
        if ground_truth is not None:
            sections.append(("ground-truth", "Curation accuracy vs ground truth",
                             ground_truth(ds.root, export_dir)))
    finally:
        t.close()
    body = "\n".join(f'<section id="{sid}"><h2>{escape(title)}</h2>\n{html}\n</section>'
                     for sid, title, html in sections)
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = f"{ds.root}" + (f" · export {export.root}" if export else "") + f" · generated {now}"
    template = Template(resources.files("curate.report").joinpath("template.html").read_text(encoding="utf-8"))
    return template.substitute(title=escape(f"curate report: {ds.root.name}"), subtitle=escape(sub), nav=nav,
                               sections=body)


# ---------------------------------------------------------------- data


def _candidates_view(ctx: Context) -> None:
    """`cand`: one row per downloaded sample with its score, lang, kept flag and drop reason.

    Materialised once (without captions, fetched later for the shown samples only), since every
    section queries it and the joins over ledger, signals and export would otherwise run each time.
    """
    t = ctx.t
    cols = ["l.key", "l.shard"]
    joins = []
    if t.has("score"):
        joins.append("LEFT JOIN score s ON s.key = l.key")
        cols.append("s.clip_score" if t.has("score", "clip_score") else "NULL::FLOAT AS clip_score")
        cols.append("s.lang" if t.has("score", "lang") else "NULL::VARCHAR AS lang")
        cols.append("s.skip_reason" if t.has("score", "skip_reason") else "NULL::VARCHAR AS skip_reason")
    else:
        cols += ["NULL::FLOAT AS clip_score", "NULL::VARCHAR AS lang", "NULL::VARCHAR AS skip_reason"]
    if ctx.has_kept:
        joins.append("LEFT JOIN kept k ON k.key = l.key")
        cols.append("k.key IS NOT NULL AS kept")
    else:
        cols.append("NULL::BOOLEAN AS kept")
    if "dropped" in ctx.views:
        joins.append("LEFT JOIN dropped dr ON dr.key = l.key")
        cols.append("dr.reason AS reason")
    else:
        cols.append("NULL::VARCHAR AS reason")
    t.con.execute(f"CREATE TEMP TABLE cand AS SELECT {', '.join(cols)} FROM ledger l {' '.join(joins)} "
                  "WHERE l.status = 'success'")
    ctx.views.add("cand")


# ---------------------------------------------------------------- sections


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            text = _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else escape(str(v))
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _num(v: float | int | None) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}"


def _pct(n: int | float | None, total: int | float | None) -> str:
    return f"{n / total:.1%}" if n is not None and total else "–"


def _overview(ctx: Context) -> str:
    s = ctx.summary
    rows = []
    for name, st in s["stages"].items():
        sh = st["shards"]
        cfg = ", ".join(f"{k}={v}" for k, v in list(st["config"].items())[:8])
        rows.append([name, st["status"], sh["done"], sh.get("pending", "–"), len(sh["failed"]),
                     st["fingerprint"] or "–", cfg])
    out = [_table(["stage", "status", "shards done", "pending", "failed", "fingerprint", "config"], rows,
                  {2, 3, 4}) if rows else '<p class="empty">no stages recorded</p>']
    out += _filter_quality(ctx)
    q = (s.get("score") or {}).get("clip_score")
    if q and q.get("p50") is not None:
        out.append("<h3>clip_score quantiles (scored samples)</h3>")
        out.append(_table(list(q), [list(q.values())], set(range(len(q)))))
    dd = s.get("dedup")
    if dd and "duplicates" in dd:
        out.append(f'<p>dedup: {dd["duplicates"]:,} duplicates of {dd["rows"]:,} samples '
                   f'({dd["duplicate_share"]:.1%}), {dd.get("groups", 0):,} groups, largest '
                   f'{dd.get("largest_group", 0):,}; {dd.get("eval_contaminated", 0):,} eval-contaminated.</p>')
    return "\n".join(out)


def _filter_quality(ctx: Context) -> list[str]:
    """The held-out check of a train-probe filter model that scored this dataset (a loud box when weak)."""
    fq = load(ctx.ds)["stages"].get("score", {}).get("inputs", {}).get("filter_quality")
    if not fq:
        return []
    if fq.get("weak"):
        return [f'<p style="border:2px solid #c00;background:#fee;padding:8px;font-weight:bold">WARNING: the '
                f'filter model that scored this dataset is near chance on its own held-out pairs. '
                f'{escape(str(fq.get("verdict", "")))}. Scores, top fractions and embedding dedup built on it '
                f'are close to random.</p>']
    return [f'<p>filter model check: {escape(str(fq.get("verdict", "")))} '
            f'({fq.get("heldout_pairs")} held-out pairs).</p>']


def _funnel_steps(ctx: Context) -> list[tuple[str, int, str]]:
    """(label, count after the step, what the step removed and why)."""
    t, led = ctx.t, ctx.summary.get("ledger")
    if not led:
        return []
    steps = [("input rows", led["rows"], "")]
    failed = led["rows"] - led["success"]
    top = ", ".join(f"{c} {n:,}" for c, n in list(led["error_code"].items())[:5])
    download_note = f"−{failed:,} download failures" + (f": {top}" if top else "")
    ex = ctx.export
    export_input = ex.count("input", "candidates", "rows") if ex else None
    # curate export starts from every ledger row, its first clause being "downloaded"
    if export_input != led["rows"]:
        steps.append(("downloaded", led["success"], download_note))
    if ex is None:
        if t.has("score"):
            scored = t.scalar("SELECT count(*) FROM cand WHERE clip_score IS NOT NULL")
            steps.append(("scored", scored, f"−{led['success'] - scored:,} not scored (undecodable)"))
            if t.has("dedup", "is_duplicate"):
                left = t.scalar("SELECT count(*) FROM cand c JOIN dedup d USING (key) "
                                "WHERE c.clip_score IS NOT NULL AND NOT d.is_duplicate")
                steps.append(("not a duplicate", left, f"−{scored - left:,} flagged is_duplicate by dedup"))
        return steps
    clauses = ex.clauses()
    if not clauses and "dropped" in ctx.views:
        clauses = [{"clause": r, "removed": n, "remaining": None}
                   for r, n in t.rows("SELECT reason, count(*) FROM dropped GROUP BY 1 ORDER BY 2 DESC, 1")]
    current = export_input if export_input is not None else led["success"]
    if current not in (led["success"], led["rows"]):
        steps.append(("export input", current, ""))
    for c in clauses:
        removed = c["removed"] or 0
        current = c["remaining"] if isinstance(c["remaining"], int) else current - removed
        note = download_note if c["clause"] == "downloaded" else f"−{removed:,} removed by this clause"
        steps.append((c["clause"], current, note))
    kept = ex.count("kept", "exported", "output", "out")
    if kept is None and ctx.has_kept:
        kept = t.scalar("SELECT count(*) FROM kept")
    if kept is not None:
        steps.append(("exported", kept, ""))
    return steps


def _funnel(ctx: Context) -> str:
    steps = _funnel_steps(ctx)
    if not steps:
        return '<p class="empty">no ledger</p>'
    top = steps[0][1] or 1
    rows = []
    for label, n, why in steps:
        width = max(0.5, 100 * n / top)
        rows.append(f'<tr><td>{escape(label)}</td><td class="n">{n:,}</td><td class="n">{_pct(n, top)}</td>'
                    f'<td class="bar"><div class="fill" style="width:{width:.1f}%"></div></td>'
                    f'<td class="muted">{escape(why)}</td></tr>')
    note = "" if ctx.export else '<p class="note">No --export-dir given: the funnel stops at the signals.</p>'
    return ('<table class="funnel"><tr><th>step</th><th class="n">remaining</th><th class="n">of input</th>'
            f'<th></th><th>removed</th></tr>{"".join(rows)}</table>{note}')


def _split(ctx: Context) -> tuple[str, dict[str, str]]:
    """The SQL column that splits samples into series, and its series names."""
    if ctx.has_kept:
        return "CASE WHEN kept THEN 'kept' ELSE 'dropped' END", {"kept": "kept", "dropped": "dropped"}
    return "'scored'", {"scored": "scored"}


def _histograms(ctx: Context) -> str:
    t = ctx.t
    if "cand" not in ctx.views or not t.has("score"):
        return '<p class="empty">no score signals</p>'
    lo, hi = t.rows("SELECT min(clip_score), max(clip_score) FROM cand WHERE clip_score IS NOT NULL")[0]
    if lo is None:
        return '<p class="empty">no scored samples</p>'
    nb = ctx.opts.bins
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    w = (hi - lo) / nb
    split, names = _split(ctx)
    counts = {name: [0] * nb for name in names}
    for b, series, n in t.rows(
            f"SELECT least(CAST(floor((clip_score - ?) / ?) AS INTEGER), {nb - 1}) AS b, {split} AS series, "
            "count(*) FROM cand WHERE clip_score IS NOT NULL GROUP BY ALL", [lo, w]):
        counts[series][b] += n
    edges = [lo + i * w for i in range(nb + 1)]
    hist = svg.histogram(edges, counts, xlabel="clip_score")
    langs = t.rows(f"SELECT coalesce(lang, '(none)') AS lang, {split} AS series, count(*) FROM cand "
                   "WHERE clip_score IS NOT NULL GROUP BY ALL")
    totals: dict[str, int] = {}
    for lang, _, n in langs:
        totals[lang] = totals.get(lang, 0) + n
    top = sorted(totals, key=lambda k: (-totals[k], k))[:12]
    lseries = {name: [0] * len(top) for name in names}
    for lang, series, n in langs:
        if lang in top:
            lseries[series][top.index(lang)] += n
    bars = svg.hbars(top, lseries, width=520, label_width=90)
    return (f'<div class="charts"><div><h3>clip_score</h3>{hist}</div>'
            f'<div><h3>caption language (scored samples)</h3>{bars}</div></div>')


def _sample_rows(ctx: Context, where: str, order: str) -> list[dict[str, Any]]:
    rows = ctx.t.rows(f"SELECT key, shard, NULL, clip_score, lang, kept, coalesce(reason, skip_reason) "
                      f"FROM cand WHERE {where} ORDER BY {order} LIMIT {int(ctx.opts.grid_size)}")
    return [dict(zip(("key", "shard", "caption", "clip_score", "lang", "kept", "reason"), r, strict=True)) for r in rows]


def _add_captions(ctx: Context, samples: list[dict[str, Any]]) -> None:
    """Fill in the captions of the samples shown, reading only their shards' ledgers."""
    if not samples:
        return
    keys = {s["key"] for s in samples}
    files = [ctx.ds.ledger(sh) for sh in sorted({s["shard"] for s in samples}) if ctx.ds.ledger(sh).exists()]
    if not files:
        return
    ctx.t.con.register("wanted_keys", pa.table({"key": sorted(keys)}))
    try:
        found = dict(ctx.t.rows(f"SELECT l.key, any_value(l.caption) FROM {parquet_source(files)} l "
                                "JOIN wanted_keys w ON w.key = l.key GROUP BY 1"))
    finally:
        ctx.t.con.unregister("wanted_keys")
    for s in samples:
        s["caption"] = found.get(s["key"])


def _random_rows(ctx: Context, where: str) -> list[dict[str, Any]]:
    """A seeded random sample drawn from a few random shards, so only those tars are opened."""
    seed = sql_str(str(ctx.opts.seed))
    shards = [r[0] for r in ctx.t.rows(
        f"SELECT shard FROM (SELECT DISTINCT shard FROM cand WHERE {where}) "
        f"ORDER BY hash(shard || {seed}) LIMIT {int(ctx.opts.sample_shards)}")]
    if not shards:
        return []
    in_shards = ", ".join(sql_str(s) for s in shards)
    return _sample_rows(ctx, f"({where}) AND shard IN ({in_shards})", f"hash(key || {seed})")


def _tile(s: dict[str, Any], thumbs: dict[str, str], show_reason: bool = False, kept_mark: bool = False,
          extra: str = "") -> str:
    img = thumbs.get(s["key"])
    pic = f'<img src="{img}" alt="{escape(s["key"])}" loading="lazy">' if img else '<div class="noimg">no image</div>'
    cap = s.get("caption") or ""
    cap = cap if len(cap) <= 140 else cap[:139] + "…"
    score = f'{s["clip_score"]:.3f}' if s.get("clip_score") is not None else "–"
    meta = f'{escape(s["key"])} · clip {score}' + (f' · {escape(s["lang"])}' if s.get("lang") else "")
    why = ""
    if show_reason:
        why = f'<div class="why">{escape(s.get("reason") or "not exported")}</div>'
    cls = "tile kept" if kept_mark and s.get("is_kept_of_group") else "tile"
    return (f'<div class="{cls}">{pic}<div class="cap">{escape(cap) or "<i>(empty caption)</i>"}</div>'
            f'<div class="meta">{meta}</div>{why}{extra}</div>')


def _grids(ctx: Context) -> str:
    if "cand" not in ctx.views:
        return '<p class="empty">no downloaded samples</p>'
    grids: list[tuple[str, list[dict[str, Any]], bool]] = []
    if ctx.t.has("score", "clip_score"):
        grids.append(("Highest clip_score", _sample_rows(ctx, "clip_score IS NOT NULL", "clip_score DESC, key"), False))
        grids.append(("Lowest clip_score", _sample_rows(ctx, "clip_score IS NOT NULL", "clip_score ASC, key"), False))
    if ctx.has_kept:
        grids.append(("Random kept", _random_rows(ctx, "kept"), False))
        grids.append(("Random dropped, with the reason", _random_rows(ctx, "NOT kept"), True))
    else:
        grids.append(("Random samples", _random_rows(ctx, "true"), False))
    shown = [s for _, rows, _ in grids for s in rows]
    _add_captions(ctx, shown)
    ctx.thumbs.update(load_thumbnails(ctx.ds, [(s["key"], s["shard"]) for s in shown], ctx.opts.thumb_px))
    # with an index (`curate index`), each tile lists its nearest neighbours
    from curate.search.neighbours import report_neighbours

    nbrs = report_neighbours(ctx.ds, [s["key"] for s in shown])
    out = []
    for title, rows, reason in grids:
        tiles = "".join(_tile(s, ctx.thumbs, show_reason=reason, extra=nbrs.get(s["key"], "")) for s in rows)
        out.append(f"<h3>{escape(title)} ({len(rows)})</h3>"
                   + (f'<div class="grid">{tiles}</div>' if rows else '<p class="empty">none</p>'))
    if not ctx.has_kept:
        out.append('<p class="note">No --export-dir given: kept/dropped grids need an export.</p>')
    return "\n".join(out)


def _duplicates(ctx: Context) -> str:
    t = ctx.t
    if not t.has("dedup", "dup_group") or "cand" not in ctx.views:
        return '<p class="empty">no dedup signals</p>'
    groups = t.rows(f"SELECT dup_group, count(*) AS n FROM dedup WHERE dup_group >= 0 GROUP BY 1 "
                    f"ORDER BY n DESC, dup_group LIMIT {int(ctx.opts.dup_groups)}")
    if not groups:
        return '<p class="empty">no duplicate groups found</p>'
    ids = ", ".join(str(int(g)) for g, _ in groups)
    kept_key = "d.kept_key" if t.has("dedup", "kept_key") else "NULL"
    # pick the members from the small dedup table first, then look up only those in the joined view
    t.con.execute(
        f"CREATE TEMP TABLE shown AS SELECT dup_group, key, key = {kept_key} AS k FROM dedup d "
        f"WHERE dup_group IN ({ids}) QUALIFY row_number() OVER (PARTITION BY dup_group "
        f"ORDER BY k DESC NULLS LAST, key) <= {int(ctx.opts.group_members)}")
    members = t.rows("SELECT s.dup_group, c.key, c.shard, NULL, c.clip_score, c.lang, s.k FROM shown s "
                     "JOIN cand c ON c.key = s.key")
    by_group: dict[int, list[dict[str, Any]]] = {}
    for g, key, shard, cap, cs, lang, k in members:
        by_group.setdefault(g, []).append({"key": key, "shard": shard, "caption": cap, "clip_score": cs,
                                           "lang": lang, "is_kept_of_group": bool(k)})
    for rows in by_group.values():
        rows.sort(key=lambda r: (not r["is_kept_of_group"], r["key"]))
    _add_captions(ctx, [r for rows in by_group.values() for r in rows])
    wanted = [(r["key"], r["shard"]) for rows in by_group.values() for r in rows if r["key"] not in ctx.thumbs]
    ctx.thumbs.update(load_thumbnails(ctx.ds, wanted, ctx.opts.thumb_px))
    out = ['<p class="note">The largest groups; the sample dedup keeps has a green border.</p>']
    for g, n in groups:
        tiles = "".join(_tile(r, ctx.thumbs, kept_mark=True) for r in by_group.get(g, []))
        out.append(f"<h3>group {g}: {n:,} samples</h3><div class=\"group\">{tiles}</div>")
    return "\n".join(out)


def _download_health(ctx: Context) -> str:
    t = ctx.t
    led = ctx.summary.get("ledger")
    if not led:
        return '<p class="empty">no ledger</p>'
    codes = led["error_code"]
    out = [f"<p>{led['rows']:,} rows, {led['success']:,} downloaded ({led['success_share']:.1%}), "
           f"{led['rows'] - led['success']:,} failed.</p>"]
    if codes:
        out.append('<div class="charts"><div>')
        out.append(_table(["error code", "rows", "share", "meaning"],
                          [[c, n, _pct(n, led["rows"]), ERROR_CODES.get(c, "")] for c, n in codes.items()], {1, 2}))
        out.append("</div><div>" + svg.hbars(list(codes), {"rows": list(codes.values())}, width=460,
                                            label_width=150) + "</div></div>")
    # the failures by cause (the error code, split where it covers several: 429, refused, 404/410...)
    # and the hosts with the most failures, each by cause: where a low success rate comes from
    fails = failures(t, top=int(ctx.opts.top_hosts))
    if fails["causes"]:
        out.append("<h3>Failures by cause</h3>")
        out.append(_table(["cause", "rows", "share of failures"],
                          [[c, n, _pct(n, led["rows"] - led["success"])] for c, n in fails["causes"].items()],
                          {1, 2}))
    hosts = fails["hosts"]
    out.append("<h3>Hosts with the most failures</h3>")
    out.append(_table(["host", "rows", "failed", "failure rate", "by cause"],
                      [[h, st["rows"], st["failed"], _pct(st["failed"], st["rows"]),
                        ", ".join(f"{c} {n:,}" for c, n in st["causes"].items())] for h, st in hosts.items()],
                      {1, 2, 3})
               if hosts else '<p class="empty">no failures</p>')
    return "\n".join(out)


# ---------------------------------------------------------------- train-probe and ground truth


def _json_tables(value: Any, name: str = "", depth: int = 0) -> list[str]:
    """HTML tables for the lists of records and the scalar fields found in a results.json, whatever its shape."""
    out: list[str] = []
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        cols: list[str] = []
        for r in value:
            cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
        cols = cols[:14]
        rows = [[_cell(r.get(c)) for c in cols] for r in value[:60]]
        numeric = {i for i, c in enumerate(cols) if all(isinstance(r.get(c), (int, float)) for r in value[:60])}
        out.append((f"<h3>{escape(name)}</h3>" if name else "") + _table(cols, rows, numeric))
    elif isinstance(value, dict) and depth < 3:
        scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
        if scalars:
            out.append((f"<h3>{escape(name)}</h3>" if name else "")
                       + _table(["field", "value"], [[k, _cell(v)] for k, v in scalars.items()]))
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                out += _json_tables(v, f"{name}.{k}" if name else str(k), depth + 1)
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    return "" if v is None else v


def _png_uri(path: Path) -> str | None:
    data = path.read_bytes()
    if len(data) > MAX_PNG_BYTES:
        from curate.imaging import ImageRejected, safe_open

        try:
            with safe_open(data) as im:  # the allowlist and pixel cap of every decoder
                im.thumbnail((1200, 1200))
                buf = io.BytesIO()
                im.save(buf, "PNG", optimize=True)
                data = buf.getvalue()
        except ImageRejected as e:
            log.warning("report: skipping %s (%s: %s)", path, e.code, e.message)
            return None
        except Exception as e:  # noqa: BLE001 - an unreadable plot is left out, not fatal
            log.warning("report: skipping %s (%s)", path, e)
            return None
    if not data.startswith(b"\x89PNG"):
        log.warning("report: skipping %s (not a PNG)", path)
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _train_probe(probe: Path) -> str:
    out = []
    rj = probe / "results.json"
    if rj.is_file():
        try:
            data = json.loads(rj.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("study"):
                from curate.train_probe.study import study_lines

                out.append(f'<pre class="study">{escape(chr(10).join(study_lines(data["study"])))}</pre>')
            tables = _json_tables(data)
            out += tables or [f"<pre>{escape(json.dumps(data, indent=2)[:20000])}</pre>"]
        except (ValueError, OSError) as e:
            out.append(f'<p class="empty">results.json is unreadable: {escape(str(e))}</p>')
    for png in sorted(probe.glob("*.png")):
        uri = _png_uri(png)
        if uri:
            out.append(f'<figure><img src="{uri}" alt="{escape(png.name)}"><figcaption class="note">'
                       f"{escape(png.name)}</figcaption></figure>")
    if not out:
        return f'<p class="empty">{escape(str(probe))} has no results.json or PNG plots</p>'
    return f'<div class="probe">{"".join(out)}</div>'


