"""Summarise any dataset directory: stages and configs, shards done and pending, ledger and signal figures.

All aggregation runs in DuckDB over the per-shard parquet files, so a summary of a big dataset reads
only the columns it needs and never loads a table into Python.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curate.errors import InputError
from curate.io import manifest
from curate.io.layout import DatasetDir, is_shard_name

QUANTILES = (("min", 0.0), ("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95),
             ("max", 1.0))
TOP_LANGS = 10
STAGE_ORDER = ("download", "score", "dedup", "export", "train-probe")


# a host column that survives userinfo, ports and IPv6 brackets
HOST_SQL = ("coalesce(nullif(lower(regexp_extract(url, "
            "'^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\\[[^]]*\\]|[^:/?#]*)', 1)), ''), '(no host)')")

# why a ledger row failed, in the words a user looking at a low success rate needs: the error code, split
# where the code covers several causes (429 from other 5xx, a refused connection from a reset one, a
# 4xx by its status)
CAUSES = ("timeout", "dns", "refused", "connection", "http 404", "http 410", "http 403", "http 4xx other",
          "429 rate limited", "throttled, for --retry-failed", "http 5xx", "redirects", "decode", "too large or small", "opted out",
          "blocked", "input", "internal")
CAUSE_SQL = """CASE
  WHEN error_code IN ('timeout', 'deadline_exceeded') THEN 'timeout'
  WHEN error_code = 'dns_error' THEN 'dns'
  WHEN error_code = 'connect_error' AND lower(coalesce(error_message, '')) LIKE '%refused%' THEN 'refused'
  WHEN error_code = 'connect_error' THEN 'connection'
  WHEN error_code = 'http_4xx' AND http_status IN (403, 404, 410) THEN 'http ' || http_status
  WHEN error_code = 'http_4xx' THEN 'http 4xx other'
  WHEN error_code = 'http_5xx' AND (http_status = 429 OR error_message LIKE '%Retry-After%') THEN '429 rate limited'
  WHEN error_code = 'host_throttled' THEN 'throttled, for --retry-failed'
  WHEN error_code = 'http_5xx' THEN 'http 5xx'
  WHEN error_code = 'too_many_redirects' THEN 'redirects'
  WHEN error_code IN ('decode_error', 'format_not_allowed', 'decompression_bomb') THEN 'decode'
  WHEN error_code IN ('too_large', 'empty_body', 'too_small', 'bad_aspect_ratio') THEN 'too large or small'
  WHEN error_code = 'opted_out' THEN 'opted out'
  WHEN error_code IN ('blocked_scheme', 'blocked_address', 'disallowed_domain') THEN 'blocked'
  WHEN error_code IN ('invalid_url', 'invalid_text', 'duplicate_url') THEN 'input'
  ELSE 'internal' END"""
TOP_HOSTS = 10


def sql_str(value: str | os.PathLike) -> str:
    """A SQL string literal (paths go into read_parquet lists this way: views take no parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_source(files: list[Path]) -> str:
    return f"read_parquet([{', '.join(sql_str(p) for p in files)}], union_by_name=true)"


def open_dataset(root: str | os.PathLike) -> DatasetDir:
    """The dataset at `root`; InputError (exit 2) when it is not a dataset directory."""
    ds = DatasetDir.at(root)
    if not ds.root.is_dir():
        raise InputError(f"DIR: {ds.root} is not a directory")
    if not (ds.manifest.exists() or (ds.root / "ledger").is_dir() or (ds.root / "_done").is_dir()):
        raise InputError(f"DIR: {ds.root} is not a curate dataset directory (no manifest.json, ledger/ or _done/)")
    return ds


class Tables:
    """A DuckDB connection with views `ledger` (current rows), `score` and `dedup` over a dataset's parquet.

    A view exists only when its files do; `has(name)` says which. `ledger` leaves out rows superseded
    by --retry-failed, so every input row is counted once.
    """

    def __init__(self, ds: DatasetDir):
        import duckdb

        self.ds = ds
        self.con = duckdb.connect(":memory:")
        self.views: set[str] = set()
        self.columns: dict[str, set[str]] = {}
        ledger_files = ds.ledger_files()
        if ledger_files:
            self._view("ledger_all", parquet_source(ledger_files))
            where = "WHERE superseded_by IS NULL" if "superseded_by" in self.columns["ledger_all"] else ""
            self._view("ledger", f"(SELECT * FROM ledger_all {where})")
        for stage in ("score", "dedup"):
            files = ds.signal_files(stage)
            if files:
                self._view(stage, parquet_source(files))

    def _view(self, name: str, source: str) -> None:
        self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM {source}")
        self.columns[name] = {r[0] for r in self.con.execute(f"DESCRIBE {name}").fetchall()}
        self.views.add(name)

    def has(self, view: str, column: str | None = None) -> bool:
        return view in self.views and (column is None or column in self.columns[view])

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        return self.con.execute(sql, params or []).fetchone()[0]

    def close(self) -> None:
        self.con.close()


def summarize(root: str | os.PathLike) -> dict[str, Any]:
    """Everything `curate inspect` shows, as JSON-able data."""
    ds = open_dataset(root)
    man = manifest.load(ds)
    tables = Tables(ds)
    try:
        return {
            "root": str(ds.root),
            "format": man.get("format"),
            "stages": _stages(ds, man),
            "ledger": _ledger(tables),
            "score": _score(tables),
            "dedup": _dedup(tables),
        }
    finally:
        tables.close()


def _stem_set(folder: Path, pattern: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name.split(".", 1)[0] for p in folder.glob(pattern) if not p.name.startswith(".")}


def _stages(ds: DatasetDir, man: dict[str, Any]) -> dict[str, Any]:
    entries = dict(man.get("stages", {}))
    marked = sorted(p.name for p in (ds.root / "_done").glob("*") if p.is_dir()) if (ds.root / "_done").is_dir() else []
    downloaded = set(ds.done_shards("download"))
    names = list(entries) + [s for s in marked if s not in entries]
    out: dict[str, Any] = {}
    for name in sorted(names, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n)):
        entry = entries.get(name, {})
        done = set(ds.done_shards(name))
        # what the stage was planned to cover: download plans one shard per input slice in _inputs/;
        # per-shard signal stages cover every downloaded shard
        if name == "download":
            planned: set[str] | None = {s for s in _stem_set(ds.inputs_dir, "*.parquet") if is_shard_name(s)} | done
        elif name != "export" and downloaded and done <= downloaded:
            planned = downloaded | done
        else:
            planned = None
        recorded = entry.get("shards", {}) if isinstance(entry.get("shards"), dict) else {}
        shards: dict[str, Any] = {"done": len(done), "failed": list(recorded.get("failed", []))}
        if planned is not None:
            pending = sorted(planned - done)
            shards.update(planned=len(planned), pending=len(pending), pending_shards=pending)
        elif isinstance(recorded.get("total"), int):
            shards.update(planned=recorded["total"], pending=max(0, recorded["total"] - len(done)))
        out[name] = {
            "status": entry.get("status", "no manifest entry"),
            "fingerprint": entry.get("fingerprint"),
            "updated": entry.get("updated"),
            "config": entry.get("config", {}),
            "inputs": entry.get("inputs", {}),
            "counts": entry.get("counts", {}),
            "shards": shards,
        }
    return out


def _ledger(t: Tables) -> dict[str, Any] | None:
    if not t.has("ledger"):
        return None
    superseded = 0
    if t.has("ledger_all", "superseded_by"):
        superseded = t.scalar("SELECT count(*) FROM ledger_all WHERE superseded_by IS NOT NULL")
    status = dict(t.rows("SELECT status, count(*) FROM ledger GROUP BY 1 ORDER BY 2 DESC, 1"))
    codes = dict(t.rows("SELECT error_code, count(*) FROM ledger WHERE error_code IS NOT NULL "
                        "GROUP BY 1 ORDER BY 2 DESC, 1"))
    total = sum(status.values())
    return {
        "files": len(t.ds.ledger_files()),
        "rows": total,
        "superseded": superseded,
        "success": status.get("success", 0),
        "success_share": _share(status.get("success", 0), total),
        "status": {str(k): v for k, v in status.items()},
        "error_code": codes,
        **failures(t),
    }


def failures(t: Tables, top: int = TOP_HOSTS) -> dict[str, Any]:
    """Where the failed rows went: counts per cause (CAUSE_SQL), and the hosts with the most failures,
    each with its rows, failures and failures per cause."""
    if not t.has("ledger", "http_status"):
        return {"causes": {}, "hosts": {}}
    t.con.execute(f"""CREATE OR REPLACE TEMP VIEW failed AS SELECT {HOST_SQL} AS host, {CAUSE_SQL} AS cause
                      FROM ledger WHERE status <> 'success'""")
    causes = dict(t.rows("SELECT cause, count(*) FROM failed GROUP BY 1 ORDER BY 2 DESC, 1"))
    worst = t.rows(f"SELECT host, count(*) FROM failed GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {int(top)}")
    hosts: dict[str, Any] = {}
    if worst:
        names = ", ".join(sql_str(h) for h, _ in worst)
        rows = dict(t.rows(f"SELECT host, count(*) FROM (SELECT {HOST_SQL} AS host FROM ledger) "
                           f"WHERE host IN ({names}) GROUP BY 1"))
        per = t.rows(f"SELECT host, cause, count(*) FROM failed WHERE host IN ({names}) GROUP BY 1, 2 "
                     "ORDER BY 3 DESC, 2")
        for h, n in worst:
            hosts[h] = {"rows": rows.get(h, n), "failed": n, "failure_share": _share(n, rows.get(h, n)),
                        "causes": {c: k for hh, c, k in per if hh == h}}
    return {"causes": causes, "hosts": hosts}


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else 0.0


def clip_quantiles(t: Tables, where: str = "clip_score IS NOT NULL") -> dict[str, float | None]:
    qs = ", ".join(f"quantile_cont(clip_score, {q})" for _, q in QUANTILES)
    row = t.rows(f"SELECT {qs}, avg(clip_score) FROM score WHERE {where}")[0]
    names = [n for n, _ in QUANTILES] + ["mean"]
    return {n: (round(float(v), 4) if v is not None else None) for n, v in zip(names, row, strict=True)}


def _score(t: Tables) -> dict[str, Any] | None:
    if not t.has("score"):
        return None
    scored_expr = "scored" if t.has("score", "scored") else "clip_score IS NOT NULL"
    rows, scored = t.rows(f"SELECT count(*), count(*) FILTER ({scored_expr}) FROM score")[0]
    out: dict[str, Any] = {"files": len(t.ds.signal_files("score")), "rows": rows, "scored": scored}
    if t.has("score", "skip_reason"):
        out["skip_reason"] = dict(t.rows("SELECT skip_reason, count(*) FROM score WHERE skip_reason IS NOT NULL "
                                         "GROUP BY 1 ORDER BY 2 DESC, 1"))
    if t.has("score", "clip_score"):
        out["clip_score"] = clip_quantiles(t)
    if t.has("score", "lang"):
        langs = t.rows(f"SELECT coalesce(lang, '(none)'), count(*) FROM score WHERE {scored_expr} "
                       "GROUP BY 1 ORDER BY 2 DESC, 1")
        shown = langs[:TOP_LANGS]
        rest = sum(n for _, n in langs[TOP_LANGS:])
        out["lang"] = {lang: {"count": n, "share": _share(n, scored)} for lang, n in shown}
        if rest:
            out["lang"]["(other)"] = {"count": rest, "share": _share(rest, scored)}
    if t.has("score", "caption_boilerplate"):
        out["boilerplate"] = t.scalar("SELECT count(*) FILTER (caption_boilerplate) FROM score")
    return out


def _dedup(t: Tables) -> dict[str, Any] | None:
    if not t.has("dedup"):
        return None
    rows = t.scalar("SELECT count(*) FROM dedup")
    out: dict[str, Any] = {"files": len(t.ds.signal_files("dedup")), "rows": rows}
    if t.has("dedup", "is_duplicate"):
        dups = t.scalar("SELECT count(*) FILTER (is_duplicate) FROM dedup")
        out.update(duplicates=dups, duplicate_share=_share(dups, rows))
    if t.has("dedup", "exact_dup"):
        out["exact_dup"] = t.scalar("SELECT count(*) FILTER (exact_dup) FROM dedup")
    if t.has("dedup", "dup_group"):
        groups, largest = t.rows("SELECT count(*), coalesce(max(n), 0) FROM (SELECT dup_group, count(*) AS n "
                                 "FROM dedup WHERE dup_group >= 0 GROUP BY 1)")[0]
        out.update(groups=groups, largest_group=largest)
    if t.has("dedup", "eval_contaminated"):
        out["eval_contaminated"] = t.scalar("SELECT count(*) FILTER (eval_contaminated) FROM dedup")
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The terminal form of `summarize`'s result."""
    lines = [f"dataset {s['root']}"]
    lines.append("stages:")
    if not s["stages"]:
        lines.append("  (none run)")
    for name, st in s["stages"].items():
        sh = st["shards"]
        pend = f", {sh['pending']} pending" if "pending" in sh else ""
        failed = f", {len(sh['failed'])} failed" if sh["failed"] else ""
        lines.append(f"  {name:<10} {st['status']:<10} shards: {sh['done']} done{pend}{failed}"
                     f"  fingerprint {st['fingerprint'] or '-'}  {st['updated'] or ''}".rstrip())
        if sh.get("pending_shards"):
            more = " ..." if len(sh["pending_shards"]) > 10 else ""
            lines.append(f"    pending: {' '.join(sh['pending_shards'][:10])}{more}")
        cfg = st["config"]
        if cfg:
            shown = ", ".join(f"{k}={v}" for k, v in list(cfg.items())[:12])
            lines.append(f"    config: {shown}{' ...' if len(cfg) > 12 else ''}")
    led = s["ledger"]
    if led:
        lines.append(f"ledger: {led['rows']} rows in {led['files']} shard(s), {led['success']} success "
                     f"({led['success_share']:.1%})" + (f", {led['superseded']} superseded" if led["superseded"] else ""))
        for code, n in led["error_code"].items():
            lines.append(f"  {code:<20} {n:>10}")
        if led.get("causes"):
            lines.append("failures by cause: " + ", ".join(f"{c} {n}" for c, n in led["causes"].items()))
        if led.get("hosts"):
            lines.append("hosts with the most failures (rows, failed, by cause):")
            for h, st in led["hosts"].items():
                why = ", ".join(f"{c} {n}" for c, n in st["causes"].items())
                lines.append(f"  {h:<30} {st['rows']:>8} {st['failed']:>8} ({st['failure_share']:.1%})  {why}")
    sc = s["score"]
    if sc:
        lines.append(f"score: {sc['scored']} of {sc['rows']} rows scored")
        q = sc.get("clip_score")
        if q and q["p50"] is not None:
            lines.append("  clip_score  " + "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
        if sc.get("lang"):
            lines.append("  lang        " + "  ".join(f"{k} {v['share']:.1%}" for k, v in sc["lang"].items()))
        if sc.get("skip_reason"):
            lines.append("  not scored  " + "  ".join(f"{k} {v}" for k, v in sc["skip_reason"].items()))
    dd = s["dedup"]
    if dd:
        parts = [f"dedup: {dd['rows']} rows"]
        if "duplicates" in dd:
            parts.append(f"{dd['duplicates']} duplicates ({dd['duplicate_share']:.1%})")
        if "groups" in dd:
            parts.append(f"{dd['groups']} groups (largest {dd['largest_group']})")
        if "exact_dup" in dd:
            parts.append(f"{dd['exact_dup']} exact")
        if "eval_contaminated" in dd:
            parts.append(f"{dd['eval_contaminated']} eval-contaminated")
        lines.append(", ".join(parts))
    return "\n".join(lines)
