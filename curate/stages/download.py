"""The download stage: a URL list -> webdataset shards of successes + one ledger row per input row.

plan() runs on the driver, once: it streams the input in record batches and writes each shard's rows
to DIR/_inputs/{shard}.parquet as it reads (memory: one batch and one slice); then one DuckDB
GROUP BY over the slices (memory capped, spilling to disk) writes DIR/_inputs/duplicates.parquet,
the rows whose URL appeared earlier (first occurrence wins, so the choice is the same on every
engine); plan.json is written last and reused by every later run and every Slurm array task.
Tasks are just {"shard": ...}. run_shard() fetches a shard's rows with a thread pool and writes the
tar (successes, in row order whatever order they finished in) and the ledger (every row) atomically; the engine writes the marker last.

--retry-failed: rows of completed shards whose error code is transient (TRANSIENT_CODES) and that
were not retried yet are written as new shards (numbers after the last one), each keeping its
input `row`; the old ledger rows get `superseded_by` = the new key. A row is retried at most once
per --retry-failed run, and only failures are retried, so no success is ever duplicated. Readers
that want one row per input row take the rows whose `superseded_by` is null.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import logging
import math
import os
import queue
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import runtime
from curate.errors import InputError
from curate.fetch import Fetcher, FetchFailed, FetchPolicy, HostLimiter, HostSlot, parse_endpoint
from curate.imaging import (
    DECODE_BUDGET_BYTES,
    ENCODE_FORMATS,
    FAST_DECODER_ERRORS,
    RESIZE_MODES,
    DecodeBudget,
    ImageOptions,
    ImageRejected,
    process_image,
    return_freed_memory_to_os,
)
from curate.io.atomic import atomic_path, read_json, tmp_path_for, write_json
from curate.io.inputs import FORMATS as INPUT_FORMATS
from curate.io.inputs import InputSpec, check_columns, iter_input, list_files
from curate.io.layout import (
    MAX_ROWS_PER_SHARD,
    DatasetDir,
    sample_key,
    shard_index,
    shard_name,
    shard_of_key,
)
from curate.io.ledger import LEDGER_FIELDS, TRANSIENT_CODES, check_code
from curate.io.shards import ShardWriter
from curate.io.tables import write_table
from curate.machine import release_free_heap, sql_memory_limit
from curate.options import option, unique
from curate.phases import ENABLED as PROFILE_ENABLED
from curate.phases import PHASES
from curate.stages.base import Resources, Stage, context, holds_place, leave_place

# ledger fields left out of the sample's json in the tar: timing differs from run to run, and the
# tar must be byte-identical whatever engine or machine wrote it
_NOT_IN_TAR = frozenset({"elapsed", "superseded_by"})
_LEDGER_NAMES = [f.name for f in LEDGER_FIELDS]


def read_deny_domains(values: tuple[str, ...]) -> tuple[str, ...]:
    """--deny-domain values; '@FILE' reads one domain a line (# comments allowed)."""
    out: list[str] = []
    for v in values:
        if v.startswith("@"):
            path = Path(v[1:])
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise InputError(f"--deny-domain {v}: cannot read {path} ({e.strerror})") from None
            out += [ln.split("#", 1)[0].strip() for ln in lines]
        else:
            out.append(v)
    return tuple(sorted({d.lower().strip(".") for d in out if d.strip(".")}))


# DownloadConfig is flat (one JSON object, one fingerprint, YAML keys = flags) but declared in groups, each
# with the object it builds; the groups' fields come first in the config, in the order of these classes.
@dataclass(frozen=True)
class InputFields:
    """Which file(s) to read and which columns hold the URL, the caption and the kept values."""

    input: str  # the INPUT argument (a file, a folder or an fsspec URL)
    input_format: str = option("auto", choices=("auto", *INPUT_FORMATS),
                               help="Format of INPUT (auto: from the file name; .gz allowed).")
    url_col: str = option("url", help="URL column.")
    caption_col: str | None = option(None, help="Caption column (default: none).")
    keep_cols: tuple[str, ...] = option((), flag="keep-col", convert=unique,
                                        help="Column carried into the ledger and the sample json (repeatable).")
    header: bool = True  # csv/tsv have a header row (set by --preset)

    def input_spec(self) -> InputSpec:
        return InputSpec(self.input, self.input_format, self.url_col, self.caption_col, self.keep_cols, self.header)


@dataclass(frozen=True)
class ImageFields:
    """How a fetched image is checked, resized and encoded into the tar."""

    image_size: int = option(256, help="Target size (px) of the resize.")
    resize_mode: str = option("keep_ratio", choices=RESIZE_MODES, help="As img2dataset's resize modes.")
    encode_format: str = option("jpg", choices=tuple(ENCODE_FORMATS), help="Image format in the tar.")
    encode_quality: int = option(95, help="jpg/webp quality; png compression level 0-9.")
    min_image_size: int = option(0, help="Smaller side below this: too_small.")
    max_aspect_ratio: float = option(0.0, help="max/min side above this: bad_aspect_ratio (0: no limit).")
    max_pixels: int = option(40_000_000,
                             help="Header pixel count above this: decompression_bomb (checked before decoding).")

    def image_options(self) -> ImageOptions:
        return ImageOptions(self.image_size, self.resize_mode, self.encode_format, self.encode_quality,
                            self.min_image_size, self.max_aspect_ratio, self.max_pixels)


@dataclass(frozen=True)
class FetchFields:
    """How a URL is fetched: limits, the address guard, opt-outs, timing and politeness."""

    max_bytes: int = option(FetchPolicy.max_bytes, help="Body size cap (decoded bytes): too_large.")
    max_redirects: int = option(FetchPolicy.max_redirects, help="Redirects followed (each hop passes the address guard).")
    # how the work is done, not what it produces: a resume may change these
    timeout: float = option(FetchPolicy.timeout, runtime=True, help="Connect and read timeout (s).")
    deadline: float = option(FetchPolicy.deadline, runtime=True,
                             help="Whole-sample time limit (s): all attempts, redirects and body bytes.")
    retries: int = option(FetchPolicy.retries, runtime=True, help="Extra attempts for transient failures (connect, timeout, 429, 5xx).")
    threads: int = option(256, runtime=True,
                          help="Most fetch threads (requests in flight) per shard task; the task starts with 16 "
                               "and adds more while the decode side waits for bodies.")
    # threads per task that decode, resize and encode (the fetch threads hand them the bodies); two per
    # task keep two cores busy with one task per core. A plain field, not a flag yet (#15): the options
    # owner decides whether it becomes one.
    decode_threads: int = runtime(2)
    per_host: int = option(FetchPolicy.per_host, runtime=True,
                           help="Most concurrent requests per host, per task: a host starts at 4 and gets more "
                                "while it answers; a 429/503 pauses it (Retry-After) and lowers its share, or "
                                "spaces its requests when it limits its rate.")
    # the demo web gets a new port every run; the endpoints let through are not part of the output
    allow_hosts: tuple[str, ...] = option((), flag="allow-host", runtime=True,
                                          help="HOST[:PORT] let through the address guard (repeatable).")
    allow_private: bool = option(False, help="Turn the address guard off (loopback/private allowed).")
    deny_domains: tuple[str, ...] = option((), flag="deny-domain", convert=read_deny_domains,
                                           help="Domain (and subdomains) never fetched; @FILE: one a line.")
    ignore_optout: bool = option(False, help="Fetch even when X-Robots-Tag says noai/noimageai.")
    respect_robots: bool = option(False, help="Honour robots.txt (read once per host) for our UA token.")
    ua_token: str = "curatebot"  # the robots.txt user agent token

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            timeout=self.timeout, deadline=self.deadline, max_bytes=self.max_bytes,
            max_redirects=self.max_redirects, retries=self.retries, per_host=self.per_host,
            allow_hosts=self.allow_hosts, allow_private=self.allow_private, deny_domains=self.deny_domains,
            respect_optout=not self.ignore_optout, respect_robots=self.respect_robots, ua_token=self.ua_token,
        )


@dataclass(frozen=True)
class DownloadConfig(FetchFields, ImageFields, InputFields):
    """`curate download`: the input groups above, then sharding."""

    samples_per_shard: int = option(10_000, help="Rows per shard (the last shard may have fewer).")
    throttled_tail: float = option(
        0.1, runtime=True,
        help="Share of a shard's time (at least 5 s) its rows queued behind a host that limits its request "
             "rate (429) may add at its end, once every other row was started; the rows still queued then "
             "end as host_throttled, which --retry-failed fetches later, unless they are over a tenth of the "
             "shard (a large value: wait for all).")
    retry_failed: bool = option(False, runtime=True,
                                help="Re-attempt the transient failures of completed shards as new shards.")
    one_task_per_worker: bool = option(
        False, runtime=True,
        help="Run each worker's shards strictly one after another, in --workers processes: less memory, "
             "but a shard's last slow answers idle its worker (by default the next shard starts beside "
             "them, in a pool of a quarter more processes than --workers, at least one more).")


def check_config(cfg: DownloadConfig) -> None:
    """Bad values stop before anything is written, naming the flag."""
    def bad(flag: str, why: str) -> None:
        raise InputError(f"{flag}: {why}")

    if cfg.resize_mode not in RESIZE_MODES:
        bad("--resize-mode", f"'{cfg.resize_mode}' is not one of {', '.join(RESIZE_MODES)}")
    if cfg.encode_format not in ENCODE_FORMATS:
        bad("--encode-format", f"'{cfg.encode_format}' is not one of {', '.join(ENCODE_FORMATS)}")
    if cfg.image_size < 1:
        bad("--image-size", "must be at least 1")
    if not 0 <= cfg.encode_quality <= 100:
        bad("--encode-quality", "must be within 0..100")
    if not 1 <= cfg.samples_per_shard <= MAX_ROWS_PER_SHARD:
        bad("--samples-per-shard", f"must be within 1..{MAX_ROWS_PER_SHARD}")
    for flag, v in (("--threads", cfg.threads), ("--per-host", cfg.per_host), ("--max-pixels", cfg.max_pixels),
                    ("--max-bytes", cfg.max_bytes), ("decode_threads", cfg.decode_threads)):
        if v < 1:
            bad(flag, "must be at least 1")
    for flag, v in (("--timeout", cfg.timeout), ("--deadline", cfg.deadline)):
        if v <= 0:
            bad(flag, "must be positive")
    if cfg.throttled_tail < 0:
        bad("--throttled-tail", "must not be negative")
    if cfg.retries < 0 or cfg.max_redirects < 0 or cfg.min_image_size < 0 or cfg.max_aspect_ratio < 0:
        bad("--retries/--max-redirects/--min-image-size/--max-aspect-ratio", "must not be negative")
    for spec in cfg.allow_hosts:
        try:
            parse_endpoint(spec)
        except ValueError as e:
            bad("--allow-host", str(e))
    clash = [c for c in cfg.keep_cols if c in _LEDGER_NAMES]
    if clash:
        bad("--keep-col", f"{', '.join(clash)} would overwrite ledger column(s); rename them in the input")


# ---- planning (driver) --------------------------------------------------------------------------

PLAN_VERSION = 2
# rows read from the input per record batch; with one slice in the making this bounds the plan's memory
_BATCH_ROWS = 65_536


def slice_path(ds: DatasetDir, shard: str) -> Path:
    return ds.input_slice(shard)


def progress_path(ds: DatasetDir, shard: str) -> Path:
    return ds.input_progress(shard)


def plan_path(ds: DatasetDir) -> Path:
    return ds.plan_file


def _sql(ds: DatasetDir) -> Any:
    """A DuckDB connection whose memory is capped and which spills to DIR/_work/download/spill.

    The cap ($CURATE_SQL_MEMORY, default 64MB or less on a machine with under 128 MB per core) is what bounds duplicate detection, retry planning
    and the final counts at any input size: past it DuckDB's joins, aggregates and sorts spill to disk.
    """
    import duckdb

    spill = ds.work("download") / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{sql_memory_limit(cap=64 << 20)}'")
    con.execute(f"SET temp_directory='{spill}'")
    con.execute(f"SET threads={max(1, min(4, os.cpu_count() or 1))}")
    con.execute("SET preserve_insertion_order=false")
    return con


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def load_plan(ds: DatasetDir) -> dict[str, Any] | None:
    """The plan of an earlier run (plan.json is written last, so its presence means complete)."""
    p = ds.plan_file
    if not p.exists():
        return None
    info = read_json(p)
    return info if info.get("version") == PLAN_VERSION else None


def plan(cfg: DownloadConfig, ds: DatasetDir) -> list[dict[str, Any]]:
    """The shard tasks; the input is read once, on the first run, and the plan reused after that.

    A Slurm array task (--num-shards > 1) never plans: it needs the plan of a `--plan-only` run (the runner
    gives each array task its slice of these tasks).
    """
    part = context().array_slice
    array = part is not None
    info = load_plan(ds)
    if info is not None and info.get("samples_per_shard") != cfg.samples_per_shard:
        info = None  # cannot happen through the CLI (the fingerprint covers it); be safe
    if info is None:
        if array:
            raise InputError(f"--shard-index {part[0]}: {ds.root} has no download plan yet; an array "
                             f"task never plans (its siblings would race). Run `curate download INPUT --out "
                             f"{ds.root} --plan-only` first (jobs/slurm/download_plan.sbatch).")
        info = _make_plan(cfg, ds)
    if cfg.retry_failed:
        if array:
            raise InputError("--retry-failed: plan the retries once with --plan-only --retry-failed, then run "
                             "the array without it")
        info = _plan_retries(cfg, ds, info)
    if not info.get("superseded_marked", True) and not array:
        mark_superseded(ds, _retry_shards(info))
        info["superseded_marked"] = True
        write_json(ds.plan_file, info)
    return [{"shard": s} for s in sorted(info["shards"])]


def _make_plan(cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
    """Stream the input into per-shard slices, then find repeated URLs with DuckDB; plan.json last."""
    log = logging.getLogger(__name__)
    sps = cfg.samples_per_shard
    done = set(ds.done_shards("download"))
    ds.duplicates_file.unlink(missing_ok=True)
    sizes: dict[str, int] = {}
    pending: list[pa.Table] = []
    held = rows = 0
    t0 = time.time()
    # an input too small to give every worker process a shard of its own is cut into more, smaller
    # shards (see _small_input_shards): rows are held back until the input is known to be bigger
    workers = max(1, min(context().workers, MAX_SPLIT))
    for batch in _input_batches(cfg):
        pending.append(batch)
        held += batch.num_rows
        while held >= sps and (rows or held >= workers * sps):
            t = pa.concat_tables(pending)
            _write_slice(cfg, ds, len(sizes), rows, t.slice(0, sps), done, sizes)
            rows += sps
            pending, held = [t.slice(sps)], t.num_rows - sps
        if len(sizes) % 100 == 1 and rows:
            log.info("plan: %d rows read in %.0fs", rows, time.time() - t0)
    if held:
        t = pa.concat_tables(pending)
        size = -(-held // (1 if rows else _small_input_shards(held, sps, workers)))
        for first in range(0, held, size):
            _write_slice(cfg, ds, len(sizes), rows + first, t.slice(first, size), done, sizes)
        rows += held
    n_dup = _find_duplicates(ds, sizes) if rows else 0
    info = {"version": PLAN_VERSION, "rows": rows, "base_shards": len(sizes), "samples_per_shard": sps,
            "duplicates": n_dup, "shards": sizes, "superseded_marked": True}
    write_json(ds.plan_file, info)
    return info


# a small input is cut into at most this many shards, of at least MIN_SPLIT_ROWS rows each
MAX_SPLIT = 32
MIN_SPLIT_ROWS = 500


def _small_input_shards(rows: int, sps: int, workers: int) -> int:
    """Shards for a whole input of `rows` (fewer than `workers` x `sps`): one per worker process, so
    every process has work from the start (a single shard would leave all but one idle), unless that
    makes shards smaller than MIN_SPLIT_ROWS; never fewer than `sps` rows a shard needs."""
    return max(-(-rows // sps), min(workers, rows // MIN_SPLIT_ROWS), 1)


def _input_batches(cfg: DownloadConfig) -> Any:
    return iter_input(cfg.input_spec(), batch_rows=min(_BATCH_ROWS, cfg.samples_per_shard))


def _write_slice(cfg: DownloadConfig, ds: DatasetDir, index: int, first_row: int, t: pa.Table,
                 done: set[str], sizes: dict[str, int]) -> None:
    shard = shard_name(index)
    n = t.num_rows
    sizes[shard] = n
    # done shards keep the slice they ran from
    if shard in done and slice_path(ds, shard).exists():
        return
    cols = {"key": pa.array([sample_key(shard, j) for j in range(n)], pa.string()),
            "row": pa.array(range(first_row, first_row + n), pa.int64()),
            "url": t["url"], "caption": t["caption"],
            "input_error": t["input_error"], "input_error_message": t["input_error_message"],
            "retry_of": pa.nulls(n, pa.string())}
    for c in cfg.keep_cols:
        cols[c] = t[c]
    write_table(slice_path(ds, shard), pa.table(cols))


# the URL a duplicate is judged on: surrounding whitespace dropped, and the fragment, which never reaches
# the server (the text before the first '#'); an empty result is no URL at all
_DEDUP_KEY_SQL = ("nullif(split_part(trim(url, ' ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13)), "
                  "'#', 1), '')")


def _find_duplicates(ds: DatasetDir, sizes: dict[str, int]) -> int:
    """Write DIR/_inputs/duplicates.parquet: (shard, key, duplicate_of) for every row whose URL appeared
    earlier; the first occurrence (smallest key = earliest row) wins, so every engine decides alike.

    A GROUP BY over the slices in DuckDB, spilling past its memory cap: bounded memory at any size.
    """
    slices = [slice_path(ds, s) for s in sorted(sizes)]
    con = _sql(ds)
    try:
        # grouped on the URL's 128-bit MD5, not its text: a fixed 16 bytes a row in the hash table and the
        # spill (a collision among 10^12 distinct URLs has odds of about 10^-15)
        con.execute(f"""CREATE TEMP VIEW src AS SELECT key, md5_number({_DEDUP_KEY_SQL}) AS dk FROM
                        read_parquet({_sql_list(slices)}) WHERE retry_of IS NULL AND input_error IS NULL""")
        with atomic_path(ds.duplicates_file) as tmp:
            con.execute(f"""COPY (
                WITH firsts AS (SELECT dk, min(key) AS first_key FROM src WHERE dk IS NOT NULL
                                GROUP BY dk HAVING count(*) > 1)
                SELECT substr(src.key, 1, {len(shard_name(0))}) AS shard, src.key AS key,
                       firsts.first_key AS duplicate_of
                FROM src JOIN firsts USING (dk) WHERE src.key <> firsts.first_key ORDER BY src.key
            ) TO '{tmp}' (FORMAT PARQUET, ROW_GROUP_SIZE 65536)""")
        return int(pq.ParquetFile(ds.duplicates_file).metadata.num_rows)
    finally:
        con.close()


def read_slice(ds: DatasetDir, shard: str) -> list[dict[str, Any]]:
    """A shard's input rows with their `duplicate_of` (read from the duplicates file, this shard only)."""
    rows = pq.read_table(slice_path(ds, shard)).to_pylist()
    if ds.duplicates_file.exists():
        # the file is sorted by key: row-group statistics let the reader skip every other shard's rows
        dup = pq.read_table(ds.duplicates_file, columns=["key", "duplicate_of"], filters=[("shard", "=", shard)])
        first = dict(zip(dup["key"].to_pylist(), dup["duplicate_of"].to_pylist(), strict=True))
        for r in rows:
            r["duplicate_of"] = first.get(r["key"])
    return rows


def _retry_shards(info: dict[str, Any]) -> list[str]:
    return [s for s in sorted(info["shards"]) if shard_index(s) >= info["base_shards"]]


def _plan_retries(cfg: DownloadConfig, ds: DatasetDir, info: dict[str, Any]) -> dict[str, Any]:
    """New shards holding the transient failures of completed shards that were not retried yet.

    DuckDB picks them from the done ledgers (never all loaded at once) into a spill file sorted by key,
    which is then cut into slices of --samples-per-shard rows.
    """
    done = ds.done_shards("download")
    ledgers = [ds.ledger(s) for s in done if ds.ledger(s).exists()]
    if not ledgers:
        return info
    earlier = [slice_path(ds, s) for s in _retry_shards(info) if slice_path(ds, s).exists()]
    codes = ", ".join(f"'{c}'" for c in sorted(TRANSIENT_CODES))
    keep = "".join(f', "{c}"' for c in cfg.keep_cols)
    not_yet = (f"AND key NOT IN (SELECT retry_of FROM read_parquet({_sql_list(earlier)}) WHERE retry_of IS NOT NULL)"
               if earlier else "")
    cand = ds.work("download") / "retry-candidates.parquet"
    con = _sql(ds)
    try:
        with atomic_path(cand) as tmp:
            con.execute(f"""COPY (SELECT key AS retry_of, row, url, caption{keep} FROM read_parquet({_sql_list(ledgers)})
                            WHERE error_code IN ({codes}) AND superseded_by IS NULL {not_yet} ORDER BY key)
                            TO '{tmp}' (FORMAT PARQUET)""")
    finally:
        con.close()
    nxt = max([shard_index(s) for s in info["shards"]] + [shard_index(s) for s in done]) + 1
    sps = cfg.samples_per_shard
    new: dict[str, int] = {}
    pending: list[pa.Table] = []
    held = 0
    for rb in pq.ParquetFile(cand).iter_batches(batch_size=min(_BATCH_ROWS, sps)):
        pending.append(pa.Table.from_batches([rb]))
        held += rb.num_rows
        while held >= sps:
            t = pa.concat_tables(pending)
            _write_retry_slice(cfg, ds, nxt + len(new), t.slice(0, sps), new)
            pending, held = [t.slice(sps)], t.num_rows - sps
    if held:
        _write_retry_slice(cfg, ds, nxt + len(new), pa.concat_tables(pending), new)
    cand.unlink(missing_ok=True)
    if not new:
        return info
    info = {**info, "shards": {**info["shards"], **new}, "superseded_marked": False}
    write_json(ds.plan_file, info)  # the new slices exist before the plan names them
    return info


def _write_retry_slice(cfg: DownloadConfig, ds: DatasetDir, index: int, t: pa.Table, new: dict[str, int]) -> None:
    shard = shard_name(index)
    n = t.num_rows
    new[shard] = n
    cols = {"key": pa.array([sample_key(shard, j) for j in range(n)], pa.string()), "row": t["row"],
            "url": t["url"], "caption": t["caption"], "input_error": pa.nulls(n, pa.string()),
            "input_error_message": pa.nulls(n, pa.string()), "retry_of": t["retry_of"]}
    for c in cfg.keep_cols:
        cols[c] = t[c].cast(pa.string())
    write_table(slice_path(ds, shard), pa.table(cols))


def mark_superseded(ds: DatasetDir, retry_shards: list[str]) -> int:
    """Point the retried rows' old ledger rows at their new keys (idempotent); returns how many rows.

    The (old key -> new key) pairs are sorted by old key, so each old ledger is read and rewritten once,
    holding only that shard's pairs.
    """
    slices = [slice_path(ds, s) for s in retry_shards if slice_path(ds, s).exists()]
    if not slices:
        return 0
    con = _sql(ds)
    try:
        reader = con.sql(f"""SELECT retry_of, key FROM read_parquet({_sql_list(slices)})
                             WHERE retry_of IS NOT NULL ORDER BY retry_of""").to_arrow_reader(_BATCH_ROWS)
        total = 0
        shard_now: str | None = None
        new_keys: dict[str, str] = {}
        for rb in reader:
            for old, new in zip(rb.column(0).to_pylist(), rb.column(1).to_pylist(), strict=True):
                total += 1
                s = shard_of_key(old)
                if s != shard_now:
                    _supersede(ds, shard_now, new_keys)
                    shard_now, new_keys = s, {}
                new_keys[old] = new
        _supersede(ds, shard_now, new_keys)
        return total
    finally:
        con.close()


def _supersede(ds: DatasetDir, shard: str | None, new_keys: dict[str, str]) -> None:
    if shard is None or not new_keys:
        return
    path = ds.ledger(shard)
    if not path.exists():
        return
    led = pq.read_table(path)
    keys = led.column("key").to_pylist()
    old = led.column("superseded_by").to_pylist()
    sup = [new_keys.get(k, o) for k, o in zip(keys, old, strict=True)]
    if sup != old:
        idx = led.schema.get_field_index("superseded_by")
        led = led.set_column(idx, led.schema.field(idx), pa.array(sup, pa.string()))
        write_table(path, led)


# ---- one shard (worker) -------------------------------------------------------------------------

@dataclass
class _Result:
    ledger: dict[str, Any]
    image: bytes | None = None
    ext: str | None = None


# the shard writer's last resort: a row with no result this long after its worker took it is written
# as deadline_exceeded (the fetch itself is bounded by the watchdog; this covers a redirect's wait for
# a per-host slot, the decode budget, and any bug that would otherwise hang the shard)
WRITER_GRACE = 60.0
# seconds between the writer's looks for rows stuck in a worker
STUCK_CHECK_PERIOD = 1.0


def _row_wait_limit(cfg: DownloadConfig) -> float:
    """Seconds the writer waits for a row a worker took: its deadline (a row never waits for a host slot
    in a worker, it is queued until one is free; a redirect to a busy host waits within the deadline),
    once more for the decode side, and a grace."""
    return cfg.deadline * 2 + WRITER_GRACE


class _Dispatch:
    """Which row a fetch thread takes next; every method is called holding the shard's lock.

    Rows are scanned in order. A row whose host is at its limit (or paused by a Retry-After) is queued
    under its host, and never holds a thread: the next free thread takes the next row instead, and a
    queued row is taken (lowest row first) as soon as its host has a slot, so every host is kept at its
    limit from the start of the shard to its end. A row of a host paused past what a fetch could wait
    out, or down (Fetcher.skips), is taken at once and fails fast in the fetcher, without a request.

    Only hosts that may have a slot are tried: a host whose slot was released (`freed`), or whose pause
    or spacing has run out (a timer), and every queued host once per RESCAN_PERIOD; so a take costs what
    changed, not the number of queued hosts, with thousands of threads and hosts.
    """

    def __init__(self, rows: list[dict[str, Any]], fetcher: Fetcher):
        self.rows = rows
        self.fetcher = fetcher
        self.limiter = fetcher.limiter
        self.scan = 0
        self.queued: dict[str, collections.deque[int]] = {}
        self.n_queued = 0
        self.max_queued = 0
        self.ready: set[str] = set()  # queued hosts that may have a slot now
        self.timers: list[tuple[float, str]] = []  # (monotonic time, host): its pause or spacing ends
        self.rescan_at = 0.0

    def exhausted(self) -> bool:
        return self.scan >= len(self.rows) and not self.n_queued

    def _host(self, i: int) -> str | None:
        row = self.rows[i]
        if row.get("input_error") or row.get("duplicate_of"):
            return None
        return self.fetcher.host_of(row["url"])

    def freed(self, host: str) -> None:
        """A slot of `host` was released."""
        if host in self.queued:
            self.ready.add(host)

    def _not_free(self, host: str, now: float) -> None:
        """`host` has no slot now: it waits for a release, or for its pause or spacing to end."""
        self.ready.discard(host)
        wait = self.limiter.paused_for(host)
        if wait > 0:
            heapq.heappush(self.timers, (now + wait, host))

    def take(self) -> tuple[int, HostSlot | None] | None:
        """(row, the host slot taken for it) or None when no row can start now."""
        now = time.monotonic()
        if now >= self.rescan_at:
            self.ready, self.rescan_at = set(self.queued), now + RESCAN_PERIOD
        while self.timers and self.timers[0][0] <= now:
            host = heapq.heappop(self.timers)[1]
            if host in self.queued:
                self.ready.add(host)
        for _, host in sorted((self.queued[h][0], h) for h in self.ready if h in self.queued):
            paused = self.fetcher.skips(host)
            slot = None if paused else self.limiter.try_acquire(host)
            if slot is not None or paused:
                return self._unqueue(host), slot
            self._not_free(host, now)
        while self.scan < len(self.rows):
            i = self.scan
            self.scan += 1
            host = self._host(i)
            if host is None or self.fetcher.skips(host):
                return i, None
            if host not in self.queued:  # behind the rows already queued under it, if any
                slot = self.limiter.try_acquire(host)
                if slot is not None:
                    return i, slot
                self._not_free(host, now)
            self.queued.setdefault(host, collections.deque()).append(i)
            self.n_queued += 1
            self.max_queued = max(self.max_queued, self.n_queued)
        return None

    def _unqueue(self, host: str) -> int:
        dq = self.queued[host]
        i = dq.popleft()
        if not dq:
            del self.queued[host]
            self.ready.discard(host)
        self.n_queued -= 1
        return i

    def drop_throttled(self, most: int) -> list[tuple[int, str]]:
        """Take every row queued behind a host that holds us back after a 429 (HostLimiter.rate_limited: its
        requests spaced, or at most two at once), (row, host), when they are `most` rows or fewer; else none."""
        hosts = [h for h in self.queued if self.limiter.rate_limited(h)]
        if sum(len(self.queued[h]) for h in hosts) > most:
            return []
        out = []
        for host in hosts:
            out += [(i, host) for i in self.queued.pop(host)]
            self.ready.discard(host)
        self.n_queued -= len(out)
        return out

    def due(self) -> float:
        """When a host's pause or spacing ends next, or the next rescan (monotonic time, at most
        RESCAN_PERIOD away): the idle thread that keeps the timers sleeps until then, unless a release
        wakes it first."""
        return min(self.rescan_at, self.timers[0][0]) if self.timers else self.rescan_at


# seconds between tries of every queued host (the net under the release and timer wake-ups)
RESCAN_PERIOD = 1.0


# seconds rows queued behind a throttled host may always add to a shard's end (a Retry-After of a few
# seconds is waited out)
THROTTLED_TAIL_MIN = 5.0
# ... and the share of a shard's rows they may be: past it the shard is mostly theirs and they all wait
THROTTLED_SHARE = 0.1


# the adaptive number of fetch threads of a task: it starts here (or at --threads when lower) ...
PACE_START = 16
PACE_PERIOD = 0.25  # seconds between decisions


class _Pace:
    """How many fetch threads a task runs, between PACE_START and --threads (the ceiling).

    Every PACE_PERIOD: more threads (a quarter more) while the decode threads sat idle part of the time
    and every fetch thread was busy; a quarter fewer when the share of transient failures (timeouts,
    refused connections, 5xx) jumped. Decisions are taken as rows finish, so with slow answers a period
    lasts longer (threads started together finish together, one decision per answer time): it then
    grows a quarter for each PACE_PERIOD it lasted, at most doubling, or reaching thousands of threads
    would take about 23 answer times. Called holding the shard's lock.
    """

    def __init__(self, ceiling: int, n_decode: int):
        self.ceiling = max(1, ceiling)
        self.target = min(self.ceiling, PACE_START)
        self.n_decode = n_decode
        self.t0 = time.monotonic()
        self.rows = self.errors = 0
        self.decode_idle = 0.0  # seconds the decode threads waited for a body, summed, this period
        self.prev_error_rate: float | None = None
        self.peak = self.target

    def row_done(self, transient: bool, idle_threads: int) -> None:
        self.rows += 1
        self.errors += transient
        now = time.monotonic()
        period = now - self.t0
        if period < PACE_PERIOD:
            return
        rate = self.errors / self.rows
        idle_share = self.decode_idle / (period * self.n_decode)
        if self.prev_error_rate is not None and rate > 0.1 and rate > self.prev_error_rate + 0.1:
            self.target = max(min(self.ceiling, PACE_START), self.target * 3 // 4)
        elif idle_share > 0.1 and idle_threads == 0:
            steps = min(4, int(period / PACE_PERIOD))
            self.target = min(self.ceiling, self.target + max(2, self.target // 4) * steps)
        self.peak = max(self.peak, self.target)
        self.prev_error_rate = rate
        self.t0, self.rows, self.errors, self.decode_idle = now, 0, 0, 0.0


def _new_result(row: dict[str, Any]) -> _Result:
    led: dict[str, Any] = dict.fromkeys(_LEDGER_NAMES)
    led.update(key=row["key"], row=row["row"], url=row["url"], caption=row["caption"], attempts=0)
    return _Result(led)


def _internal_error(res: _Result, e: Exception) -> None:
    tb = traceback.format_exc(limit=3).replace("\n", " | ")
    res.ledger.update(status="internal_error", error_code="internal_error",
                      error_message=f"{type(e).__name__}: {e} [{tb}]"[:1000])
    res.image = None


def _fetch_row(row: dict[str, Any], fetcher: Fetcher) -> tuple[_Result, bytes | None]:
    """The network half of a row: its result (final unless the body is not None) and the body to decode."""
    res = _new_result(row)
    led = res.ledger
    led["elapsed"] = time.monotonic()  # the start, until _finish_row turns it into seconds
    try:
        if row.get("input_error"):  # text that was not valid UTF-8: repaired for the ledger, not fetched
            led.update(status=row["input_error"], error_code=row["input_error"],
                       error_message=row.get("input_error_message"))
            return res, None
        if row.get("duplicate_of"):
            led.update(status="duplicate_url", error_code="duplicate_url",
                       error_message=f"same URL as {row['duplicate_of']}", duplicate_of=row["duplicate_of"])
            return res, None
        try:
            got = fetcher.fetch(row["url"])
        except FetchFailed as e:
            led.update(status=e.code, error_code=e.code, error_message=e.message, attempts=e.attempts,
                       http_status=e.http_status, final_url=e.final_url)
            return res, None
        with PHASES.timed("hash"):
            digest = hashlib.sha256(got.body).hexdigest()
        led.update(attempts=got.attempts, http_status=got.http_status, final_url=got.final_url,
                   bytes=len(got.body), sha256=digest,
                   mime=(got.content_type or "").split(";")[0].strip() or None)
        return res, got.body
    except Exception as e:  # noqa: BLE001 - a bug in one row must not lose the others
        _internal_error(res, e)
        return res, None


def _decode_row(res: _Result, body: bytes, opt: ImageOptions, budget: DecodeBudget | None = None) -> _Result:
    """The image half of a row: decode, resize and encode the fetched body into `res`."""
    led = res.ledger
    try:
        try:
            img = process_image(body, opt, budget)
        except ImageRejected as e:
            led.update(status=e.code, error_code=e.code, error_message=e.message, mime=e.mime or led["mime"])
            if e.orig_size:
                led.update(orig_width=e.orig_size[0], orig_height=e.orig_size[1])
            return res
        led.update(status="success", mime=img.mime, orig_width=img.orig_width, orig_height=img.orig_height,
                   width=img.width, height=img.height)
        res.image, res.ext = img.data, img.ext
    except Exception as e:  # noqa: BLE001 - a bug in one row must not lose the others
        _internal_error(res, e)
    return res


def _finish_row(res: _Result) -> _Result:
    led = res.ledger
    check_code(led["error_code"])
    led["elapsed"] = round(time.monotonic() - led["elapsed"], 4)
    return res


def _unfetched(row: dict[str, Any], code: str, message: str, elapsed: float) -> _Result:
    """The result of a row the shard ended without a fetch result for."""
    res = _new_result(row)
    res.ledger.update(status=code, error_code=code, elapsed=round(elapsed, 4), error_message=message)
    return res


def _abandoned(row: dict[str, Any], limit: float) -> _Result:
    return _unfetched(row, "deadline_exceeded",
                      f"no result {limit:.0f}s after the row was started; the shard went on without it", limit)


class _Spill:
    """The encoded images of a shard in the order they were finished, in a temporary file; the tar is
    written from it in row order once every row is done, so the tar is the same whatever order the
    network answered in, and no finished row waits in memory for a slower one before it."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w+b")  # noqa: SIM115 - closed in close(), after the tar is written
        self.where: dict[int, tuple[int, int, str]] = {}  # row -> (offset, size, extension)
        self._end = 0

    def put(self, i: int, image: bytes, ext: str) -> None:
        self._f.write(image)
        self.where[i] = (self._end, len(image), ext)
        self._end += len(image)

    def get(self, i: int) -> tuple[bytes, str] | None:
        if i not in self.where:
            return None
        off, size, ext = self.where[i]
        return os.pread(self._f.fileno(), size, off), ext

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def run_shard(cfg: DownloadConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """Fetch and process one shard's rows; write the tar (row order) and the ledger.

    Fetch threads (their number adapts, see _Pace, up to `cfg.threads`) do the network half of each row
    and hand the bodies over a bounded queue to `cfg.decode_threads` decode threads (decode, resize,
    encode): the pixel work runs in few threads, so their allocator arenas are reused instead of
    growing in every fetch thread, and the GIL is not handed around among many threads mid-decode. A
    row whose host is at its limit is queued under its host (_Dispatch), so a waiting thread is never
    a blocked one. Finished rows go to the writer in the order they finish (their images to a spill
    file, _Spill), so a slow row never holds the rows after it; the tar is written in row order at the
    end. Long because the workers and the writer share one lock and its state; split apart they would
    pass the same objects around.
    """
    shard = task["shard"]
    t0, t0_mono = time.time(), time.monotonic()
    cpu0 = time.process_time()
    rows = read_slice(ds, shard)
    n = len(rows)
    lock = threading.Lock()
    work = threading.Condition(lock)  # idle fetch threads wait here for a row they can start

    def slot_freed(host: str) -> None:
        with lock:
            dispatch.freed(host)
            work.notify()

    fetcher = Fetcher(cfg.fetch_policy(), limiter=HostLimiter(cfg.per_host, on_release=slot_freed))
    opt = cfg.image_options()
    budget = DecodeBudget(DECODE_BUDGET_BYTES)  # decoded bytes in flight in this task, all threads together
    return_freed_memory_to_os()  # or freed decode buffers stay in per-thread arenas (see imaging)
    PHASES.reset()
    fast_errors0 = Counter(FAST_DECODER_ERRORS)
    finished: queue.SimpleQueue[tuple[int, _Result]] = queue.SimpleQueue()  # to the writer, as rows finish
    # rows in a worker: > 0 fetching or decoding since then; < 0 fetched and waiting for a decode thread
    # since -value. A row the writer gave up on leaves it, and its late result is dropped.
    working: dict[int, float] = {}
    slots: dict[int, HostSlot] = {}  # the host slot a fetching row's thread holds
    wait_limit = _row_wait_limit(cfg)
    # "timer_due": when the idle thread that waits for the timers (a pause or spacing ending, the rescan)
    # wakes; the other idle threads wait for a notify, so a second's rescan wakes one thread, not all
    state = {"stop": False, "workers": 0, "idle": 0, "timer_due": math.inf, "in_flight": 0, "peak_in_flight": 0,
             "last_start": math.nan}
    dispatch = _Dispatch(rows, fetcher)
    n_decode = max(1, cfg.decode_threads)
    pace = _Pace(cfg.threads, n_decode)
    # bodies waiting for a decode thread: bounded, so a slow decode holds the fetch threads back
    # (bodies in memory: at most the fetch threads + this many)
    to_decode: queue.Queue[tuple[int, _Result, bytes] | None] = queue.Queue(maxsize=2 * n_decode)

    def deliver(i: int, r: _Result) -> None:
        with lock:
            if working.pop(i, None) is None:  # given up on by the writer
                return
        finished.put((i, r))

    def next_row() -> tuple[int, HostSlot | None] | None:
        """(holding the lock) the next row this thread fetches; None: the thread ends."""
        while True:
            if state["stop"] or dispatch.exhausted() or state["workers"] > pace.target:
                state["workers"] -= 1
                work.notify()  # pass on the wake-up this thread may have taken
                return None
            got = dispatch.take()
            if got is not None:
                work.notify()  # another idle thread may find a row too
                return got
            state["idle"] += 1
            due = dispatch.due()
            if due < state["timer_due"]:  # no idle thread wakes that early: this one does
                state["timer_due"] = due
                work.wait(timeout=max(0.0, due - time.monotonic()) + 0.001)
                if state["timer_due"] == due:
                    state["timer_due"] = math.inf
            else:
                work.wait()  # a release, a take that may leave rows, an exit or the timer thread wakes it
            state["idle"] -= 1

    def fetch_worker() -> None:
        while True:
            with lock:
                got = next_row()
                if got is None:
                    return
                i, slot = got
                working[i] = state["last_start"] = time.monotonic()
                if slot is not None:
                    slots[i] = slot
                state["in_flight"] += 1
                state["peak_in_flight"] = max(state["peak_in_flight"], state["in_flight"])
            if slot is None:
                r, body = _fetch_row(rows[i], fetcher)
            else:
                with fetcher.holding(slot):
                    r, body = _fetch_row(rows[i], fetcher)
            with lock:
                slots.pop(i, None)
                state["in_flight"] -= 1
                pace.row_done(r.ledger["error_code"] in TRANSIENT_CODES, state["idle"])
                grow = max(0, min(pace.target - state["workers"], 64))
                state["workers"] += grow
                if body is not None and i in working:
                    # waiting for a decode thread is not the row's fault: the writer's clock restarts
                    # when a decode thread takes it
                    working[i] = -time.monotonic()
            for _ in range(grow):
                spawn(fetch_worker, f"fetch-{shard}-{len(threads)}", threads)
            if body is None:
                deliver(i, _finish_row(r))
                continue
            while True:  # a put that gives up when the shard is stopped (the decoders may be gone)
                try:
                    to_decode.put((i, r, body), timeout=0.5)
                    break
                except queue.Full:
                    if state["stop"]:
                        return

    def decode_worker() -> None:
        while True:
            w0 = time.monotonic()
            item = to_decode.get()
            if item is None:
                return
            i, r, body = item
            del item
            with lock:
                now = time.monotonic()
                if i in working:
                    working[i] = now
                pace.decode_idle += now - w0
            deliver(i, _finish_row(_decode_row(r, body, opt, budget)))
            del body, r

    def spawn(target: Any, name: str, pool: list[threading.Thread]) -> None:
        th = threading.Thread(target=target, daemon=True, name=name)
        pool.append(th)
        th.start()

    def give_up_stuck() -> list[int]:
        """Rows in a worker for longer than wait_limit, given up on (their threads are replaced and
        their host slots freed); a decode thread more when a fetched row waited that long for one."""
        now = time.monotonic()
        with lock:
            stuck = [i for i, t in working.items() if t > 0 and now - t > wait_limit]
            waiting = [i for i, t in working.items() if t < 0 and now + t > wait_limit]
            for i in waiting:
                working[i] = -now
            freed = []
            for i in stuck:
                del working[i]
                freed.append(slots.pop(i, None))
            state["workers"] += len(stuck)
        for slot in freed:
            if slot is not None:
                fetcher.limiter.release(slot)
        for i in stuck:  # the row may be stuck in a fetch or in a decode: replace one of each
            spawn(fetch_worker, f"fetch-{shard}-r{i}", threads)
            spawn(decode_worker, f"decode-{shard}-r{i}", decoders)
        if waiting:  # every decode thread is stuck: add one, the rows wait on
            spawn(decode_worker, f"decode-{shard}-s{len(decoders)}", decoders)
        return stuck

    threads: list[threading.Thread] = []
    decoders: list[threading.Thread] = []
    with lock:
        state["workers"] = min(pace.target, max(n, 1))
    for k in range(state["workers"]):
        spawn(fetch_worker, f"fetch-{shard}-{k}", threads)
    for k in range(n_decode):
        spawn(decode_worker, f"decode-{shard}-{k}", decoders)
    ledger_rows: list[dict[str, Any] | None] = [None] * n
    status: Counter[str] = Counter()
    total_bytes = 0
    done = 0
    last_progress = last_check = m0 = time.monotonic()
    spill = _Spill(tmp_path_for(ds.shard_tar(shard)).with_suffix(".spill"))

    def record(i: int, r: _Result) -> None:
        nonlocal done, total_bytes
        led = r.ledger
        led["shard"] = shard
        for c in cfg.keep_cols:
            led[c] = rows[i].get(c)
        if r.image is not None:
            spill.put(i, r.image, r.ext or "jpg")
        ledger_rows[i] = led
        status[led["status"]] += 1
        total_bytes += led["bytes"] or 0
        done += 1

    tail_end: float | None = None  # when rows still queued behind a throttled host stop waiting

    def defer_throttled(now: float) -> None:
        """Rows queued behind a host that limits its request rate, still waiting throttled_tail x the shard's time
        after every other row was started: host_throttled (the shard does not wait on for them), unless
        they are more than THROTTLED_SHARE of the shard (then there is little else to do: they all wait)."""
        nonlocal tail_end
        with lock:
            if tail_end is None and dispatch.scan >= n:
                tail_end = now + max(THROTTLED_TAIL_MIN, cfg.throttled_tail * (now - m0))
            dropped = []
            if tail_end is not None and now >= tail_end:
                dropped = dispatch.drop_throttled(int(THROTTLED_SHARE * n))
                tail_end = float("inf")  # decided once
        for i, host in dropped:
            record(i, _unfetched(rows[i], "host_throttled", f"{host} answered 429 and limits its rate; its "
                                 f"rows still queued when the shard's other rows were done were left for "
                                 f"--retry-failed", 0.0))

    try:
        try:
            while done < n:
                try:
                    record(*finished.get(timeout=STUCK_CHECK_PERIOD))
                except queue.Empty:
                    pass
                if holds_place() and dispatch.scan >= n and dispatch.n_queued <= state["in_flight"]:
                    # every row started, or few left behind their hosts: the rest waits, beside the next task;
                    # the heap pages this task's decodes freed go back first
                    release_free_heap()
                    leave_place()
                now = time.monotonic()
                if now - last_check >= STUCK_CHECK_PERIOD:
                    last_check = now
                    for i in give_up_stuck():
                        record(i, _abandoned(rows[i], wait_limit))
                    defer_throttled(now)
                if now - last_progress > 1.0:
                    last_progress = now
                    write_json(progress_path(ds, shard), {"done": done, "success": status["success"]})
        finally:
            with lock:
                state["stop"] = True
                work.notify_all()
            # every row is done: the threads left are idle (they end now) or stuck in a row given up
            # on (daemons, left behind); a short bound for all of them together
            join_until = time.monotonic() + 5.0
            for th in list(threads):
                th.join(timeout=max(0.0, join_until - time.monotonic()))
            for _ in decoders:  # the fetch threads are done putting: one end mark per decode thread
                with contextlib.suppress(queue.Full):
                    to_decode.put(None, timeout=max(0.0, join_until - time.monotonic()))
            for th in decoders:
                th.join(timeout=max(0.0, join_until - time.monotonic()))
            fetcher.close()
        spill.flush()
        with ShardWriter(ds.shard_tar(shard)) as writer:
            for i, led in enumerate(ledger_rows):
                got = spill.get(i)
                if got is not None and led is not None:
                    meta = {k: v for k, v in led.items() if k not in _NOT_IN_TAR}
                    with PHASES.timed("write"):
                        writer.write(led["key"], got[0], got[1], led["caption"], meta)
    finally:
        spill.close()
    fields = list(LEDGER_FIELDS) + [pa.field(c, pa.string()) for c in cfg.keep_cols]
    schema = pa.schema(fields)
    with PHASES.timed("ledger"):
        table = pa.Table.from_pylist(ledger_rows, schema=schema) if ledger_rows else schema.empty_table()
        write_table(ds.ledger(shard), table)
    seconds = time.time() - t0
    write_json(progress_path(ds, shard), {"done": n, "success": status["success"]})
    del table
    release_free_heap()  # what this task freed, back before the next task of this process
    stats: dict[str, Any] = {
        "rows": n, "success": status["success"], "failed": n - status["success"],
        "status": dict(sorted(status.items())), "bytes": total_bytes, "seconds": round(seconds, 3),
        # how the fetch side ran: the most requests in flight at once, fetch threads at most, rows that
        # were queued behind a busy host at most, 429/503 answers that paused a host, when (seconds into the
        # task) the last row was started: what follows is the shard's tail
        "fetch": {"peak_in_flight": state["peak_in_flight"], "peak_threads": pace.peak,
                  "peak_queued": dispatch.max_queued, "throttled": fetcher.limiter.throttles,
                  "last_row_started_s": (None if math.isnan(state["last_start"]) else
                                         round(state["last_start"] - t0_mono, 3))},
    }
    fast_errors = Counter(FAST_DECODER_ERRORS) - fast_errors0
    if fast_errors:  # rows the fast PNG/WebP decoder failed on, decoded (or rejected) by Pillow instead
        stats["fast_decoder_errors"] = dict(sorted(fast_errors.items()))
    if PROFILE_ENABLED:  # CURATE_PROFILE=1: per-phase timers (bench/download.py --profile)
        stats["phases"] = PHASES.snapshot()
        stats["cpu_seconds"] = round(time.process_time() - cpu0, 3)  # the whole task process, every thread
    return stats


# ---- driver-side summaries ----------------------------------------------------------------------

def finalize(cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
    """Counts over every completed shard, one per input row (rows superseded by a retry not counted).

    One DuckDB aggregate over the done ledgers: memory does not grow with the number of rows.
    """
    paths = ds.ledger_files()
    if not paths:
        return {"rows": 0, "success": 0, "status": {}}
    con = _sql(ds)
    try:
        got = con.execute(f"""SELECT status, superseded_by IS NOT NULL AS sup, count(*), coalesce(sum(bytes), 0)
                              FROM read_parquet({_sql_list(paths)}) GROUP BY 1, 2""").fetchall()
    finally:
        con.close()
    status: Counter[str] = Counter()
    superseded = total_bytes = 0
    for st, sup, n, b in got:
        if sup:
            superseded += n
            continue
        status[st] += n
        total_bytes += int(b)
    rows = sum(status.values())
    return {"rows": rows, "success": status["success"], "failed": rows - status["success"],
            "status": dict(sorted(status.items())), "superseded": superseded, "bytes": total_bytes}


def inputs(cfg: DownloadConfig) -> dict[str, Any]:
    return {"files": [{"path": p, "size": s} for p, s in list_files(cfg.input_spec())]}


def read_stats(ds: DatasetDir, shard: str) -> dict[str, Any] | None:
    p = ds.stats("download", shard)
    return read_json(p) if p.exists() else None


class DownloadStage(Stage):
    name = "download"
    config_cls = DownloadConfig
    array_slices = True

    def resources(self, cfg: DownloadConfig) -> Resources:
        # a task waits on the network most of the time and decodes in 2 threads: one per CPU
        return Resources(cpus=cfg.decode_threads, per_cpu=True, overlap_tails=not cfg.one_task_per_worker)

    def validate(self, cfg: DownloadConfig, ds: DatasetDir) -> None:
        check_config(cfg)

    def fingerprint_inputs(self, cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
        """The input files' names and sizes (the columns are checked first: exit 2 naming file and column)."""
        return {"inputs": [[os.path.basename(f), size] for f, size in check_columns(cfg.input_spec())]}

    def plan(self, cfg: DownloadConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        return plan(cfg, ds)

    def run_shard(self, cfg: DownloadConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        return run_shard(cfg, ds, task)

    def finalize(self, cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
        return finalize(cfg, ds)

    def inputs(self, cfg: DownloadConfig) -> dict[str, Any]:
        return inputs(cfg)


STAGE = DownloadStage()
