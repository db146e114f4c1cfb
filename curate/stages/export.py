"""Export: select samples with clauses over the `samples` view, then reshard them with their original bytes.

The driver never holds the selection. DuckDB (or Spark SQL with `--engine spark`) evaluates the
clauses and writes, under OUT/_work/export/sel-DIGEST/:
    selection/   key, shard, d (the first clause that drops the row; NULL when kept), every source row
    keep/part=N/ the kept keys of output shard N with their source shard (each task reads only its own)
    summary.json per-clause counts and the number of output shards, written last (the folder's marker)
Only counts per clause and kept rows per source shard (O(clauses + shards)) come back to the driver:
it turns the latter into offsets, so output shard N holds kept rows N*S..N*S+S-1 in (source shard,
key) order without a global sort. Each shard task copies its samples' tar members byte for byte from
the source tars and writes their ledger rows (ledger + signals) beside them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import ConfigMismatchError, CurateError, InputError, ShardError
from curate.hashing import file_sha256, json_digest
from curate.io import manifest
from curate.io.atomic import TMP_PREFIX, atomic_path, read_json, write_json
from curate.io.layout import DatasetDir, shard_name
from curate.io.lineage import require_current, stage_state
from curate.io.shards import ShardWriter, iter_raw
from curate.io.tables import write_table
from curate.io.trainable import sample_uid, with_uid, write_shard_stats, write_sizes
from curate.options import absolute, option
from curate.policies import load_policy, top_clause
from curate.query import (
    SIGNAL_STAGES,
    Clause,
    DuckDBQuery,
    Sources,
    check_clauses,
    column_prefix,
    open_query,
    parquet_files,
    selection_sql,
)
from curate.stages.base import Stage, context
from curate.stages.img2dataset_layout import discard_img2dataset_files, write_img2dataset_shard

NAME = "export"
DOWNLOADED = Clause("downloaded", where="status = 'success'")
LAYOUTS = ("curate", "img2dataset")
AUTO = "auto"


def parse_top_fraction(value: Any) -> float | str | None:
    """--top-fraction: a number (checked by the top clause) or 'auto'."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None if value is None else AUTO
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"--top-fraction: expected a number in (0, 1] or auto, got {value!r}") from None


@dataclass(frozen=True)
class ExportConfig:
    source: str  # the DIR argument (absolute)
    where: tuple[str, ...] = option((), metavar="SQL", help="A SQL predicate over the samples view (ledger + score + "
                                    "dedup columns); repeatable.")
    policy: tuple[str, ...] = option((), metavar="NAME|FILE",
                                     help="A built-in policy (laion, datacomp-basic, clip-top30, dedup, demo) or a "
                                          "policy YAML file; repeatable, applied in order.")
    top_fraction: float | str | None = option(
        None, cli_type=str, convert=parse_top_fraction, metavar="F|auto",
        help="Keep this fraction of the rows left, ranked by --by. auto: the fraction a train-probe --budgets "
             "study (--study) recommends at --budget samples seen (--by defaults to the study's sweep column).")
    by: str | None = option(None, metavar="COLUMN", help="The column (SQL expression) --top-fraction ranks by.")
    # study and budget are runtime fields: what they decide (the fraction, the study's digest) is in the
    # fingerprint's extra (fingerprint_extra), and exports made before them keep their fingerprints
    study: str | None = option(None, convert=absolute, metavar="DIR", runtime=True,
                               help="--top-fraction auto: a train-probe output dir whose results.json holds a "
                                    "--budgets study (sweep it over what the clauses before --top-fraction leave, "
                                    "e.g. an export of them, so its fractions mean the same rows).")
    budget: int | None = option(None, metavar="N", runtime=True, help="--top-fraction auto: the samples-seen budget the "
                                                        "training run will have.")
    samples_per_shard: int = option(10000, help="Samples per output tar.")
    layout: str = option("curate", choices=LAYOUTS,
                         help="curate: shards/ + ledger/ (a curate dataset dir). img2dataset: flat {shard}.tar, "
                              "{shard}.parquet and {shard}_stats.json as img2dataset writes them (readable by its "
                              "tools, and by `curate adopt`).")
    write_dropped: bool = option(False, help="Write OUT/dropped.parquet: every dropped key and its clause.")


@dataclass
class Selection:
    """Per-clause counts of a selection (its keep lists, when written, are in the folder select() was given)."""

    counts: list[dict[str, Any]]  # per clause: clause, removed, remaining
    input: int
    kept_rows: int

    def summary(self) -> dict[str, Any]:
        return {"input": self.input, "clauses": self.counts, "kept": self.kept_rows}


def resolve_clauses(cfg: ExportConfig) -> list[Clause]:
    """Every clause in the order it applies: downloaded, each policy, each --where, --top-fraction."""
    clauses = [DOWNLOADED]
    for ref in cfg.policy:
        clauses += load_policy(ref).clauses
    for w in cfg.where:
        if not w.strip():
            raise InputError("--where: empty predicate")
        clauses.append(Clause(w, where=w))
    if cfg.top_fraction == AUTO:
        auto = auto_fraction(cfg)
        clauses.append(top_clause(auto["fraction"], cfg.by or auto["column"]))
    elif cfg.study is not None or cfg.budget is not None:
        raise InputError("--study/--budget: only with --top-fraction auto")
    elif cfg.top_fraction is not None or cfg.by is not None:
        clauses.append(top_clause(cfg.top_fraction, cfg.by))
    names = [c.name for c in clauses]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--policy/--where: clause(s) {', '.join(dup)} given twice")
    return clauses


def auto_fraction(cfg: ExportConfig) -> dict[str, Any]:
    """--top-fraction auto: the study's recommendation at --budget, with what it rests on (the study's
    results.json path and digest, its sweep column and source, the fit); recorded in the manifest."""
    from curate.train_probe.study import recommend

    if not cfg.study or cfg.budget is None:
        raise InputError("--top-fraction auto: needs --study DIR (a train-probe --budgets output) and --budget N "
                         "(samples seen)")
    if cfg.budget < 1:
        raise InputError(f"--budget: must be a positive number of samples seen (got {cfg.budget})")
    path = Path(cfg.study) / "results.json"
    if not path.is_file():
        raise InputError(f"--study {cfg.study}: no results.json; run `curate train-probe --sweep ... --budgets ...` "
                         f"with --out {cfg.study} first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--study {path}: unreadable ({e})") from None
    study = results.get("study") if isinstance(results, dict) else None
    if not study:
        raise InputError(f"--study {path}: no quality-vs-quantity study in it (train-probe needs --sweep with "
                         f"--budgets at two or more budgets, and enough points to fit)")
    sweep = results.get("sweep") or {}
    column = sweep.get("column")
    if cfg.by is not None and column is not None and cfg.by.strip() != column:
        raise InputError(f"--by {cfg.by}: the study ranked by '{column}'; its fractions mean nothing for another "
                         f"column (leave --by out, or give --by {column})")
    rec = recommend(study, cfg.budget)
    probe = (results.get("config") or {}).get("probe") or {}
    return {**rec, "column": column, "study": str(path), "study_sha256": file_sha256(path),
            "sweep_source": probe.get("sweep_source")}


def source_dir(cfg: ExportConfig) -> DatasetDir:
    src = DatasetDir.at(cfg.source)
    if not src.root.is_dir():
        raise InputError(f"DIR {cfg.source}: no such dataset directory")
    return src


def source_fingerprints(cfg: ExportConfig, clauses: list[dict[str, Any]]) -> dict[str, str]:
    """The fingerprints of the source stages this export reads: the ledger's and the unprefixed signal
    tables' always, any other stage's only when its `<name>_` columns appear in the clauses or --by.
    A stage that runs later on the source (balance, index) then does not refuse a resumed export."""
    stages = manifest.load(source_dir(cfg)).get("stages", {})
    text = json.dumps(clauses) + (cfg.by or "")
    always = {"download", "adopt", *SIGNAL_STAGES}
    return {name: entry.get("fingerprint") for name, entry in sorted(stages.items())
            if name in always or column_prefix(name) in text}


def fingerprint_extra(cfg: ExportConfig) -> dict[str, Any]:
    """What the output depends on beyond the config: resolved clause text (policy files can change)
    and the fingerprints of the source's stages."""
    clauses = [c.to_dict() for c in resolve_clauses(cfg)]
    extra = {"clauses": clauses, "source_stages": source_fingerprints(cfg, clauses)}
    if cfg.top_fraction == AUTO:
        extra["top_fraction_auto"] = auto_fraction(cfg)
    return extra


def _counts(q: Any, clauses: list[Clause], table: str) -> tuple[int, list[dict[str, Any]]]:
    """(input rows, per-clause removed/remaining) from one GROUP BY over the selection."""
    by_d = {r["d"]: r["n"] for r in q.arrow(f"SELECT d, COUNT(*) AS n FROM {table} GROUP BY d").to_pylist()}
    total = sum(by_d.values())
    remaining, counts = total, []
    for i, c in enumerate(clauses):
        removed = int(by_d.get(i, 0))
        remaining -= removed
        counts.append({"clause": c.name, "removed": removed, "remaining": remaining})
    return int(total), counts


def _check_unique_keys(q: Any, src: DatasetDir, table: str) -> None:
    dup = q.arrow(f"SELECT key FROM {table} GROUP BY key HAVING COUNT(*) > 1 ORDER BY key LIMIT 1")
    if dup.num_rows:
        raise CurateError(f"{src.root}: key {dup['key'][0].as_py()} appears twice in ledger/; "
                          f"the source dataset is inconsistent")


def select(cfg: ExportConfig, folder: Path | None = None) -> Selection:
    """Evaluate the clauses in order (the first failing clause drops a row).

    Without `folder` (a dry run) only per-clause counts are computed (SQL COUNTs). With it, the
    selection and the keep lists are written under `folder` (see the module docstring).
    """
    src = source_dir(cfg)
    clauses = resolve_clauses(cfg)
    sources = Sources.of(src)
    check_clauses(src, sources, clauses)
    spill = folder / "spill" if folder is not None else None
    ctx = context()  # DuckDB, or Spark SQL on the engine's session with --engine spark
    q = open_query(sources, ctx.spark() if ctx.sql == "spark" else None, spill=spill)
    try:
        if folder is None:
            q.define("sel", selection_sql(clauses))
            _check_unique_keys(q, src, "sel")
            total, counts = _counts(q, clauses, "sel")
            return Selection(counts, total, counts[-1]["remaining"])
        q.write(selection_sql(clauses), folder / "selection")
        q.view("sel", folder / "selection")
        _check_unique_keys(q, src, "sel")
        total, counts = _counts(q, clauses, "sel")
        kept = _write_keep_lists(q, folder, cfg.samples_per_shard)
        if cfg.write_dropped:
            q.register("clause_names", pa.table({"d": pa.array(range(len(clauses)), pa.int64()),
                                                 "clause": pa.array([c.name for c in clauses], pa.string())}))
            q.write("SELECT s.key, s.shard AS source_shard, n.clause FROM sel s JOIN clause_names n "
                    "ON n.d = s.d", folder / "dropped", order_by="key")
    finally:
        q.close()
    shutil.rmtree(folder / "spill", ignore_errors=True)
    return Selection(counts, total, kept)


def _write_keep_lists(q: Any, folder: Path, per_shard: int) -> int:
    """Write keep/part=N/ for every output shard N; returns the number of kept rows.

    Kept rows per source shard (O(shards)) become offsets on the driver; a window partitioned by
    source shard then numbers the rows, so no engine sorts the whole selection at once.
    """
    per_src = q.arrow("SELECT shard, COUNT(*) AS n FROM sel WHERE d IS NULL GROUP BY shard").to_pylist()
    offsets, total = [], 0
    for r in sorted(per_src, key=lambda r: r["shard"]):
        offsets.append((r["shard"], total))
        total += int(r["n"])
    q.register("offsets", pa.table({"shard": pa.array([s for s, _ in offsets], pa.string()),
                                    "off": pa.array([o for _, o in offsets], pa.int64())}))
    q.write(f"SELECT s.key, s.shard AS source_shard, CAST(FLOOR((o.off + ROW_NUMBER() OVER "
            f"(PARTITION BY s.shard ORDER BY s.key) - 1) / CAST({per_shard} AS DOUBLE)) AS BIGINT) AS part "
            f"FROM sel s JOIN offsets o ON o.shard = s.shard WHERE s.d IS NULL", folder / "keep", partition_by="part")
    return total


def read_keep_list(folder: Path, index: int) -> pa.Table:
    """The keep list of output shard `index`: (key, source_shard) sorted by (source_shard, key)."""
    part = folder / "keep" / f"part={index}"
    files = sorted(p for p in part.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise ShardError(f"{part}: keep list missing; rerun export (the plan writes it)")
    t = pa.concat_tables([pq.read_table(p, columns=["key", "source_shard"]) for p in files])
    return t.sort_by([("source_shard", "ascending"), ("key", "ascending")])


def source_state(cfg: ExportConfig) -> dict[str, dict[str, str]]:
    """{stage: {shard: identity}} of the source stages the selection reads (curate.io.lineage): which shards
    are done and which run of each. Signal shards computed from a ledger that changed since are refused."""
    src = source_dir(cfg)
    clauses = [c.to_dict() for c in resolve_clauses(cfg)]
    out = {}
    for stage in source_fingerprints(cfg, clauses):
        if stage not in ("download", "adopt", "export"):
            require_current(src, stage, "export")
        out[stage] = stage_state(src, stage)
    return out


def selection_digest(cfg: ExportConfig, state: dict[str, dict[str, str]] | None = None) -> str:
    """Names the selection folder: the same clauses over the same source state (which shards are done, and
    which run of each) give the same folder; a shard completed or recomputed since gives another."""
    state = source_state(cfg) if state is None else state
    what = {**fingerprint_extra(cfg), "samples_per_shard": cfg.samples_per_shard, "write_dropped": cfg.write_dropped,
            "source_state": json_digest(state)}
    return json_digest(what)


def _changed(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> list[str]:
    """"stage/shard" names that differ between two source states (added, removed or recomputed)."""
    out = []
    for stage in sorted(set(old) | set(new)):
        a, b = old.get(stage, {}), new.get(stage, {})
        out += [f"{stage}/{t}" for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)]
    return out


def ensure_selection(cfg: ExportConfig, ds: DatasetDir,
                     state: dict[str, dict[str, str]] | None = None) -> tuple[Path, dict[str, Any]]:
    """The selection folder for this config and source state, written once: a resume (or a second Slurm
    array index) finds summary.json, its marker, and reuses it; concurrent writers race on one rename."""
    final = _work_dir(ds) / f"sel-{selection_digest(cfg, state)}"
    if not (final / "summary.json").exists():
        # the array indices of one export start together: the first computes the selection (a query over
        # every row), the others wait on the lock and read it
        with _selection_lock(_work_dir(ds)):
            if not (final / "summary.json").exists():
                _write_selection(cfg, ds, final)
    if cfg.write_dropped:
        _publish_dropped(parquet_files(final / "dropped")[0], ds.root / "dropped.parquet")
    return final, read_json(final / "summary.json")


@contextlib.contextmanager
def _selection_lock(folder: Path) -> Iterator[None]:
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "selection.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_selection(cfg: ExportConfig, ds: DatasetDir, final: Path) -> None:
    tmp = _work_dir(ds) / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-sel"
    tmp.mkdir(parents=True)
    try:
        sel = select(cfg, tmp)
        summary = {**sel.summary(), "shards": math.ceil(sel.kept_rows / cfg.samples_per_shard)}
        write_json(tmp / "summary.json", summary)  # the folder's marker, inside it before the rename
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same selection first (a file system without flock)
            if not (final / "summary.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DROPPED_SCHEMA = pa.schema([("key", pa.string()), ("source_shard", pa.string()), ("clause", pa.string())])


def _publish_dropped(src: Path, target: Path) -> None:
    """Copy the engine's dropped list to `target` in one schema (engines differ in nullability), batch by
    batch; a copy, not a move, so every plan (a resume, each array index) publishes the same file safely."""
    with atomic_path(target) as tmp_file:
        with pq.ParquetWriter(tmp_file, DROPPED_SCHEMA, compression="zstd") as w:
            for batch in pq.ParquetFile(src).iter_batches(batch_size=65536):
                w.write_table(pa.Table.from_batches([batch]).select(DROPPED_SCHEMA.names).cast(DROPPED_SCHEMA))


def format_counts(sel: Selection) -> str:
    width = max([len("input")] + [len(c["clause"]) for c in sel.counts])
    lines = [f"{'clause':<{width}}  {'removed':>9}  {'remaining':>9}", f"{'input':<{width}}  {'':>9}  {sel.input:>9}"]
    for c in sel.counts:
        lines.append(f"{c['clause']:<{width}}  {c['removed']:>9}  {c['remaining']:>9}")
    lines.append(f"{'kept':<{width}}  {'':>9}  {sel.kept_rows:>9}")
    return "\n".join(lines)


def _work_dir(ds: DatasetDir) -> Path:
    return ds.root / "_work" / NAME


class ExportStage(Stage):
    name = NAME
    config_cls = ExportConfig
    array_slices = True  # an array task writes output shards i with i % num == index of the one selection

    def validate(self, cfg: ExportConfig, ds: DatasetDir) -> None:
        if cfg.samples_per_shard < 1:
            raise InputError("--samples-per-shard: must be at least 1")
        if cfg.layout not in LAYOUTS:
            raise InputError(f"--layout {cfg.layout}: must be one of {', '.join(LAYOUTS)}")
        if source_dir(cfg).root == ds.root:
            raise InputError(f"--out {ds.root}: must differ from the source directory")

    def fingerprint_inputs(self, cfg: ExportConfig, ds: DatasetDir) -> dict[str, Any]:
        return fingerprint_extra(cfg)

    def plan(self, cfg: ExportConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        state = source_state(cfg)
        _refuse_changed_source(ds, state)
        folder, summary = ensure_selection(cfg, ds, state)
        write_json(_work_dir(ds) / "selection.json", {**summary, "folder": folder.name, "source_state": state})
        tasks = []
        for i in range(summary["shards"]):
            n = min(cfg.samples_per_shard, summary["kept"] - i * cfg.samples_per_shard)
            tasks.append({"shard": shard_name(i), "index": i, "samples": n, "selection": folder.name})
        return tasks

    def run_shard(self, cfg: ExportConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        shard = task["shard"]
        want = read_keep_list(_work_dir(ds) / task["selection"], task["index"])
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
        if cfg.layout == "img2dataset":
            write_img2dataset_shard(ds.root, shard, rows, found)
        else:
            uids = {r["key"]: sample_uid(r) for r in rows.select(
                [c for c in ("key", "url", "caption", "uid") if c in rows.column_names]).to_pylist()}
            with ShardWriter(ds.shard_tar(shard)) as w:
                for key in sorted(found):
                    # image and caption bytes as the source's; the json gains the uid DataComp's tools match
                    w.write_raw(key, {**found[key], "json": with_uid(found[key].get("json"), uids[key])})
            write_table(ds.ledger(shard), rows)
            write_shard_stats(ds.shard_tar(shard), len(found))  # DataComp's resharder reads `successes`
        return {"kept": len(found), "source_shards": len(sources)}

    def finalize(self, cfg: ExportConfig, ds: DatasetDir) -> dict[str, Any]:
        p = _work_dir(ds) / "selection.json"
        if not p.exists():
            return {}
        write_sizes_table(cfg, ds)
        out = read_json(p)
        out.pop("folder", None)
        out.pop("source_state", None)
        return out

    def inputs(self, cfg: ExportConfig) -> dict[str, Any]:
        return {"source": str(source_dir(cfg).root), **fingerprint_extra(cfg)}

    def discard_outputs(self, cfg: ExportConfig, ds: DatasetDir) -> None:
        discard_img2dataset_files(ds.root, ds.done_shards(NAME))  # before the markers that name them go
        for sub in ("shards", "ledger", "_done/export", "stats/export", "_work/export"):
            shutil.rmtree(ds.root / sub, ignore_errors=True)
        (ds.root / "dropped.parquet").unlink(missing_ok=True)


def write_sizes_table(cfg: ExportConfig, ds: DatasetDir) -> None:
    """sizes.json beside the tars (open_clip's and DataComp's shard table) over every completed shard."""
    sizes = {}
    for shard in ds.done_shards(NAME):
        stats = ds.stats(NAME, shard)
        if stats.exists():
            sizes[f"{shard}.tar"] = int(read_json(stats).get("kept", 0))
    if sizes:
        write_sizes(ds.root if cfg.layout == "img2dataset" else ds.root / "shards", sizes)


def _refuse_changed_source(ds: DatasetDir, state: dict[str, dict[str, str]]) -> None:
    """An export whose shards were cut from another source state refuses to add shards cut from this one."""
    p = _work_dir(ds) / "selection.json"
    if not p.exists() or not ds.done_tasks(NAME):
        return
    old = read_json(p).get("source_state")
    if old is None or old == state:
        return
    changed = _changed(old, state)
    raise ConfigMismatchError(
        f"{ds.root}: this export's shards were selected from another state of the source: {len(changed)} source "
        f"shard(s) completed, removed or recomputed since ({', '.join(changed[:8])}"
        f"{' ...' if len(changed) > 8 else ''}). Refusing to mix two selections; rerun with --redo to export "
        f"the source as it is now.")


def _ledger_rows(src: DatasetDir, source_shards: list[str], want: pa.Table, shard: str) -> pa.Table:
    """The kept rows of the joined view (ledger + signals), now living in output shard `shard`."""
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


STAGE = ExportStage()
