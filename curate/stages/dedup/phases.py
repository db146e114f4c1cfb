"""The task phases of stage "dedup" (see curate/stages/dedup/stage.py for the picture): the driver's plan (sample,
k-means, eval set), the per-shard assignment into cluster-group buckets, the per-group pair search, the
exact-duplicate GROUP BY, the decision task and the per-shard signal writer.

Files in _work/dedup are written atomically; a task's marker (written by the engine after it returns) is what
says it is complete. Bucket and neighbour files are structured .npy arrays sorted by group / source shard with
an offsets file, so a reader memory-maps only its own slice (the map side of a shuffle).
"""

from __future__ import annotations

import ast
import logging
import mmap
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from curate.devices import cuda_count
from curate.errors import InputError
from curate.imaging import safe_open
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.shards import iter_samples
from curate.machine import cores, sql_memory_limit
from curate.stages.base import context
from curate.stages.dedup import core as sd
from curate.stages.dedup.config import (
    SAMPLE_PER_CENTROID,
    DedupConfig,
    gather,
    groups_for,
    read_shard,
    work_dir,
)
from curate.stages.dedup.core import _splitmix
from curate.stages.dedup.threshold import calibrate

log = logging.getLogger(__name__)
PHASH_FINE_SIZE = 16  # phash256: imagehash.phash(hash_size=16), 256 bits
UID_SHIFT = 32  # uid = shard ordinal << 32 | row position in the shard's key order (routing only, never ties)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


_DESCR: dict[str, np.dtype] = {}  # a .npy header's 'descr' text -> dtype (parsed once per process)
_NPY_HEADER = re.compile(r"\{'descr': (.*), 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def npy(path: Path) -> np.ndarray:
    """A read-only view of a .npy file written by _save, through one mmap. np.load(mmap_mode="r") costs about
    0.25 ms a file (literal_eval of the header, np.memmap's set-up); a resolve or pair task opens one file
    per shard or group, so at 10^3 shards that was most of its time."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if head[:6] != b"\x93NUMPY":
            raise InputError(f"{path}: not a .npy file")
        size, start = (int.from_bytes(head[8:10], "little"), 10) if head[6] == 1 else \
            (int.from_bytes(head[8:12], "little"), 12)
        fh.seek(start)
        header = fh.read(size).decode("latin1")
        m = _NPY_HEADER.match(header.strip())
        if m is None:  # another writer's layout: the slow, general reader
            return np.load(path, mmap_mode="r")
        if m.group(1) not in _DESCR:
            _DESCR[m.group(1)] = np.lib.format.descr_to_dtype(ast.literal_eval(m.group(1)))
        dtype = _DESCR[m.group(1)]
        shape = tuple(int(v) for v in m.group(2).replace(" ", "").split(",") if v)
        count = int(np.prod(shape)) if shape else 1
        if count == 0 or dtype.itemsize == 0:
            return np.zeros(shape, dtype)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype, count=count, offset=start + size).reshape(shape)


def _paths(ds: DatasetDir, task: dict[str, Any]) -> list[Path]:
    wd = work_dir(ds)
    kind = task["kind"]
    if kind == "assign":
        s = task["source"]
        return [wd / "meta" / f"{s}.parquet", wd / "bucket" / f"{s}.offsets.npy", wd / "bucket" / f"{s}.npy",
                wd / "keys" / f"{s}.npy"]
    if kind == "phash":
        return [wd / "phash" / f"{task['source']}.parquet"]
    if kind == "collapse":
        s = task["source"]
        return [wd / "collapse" / f"{s}.mask.npy", wd / "collapse" / f"{s}.npy",
                wd / "collapse" / f"{s}.reps.offsets.npy", wd / "collapse" / f"{s}.reps.npy"]
    if kind == "pairs":
        g = f"{task['group']:05d}"
        return [wd / "pairs" / f"{g}.edges.npy", wd / "pairs" / f"{g}.edge_offsets.npy",
                wd / "pairs" / f"{g}.nn_offsets.npy", wd / "pairs" / f"{g}.nn.npy"]
    if kind == "resolve":
        r, s = f"r{task['round']:03d}", task["source"]
        own = [wd / "resolve" / r / f"{s}.npy", wd / "resolve" / r / f"{s}.json", wd / "resolve" / r / f"{s}.by.npy"]
        return own + ([wd / "resolve" / f"{s}.edges.npy"] if task["round"] == 0 else [])
    if kind == "decide":
        return [wd / "decide" / f"{task['source']}.npy", wd / "decide" / f"{task['source']}.json"]
    return [ds.signals("dedup", task["source"])]


def task_device(plan: dict[str, Any], cfg: DedupConfig) -> str:
    """The device the driver resolved (tasks do not import torch to ask again); a task on a machine without
    the plan's GPU runs on the CPU, with the same decisions."""
    if plan["device"] == "cpu" or cfg.device == "cpu":
        return "cpu"

    return plan["device"] if cuda_count() else "cpu"


def task_done(ds: DatasetDir, task: dict[str, Any]) -> bool:
    return all(p.exists() for p in _paths(ds, task))


# --- driver: plan ----------------------------------------------------------------------------------------


def build_plan(cfg: DedupConfig, ds: DatasetDir, digest: dict[str, Any], device: str) -> dict[str, Any]:
    """Sample, train the centroids, gather the (small) eval set; returns the plan (written by the caller)."""
    wd = work_dir(ds)
    shards = ds.done_shards(cfg.scorer)
    if not shards:
        raise InputError(f"{ds.root / 'signals' / cfg.scorer}: no scored shards (no _done/{cfg.scorer} markers); "
                         "run `curate score` first")
    n, d = _count(ds, shards, cfg.scorer)
    k = sd.choose_k(n, cfg.k or None)
    sample = _sample(ds, shards, n, k * SAMPLE_PER_CENTROID, cfg.seed, d, cfg.scorer)
    k = max(1, min(k, len(sample)))
    if len(sample) >= 2:
        log.info("dedup: %d rows, k-means with %d clusters on %d sampled rows (%s)", n, k, len(sample), device)
        # faiss on the driver's CPU whatever the device: the same centroids, hence the same decisions, on a
        # GPU run as on a CPU run (the GPU does assignment and pair search, the O(rows) work)
        centroids = sd.train_centroids(sample, k, cfg.seed)
    else:
        centroids = np.asarray(sample, np.float32).reshape(-1, d)[:1] if len(sample) else np.eye(1, d, dtype=np.float32)
    # (row, probe) entries per cluster, estimated on the sample: pair tasks get about equal shares
    ids = sd.assign(sample, centroids, cfg.probes)[0] if len(sample) else np.zeros((0, 1), int)
    cluster_entries = np.bincount(ids.reshape(-1), minlength=len(centroids))
    del sample, ids
    _save(wd / "centroids.npy", centroids.astype(np.float32))
    if cfg.against:
        _gather_eval(DatasetDir.at(cfg.against), wd, d if n else None, cfg.scorer)
    calibration = None
    if cfg.threshold_auto:
        calibration = calibrate(ds, shards, cfg.seed, cfg.auto_target, device, cfg.scorer)
        log.info("dedup: --threshold auto chose %.4f (%s)", calibration["threshold"], calibration)
    return {"digest": digest, "rows": n, "dim": d, "k": k, "device": device, "shards": shards,
            "group_bounds": groups_for(n, k, cfg.tasks, cluster_entries),
            "threshold": calibration["threshold"] if calibration else cfg.threshold, "calibration": calibration}


def _count(ds: DatasetDir, shards: list[str], scorer: str) -> tuple[int, int]:
    n, d = 0, None
    for shard in shards:
        t, emb = read_shard(ds, shard, with_sha=False, scorer=scorer)
        n += len(t)
        if len(t):
            if d is not None and emb.shape[1] != d:
                raise InputError(f"{ds.signals(scorer, shard, '.img_emb.npy')}: dimension {emb.shape[1]}, "
                                 f"other shards have {d}")
            d = emb.shape[1]
    return n, d or 0


def _sample(ds: DatasetDir, shards: list[str], n: int, size: int, seed: int, d: int, scorer: str) -> np.ndarray:
    """About `size` rows drawn by a hash of (key, seed), in hash order, one row per distinct embedding, as
    float32 (what k-means reads): the same sample, in the same order, whatever the shard placement. Two passes
    over the score tables: the drawn rows' (hash, key) give each its place, then the embeddings are read into
    one preallocated array; so the driver holds the sample once, not its parts and their concatenations."""
    if n == 0:
        return np.zeros((0, d), np.float32)
    cut = np.uint64(min(2**64 - 1, int(size / n * 2**64))) if size < n else np.uint64(2**64 - 1)

    def drawn(shard: str) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        t, emb = read_shard(ds, shard, with_sha=False, scorer=scorer)
        k = np.asarray(t["key"].to_numpy(zero_copy_only=False)).astype("S")
        h = sd.key_hash(k, seed)
        sel = np.flatnonzero(h <= cut)
        return emb, t["emb_row"].to_numpy()[sel], h[sel], k[sel]

    hashes, keys = [], []
    for shard in shards:
        _, _, h, k = drawn(shard)
        hashes.append(h)
        keys.append(k)
    place = np.empty(sum(len(h) for h in hashes), np.int64)
    place[np.lexsort((np.concatenate(keys), np.concatenate(hashes)))] = np.arange(len(place))
    del hashes, keys
    sample = np.empty((len(place), d), np.float32)
    at = 0
    for shard in shards:
        emb, rows, _, _ = drawn(shard)
        sample[place[at:at + len(rows)]] = gather(emb, rows)
        at += len(rows)
    # one sample row per embedding: exact copies (a placeholder behind 10^5 URLs, byte-equal images embed
    # equally) would pull centroids onto one point and split its near copies over several clusters
    return _distinct_rows(sample)


def _distinct_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The first row of every distinct value of x, in order, compacted in place (a view of x's buffer): rows
    sorted by a 64-bit hash of their bytes, equal neighbours compared in full."""
    words = x.view(np.uint32).reshape(len(x), -1)
    h = np.zeros(len(x), np.uint64)
    for s in range(0, len(x), chunk):
        hc = np.zeros(min(chunk, len(x) - s), np.uint64)
        for j in range(words.shape[1]):
            hc = _splitmix(hc ^ words[s:s + chunk, j].astype(np.uint64) ^ np.uint64(j << 32))
        h[s:s + chunk] = hc
    o = np.argsort(h, kind="stable")  # equal rows: equal hashes, in row order
    cand = np.flatnonzero(h[o][1:] == h[o][:-1]) + 1
    same = np.array([x[o[i]].tobytes() == x[o[i - 1]].tobytes() for i in cand.tolist()], bool)
    dup = np.zeros(len(x), bool)
    dup[o[cand[same]]] = True
    keep = np.flatnonzero(~dup)
    for s in range(0, len(keep), chunk):  # keep[i] >= i: each chunk reads rows at or after those it writes
        part = keep[s:s + chunk]
        x[s:s + len(part)] = x[part]
    return x[:len(keep)]


def _gather_eval(eval_ds: DatasetDir, wd: Path, dim: int | None, scorer: str) -> None:
    """The evaluation set's embeddings and sha256 values (an eval set is small: thousands of images)."""
    import pyarrow as pa

    from curate.io.tables import write_table

    embs, shas = [], []
    for shard in eval_ds.done_shards(scorer):
        t, emb = read_shard(eval_ds, shard, scorer=scorer)
        embs.append(gather(emb, t["emb_row"].to_numpy()))
        shas.append(t["sha256"])
    if not embs:
        raise InputError(f"--against {eval_ds.root}: no scored shards; run `curate score` on it first")
    e = np.concatenate(embs).astype(np.float32)
    if dim is not None and len(e) and e.shape[1] != dim:
        raise InputError(f"--against {eval_ds.root}: embedding dimension {e.shape[1]}, this dataset has {dim}")
    _save(wd / "eval_emb.npy", e)
    write_table(wd / "eval_sha.parquet", pa.table({"sha256": pa.chunked_array(shas, pa.string())}))


# --- assign ------------------------------------------------------------------------------------------


def run_assign(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """Nearest `probes` clusters of each row of one shard; meta table and per-group buckets."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from curate.io.tables import write_table

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    device = task_device(plan, cfg)
    t, emb = read_shard(ds, task["source"], scorer=cfg.scorer)
    x = gather(emb, t["emb_row"].to_numpy())
    n = len(t)
    centroids = np.load(wd / "centroids.npy")
    ids, sims = sd.assign(x, centroids, cfg.probes, cfg.batch_rows, device) if n else \
        (np.zeros((0, min(cfg.probes, len(centroids))), np.int32), np.zeros((0, 1), np.float32))
    clip = t["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    prio = sd.priority(cfg.keep, clip, sims[:, 0] if n else np.zeros(0), n)
    uid = (np.int64(task["ordinal"]) << UID_SHIFT) + np.arange(n, dtype=np.int64)
    cols = {"key": t["key"], "uid": pa.array(uid), "sha256": t["sha256"], "prio": pa.array(prio),
            "cluster": pa.array(ids[:, 0] if n else np.zeros(0, np.int32), pa.int32())}
    contaminated = 0
    if cfg.against:
        esim, _ = sd.max_similarity(x, np.load(wd / "eval_emb.npy"), cfg.batch_rows, device)
        eval_sha = pq.read_table(wd / "eval_sha.parquet")["sha256"]
        same = pc.fill_null(pc.is_in(t["sha256"], value_set=eval_sha.combine_chunks().drop_null()), False)
        cols["eval_sim"] = pa.array(esim, pa.float32())
        cols["eval_contaminated"] = pc.or_(pa.array(esim >= cfg.eval_threshold), same)
        contaminated = int(pc.sum(cols["eval_contaminated"]).as_py() or 0)
    write_table(wd / "meta" / f"{task['source']}.parquet", pa.table(cols))
    # keys in position order, memory-mapped by later tasks to name a row of this shard from its uid
    _save(wd / "keys" / f"{task['source']}.npy",
          np.asarray(t["key"].to_numpy(zero_copy_only=False)).astype("S") if n else np.zeros(0, "S1"))
    _write_bucket(wd, task["source"], x, ids, uid, prio, t["key"], plan["group_bounds"])
    return {"rows": n, "eval_contaminated": contaminated}


def _write_bucket(wd: Path, shard: str, x: np.ndarray, ids: np.ndarray, uid: np.ndarray, prio: np.ndarray,
                  keys: Any, bounds: list[int], prefix: Path | None = None, members: bool = True) -> None:
    """One entry per (row, probed cluster), sorted by cluster (rows in key order within it), and the offsets
    of each cluster group: a pair task memory-maps only entries[offsets[g]:offsets[g + 1]]. A row is stored
    (member) in its first cluster; with members=False in none (extra probes)."""
    n, p = ids.shape
    prefix = prefix or wd / "bucket" / shard
    if isinstance(keys, np.ndarray):
        key = keys if n else np.zeros(0, "S1")
    else:
        key = np.asarray(keys.to_numpy(zero_copy_only=False)).astype("S") if n else np.zeros(0, "S1")
    p = max(p, 1)
    cluster = ids.reshape(-1)
    o = np.argsort(cluster, kind="stable")  # entry e = row * p + probe; stable keeps key order in a cluster
    o = o[cluster[o] >= 0]  # -1: no entry (a padded probe list)
    row = o // p
    dt = np.dtype([("emb", np.float16, (x.shape[1],)), ("uid", np.int64), ("prio", np.float64),
                   ("cluster", np.int32), ("member", np.bool_), ("key", key.dtype)])
    out = np.empty(len(o), dt)
    out["emb"] = x[row]
    out["uid"], out["prio"], out["cluster"] = uid[row], prio[row], cluster[o]
    out["member"], out["key"] = ((o % p) == 0) & members, key[row]
    _save(prefix.with_name(prefix.name + ".offsets.npy"), np.searchsorted(cluster[o], bounds).astype(np.int64))
    _save(prefix.with_name(prefix.name + ".npy"), out)


def run_phash(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    import imagehash
    import pyarrow as pa

    from curate.io.tables import write_table

    t, _ = read_shard(ds, task["source"], with_sha=False, scorer=cfg.scorer)
    wanted = set(t["key"].to_pylist())
    keys, hashes, fine = [], [], []
    failed: dict[str, int] = {}  # an image with no hash matches nothing: counted, never silently skipped
    for s in iter_samples(ds.shard_tar(task["source"])):
        if s["key"] not in wanted or not s["image"]:
            continue
        try:
            # adopted shards hold bytes nobody re-encoded: the safe decoder (allowlist, pixel cap)
            with safe_open(s["image"]) as im:
                # 64 bits for equality (the GROUP BY); 256 bits (a 16x16 DCT) for --phash-distance: 64 bits
                # cannot tell two clock faces apart, 256 can (bench/dedup_evidence.py)
                h, h256 = str(imagehash.phash(im)), str(imagehash.phash(im, hash_size=PHASH_FINE_SIZE))
        except Exception as e:  # noqa: BLE001 - an undecodable image has no hash, and no hash match
            code = getattr(e, "code", None) or type(e).__name__
            failed[code] = failed.get(code, 0) + 1
            log.warning("phash: %s: no perceptual hash (%s: %s)", s["key"], code, str(e)[:200])
            continue
        keys.append(s["key"])
        hashes.append(h)
        fine.append(h256)
    write_table(_paths(ds, task)[0], pa.table({"key": pa.array(keys, pa.string()),
                                               "phash": pa.array(hashes, pa.string()),
                                               "phash256": pa.array(fine, pa.string())}))
    return {"hashed": len(keys), "phash_failed": sum(failed.values()), "phash_failed_by": failed}


# --- exact copies collapse, and equal pHashes: a GROUP BY on the driver, then one task per shard ----------


def _active_spark() -> Any:
    """The run's Spark session when its reduces run on Spark SQL (--engine spark), lent by the runner."""
    ctx = context()
    return ctx.spark() if ctx.sql == "spark" else None


COPY, REP, PHASH_EDGE = 4, 0, 2  # kinds of exact_edges.parquet rows (COPY and PHASH_EDGE are evidence bits too)


def exact_sql(cfg: DedupConfig) -> str:
    """The GROUP BY behind the collapse, one row per (row b, row a) with b_uid sorted:
    - kind 4 (COPY): b shares its sha256 with a, the first row of that value in keep order (its representative);
    - kind 0 (REP): b is a representative with `copies` copies; a is its first copy (b's nearest neighbour, at
      cosine 1);
    - kind 2 (PHASH_EDGE), with --phash: representative b has the perceptual hash of a, the first representative
      of that hash in keep order (256-bit with --phash-distance, else 64-bit).
    Copies never reach the pair search; they take their representative's decision when the signals are written."""
    sha = ("s AS (SELECT key, uid, prio, sha256 AS v FROM meta WHERE sha256 IS NOT NULL AND sha256 <> ''), "
           "r AS (SELECT *, row_number() OVER (PARTITION BY v ORDER BY prio DESC, key) AS rn, "
           "count(*) OVER (PARTITION BY v) AS cnt FROM s), g AS (SELECT * FROM r WHERE cnt > 1), "
           "copies AS (SELECT o.uid AS b_uid, h.uid AS a_uid, h.prio AS a_prio, h.key AS a_key, 4 AS kind, "
           "CAST(0 AS BIGINT) AS copies FROM g o JOIN g h ON o.v = h.v AND h.rn = 1 WHERE o.rn > 1), "
           "reps AS (SELECT h.uid AS b_uid, o.uid AS a_uid, o.prio AS a_prio, o.key AS a_key, 0 AS kind, "
           "CAST(h.cnt - 1 AS BIGINT) AS copies FROM g h JOIN g o ON o.v = h.v AND o.rn = 2 WHERE h.rn = 1)")
    parts = ["SELECT * FROM copies", "SELECT * FROM reps"]
    if cfg.phash:
        # with --phash-distance the 256-bit hash: equal 64-bit pHashes join blank images and look-alike
        # drawings (two clock faces), equal 256-bit ones far fewer (bench/dedup_evidence.py)
        col = "phash256" if cfg.phash_distance >= 0 else "phash"
        sha += (f", p AS (SELECT m.key, m.uid, m.prio, ph.{col} AS v FROM meta m JOIN phash ph ON m.key = ph.key "
                f"LEFT JOIN copies c ON m.uid = c.b_uid WHERE ph.{col} IS NOT NULL AND c.b_uid IS NULL), "
                "pr AS (SELECT *, row_number() OVER (PARTITION BY v ORDER BY prio DESC, key) AS rn FROM p), "
                "pe AS (SELECT o.uid AS b_uid, h.uid AS a_uid, h.prio AS a_prio, h.key AS a_key, 2 AS kind, "
                "CAST(0 AS BIGINT) AS copies FROM pr o JOIN pr h ON o.v = h.v AND h.rn = 1 WHERE o.rn > 1)")
        parts.append("SELECT * FROM pe")
    return f"WITH {sha} SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY b_uid, kind"


def exact_edges(cfg: DedupConfig, ds: DatasetDir, plan: dict[str, Any]) -> Path:
    """`exact_edges.parquet` (see exact_sql) from the per-shard meta tables: DuckDB on the driver, spilling to disk past
    its memory limit; on Spark (an active session in the driver) the same query in Spark SQL."""
    wd = work_dir(ds)
    out = wd / "exact_edges.parquet"
    sql = exact_sql(cfg)
    # the planned files by name, never a glob: a killed writer's temporary file may lie beside them
    meta = [str(wd / "meta" / f"{s}.parquet") for s in plan["shards"]]
    phash = [str(wd / "phash" / f"{s}.parquet") for s in plan["shards"]]
    spark = _active_spark()
    if spark is not None:
        tmp = wd / "exact_edges.spark-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        spark.read.parquet(*meta).createOrReplaceTempView("meta")
        if cfg.phash:
            spark.read.parquet(*phash).createOrReplaceTempView("phash")
        spark.sql(sql).coalesce(1).write.parquet(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit='{sql_memory_limit()}'; SET threads={min(4, cores())}; "
                f"SET temp_directory='{wd / 'duckdb-tmp'}'; SET preserve_insertion_order=false")
    con.execute(f"CREATE VIEW meta AS SELECT * FROM read_parquet({meta!r})")
    if cfg.phash:
        con.execute(f"CREATE VIEW phash AS SELECT * FROM read_parquet({phash!r})")
    if out.is_dir():
        shutil.rmtree(out)
    with atomic_path(out) as tmp:
        con.execute(f"COPY ({sql}) TO '{tmp}' (FORMAT parquet)")
    con.close()
    return out


def _exact_rows(wd: Path, ordinal: int) -> Any:
    """The rows of exact_edges.parquet whose b is in shard `ordinal` (b_uid is sorted: row groups are skipped)."""
    import pyarrow.dataset as pds

    path = wd / "exact_edges.parquet"
    dset = pds.dataset(sorted(path.glob("*.parquet")) if path.is_dir() else path, format="parquet")
    f = pds.field("b_uid")
    return dset.to_table(filter=(f >= (ordinal << UID_SHIFT)) & (f < ((ordinal + 1) << UID_SHIFT)))


def run_collapse(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """One shard's part of the GROUP BY: a byte mask of its copies (read by the pair tasks) and its rows of
    exact_edges.parquet as an array sorted by position (read by resolve and write)."""
    wd = work_dir(ds)
    n = len(npy(wd / "keys" / f"{task['source']}.npy"))
    t = _exact_rows(wd, task["ordinal"])
    keys = np.array([k.encode() for k in t["a_key"].to_pylist()], "S") if t.num_rows else np.zeros(0, "S1")
    out = np.empty(t.num_rows, [("pos", np.int64), ("a_uid", np.int64), ("a_prio", np.float64),
                                ("a_key", keys.dtype), ("kind", np.int8), ("copies", np.int64)])
    out["pos"] = t["b_uid"].to_numpy() & ((1 << UID_SHIFT) - 1) if t.num_rows else 0
    if t.num_rows:
        out["a_uid"], out["a_prio"] = t["a_uid"].to_numpy(), t["a_prio"].to_numpy()
        out["a_key"], out["kind"] = keys, t["kind"].to_numpy().astype(np.int8)
        out["copies"] = t["copies"].to_numpy()
    out = out[np.lexsort((out["kind"], out["pos"]))]
    mask = np.zeros(n, np.uint8)
    mask[out["pos"][out["kind"] == COPY]] = 1
    mask_path, rows_path = _paths(ds, task)[:2]
    _save(rows_path, out)
    rep = out[out["kind"] == REP]
    _write_rep_bucket(cfg, ds, task, rep["pos"], rep["copies"])
    _save(mask_path, mask)
    return {"copies": int(mask.sum())}


REP_PROBES = 4  # a representative with copies searches REP_PROBES x --probes clusters
# a representative of at least HUB_COPIES byte copies (a placeholder, a logo) searches every cluster that can hold
# a partner of it, at most HUB_MAX_PROBES (the nearest first): its near copies crowd many clusters around it
HUB_COPIES, HUB_MAX_PROBES = 100, 256


def _write_rep_bucket(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any], reps: np.ndarray,
                      copies: np.ndarray) -> None:
    """Extra probes for the shard's representatives with copies: the near copies of a heavy group (a re-encoded
    placeholder) crowd several neighbouring clusters around it, and with --probes clusters a pair between a near
    copy and the representative can straddle a border. These rows are few (one per group), so they query
    REP_PROBES times as many clusters, and a hub (HUB_COPIES copies or more) every cluster that can hold a
    partner (core.hub_probes), as non-members: the extra entries only look."""
    import pyarrow.parquet as pq

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    centroids = np.load(wd / "centroids.npy")
    p = min(cfg.probes, len(centroids))
    extra = min(REP_PROBES * cfg.probes, len(centroids))
    prefix = wd / "collapse" / f"{task['source']}.reps"
    hub = copies >= HUB_COPIES
    if extra <= p:
        reps, copies, hub = reps[hub], copies[hub], hub[hub]
    ids = np.zeros((0, 1), np.int32)
    x = np.zeros((0, plan["dim"]), np.float16)
    if len(reps):
        t, emb = read_shard(ds, task["source"], with_sha=False, scorer=cfg.scorer)
        x = gather(emb, t["emb_row"].to_numpy()[reps])
        nearest = sd.assign(x, centroids, max(extra, p), cfg.batch_rows, task_device(plan, cfg))[0]
        own, near = nearest[:, :p], nearest[:, p:]  # own: the probes of the row's entries in its shard's bucket
        wide = [w[~np.isin(w, own[i])] for i, w in zip(np.flatnonzero(hub), sd.hub_probes(
            x[hub], centroids, plan["threshold"], HUB_MAX_PROBES), strict=True)] if hub.any() else []
        ids = np.full((len(reps), max([near.shape[1], 1] + [len(w) for w in wide])), -1, np.int32)  # -1: none
        ids[:, :near.shape[1]] = near
        for i, w in zip(np.flatnonzero(hub), wide, strict=True):
            ids[i] = -1
            ids[i, :len(w)] = w
    prio = pq.read_table(wd / "meta" / f"{task['source']}.parquet", columns=["prio"])["prio"].to_numpy()[reps]
    keys = np.load(wd / "keys" / f"{task['source']}.npy", mmap_mode="r")[reps]
    uid = (np.int64(task["ordinal"]) << UID_SHIFT) + reps.astype(np.int64)
    _write_bucket(wd, task["source"], x, ids, uid, prio, np.asarray(keys), plan["group_bounds"], prefix,
                  members=False)


# --- pairs -------------------------------------------------------------------------------------------


def _read_group(wd: Path, shards: list[str], g: int) -> dict[str, np.ndarray]:
    """Group g's slice of every shard's bucket without the shard's exact copies (they are collapsed to their
    representative), copied from the memory maps into one array per field."""
    slices, dtype, width = [], None, 1
    mask32 = (1 << UID_SHIFT) - 1
    for s in shards:  # first pass: which entries survive the collapse (uids only)
        for prefix, masked in ((wd / "bucket" / s, True), (wd / "collapse" / f"{s}.reps", False)):
            off = npy(prefix.with_name(prefix.name + ".offsets.npy"))
            if off[g + 1] <= off[g]:
                continue
            path = prefix.with_name(prefix.name + ".npy")
            part = npy(path)
            dtype = part.dtype if dtype is None else dtype
            width = max(width, part.dtype["key"].itemsize)
            keep = np.arange(int(off[g]), int(off[g + 1]))
            if masked:
                copy = npy(wd / "collapse" / f"{s}.mask.npy")
                keep = keep[copy[np.asarray(part["uid"][off[g]:off[g + 1]]) & mask32] == 0]
            if len(keep):
                slices.append((path, keep))
            del part
    if not slices:
        return {}
    total = sum(len(k) for _, k in slices)
    fields = ("emb", "uid", "prio", "cluster", "member", "key")
    out = {f: np.empty((total, *dtype[f].shape), dtype[f].base) for f in fields[:-1]}
    out["key"] = np.empty(total, f"S{width}")
    pos = 0
    for path, keep in slices:
        part = npy(path)
        a, b = int(keep[0]), int(keep[-1]) + 1
        window = part[a:b]
        for f in fields:
            out[f][pos:pos + len(keep)] = window[f][keep - a]
        pos += len(keep)
        del part, window
    return out


EDGE = [("lo_uid", np.int64), ("hi_uid", np.int64), ("hi_prio", np.float64), ("sim", np.float32), ("more", np.bool_)]


def _empty_pairs(paths: list[Path], n_shards: int) -> None:
    _save(paths[0], np.zeros(0, [*EDGE, ("hi_key", "S1"), ("lo_key", "S1")]))
    _save(paths[1], np.zeros(n_shards + 1, np.int64))
    _save(paths[2], np.zeros(n_shards + 1, np.int64))
    _save(paths[3], np.zeros(0, [("uid", np.int64), ("sim", np.float32), ("near", np.bool_), ("key", "S1")]))


def run_pairs(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """Candidate pairs (at most --pairs-per-row higher-priority partners per row and cluster) and nearest
    neighbours among the entries of one group of clusters; edges sorted by the lower row, cut by shard."""
    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    e = _read_group(wd, plan["shards"], task["group"])
    paths = _paths(ds, task)
    n_shards = len(plan["shards"])
    if not e:
        _empty_pairs(paths, n_shards)
        return {"entries": 0, "candidates": 0, "unconfirmed": 0}
    o = np.lexsort((e["key"], e["cluster"]))  # by cluster, then key: ties go to the lowest key
    emb = e.pop("emb")  # the big array stays in place; entries reach it through `rows`
    e = {f: v[o] for f, v in e.items()}
    by_rank = np.lexsort((e["key"], -e["prio"]))  # keep order: priority, then lowest key
    new = np.r_[True, e["key"][by_rank][1:] != e["key"][by_rank][:-1]]
    rank = np.empty(len(o), np.int64)
    rank[by_rank] = np.cumsum(new) - 1  # a row's entries (one per probed cluster here) share a rank
    confirm = None
    if cfg.phash_distance >= 0:
        # the pixels confirm a pair before the bound per row: a row's confirmed partner is never cut by
        # unconfirmed ones (the demo's tiny model puts dozens of look-alikes above its threshold)
        hashes, found = _phash_of(wd, plan["shards"], e["key"])

        def confirm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            close = np.bitwise_count(hashes[a] ^ hashes[b]).sum(axis=1) <= cfg.phash_distance
            return found[a] & found[b] & close

    c = sd.search_candidates(emb, e["cluster"], e["member"], e["uid"], rank, plan["threshold"], cfg.pairs_per_row,
                             task_device(plan, cfg), rows=o, confirm=confirm)
    del emb
    ordinals = np.arange(n_shards + 1, dtype=np.int64) << UID_SHIFT
    edges = np.empty(len(c.lo), [*EDGE, ("hi_key", e["key"].dtype), ("lo_key", e["key"].dtype)])
    edges["lo_uid"], edges["hi_uid"], edges["hi_prio"] = e["uid"][c.lo], e["uid"][c.hi], e["prio"][c.hi]
    edges["sim"], edges["hi_key"], edges["lo_key"] = c.sim, e["key"][c.hi], e["key"][c.lo]
    edges["more"] = c.more[c.lo]
    edges = edges[np.argsort(edges["lo_uid"], kind="stable")]
    _save(paths[1], np.searchsorted(edges["lo_uid"], ordinals).astype(np.int64))
    _save(paths[0], edges)
    # each row's best neighbour over its probes in this group: highest cosine, then lowest key
    has = c.best_m >= 0
    nn_key = np.where(has, e["key"][np.maximum(c.best_m, 0)], b"")
    o = np.lexsort((nn_key, -c.best_sim, e["uid"]))
    first = np.r_[True, e["uid"][o][1:] != e["uid"][o][:-1]]
    sel = o[first]
    near = np.zeros(len(sel), bool)
    np.logical_or.at(near, np.cumsum(first) - 1, c.near[o])
    nn = np.empty(len(sel), [("uid", np.int64), ("sim", np.float32), ("near", np.bool_), ("key", nn_key.dtype)])
    nn["uid"], nn["sim"], nn["near"], nn["key"] = e["uid"][sel], c.best_sim[sel], near, nn_key[sel]
    nn = nn[np.argsort(nn["uid"], kind="stable")]
    _save(paths[2], np.searchsorted(nn["uid"], ordinals).astype(np.int64))
    _save(paths[3], nn)
    return {"entries": len(o), "candidates": len(edges), "unconfirmed": c.unconfirmed}


# --- resolve: SemDeDup's rule in rounds, one task per shard and round -------------------------------------

# more: the row had more partners than --pairs-per-row; kept with every listed partner dropped, an unlisted
# partner might have been kept (counted as kept_beyond_pairs_per_row: 0 means the rule was applied exactly)
STATUS = [("status", np.int8), ("kept_uid", np.int64), ("evidence", np.int8), ("more", np.bool_)]
UNDECIDED, KEPT, DROPPED, COPIED = 0, 1, 2, 3  # COPIED: an exact copy, decided by its representative


def _phash_of(wd: Path, shards: list[str], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(256-bit pHash as 4 uint64 words (n, 4), found) for each key (bytes), read from the phash tables for
    those keys only; a key without a hash (undecodable image) has found False."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    want = pa.array(np.char.decode(keys, "utf-8").astype(object), pa.string())
    uniq = pc.unique(want)
    found_keys, found_hash = [], []
    for s in shards:
        t = pq.read_table(wd / "phash" / f"{s}.parquet")
        t = t.filter(pc.is_in(t["key"], value_set=uniq))
        found_keys += t["key"].to_pylist()
        found_hash += t["phash256"].to_pylist()
    pos = pc.index_in(want, value_set=pa.array(found_keys, pa.string())).to_numpy(zero_copy_only=False)
    has = ~np.isnan(pos.astype(np.float64))
    words = PHASH_FINE_SIZE * PHASH_FINE_SIZE // 64
    hashes = np.frombuffer(bytes.fromhex("".join(found_hash)), ">u8").astype(np.uint64).reshape(-1, words) \
        if found_hash else np.zeros((1, words), np.uint64)
    return np.where(has[:, None], hashes[np.where(has, pos, 0).astype(np.int64)], 0).astype(np.uint64), has


def _round_dir(wd: Path, r: int) -> Path:
    return wd / "resolve" / f"r{r:03d}"


def resolve_tasks(ds: DatasetDir, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The tasks of the round to run next, or those of the last round when it left nothing undecided (then the
    runner, finding them done, moves on). A round is complete when every shard's files of it exist."""
    wd = work_dir(ds)
    shards = plan["shards"]

    def tasks(r: int) -> list[dict[str, Any]]:
        return [{"task": f"resolve.{r:03d}.{s}", "kind": "resolve", "round": r, "source": s, "ordinal": o}
                for o, s in enumerate(shards)]

    r = 0
    while all(task_done(ds, t) for t in tasks(r)):
        if sum(read_json(_round_dir(wd, r) / f"{s}.json")["undecided"] for s in shards) == 0:
            return tasks(r)
        r += 1
    return tasks(r)


def last_round(ds: DatasetDir, plan: dict[str, Any]) -> int:
    return resolve_tasks(ds, plan)[0]["round"] if plan["shards"] else 0


def _gather_candidates(cfg: DedupConfig, wd: Path, plan: dict[str, Any], task: dict[str, Any]
                       ) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Shard `task`'s candidate edges from every pair task (already checked by --phash-distance there) and its
    pHash edges, at most --pairs-per-row per row (the highest-priority partners): (edges sorted by row then
    partner priority, near edges among them, positions of the rows that had more partners than were kept)."""
    o = task["ordinal"]
    parts = []
    for g in range(len(plan["group_bounds"]) - 1):
        off = npy(wd / "pairs" / f"{g:05d}.edge_offsets.npy")
        if off[o + 1] > off[o]:
            parts.append(np.array(npy(wd / "pairs" / f"{g:05d}.edges.npy")[off[o]:off[o + 1]]))
    width = max([p.dtype["hi_key"].itemsize for p in parts] + [1])
    near = {f: np.concatenate([p[f] for p in parts]) if parts else np.zeros(0, t) for f, t in EDGE}
    near["hi_key"] = np.concatenate([p["hi_key"].astype(f"S{width}") for p in parts]) if parts else np.zeros(0, "S1")
    rows = np.load(wd / "collapse" / f"{task['source']}.npy")
    ph = rows[rows["kind"] == PHASH_EDGE]
    w = max(width, ph.dtype["a_key"].itemsize)
    pos = np.r_[near["lo_uid"] & ((1 << UID_SHIFT) - 1), ph["pos"]]
    more = np.unique(np.r_[(near["lo_uid"] & ((1 << UID_SHIFT) - 1))[near["more"]]])
    hi_uid, hi_prio = np.r_[near["hi_uid"], ph["a_uid"]], np.r_[near["hi_prio"], ph["a_prio"]]
    hi_key = np.r_[near["hi_key"].astype(f"S{w}"), ph["a_key"].astype(f"S{w}")]
    kind = np.r_[np.full(len(near["lo_uid"]), sd.NEAR, np.int8), np.full(len(ph), sd.PHASH, np.int8)]
    s = np.lexsort((hi_key, -hi_prio, pos))
    pos, hi_uid, kind = pos[s], hi_uid[s], kind[s]
    head = np.r_[True, (pos[1:] != pos[:-1]) | (hi_uid[1:] != hi_uid[:-1])] if len(pos) else np.zeros(0, bool)
    starts = np.flatnonzero(head)
    kind = np.bitwise_or.reduceat(kind, starts) if len(pos) else kind
    pos, hi_uid = pos[starts], hi_uid[starts]
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if len(pos) else np.zeros(0, np.int64)
    nth = np.arange(len(pos)) - np.repeat(first, np.diff(np.r_[first, len(pos)]))
    keep = nth < cfg.pairs_per_row
    more = np.union1d(more, pos[~keep])
    n_near = int(((kind[keep] & sd.NEAR) > 0).sum())
    return {"pos": pos[keep], "hi_uid": hi_uid[keep], "kind": kind[keep]}, n_near, more


def run_resolve(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """One round of SemDeDup's rule for one shard's rows. Round 0 gathers the shard's candidate edges and marks
    rows without a higher-priority partner kept; round r decides, from the statuses of round r-1, each undecided
    row: dropped when a partner is kept (the highest-priority kept partner is the one named), kept when every
    partner is settled and none is kept. The result is the greedy rule's, whatever the placement; the rounds
    needed are the longest chain of decisions, a few on real data."""
    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    src, r = task["source"], task["round"]
    paths = _paths(ds, task)
    if r == 0:
        edges, n_near, more = _gather_candidates(cfg, wd, plan, task)
        n = len(npy(wd / "keys" / f"{src}.npy"))
        st = np.zeros(n, STATUS)
        st["status"], st["kept_uid"] = KEPT, -1
        st["status"][edges["pos"]] = UNDECIDED
        copy = np.load(wd / "collapse" / f"{src}.mask.npy")
        st["status"][copy == 1] = COPIED
        st["more"][more] = True
        e = np.empty(len(edges["pos"]), [("pos", np.int64), ("hi_uid", np.int64), ("kind", np.int8)])
        e["pos"], e["hi_uid"], e["kind"] = edges["pos"], edges["hi_uid"], edges["kind"]
        _save(paths[3], e)
        counts = {"near_pairs": n_near, "candidates": len(e)}
        by = np.zeros(0, np.int64)
    else:
        st = np.load(_round_dir(wd, r - 1) / f"{src}.npy")
        e = np.load(wd / "resolve" / f"{src}.edges.npy")
        e = e[st["status"][e["pos"]] == UNDECIDED]
        hs = _status_of(wd, plan["shards"], r - 1, e["hi_uid"])
        # edges are sorted by row, then partner priority: the first kept partner of a row is its highest
        kept_edge = np.flatnonzero(hs == KEPT)
        first = kept_edge[np.r_[True, e["pos"][kept_edge][1:] != e["pos"][kept_edge][:-1]]] if len(kept_edge) \
            else kept_edge
        drop = e["pos"][first]
        pending = np.unique(e["pos"][hs == UNDECIDED])
        settle = np.setdiff1d(np.unique(e["pos"]), np.r_[drop, pending])
        st["status"][drop], st["kept_uid"][drop] = DROPPED, e["hi_uid"][first]
        st["evidence"][drop] = sd.strongest(e["kind"][first])
        st["status"][settle] = KEPT
        counts = {}
        # the kept rows this shard's drops name so far, sorted by uid (so by owning shard): each shard's decide
        # task reads its own range of every shard's file of the last round to learn which of its rows head a group
        by = np.union1d(npy(_round_dir(wd, r - 1) / f"{src}.by.npy"), e["hi_uid"][first])
    counts["undecided"] = int((st["status"] == UNDECIDED).sum())
    _save(paths[2], by)
    _save(paths[0], st)
    write_json(paths[1], counts)
    return counts


def _by_shard(uid: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(shard ordinal, positions in `uid`) of every shard owning some of `uid`: one sort, then slices (not a
    scan of all uids per shard)."""
    ordinal = uid >> UID_SHIFT
    if len(ordinal) == 0:
        return []
    o = np.argsort(ordinal, kind="stable")
    starts = np.flatnonzero(np.r_[True, ordinal[o][1:] != ordinal[o][:-1]])
    ends = np.r_[starts[1:], len(o)]
    return [(int(ordinal[o[a]]), o[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _status_of(wd: Path, shards: list[str], r: int, uid: np.ndarray, field: str | None = "status") -> np.ndarray:
    """`field` (None: the whole record) of round r's status of each uid, read from each owning shard's file
    through a memory map."""
    out = np.zeros(len(uid), STATUS if field is None else STATUS[[f for f, _ in STATUS].index(field)][1])
    for o, sel in _by_shard(uid):
        st = npy(_round_dir(wd, r) / f"{shards[o]}.npy")
        rows = st[uid[sel] & ((1 << UID_SHIFT) - 1)]
        out[sel] = rows if field is None else rows[field]
    return out


def _keys_of(wd: Path, shards: list[str], uid: np.ndarray) -> np.ndarray:
    """The key (bytes) of each uid, read from each owning shard's key array through a memory map."""
    parts, width = {}, 1
    for o, sel in _by_shard(uid):
        k = npy(wd / "keys" / f"{shards[o]}.npy")
        parts[o] = (sel, k[uid[sel] & ((1 << UID_SHIFT) - 1)])
        width = max(width, k.dtype.itemsize)
    out = np.zeros(len(uid), f"S{width}")
    for sel, k in parts.values():
        out[sel] = k
    return out


# --- decide: the groups ------------------------------------------------------------------------------------


def run_decide(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """One shard's group heads: its kept rows that some dropped row names (read from its uid range of every
    shard's `by` file of the last round: at most one entry per shard for a row, however large its group)
    and its kept representatives of byte copies, as positions in key order; no task holds every head."""
    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    r, src, ordinal = task["round"], task["source"], task["ordinal"]
    lo, hi = np.int64(ordinal) << UID_SHIFT, np.int64(ordinal + 1) << UID_SHIFT
    parts = []
    for s in plan["shards"]:
        by = npy(_round_dir(wd, r) / f"{s}.by.npy")
        a, b = np.searchsorted(by, [lo, hi])
        if b > a:
            parts.append(np.asarray(by[a:b]) & ((1 << UID_SHIFT) - 1))
    st = npy(_round_dir(wd, r) / f"{src}.npy")
    rows = np.load(wd / "collapse" / f"{src}.npy")
    reps = rows["pos"][rows["kind"] == REP]
    parts.append(reps[st["status"][reps] == KEPT])
    heads = np.unique(np.concatenate(parts)).astype(np.int64)
    paths = _paths(ds, task)
    _save(paths[0], heads)
    counts = {"heads": len(heads), "kept_beyond_pairs_per_row": int((st["more"] & (st["status"] == KEPT)).sum()),
              "near_pairs": read_json(_round_dir(wd, 0) / f"{src}.json")["near_pairs"]}
    write_json(paths[1], counts)
    return counts


def decide_summary(ds: DatasetDir, plan: dict[str, Any], r: int) -> dict[str, Any]:
    """On the driver after the decide tasks (O(shards + pair tasks) small files): the stage's counts
    (decide/summary.json), rewritten only when they change."""
    wd = work_dir(ds)
    per = [read_json(wd / "decide" / f"{s}.json") for s in plan["shards"]]
    unconfirmed = sum(read_json(ds.stats("dedup", f"pairs.{g:05d}")).get("unconfirmed", 0)
                      for g in range(len(plan["group_bounds"]) - 1))
    counts = {"near_duplicate_pairs": sum(c["near_pairs"] for c in per),  # candidates (<= --pairs-per-row a row)
              "near_pairs_without_phash_match": unconfirmed,  # embedding pairs --phash-distance did not confirm
              "groups": sum(c["heads"] for c in per), "resolve_rounds": r + 1,
              "kept_beyond_pairs_per_row": sum(c["kept_beyond_pairs_per_row"] for c in per)}
    if not ((wd / "decide" / "summary.json").exists() and read_json(wd / "decide" / "summary.json") == counts):
        write_json(wd / "decide" / "summary.json", counts)
    return counts


# --- write ------------------------------------------------------------------------------------------------


ALL_OFFSETS = "offsets-all.npy"  # every shard's (or group's) offsets, one row each, gathered on the driver


def gather_offsets(folder: Path, names: list[str], suffix: str) -> None:
    """One [len(names), k] array of the offsets files folder/{name}{suffix}, written on the driver between two
    phases, so a task reads its column from one file instead of opening one file per shard or group (a
    metadata storm on a shared filesystem: pair tasks x shards opens)."""
    rows = [np.load(folder / f"{n}{suffix}") for n in names]
    table = np.stack(rows) if rows else np.zeros((0, 1), np.int64)
    path = folder / ALL_OFFSETS
    if path.exists() and np.array_equal(np.load(path), table):
        return  # a resume: unchanged, left as it is
    _save(path, table)


def _offsets_column(folder: Path, names: list[str], suffix: str, col: int) -> np.ndarray:
    """[offsets[col], offsets[col + 1]] of every name: from the gathered file, else each name's own file."""
    path = folder / ALL_OFFSETS
    if path.exists():
        return np.array(npy(path)[:, col:col + 2])
    return np.stack([np.load(folder / f"{n}{suffix}")[col:col + 2] for n in names]) if names else np.zeros((0, 2))


def _nearest(wd: Path, plan: dict[str, Any], ordinal: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best neighbour over every group it probed: (cosine (-inf if none), key bytes, whether the row
    is in a pair above the threshold)."""
    parts = []
    groups = [f"{g:05d}" for g in range(len(plan["group_bounds"]) - 1)]
    for g, (a, b) in zip(groups, _offsets_column(wd / "pairs", groups, ".nn_offsets.npy", ordinal), strict=True):
        if b > a:
            parts.append(np.array(npy(wd / "pairs" / f"{g}.nn.npy")[a:b]))
    sim = np.full(n, -np.inf, np.float32)
    key = np.zeros(n, "S1")
    near = np.zeros(n, bool)
    if parts:
        width = max(p.dtype["key"].itemsize for p in parts)
        pos = np.concatenate([p["uid"] for p in parts]) & ((1 << UID_SHIFT) - 1)
        s = np.concatenate([p["sim"] for p in parts])
        k = np.concatenate([p["key"].astype(f"S{width}") for p in parts])
        near[pos[np.concatenate([p["near"] for p in parts])]] = True
        o = np.lexsort((k, -s, pos))
        first = np.r_[True, pos[o][1:] != pos[o][:-1]]
        key = np.zeros(n, f"S{width}")
        sim[pos[o][first]], key[pos[o][first]] = s[o][first], k[o][first]
    return sim, key, near


def _decisions(wd: Path, plan: dict[str, Any], task: dict[str, Any], r: int, rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(kept uid (-1 when kept), evidence) of each row of the shard: its own round-r status, or for an exact
    copy its representative's: a kept representative keeps it (evidence exact), a dropped one hands on its
    own kept row and evidence."""
    st = np.load(_round_dir(wd, r) / f"{task['source']}.npy")
    kept_uid = np.where(st["status"] == DROPPED, st["kept_uid"], -1)
    evidence = np.where(st["status"] == DROPPED, st["evidence"], 0).astype(np.int8)
    copies = rows[rows["kind"] == COPY]
    rep = _status_of(wd, plan["shards"], r, copies["a_uid"], None)
    dropped_rep = rep["status"] == DROPPED
    kept_uid[copies["pos"]] = np.where(dropped_rep, rep["kept_uid"], copies["a_uid"])
    evidence[copies["pos"]] = np.where(dropped_rep, rep["evidence"], sd.EXACT)
    return kept_uid, evidence


def group_id(head_key: np.ndarray) -> np.ndarray:
    """A group's number: a 63-bit hash of its head's key (the kept row), the same wherever the rows are stored
    and computed from the head alone, so no task numbers the groups of the whole dataset. Two groups share a
    number with probability about G^2 / 2^64 (G groups: 5e-5 for 3 x 10^7 groups)."""
    return (sd.key_hash(head_key, 0) >> np.uint64(1)).astype(np.int64)


def run_write(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """signals/dedup/{shard}.parquet: one row per scored sample of the shard, in key order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.io.tables import write_table

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    r = read_json(wd / "decide" / "summary.json")["resolve_rounds"] - 1
    meta = pq.read_table(wd / "meta" / f"{task['source']}.parquet")
    n = meta.num_rows
    own = np.asarray(meta["key"].to_numpy(zero_copy_only=False)).astype("S") if n else np.zeros(0, "S1")
    nn_sim, nn_key, near = _nearest(wd, plan, task["ordinal"], n)
    rows = np.load(wd / "collapse" / f"{task['source']}.npy")
    # a row with an exact copy: the copy is its nearest neighbour (same bytes, same image, cosine 1)
    same = rows[(rows["kind"] == COPY) | (rows["kind"] == REP)]
    width = max(nn_key.dtype.itemsize, same.dtype["a_key"].itemsize)
    nn_key = nn_key.astype(f"S{width}")
    nn_sim[same["pos"]], nn_key[same["pos"]] = 1.0, same["a_key"]
    exact = np.zeros(n, bool)
    exact[same["pos"]] = True
    kept_uid, evidence = _decisions(wd, plan, task, r, rows)
    dropped = kept_uid >= 0
    kept_key = own.copy()
    if dropped.any():
        kk = _keys_of(wd, plan["shards"], kept_uid[dropped])
        kept_key = kept_key.astype(f"S{max(own.dtype.itemsize, kk.dtype.itemsize)}")
        kept_key[dropped] = kk
    head = np.zeros(n, bool)
    head[npy(wd / "decide" / f"{task['source']}.npy")] = True
    group = np.where(dropped | head, group_id(kept_key), -1).astype(np.int64)
    nn_ok = np.isfinite(nn_sim)
    names = np.array([None, *(sd.EVIDENCE[b] for b in (sd.NEAR, sd.PHASH, sd.EXACT))], dtype=object)
    columns = {
        "key": meta["key"],
        "exact_dup": pa.array(exact),
        "dup_group": pa.array(group, pa.int64()),
        "is_duplicate": pa.array(dropped),
        "kept_key": pa.array(np.char.decode(kept_key, "utf-8").astype(object), pa.string()),
        "dup_evidence": pa.array(names[np.searchsorted([0, sd.NEAR, sd.PHASH, sd.EXACT], evidence)], pa.string()),
        "cluster": meta["cluster"],
        "nn_similarity": pa.array(nn_sim, pa.float32(), mask=~nn_ok),
        "nn_key": pa.array(np.where(nn_ok, np.char.decode(nn_key, "utf-8").astype(object), None), pa.string()),
    }
    if cfg.against:
        esim = meta["eval_sim"].to_numpy(zero_copy_only=False)
        columns["eval_contaminated"] = meta["eval_contaminated"]
        columns["eval_similarity"] = pa.array(esim, pa.float32(), mask=~np.isfinite(esim))
    else:
        columns["eval_contaminated"] = pa.array(np.zeros(n, bool))
        columns["eval_similarity"] = pa.nulls(n, pa.float32())
    write_table(ds.signals("dedup", task["source"]), pa.table(columns))
    return {"rows": n, "eval_contaminated": int(np.sum(columns["eval_contaminated"].to_numpy(zero_copy_only=False))),
            "duplicates": int(dropped.sum()), "exact_duplicates": int(exact.sum()), "near_duplicates": int(near.sum()),
            "drops_by_evidence": {name: int((evidence == bit).sum()) for bit, name in sd.EVIDENCE.items()}}
