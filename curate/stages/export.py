"""Export: select samples with clauses over the `samples` view, then reshard them with their original bytes.

The driver computes the selection once (plan) and writes the kept keys of each output shard to
OUT/_work/export/{shard}.parquet; each shard task copies those samples' tar members byte for byte from
the source tars and writes their ledger rows (ledger + signals) beside them.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import runtime
from curate.errors import CurateError, InputError, ShardError
from curate.io import manifest
from curate.io.atomic import read_json, write_json
from curate.io.layout import DatasetDir, shard_name
from curate.io.shards import ShardWriter, iter_raw
from curate.io.tables import write_table
from curate.query import Clause, Sources, check_clauses, open_query, selection_sql

NAME = "export"
DOWNLOADED = Clause("downloaded", where="status = 'success'")
# test hook: a directory; the first shard task to get there dies (like a killed executor) after its tar
# is in place and before its ledger is, so tests can check that a retry leaves no duplicate output
CRASH_ONCE_ENV = "CURATE_TEST_EXPORT_CRASH_ONCE"


@dataclass(frozen=True)
class ExportConfig:
    source: str
    where: tuple[str, ...] = ()
    policy: tuple[str, ...] = ()
    top_fraction: float | None = None
    by: str | None = None
    samples_per_shard: int = 10000
    write_dropped: bool = False
    query_engine: str = runtime("local")
    spark_master: str = runtime("local[*]")
    shard_index: int = runtime(0)
    num_shards: int = runtime(1)


@dataclass
class Selection:
    keys: pa.Table  # key, shard (source), dropped_by (clause name, null when kept); sorted by key
    counts: list[dict[str, Any]]  # per clause: clause, removed, remaining
    input: int

    @property
    def kept(self) -> pa.Table:
        return self.keys.filter(pc.is_null(self.keys["dropped_by"])).select(["key", "shard"])

    def summary(self) -> dict[str, Any]:
        return {"input": self.input, "clauses": self.counts, "kept": self.kept.num_rows}


def resolve_clauses(cfg: ExportConfig) -> list[Clause]:
    """Every clause in the order it applies: downloaded, each policy, each --where, --top-fraction."""
    from curate.policies import load_policy, top_clause

    clauses = [DOWNLOADED]
    for ref in cfg.policy:
        clauses += load_policy(ref).clauses
    for w in cfg.where:
        if not w.strip():
            raise InputError("--where: empty predicate")
        clauses.append(Clause(w, where=w))
    if cfg.top_fraction is not None or cfg.by is not None:
        clauses.append(top_clause(cfg.top_fraction, cfg.by))
    names = [c.name for c in clauses]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--policy/--where: clause(s) {', '.join(dup)} given twice")
    return clauses


def source_dir(cfg: ExportConfig) -> DatasetDir:
    src = DatasetDir.at(cfg.source)
    if not src.root.is_dir():
        raise InputError(f"DIR {cfg.source}: no such dataset directory")
    return src


def source_fingerprints(cfg: ExportConfig) -> dict[str, str]:
    stages = manifest.load(source_dir(cfg)).get("stages", {})
    return {name: entry.get("fingerprint") for name, entry in sorted(stages.items())}


def fingerprint_extra(cfg: ExportConfig) -> dict[str, Any]:
    """What the output depends on beyond the config: resolved clause text (policy files can change)
    and the fingerprints of the source's stages."""
    return {"clauses": [c.to_dict() for c in resolve_clauses(cfg)], "source_stages": source_fingerprints(cfg)}


def select(cfg: ExportConfig) -> Selection:
    """Apply the clauses in order over the source's samples view; the first failing clause drops a row."""
    src = source_dir(cfg)
    clauses = resolve_clauses(cfg)
    sources = Sources.of(src)
    check_clauses(src, sources, clauses)
    q = open_query(sources, cfg.query_engine, cfg.spark_master)
    try:
        t = q.arrow(selection_sql(clauses))
    finally:
        q.close()
    t = t.sort_by("key")
    keys = t["key"].to_numpy(zero_copy_only=False)
    if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
        dup = keys[1:][keys[1:] == keys[:-1]][0]
        raise CurateError(f"{src.root}: key {dup} appears twice in ledger/; the source dataset is inconsistent")
    n = t.num_rows
    alive = np.ones(n, dtype=bool)
    dropped_by = np.full(n, -1, dtype=np.int64)
    counts = []
    for i, c in enumerate(clauses):
        col = t[f"c{i}"]
        if c.where is not None:
            ok = np.asarray(col.to_numpy(zero_copy_only=False), dtype=bool)
        else:
            ok = _top(np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64), alive, c.top_fraction)
        drop = alive & ~ok
        dropped_by[drop] = i
        alive &= ok
        counts.append({"clause": c.name, "removed": int(drop.sum()), "remaining": int(alive.sum())})
    names = [c.name for c in clauses]
    reason = pa.array([names[j] if j >= 0 else None for j in dropped_by], type=pa.string())
    table = pa.table({"key": t["key"], "shard": t["shard"], "dropped_by": reason})
    return Selection(table, counts, n)


def _top(values: np.ndarray, alive: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the best round(fraction * n) rows among the n alive rows with a value; ties go to the lower key."""
    cand = np.flatnonzero(alive & ~np.isnan(values))
    k = math.floor(fraction * len(cand) + 0.5)
    order = cand[np.lexsort((cand, -values[cand]))]  # rows are sorted by key, so index order is key order
    ok = np.zeros(len(values), dtype=bool)
    ok[order[:k]] = True
    return ok


def format_counts(sel: Selection) -> str:
    width = max([len("input")] + [len(c["clause"]) for c in sel.counts])
    lines = [f"{'clause':<{width}}  {'removed':>9}  {'remaining':>9}", f"{'input':<{width}}  {'':>9}  {sel.input:>9}"]
    for c in sel.counts:
        lines.append(f"{c['clause']:<{width}}  {c['removed']:>9}  {c['remaining']:>9}")
    lines.append(f"{'kept':<{width}}  {'':>9}  {sel.kept.num_rows:>9}")
    return "\n".join(lines)


def _work_dir(ds: DatasetDir) -> Path:
    return ds.root / "_work" / NAME


def _in_slice(cfg: ExportConfig, shard: str) -> bool:
    return int(shard) % cfg.num_shards == cfg.shard_index


class ExportStage:
    name = NAME
    config_cls = ExportConfig

    def plan(self, cfg: ExportConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        if cfg.samples_per_shard < 1:
            raise InputError("--samples-per-shard: must be at least 1")
        if not 0 <= cfg.shard_index < cfg.num_shards:
            raise InputError(f"--shard-index {cfg.shard_index}: must be in [0, --num-shards {cfg.num_shards})")
        if source_dir(cfg).root == ds.root:
            raise InputError(f"--out {ds.root}: must differ from the source directory")
        sel = select(cfg)
        kept = sel.kept
        work = _work_dir(ds)
        tasks = []
        for i, start in enumerate(range(0, kept.num_rows, cfg.samples_per_shard)):
            shard = shard_name(i)
            part = kept.slice(start, cfg.samples_per_shard).rename_columns(["key", "source_shard"])
            write_table(work / f"{shard}.parquet", part)
            if _in_slice(cfg, shard):
                tasks.append({"shard": shard, "samples": part.num_rows})
        write_json(work / "selection.json", {**sel.summary(), "shards": math.ceil(kept.num_rows / cfg.samples_per_shard)})
        if cfg.write_dropped:
            dropped = sel.keys.filter(pc.is_valid(sel.keys["dropped_by"]))
            write_table(ds.root / "dropped.parquet",
                        pa.table({"key": dropped["key"], "source_shard": dropped["shard"],
                                  "clause": dropped["dropped_by"]}))
        return tasks

    def run_shard(self, cfg: ExportConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        shard = task["shard"]
        want = pq.read_table(_work_dir(ds) / f"{shard}.parquet")
        src = source_dir(cfg)
        sources = sorted(set(want["source_shard"].to_pylist()))
        rows = _ledger_rows(src, sources, want, shard)
        wanted = set(want["key"].to_pylist())
        found: dict[str, dict[str, bytes]] = {}
        for s in sources:
            for key, members in iter_raw(src.shard_tar(s)):
                if key in wanted:
                    found[key] = members
        missing = sorted(wanted - set(found))
        if missing:
            raise ShardError(f"{src.root}: {len(missing)} selected sample(s) missing from shards/ "
                             f"(first: {missing[0]}); the source tars and ledger disagree")
        with ShardWriter(ds.shard_tar(shard)) as w:
            for key in sorted(found):
                w.write_raw(key, found[key])
        _maybe_crash(shard)
        write_table(ds.ledger(shard), rows)
        return {"kept": len(found), "source_shards": len(sources)}

    def finalize(self, cfg: ExportConfig, ds: DatasetDir) -> dict[str, Any]:
        p = _work_dir(ds) / "selection.json"
        return read_json(p) if p.exists() else {}

    def inputs(self, cfg: ExportConfig) -> dict[str, Any]:
        return {"source": str(source_dir(cfg).root), **fingerprint_extra(cfg)}

    def discard_outputs(self, cfg: ExportConfig, ds: DatasetDir) -> None:
        for sub in ("shards", "ledger", "_done/export", "stats/export", "_work/export"):
            shutil.rmtree(ds.root / sub, ignore_errors=True)
        (ds.root / "dropped.parquet").unlink(missing_ok=True)


def _ledger_rows(src: DatasetDir, source_shards: list[str], want: pa.Table, shard: str) -> pa.Table:
    """The kept rows of the joined view (ledger + signals), now living in output shard `shard`."""
    from curate.query import DuckDBQuery

    q = DuckDBQuery(Sources.of(src, source_shards))
    try:
        q.con.register("want", want.select(["key"]))
        t = q.arrow("SELECT samples.* FROM samples JOIN want ON want.key = samples.key ORDER BY samples.key")
    finally:
        q.close()
    cols = {"shard": pa.array([shard] * t.num_rows, pa.string()),
            "source_shard": want.sort_by("key")["source_shard"], "source_key": t["key"]}
    for name, values in cols.items():  # an export of an export replaces the lineage columns
        i = t.schema.get_field_index(name)
        t = t.set_column(i, name, values) if i >= 0 else t.append_column(name, values)
    return t


def _maybe_crash(shard: str) -> None:
    folder = os.environ.get(CRASH_ONCE_ENV)
    if not folder:
        return
    flag = Path(folder) / "export-crashed"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(flag, "x") as fh:  # exclusive create: only one task attempt ever crashes
            fh.write(f"{shard}\n")
    except FileExistsError:
        return
    os._exit(17)


STAGE = ExportStage()
