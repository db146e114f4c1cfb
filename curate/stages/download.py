"""The download stage: a URL list -> webdataset shards of successes + one ledger row per input row.

plan() runs on the driver: it reads the input once, numbers the rows into shards, decides which
rows repeat an earlier URL (first occurrence wins, so the choice is the same on every engine), and
writes each shard's rows to DIR/_inputs/{shard}.parquet; tasks are then just {"shard": ...}.
run_shard() fetches a shard's rows with a thread pool and writes the tar (successes, in row order)
and the ledger (every row) atomically; the engine writes the done marker last.

--retry-failed: rows of completed shards whose error code is transient (TRANSIENT_CODES) and that
were not retried yet are written as new shards (numbers after the last one), each keeping its
input `row`; the old ledger rows get `superseded_by` = the new key. A row is retried at most once
per --retry-failed run, and only failures are retried, so no success is ever duplicated. Readers
that want one row per input row take the rows whose `superseded_by` is null.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import runtime
from curate.errors import InputError
from curate.fetch import Fetcher, FetchFailed, FetchPolicy
from curate.imaging import (
    DECODE_BUDGET_BYTES,
    ENCODE_FORMATS,
    RESIZE_MODES,
    DecodeBudget,
    ImageOptions,
    ImageRejected,
    process_image,
    return_freed_memory_to_os,
)
from curate.io.atomic import read_json, write_json
from curate.io.inputs import InputSpec, list_files, read_input
from curate.io.layout import DatasetDir, shard_name
from curate.io.ledger import LEDGER_FIELDS, TRANSIENT_CODES, check_code
from curate.io.shards import ShardWriter
from curate.io.tables import read_tables, write_table
from curate.phases import ENABLED as PROFILE_ENABLED
from curate.phases import PHASES

MAX_ROWS_PER_SHARD = 100_000  # keys hold the row in 5 digits
# ledger fields left out of the sample's json in the tar: timing differs from run to run, and the
# tar must be byte-identical whatever engine or machine wrote it
_NOT_IN_TAR = frozenset({"elapsed", "superseded_by"})
_LEDGER_NAMES = [f.name for f in LEDGER_FIELDS]


@dataclass(frozen=True)
class DownloadConfig:
    input: str
    input_format: str = "auto"
    url_col: str = "url"
    caption_col: str | None = None
    keep_cols: tuple[str, ...] = ()
    header: bool = True
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    max_pixels: int = 40_000_000
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False
    deny_domains: tuple[str, ...] = ()
    ignore_optout: bool = False
    respect_robots: bool = False
    samples_per_shard: int = 10_000
    ua_token: str = "curatebot"
    # how the work is done, not what it produces: a resume may change these
    timeout: float = runtime(10.0)
    deadline: float = runtime(30.0)
    retries: int = runtime(2)
    threads: int = runtime(16)
    per_host: int = runtime(4)
    # the demo web gets a new port every run; the endpoints let through are not part of the output
    allow_hosts: tuple[str, ...] = runtime(())
    retry_failed: bool = runtime(False)
    shard_index: int = runtime(0)
    num_shards: int = runtime(1)

    def input_spec(self) -> InputSpec:
        return InputSpec(self.input, self.input_format, self.url_col, self.caption_col, self.keep_cols, self.header)

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            timeout=self.timeout, deadline=self.deadline, max_bytes=self.max_bytes,
            max_redirects=self.max_redirects, retries=self.retries, per_host=self.per_host,
            allow_hosts=self.allow_hosts, allow_private=self.allow_private, deny_domains=self.deny_domains,
            respect_optout=not self.ignore_optout, respect_robots=self.respect_robots, ua_token=self.ua_token,
        )

    def image_options(self) -> ImageOptions:
        return ImageOptions(self.image_size, self.resize_mode, self.encode_format, self.encode_quality,
                            self.min_image_size, self.max_aspect_ratio, self.max_pixels)


def check_config(cfg: DownloadConfig) -> None:
    """Bad values stop before anything is written, naming the flag."""
    from curate.fetch import parse_endpoint

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
                    ("--max-bytes", cfg.max_bytes)):
        if v < 1:
            bad(flag, "must be at least 1")
    for flag, v in (("--timeout", cfg.timeout), ("--deadline", cfg.deadline)):
        if v <= 0:
            bad(flag, "must be positive")
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
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        bad("--shard-index", f"must be within 0..{cfg.num_shards - 1}")


# ---- planning (driver) --------------------------------------------------------------------------

def slice_path(ds: DatasetDir, shard: str) -> Path:
    return ds.root / "_inputs" / f"{shard}.parquet"


def progress_path(ds: DatasetDir, shard: str) -> Path:
    return ds.root / "_inputs" / "progress" / f"{shard}.json"


def plan_path(ds: DatasetDir) -> Path:
    return ds.root / "_inputs" / "plan.json"


def _dedup_key(url: str | None) -> str | None:
    if url is None or not url.strip():
        return None
    return urldefrag(url.strip())[0]  # the fragment never reaches the server


def _slice_table(rows: dict[str, list[Any]], keep_cols: tuple[str, ...]) -> pa.Table:
    cols = {
        "key": pa.array(rows["key"], pa.string()), "row": pa.array(rows["row"], pa.int64()),
        "url": pa.array(rows["url"], pa.string()), "caption": pa.array(rows["caption"], pa.string()),
        "duplicate_of": pa.array(rows["duplicate_of"], pa.string()),
        "retry_of": pa.array(rows["retry_of"], pa.string()),
    }
    for c in keep_cols:
        cols[c] = pa.array(rows[c], pa.string())
    return pa.table(cols)


def plan(cfg: DownloadConfig, ds: DatasetDir) -> list[dict[str, Any]]:
    table = read_input(cfg.input_spec())
    n = table.num_rows
    sps = cfg.samples_per_shard
    n_base = math.ceil(n / sps)
    done = set(ds.done_shards("download"))
    urls = table.column("url").to_pylist()
    captions = table.column("caption").to_pylist()
    kept = {c: table.column(c).to_pylist() for c in cfg.keep_cols}
    first: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for s in range(n_base):
        shard = shard_name(s)
        lo, hi = s * sps, min(n, (s + 1) * sps)
        sizes[shard] = hi - lo
        rows: dict[str, list[Any]] = {k: [] for k in ("key", "row", "url", "caption", "duplicate_of", "retry_of")}
        rows.update({c: [] for c in cfg.keep_cols})
        for i in range(lo, hi):
            key = f"{shard}{i - lo:05d}"
            dk = _dedup_key(urls[i])
            dup = first.get(dk) if dk else None
            if dk and dup is None:
                first[dk] = key
            rows["key"].append(key)
            rows["row"].append(i)
            rows["url"].append(urls[i])
            rows["caption"].append(captions[i])
            rows["duplicate_of"].append(dup)
            rows["retry_of"].append(None)
            for c in cfg.keep_cols:
                rows[c].append(kept[c][i])
        # done shards keep the slice they ran from; pending ones get it fresh from today's input
        if shard not in done or not slice_path(ds, shard).exists():
            write_table(slice_path(ds, shard), _slice_table(rows, cfg.keep_cols))
    retry_shards = _existing_retry_shards(ds, n_base)
    if cfg.retry_failed:
        retry_shards += _plan_retries(cfg, ds, done, n_base, retry_shards)
    for shard in retry_shards:
        sizes[shard] = _mark_superseded(ds, shard)
    write_json(plan_path(ds), {"rows": n, "shards": sizes})
    tasks = [{"shard": s} for s in sorted(sizes)]
    return tasks[cfg.shard_index::cfg.num_shards]


def _existing_retry_shards(ds: DatasetDir, n_base: int) -> list[str]:
    folder = ds.root / "_inputs"
    if not folder.exists():
        return []
    return sorted(p.stem for p in folder.glob("*.parquet")
                  if p.stem.isdigit() and int(p.stem) >= n_base and not p.name.startswith("."))


def _plan_retries(cfg: DownloadConfig, ds: DatasetDir, done: set[str], n_base: int,
                  existing: list[str]) -> list[str]:
    """New shards holding the transient failures of completed shards that were not retried yet."""
    already: set[str] = set()
    for shard in existing:
        already.update(k for k in pq.read_table(slice_path(ds, shard), columns=["retry_of"]).column(0).to_pylist() if k)
    candidates: list[dict[str, Any]] = []
    for shard in sorted(done):
        path = ds.ledger(shard)
        if not path.exists():
            continue
        for r in pq.read_table(path).to_pylist():
            if r.get("error_code") in TRANSIENT_CODES and not r.get("superseded_by") and r["key"] not in already:
                candidates.append(r)
    nxt = max([n_base - 1, *(int(s) for s in existing), *(int(s) for s in done)]) + 1
    new = []
    sps = cfg.samples_per_shard
    for start in range(0, len(candidates), sps):
        shard = shard_name(nxt)
        nxt += 1
        part = candidates[start:start + sps]
        rows: dict[str, list[Any]] = {
            "key": [f"{shard}{j:05d}" for j in range(len(part))], "row": [r["row"] for r in part],
            "url": [r["url"] for r in part], "caption": [r["caption"] for r in part],
            "duplicate_of": [None] * len(part), "retry_of": [r["key"] for r in part],
        }
        rows.update({c: [r.get(c) for r in part] for c in cfg.keep_cols})
        write_table(slice_path(ds, shard), _slice_table(rows, cfg.keep_cols))
        new.append(shard)
    return new


def _mark_superseded(ds: DatasetDir, retry_shard: str) -> int:
    """Point the retried rows' old ledger rows at their new keys (idempotent); returns the slice's size."""
    sl = pq.read_table(slice_path(ds, retry_shard), columns=["key", "retry_of"]).to_pylist()
    by_shard: dict[str, dict[str, str]] = {}
    for r in sl:
        if r["retry_of"]:
            by_shard.setdefault(r["retry_of"][:5], {})[r["retry_of"]] = r["key"]
    for shard, new_keys in by_shard.items():
        path = ds.ledger(shard)
        if not path.exists():
            continue
        led = pq.read_table(path)
        keys = led.column("key").to_pylist()
        old = led.column("superseded_by").to_pylist()
        sup = [new_keys.get(k, o) for k, o in zip(keys, old, strict=True)]
        if sup != old:
            idx = led.schema.get_field_index("superseded_by")
            led = led.set_column(idx, led.schema.field(idx), pa.array(sup, pa.string()))
            write_table(path, led)
    return len(sl)


# ---- one shard (worker) -------------------------------------------------------------------------

@dataclass
class _Result:
    ledger: dict[str, Any]
    image: bytes | None = None
    ext: str | None = None


# the shard writer's last resort: a row with no result this long after its worker took it is written
# as deadline_exceeded (the fetch itself is bounded by the watchdog; this covers the wait for a
# per-host slot, the decode budget, and any bug that would otherwise hang the shard)
WRITER_GRACE = 60.0


def _row_wait_limit(cfg: DownloadConfig) -> float:
    """Seconds the writer waits for one row: its own deadline, the deadlines of the rows that can be
    ahead of it for the same host slot, and a grace for decoding."""
    waves = math.ceil(max(1, cfg.threads) / max(1, cfg.per_host))
    return cfg.deadline * (waves + 1) + WRITER_GRACE


def _process_row(row: dict[str, Any], fetcher: Fetcher, opt: ImageOptions,
                 budget: DecodeBudget | None = None) -> _Result:
    t0 = time.monotonic()
    led: dict[str, Any] = {name: None for name in _LEDGER_NAMES}
    led.update(key=row["key"], row=row["row"], url=row["url"], caption=row["caption"], attempts=0)
    res = _Result(led)
    try:
        if row.get("duplicate_of"):
            led.update(status="duplicate_url", error_code="duplicate_url",
                       error_message=f"same URL as {row['duplicate_of']}", duplicate_of=row["duplicate_of"])
            return res
        try:
            got = fetcher.fetch(row["url"])
        except FetchFailed as e:
            led.update(status=e.code, error_code=e.code, error_message=e.message, attempts=e.attempts,
                       http_status=e.http_status, final_url=e.final_url)
            return res
        with PHASES.timed("hash"):
            digest = hashlib.sha256(got.body).hexdigest()
        led.update(attempts=got.attempts, http_status=got.http_status, final_url=got.final_url,
                   bytes=len(got.body), sha256=digest,
                   mime=(got.content_type or "").split(";")[0].strip() or None)
        try:
            img = process_image(got.body, opt, budget)
        except ImageRejected as e:
            led.update(status=e.code, error_code=e.code, error_message=e.message, mime=e.mime or led["mime"])
            if e.orig_size:
                led.update(orig_width=e.orig_size[0], orig_height=e.orig_size[1])
            return res
        led.update(status="success", mime=img.mime, orig_width=img.orig_width, orig_height=img.orig_height,
                   width=img.width, height=img.height)
        res.image, res.ext = img.data, img.ext
        return res
    except Exception as e:  # noqa: BLE001 - a bug in one row must not lose the others
        tb = traceback.format_exc(limit=3).replace("\n", " | ")
        led.update(status="internal_error", error_code="internal_error",
                   error_message=f"{type(e).__name__}: {e} [{tb}]"[:1000])
        res.image = None
        return res
    finally:
        check_code(led["error_code"])
        led["elapsed"] = round(time.monotonic() - t0, 4)


def _await_row(cond: threading.Condition, results: list[_Result | None], taken: list[float], i: int,
               limit: float) -> _Result | None:
    """Row i's result, or None once it has been in a worker for `limit` seconds (call holding `cond`).

    A row not taken yet is waited for without a bound: every taken row ends or is given up on within
    `limit`, and its thread replaced, so free workers always reach it.
    """
    while results[i] is None:
        if taken[i] and time.monotonic() - taken[i] > limit:
            return None
        cond.wait(timeout=1.0)
    return results[i]


def _abandoned(row: dict[str, Any], limit: float) -> _Result:
    led: dict[str, Any] = {name: None for name in _LEDGER_NAMES}
    led.update(key=row["key"], row=row["row"], url=row["url"], caption=row["caption"], attempts=0,
               status="deadline_exceeded", error_code="deadline_exceeded", elapsed=round(limit, 4),
               error_message=f"no result {limit:.0f}s after the row was started; the shard went on without it")
    return _Result(led)


def run_shard(cfg: DownloadConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    shard = task["shard"]
    t0 = time.time()
    rows = pq.read_table(slice_path(ds, shard)).to_pylist()
    n = len(rows)
    fetcher = Fetcher(cfg.fetch_policy())
    opt = cfg.image_options()
    budget = DecodeBudget(DECODE_BUDGET_BYTES)  # decoded bytes in flight in this task, all threads together
    return_freed_memory_to_os()  # or freed decode buffers stay in per-thread arenas (see imaging)
    PHASES.reset()
    # results are written in row order; the window bounds how far workers run ahead of the writer
    window = max(256, cfg.threads * 16)
    results: list[_Result | None] = [None] * n
    taken: list[float] = [0.0] * n  # when a worker took row i (monotonic)
    wait_limit = _row_wait_limit(cfg)
    state = {"next": 0, "written": 0, "stop": False}
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while not state["stop"] and state["next"] < n and state["next"] - state["written"] >= window:
                    cond.wait()
                if state["stop"] or state["next"] >= n:
                    return
                i = state["next"]
                state["next"] += 1
                taken[i] = time.monotonic()
            r = _process_row(rows[i], fetcher, opt, budget)
            with cond:
                if state["written"] <= i:  # not given up on by the writer
                    results[i] = r
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True, name=f"fetch-{shard}-{k}")
               for k in range(min(cfg.threads, max(n, 1)))]
    for th in threads:
        th.start()
    ledger_rows: list[dict[str, Any]] = []
    status: Counter[str] = Counter()
    total_bytes = 0
    last_progress = time.monotonic()
    try:
        with ShardWriter(ds.shard_tar(shard)) as writer:
            for i in range(n):
                with cond:
                    r = _await_row(cond, results, taken, i, wait_limit)
                    if r is None:
                        # the thread stuck in row i is left behind (a daemon) and replaced, so the
                        # rows after it still get their full thread count
                        r = _abandoned(rows[i], wait_limit)
                        spare = threading.Thread(target=worker, daemon=True, name=f"fetch-{shard}-r{i}")
                        threads.append(spare)
                        spare.start()
                    results[i] = None
                    state["written"] = i + 1
                    cond.notify_all()
                led = r.ledger
                led["shard"] = shard
                for c in cfg.keep_cols:
                    led[c] = rows[i].get(c)
                if r.image is not None:
                    meta = {k: v for k, v in led.items() if k not in _NOT_IN_TAR}
                    with PHASES.timed("write"):
                        writer.write(led["key"], r.image, r.ext or "jpg", led["caption"], meta)
                ledger_rows.append(led)
                status[led["status"]] += 1
                total_bytes += led["bytes"] or 0
                if time.monotonic() - last_progress > 1.0:
                    last_progress = time.monotonic()
                    write_json(progress_path(ds, shard), {"done": i + 1, "success": status["success"]})
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        # one bound for all threads together: a thread stuck past it is a daemon and is left behind
        join_until = time.monotonic() + cfg.deadline + 5
        for th in threads:
            th.join(timeout=max(0.0, join_until - time.monotonic()))
        fetcher.close()
    fields = list(LEDGER_FIELDS) + [pa.field(c, pa.string()) for c in cfg.keep_cols]
    schema = pa.schema(fields)
    table = pa.Table.from_pylist(ledger_rows, schema=schema) if ledger_rows else schema.empty_table()
    write_table(ds.ledger(shard), table)
    seconds = time.time() - t0
    write_json(progress_path(ds, shard), {"done": n, "success": status["success"]})
    stats: dict[str, Any] = {
        "rows": n, "success": status["success"], "failed": n - status["success"],
        "status": dict(sorted(status.items())), "bytes": total_bytes, "seconds": round(seconds, 3),
    }
    if PROFILE_ENABLED:  # CURATE_PROFILE=1: per-phase timers (bench/download.py --profile)
        stats["phases"] = PHASES.snapshot()
    return stats


# ---- driver-side summaries ----------------------------------------------------------------------

def finalize(cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
    """Counts over every completed shard, one per input row (rows superseded by a retry not counted)."""
    paths = ds.ledger_files()
    if not paths:
        return {"rows": 0, "success": 0, "status": {}}
    t = read_tables(paths, columns=["status", "superseded_by", "bytes", "row"])
    status: Counter[str] = Counter()
    superseded = 0
    total_bytes = 0
    for st, sup, b in zip(t.column("status").to_pylist(), t.column("superseded_by").to_pylist(),
                          t.column("bytes").to_pylist(), strict=True):
        if sup:
            superseded += 1
            continue
        status[st] += 1
        total_bytes += b or 0
    rows = sum(status.values())
    return {"rows": rows, "success": status["success"], "failed": rows - status["success"],
            "status": dict(sorted(status.items())), "superseded": superseded, "bytes": total_bytes}


def inputs(cfg: DownloadConfig) -> dict[str, Any]:
    return {"files": [{"path": p, "size": s} for p, s in list_files(cfg.input_spec())]}


def discard_outputs(cfg: DownloadConfig, ds: DatasetDir) -> None:
    for sub in ("shards", "ledger", "_inputs", "_done/download", "stats/download"):
        shutil.rmtree(ds.root / sub, ignore_errors=True)


def read_stats(ds: DatasetDir, shard: str) -> dict[str, Any] | None:
    p = ds.stats("download", shard)
    return read_json(p) if p.exists() else None


@dataclass(frozen=True)
class DownloadStage:
    name: str = "download"
    config_cls: type = DownloadConfig

    def plan(self, cfg: DownloadConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        return plan(cfg, ds)

    def run_shard(self, cfg: DownloadConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        return run_shard(cfg, ds, task)

    def finalize(self, cfg: DownloadConfig, ds: DatasetDir) -> dict[str, Any]:
        return finalize(cfg, ds)

    def inputs(self, cfg: DownloadConfig) -> dict[str, Any]:
        return inputs(cfg)

    def discard_outputs(self, cfg: DownloadConfig, ds: DatasetDir) -> None:
        discard_outputs(cfg, ds)


STAGE = DownloadStage()
