"""Stage "balance": MetaCLIP-style metadata balancing signals (signals/balance/{shard}.parquet), in two phases.

match: one task per downloaded shard (task id "match.{shard}") matches its captions against the metadata
entries and writes the long table _work/balance/matches/{shard}.parquet (key, shard, entry, draw; one row
per match, a null entry for a pair with none). Then the reduce, on the driver's query engine (DuckDB, out
of core, or Spark SQL with --engine spark): `curate.balancing.reduce_sql` ranks each entry's pairs by draw
with a window and keeps the minimum per pair, written partitioned by shard under _work/balance/reduced/.
write: one task per shard (task id = shard id) joins its matches with its reduce partition into

    key, matched (entries matched), entries (their text), rank, scaled_draw, min_count

so that `balance_rank < t` (export's samples view prefixes the columns with `balance_`) is the keep
decision for any cap t, with no further aggregation at export time. See curate/balancing.py.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.balancing import (
    DEFAULT_METADATA,
    cached_matcher,
    draw,
    entries_digest,
    entry_counts_sql,
    load_entries,
    reduce_sql,
)
from curate.config import output_fields
from curate.errors import InputError
from curate.hashing import json_digest
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir, task_id
from curate.options import option
from curate.stages.base import Stage, context

log = logging.getLogger(__name__)

NAME = "balance"
PLAN_VERSION = 1
PHASES = ("match", "write")
# caps t at which finalize counts the pairs `rank < t` keeps, so the summary helps choose t
REPORT_CAPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 170000)


def _metadata(value: str) -> str:
    import os

    return value if value.startswith("wordfreq:") else os.path.abspath(value)


@dataclass(frozen=True)
class BalanceConfig:
    metadata: str = option(  # wordfreq:LANG:N, or an absolute path to a .txt/.json entry list
        DEFAULT_METADATA, convert=_metadata, metavar="FILE|wordfreq:LANG:N",
        help="Metadata entries: a text file (one entry a line) or a JSON list of strings, like MetaCLIP's "
             "metadata.json; or wordfreq:LANG:N, the N most frequent words of LANG from the wordfreq package "
             "(offline).")
    seed: int = option(0, help="Seed of the per-(pair, entry) draws that decide which pairs an over-full entry "
                               "keeps.")


def work_dir(ds: DatasetDir) -> Path:
    return ds.work(NAME)


def input_digest(ds: DatasetDir) -> dict[str, Any]:
    """What balance reads: each downloaded shard's ledger size (sizes, not mtimes: a copied dir resumes)."""
    sizes = {s: ds.ledger(s).stat().st_size for s in ds.shards() if ds.ledger(s).exists()}
    return {"shards": len(sizes), "ledger_sha256": json_digest(sizes)}


def _match_path(ds: DatasetDir, shard: str) -> Path:
    return work_dir(ds) / "matches" / f"{shard}.parquet"


class BalanceStage(Stage):
    name = NAME
    config_cls = BalanceConfig

    def fingerprint_inputs(self, cfg: BalanceConfig, ds: DatasetDir) -> dict[str, Any]:
        """The entries themselves (a metadata file can change under the same path) and the input ledgers."""
        return {"metadata": entries_digest(load_entries(cfg.metadata)), "dataset": input_digest(ds)}

    def phases(self, cfg: BalanceConfig, ds: DatasetDir) -> tuple[str, ...]:
        return PHASES

    def plan(self, cfg: BalanceConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        return self.plan_phase(cfg, ds, "match")

    def plan_phase(self, cfg: BalanceConfig, ds: DatasetDir, phase: str) -> list[dict[str, Any]]:
        """match: one task per shard (task id "match.{shard}"); write: the SQL reduce on the driver's
        engine (once per set of match files), then one task per shard whose id is the shard id."""
        if phase == "match":
            plan = self._plan(cfg, ds)
            tasks = [{"task": f"match.{s}", "kind": "match", "source": s, "digest": plan["digest"]["entries"]}
                     for s in plan["shards"]]
            outputs = [_match_path(ds, t["source"]) for t in tasks]
        else:
            plan = read_json(work_dir(ds) / "plan.json")
            if _reduce_is_stale(ds, plan):
                for s in plan["shards"]:  # their tables came from another reduce
                    ds.marker(self.name, s).unlink(missing_ok=True)
                _reduce(cfg, ds, plan)
            tasks = [{"shard": s, "kind": "write"} for s in plan["shards"]]
            outputs = [ds.signals(NAME, s) for s in plan["shards"]]
        for t, out in zip(tasks, outputs, strict=True):  # a marker whose output was deleted: run it again
            if not out.exists():
                ds.marker(self.name, task_id(t)).unlink(missing_ok=True)
        return tasks

    def _plan(self, cfg: BalanceConfig, ds: DatasetDir) -> dict[str, Any]:
        shards = ds.shards()
        if not shards:
            raise InputError(f"{ds.root}: no completed ledger shards (ledger/ + _done/download/); "
                             f"run `curate download` first")
        entries = load_entries(cfg.metadata)
        wd = work_dir(ds)
        digest = {"config": output_fields(cfg), "entries": entries_digest(entries), "inputs": input_digest(ds),
                  "version": PLAN_VERSION}
        plan_path = wd / "plan.json"
        if plan_path.exists() and read_json(plan_path).get("digest") == digest:
            return read_json(plan_path)
        ds.discard(self.name)  # another plan's matches must not be reused
        with atomic_path(wd / "metadata.txt") as tmp:
            Path(tmp).write_text("\n".join(entries), encoding="utf-8")
        plan = {"digest": digest, "entries": len(entries), "shards": shards}
        write_json(plan_path, plan)  # last: its presence says metadata.txt is complete
        return plan

    def run_shard(self, cfg: BalanceConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        return _match(cfg, ds, task) if task["kind"] == "match" else _write(ds, task)

    def finalize(self, cfg: BalanceConfig, ds: DatasetDir) -> dict[str, Any]:
        wd = work_dir(ds)
        if not (wd / "plan.json").exists() or not (wd / "reduced.json").exists():
            return {}
        plan = read_json(wd / "plan.json")
        written = [ds.stats(NAME, s) for s in plan["shards"] if ds.marker(NAME, s).exists()]
        if len(written) < len(plan["shards"]):
            return {"incomplete_tasks": len(plan["shards"]) - len(written)}
        pairs = matched = 0
        for p in written:
            st = read_json(p)
            pairs += st.get("pairs", 0)
            matched += st.get("matched_pairs", 0)
        return {"pairs": pairs, "matched_pairs": matched, "unmatched_pairs": pairs - matched,
                **read_json(wd / "reduced.json")["counts"]}

    def inputs(self, cfg: BalanceConfig) -> dict[str, Any]:
        """The metadata as used: its spec, the digest of its normalized entries and, for the default
        word lists, the wordfreq version that produced them."""
        entries = load_entries(cfg.metadata)
        out: dict[str, Any] = {"metadata": cfg.metadata, "entries": len(entries), "entries_sha256": entries_digest(entries)}
        if cfg.metadata.startswith("wordfreq:"):
            from importlib.metadata import version

            out["wordfreq"] = version("wordfreq")
        return out


def _match(cfg: BalanceConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """Map: the long match table of one shard (a null entry for a pair that matched nothing)."""
    import pyarrow as pa

    from curate.io.tables import write_table

    shard = task["source"]
    matcher = cached_matcher(str(work_dir(ds) / "metadata.txt"), task["digest"])
    keys, entries, draws = [], [], []
    pairs = matched = 0
    for key, caption in _pairs(ds, shard):
        pairs += 1
        ids = matcher.match(caption)
        matched += bool(ids)
        for e in ids or [None]:
            keys.append(key)
            entries.append(e)
            draws.append(None if e is None else draw(cfg.seed, key, e))
    table = pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array([shard] * len(keys), pa.string()),
                      "entry": pa.array(entries, pa.int32()), "draw": pa.array(draws, pa.float64())})
    write_table(_match_path(ds, shard), table)
    return {"pairs": pairs, "matched_pairs": matched, "matches": sum(e is not None for e in entries)}


def _write(ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """One shard's signal table from its match table and its partition of the reduce's output."""
    import pyarrow.parquet as pq

    from curate.io.tables import write_table

    shard = task["shard"]
    entries = (work_dir(ds) / "metadata.txt").read_text(encoding="utf-8").splitlines()
    table = _shard_signals(pq.read_table(_match_path(ds, shard)), work_dir(ds) / "reduced" / f"shard={shard}", entries)
    write_table(ds.signals(NAME, shard), table)
    matched = sum(1 for v in table["matched"].to_pylist() if v)
    return {"pairs": table.num_rows, "matched_pairs": matched}


def _match_files_digest(ds: DatasetDir, plan: dict[str, Any]) -> str:
    """Size and mtime of every match file: a match task that ran again makes the reduce stale."""
    stamp = []
    for s in plan["shards"]:
        st = _match_path(ds, s).stat()
        stamp.append([s, st.st_size, st.st_mtime_ns])
    return json_digest(stamp)  # a list: sorted keys change nothing


def _reduce_is_stale(ds: DatasetDir, plan: dict[str, Any]) -> bool:
    p = work_dir(ds) / "reduced.json"
    return not p.exists() or read_json(p).get("matches") != _match_files_digest(ds, plan)


def _pairs(ds: DatasetDir, shard: str) -> list[tuple[str, str | None]]:
    """(key, caption) of the shard's downloaded samples, in key order (a superseded row is history)."""
    import pyarrow.parquet as pq

    path = ds.ledger(shard)
    t = pq.read_table(path)
    for col in ("key", "status", "caption"):
        if col not in t.column_names:
            raise InputError(f"{path}: no '{col}' column")
    rows = t.select([c for c in ("key", "status", "caption", "superseded_by") if c in t.column_names]).to_pylist()
    return sorted((r["key"], r["caption"]) for r in rows if r["status"] == "success" and not r.get("superseded_by"))


def _reduce(cfg: BalanceConfig, ds: DatasetDir, plan: dict[str, Any]) -> None:
    """Run the SQL reduce (out of core: DuckDB spills to disk, or Spark SQL) into _work/balance/reduced/,
    write the per-entry counts to stats/balance/entries.parquet, and reduced.json last."""
    import pyarrow as pa

    from curate.io.tables import write_table

    wd = work_dir(ds)
    out = wd / "reduced"
    (wd / "reduced.json").unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    match_files = [_match_path(ds, s) for s in plan["shards"]]
    per_entry, kept_at = _run_reduce(cfg, match_files, out)
    entries = (wd / "metadata.txt").read_text(encoding="utf-8").splitlines()
    counts_table = pa.table({"entry": pa.array(entries, pa.string()).take(per_entry["entry"]), "entry_id": per_entry["entry"],
                             "count": per_entry["count"]}).sort_by([("count", "descending"), ("entry", "ascending")])
    write_table(ds.root / "stats" / NAME / "entries.parquet", counts_table)
    top = counts_table.slice(0, 10).to_pylist()
    counts = {"entries": len(entries), "entries_matched": counts_table.num_rows,
              "largest_entries": {r["entry"]: r["count"] for r in top}, "kept_at_t": kept_at}
    write_json(wd / "reduced.json", {"matches": _match_files_digest(ds, plan), "counts": counts})


def _run_reduce(cfg: BalanceConfig, match_files: list[Path], out: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """reduce_sql over the match files, written partitioned by shard to `out` (out/shard=X/*.parquet);
    returns the per-entry counts (bounded by the metadata size) and the kept pairs at each REPORT_CAPS t."""
    src = "(SELECT * FROM matches WHERE entry IS NOT NULL)"
    caps = ", ".join(f"SUM(CASE WHEN rank < {t} THEN 1 ELSE 0 END) AS t{t}" for t in REPORT_CAPS)
    ctx = context()  # the reduce runs on Spark SQL with --engine spark (the engine's session), else DuckDB
    if ctx.sql == "spark":
        spark = ctx.spark()
        spark.read.parquet(*[str(p) for p in match_files]).createOrReplaceTempView("matches")
        spark.sql(reduce_sql(src)).write.mode("overwrite").partitionBy("shard").parquet(str(out))
        spark.read.parquet(str(out)).createOrReplaceTempView("reduced")
        rows = spark.sql(entry_counts_sql(src)).collect()  # one row per matched entry: bounded by the metadata
        kept = spark.sql(f"SELECT {caps} FROM reduced").collect()[0].asDict()
        per_entry = {"entry": np.asarray([r["entry"] for r in rows], np.int64),
                     "count": np.asarray([r["count"] for r in rows], np.int64)}
    else:
        import duckdb

        con = duckdb.connect()
        try:
            # spill to the dataset's work dir, not /tmp: the window over all matches may exceed memory
            con.execute(f"SET temp_directory = '{_sql_str(out.parent / 'duckdb-tmp')}'")
            files = ", ".join(f"'{_sql_str(p)}'" for p in match_files)
            con.execute(f"CREATE VIEW matches AS SELECT * FROM read_parquet([{files}])")
            con.execute(f"COPY ({reduce_sql(src)}) TO '{_sql_str(out)}' (FORMAT PARQUET, PARTITION_BY (shard))")
            con.execute(f"CREATE VIEW reduced AS SELECT * FROM read_parquet('{_sql_str(out)}/*/*.parquet')")
            e = con.execute(entry_counts_sql(src)).fetchnumpy()
            per_entry = {"entry": e["entry"].astype("int64"), "count": e["count"]}
            row = con.execute(f"SELECT {caps} FROM reduced").fetchone() if per_entry["entry"].size else None
            kept = dict(zip([f"t{t}" for t in REPORT_CAPS], row or [0] * len(REPORT_CAPS), strict=True))
        finally:
            con.close()
        shutil.rmtree(out.parent / "duckdb-tmp", ignore_errors=True)
    biggest = int(per_entry["count"].max()) if len(per_entry["count"]) else 0
    # caps above the largest entry keep every matched pair; list up to the first of them
    kept_at = {}
    for t in REPORT_CAPS:
        kept_at[str(t)] = int(kept[f"t{t}"] or 0)
        if t > biggest:
            break
    return per_entry, kept_at


def _sql_str(p: Any) -> str:
    return str(p).replace("'", "''")


def _shard_signals(matches: Any, reduced_dir: Path, text: list[str]) -> Any:
    """One row per pair of the shard, in key order: matched entries (text) from the match table and the
    reduce's statistics (null for a pair that matched nothing). Memory is bounded by one shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats: dict[str, dict[str, Any]] = {}
    files = sorted(reduced_dir.glob("*.parquet")) if reduced_dir.is_dir() else []
    for f in files:
        for r in pq.read_table(f, columns=["key", "rank", "scaled_draw", "min_count"]).to_pylist():
            stats[r["key"]] = r
    words: dict[str, list[str]] = {}
    m = matches.to_pydict()
    for key, entry in zip(m["key"], m["entry"], strict=True):
        found = words.setdefault(key, [])
        if entry is not None:
            found.append(text[entry])
    keys = sorted(words)
    empty: dict[str, Any] = {}
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "matched": pa.array([len(words[k]) for k in keys], pa.int32()),
        "entries": pa.array([sorted(words[k]) for k in keys], pa.list_(pa.string())),
        "rank": pa.array([stats.get(k, empty).get("rank") for k in keys], pa.int64()),
        "scaled_draw": pa.array([stats.get(k, empty).get("scaled_draw") for k in keys], pa.float64()),
        "min_count": pa.array([stats.get(k, empty).get("min_count") for k in keys], pa.int64()),
    })


STAGE = BalanceStage()
