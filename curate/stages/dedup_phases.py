"""The task phases of stage "dedup" (see curate/stages/dedup.py for the picture): the driver's plan (sample,
k-means, eval set), the per-shard assignment into cluster-group buckets, the per-group pair search, the
exact-duplicate GROUP BY, the decision task and the per-shard signal writer.

Files in _work/dedup are written atomically; a task's marker (written by the engine after it returns) is what
says it is complete. Bucket and neighbour files are structured .npy arrays sorted by group / source shard with
an offsets file, so a reader memory-maps only its own slice (the map side of a shuffle).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import InputError
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.stages.dedup import (
    SAMPLE_PER_CENTROID,
    DedupConfig,
    gather,
    groups_for,
    read_shard,
    work_dir,
)

log = logging.getLogger(__name__)
PHASH_FINE_SIZE = 16  # phash256: imagehash.phash(hash_size=16), 256 bits
UID_SHIFT = 32  # uid = shard ordinal << 32 | row position in the shard's key order (routing only, never ties)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _paths(ds: DatasetDir, task: dict[str, Any]) -> list[Path]:
    wd = work_dir(ds)
    kind = task["kind"]
    if kind == "assign":
        s = task["source"]
        return [wd / "meta" / f"{s}.parquet", wd / "bucket" / f"{s}.offsets.npy", wd / "bucket" / f"{s}.npy"]
    if kind == "phash":
        return [wd / "phash" / f"{task['source']}.parquet"]
    if kind == "pairs":
        g = f"{task['group']:05d}"
        return [wd / "pairs" / f"{g}.edges.npy", wd / "pairs" / f"{g}.nn_offsets.npy", wd / "pairs" / f"{g}.nn.npy"]
    if kind == "decide":
        return [wd / "decide" / "summary.json"]
    return [ds.signals("dedup", task["source"])]


def task_device(plan: dict[str, Any], cfg: DedupConfig) -> str:
    """The device the driver resolved (tasks do not import torch to ask again); a task on a machine without
    the plan's GPU runs on the CPU, with the same decisions."""
    if plan["device"] == "cpu" or cfg.device == "cpu":
        return "cpu"
    from curate.devices import cuda_count

    return plan["device"] if cuda_count() else "cpu"


def task_done(ds: DatasetDir, task: dict[str, Any]) -> bool:
    return all(p.exists() for p in _paths(ds, task))


# --- driver: plan ----------------------------------------------------------------------------------------


def build_plan(cfg: DedupConfig, ds: DatasetDir, digest: dict[str, Any], device: str) -> dict[str, Any]:
    """Sample, train the centroids, gather the (small) eval set; returns the plan (written by the caller)."""
    from curate import semdedup as sd

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
        centroids = sd.train_centroids(sample, k, cfg.seed, device="cpu")
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
        from curate.stages.dedup_threshold import calibrate

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
    """About `size` rows drawn by a hash of (key, seed), in hash order: the same sample, in the same order,
    whatever the shard placement, and never more than the sample in memory."""
    from curate import semdedup as sd

    if n == 0:
        return np.zeros((0, d), np.float32)
    cut = np.uint64(min(2**64 - 1, int(size / n * 2**64))) if size < n else np.uint64(2**64 - 1)
    hashes, keys, parts = [], [], []
    for shard in shards:
        t, emb = read_shard(ds, shard, with_sha=False, scorer=scorer)
        k = np.asarray(t["key"].to_numpy(zero_copy_only=False)).astype("S")
        h = sd.key_hash(k, seed)
        sel = np.flatnonzero(h <= cut)
        hashes.append(h[sel])
        keys.append(k[sel])
        parts.append(gather(emb, t["emb_row"].to_numpy()[sel]))
    h = np.concatenate(hashes)
    o = np.lexsort((np.concatenate(keys), h))
    return np.concatenate(parts)[o]


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

    from curate import semdedup as sd
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
    _write_bucket(wd, task["source"], x, ids, uid, prio, t["key"], plan["group_bounds"])
    return {"rows": n, "eval_contaminated": contaminated}


def _write_bucket(wd: Path, shard: str, x: np.ndarray, ids: np.ndarray, uid: np.ndarray, prio: np.ndarray,
                  keys: Any, bounds: list[int]) -> None:
    """One entry per (row, probed cluster), sorted by cluster (rows in key order within it), and the offsets
    of each cluster group: a pair task memory-maps only entries[offsets[g]:offsets[g + 1]]."""
    n, p = ids.shape
    key = np.asarray(keys.to_numpy(zero_copy_only=False)).astype("S") if n else np.zeros(0, "S1")
    cluster = ids.reshape(-1)
    o = np.argsort(cluster, kind="stable")  # entry e = row * p + probe; stable keeps key order in a cluster
    row = o // p
    dt = np.dtype([("emb", np.float16, (x.shape[1],)), ("uid", np.int64), ("prio", np.float64),
                   ("cluster", np.int32), ("member", np.bool_), ("key", key.dtype)])
    out = np.empty(len(o), dt)
    out["emb"] = x[row]
    out["uid"], out["prio"], out["cluster"] = uid[row], prio[row], cluster[o]
    out["member"], out["key"] = (o % p) == 0, key[row]
    _save(wd / "bucket" / f"{shard}.offsets.npy", np.searchsorted(cluster[o], bounds).astype(np.int64))
    _save(wd / "bucket" / f"{shard}.npy", out)


def run_phash(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    import imagehash
    import pyarrow as pa

    from curate.imaging import safe_open
    from curate.io.shards import iter_samples
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


# --- pairs -------------------------------------------------------------------------------------------


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
        return np.asarray(np.load(path, mmap_mode="r")[:, col:col + 2])
    return np.stack([np.load(folder / f"{n}{suffix}")[col:col + 2] for n in names]) if names else np.zeros((0, 2))


def _read_group(wd: Path, shards: list[str], g: int) -> dict[str, np.ndarray]:
    """Group g's slice of every shard's bucket, copied straight from the memory maps into one array per field
    (no intermediate copies: this is the largest allocation of a pair task)."""
    slices, dtype, width = [], None, 1
    offsets = _offsets_column(wd / "bucket", shards, ".offsets.npy", g)
    for s, (a, b) in zip(shards, offsets, strict=True):  # sizes and dtypes only (one memory map open at a time)
        if b > a:
            path = wd / "bucket" / f"{s}.npy"
            dtype = np.load(path, mmap_mode="r").dtype
            width = max(width, dtype["key"].itemsize)
            slices.append((path, int(a), int(b)))
    if not slices:
        return {}
    total = sum(b - a for _, a, b in slices)
    fields = ("emb", "uid", "prio", "cluster", "member", "key")
    out = {f: np.empty((total, *dtype[f].shape), dtype[f].base) for f in fields[:-1]}
    out["key"] = np.empty(total, f"S{width}")
    pos = 0
    for path, a, b in slices:
        part = np.load(path, mmap_mode="r")[a:b]
        for f in fields:
            out[f][pos:pos + b - a] = part[f]
        pos += b - a
        del part
    return out


def run_pairs(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """Near pairs and nearest neighbours among the entries of one group of clusters."""
    from curate import semdedup as sd

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    e = _read_group(wd, plan["shards"], task["group"])
    edges_path, off_path, nn_path = _paths(ds, task)
    if not e:
        _save(edges_path, _edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                                 {"uid": np.zeros(0, np.int64), "prio": np.zeros(0), "key": np.zeros(0, "S1")}))
        _save(off_path, np.zeros(len(plan["shards"]) + 1, np.int64))
        _save(nn_path, np.zeros(0, [("uid", np.int64), ("sim", np.float32), ("key", "S1")]))
        return {"entries": 0, "pairs": 0}
    o = np.lexsort((e["key"], e["cluster"]))  # by cluster, then key: ties go to the lowest key
    emb = e.pop("emb")  # the big array stays in place; entries reach it through `rows`
    e = {f: v[o] for f, v in e.items()}
    hits = sd.search_clusters(emb, e["cluster"], e["member"], e["uid"], plan["threshold"], task_device(plan, cfg),
                              rows=o)
    del emb
    edges = _edges(hits.q, hits.m, hits.sim, e)
    _save(edges_path, edges)
    # each row's best neighbour over its probes in this group: highest cosine, then lowest key
    has = hits.best_m >= 0
    nn_key = np.where(has, e["key"][np.maximum(hits.best_m, 0)], b"")
    o = np.lexsort((nn_key, -hits.best_sim, e["uid"]))
    first = np.r_[True, e["uid"][o][1:] != e["uid"][o][:-1]]
    sel = o[first]
    nn = np.empty(len(sel), [("uid", np.int64), ("sim", np.float32), ("key", nn_key.dtype)])
    nn["uid"], nn["sim"], nn["key"] = e["uid"][sel], hits.best_sim[sel], nn_key[sel]
    nn = nn[np.argsort(nn["uid"], kind="stable")]
    ordinals = np.arange(len(plan["shards"]) + 1, dtype=np.int64) << UID_SHIFT
    _save(off_path, np.searchsorted(nn["uid"], ordinals).astype(np.int64))
    _save(nn_path, nn)
    return {"entries": len(o), "pairs": len(edges)}


def _edges(q: np.ndarray, m: np.ndarray, sim: np.ndarray, e: dict[str, np.ndarray]) -> np.ndarray:
    """Unique undirected pairs (a = lower key) with both ends' key, uid and priority; a pair found twice keeps
    its higher cosine."""
    swap = e["key"][q] > e["key"][m]
    a, b = np.where(swap, m, q), np.where(swap, q, m)
    o = np.lexsort((-sim, e["uid"][b], e["uid"][a]))
    a, b, sim = a[o], b[o], sim[o]
    first = np.r_[True, (e["uid"][a][1:] != e["uid"][a][:-1]) | (e["uid"][b][1:] != e["uid"][b][:-1])] \
        if len(a) else np.zeros(0, bool)
    a, b, sim = a[first], b[first], sim[first]
    dt = [("a_key", e["key"].dtype), ("b_key", e["key"].dtype), ("a_uid", np.int64), ("b_uid", np.int64),
          ("a_prio", np.float64), ("b_prio", np.float64), ("sim", np.float32)]
    out = np.empty(len(a), dt)
    out["a_key"], out["b_key"], out["a_uid"], out["b_uid"] = e["key"][a], e["key"][b], e["uid"][a], e["uid"][b]
    out["a_prio"], out["b_prio"], out["sim"] = e["prio"][a], e["prio"][b], sim
    return out


# --- exact and perceptual duplicates: a GROUP BY on the driver -------------------------------------------


def _active_spark() -> Any:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return None
    return SparkSession.getActiveSession()


def exact_edges(cfg: DedupConfig, ds: DatasetDir, plan: dict[str, Any]) -> Path:
    """Rows with equal sha256 (and, with --phash, equal perceptual hash: 256-bit with --phash-distance, else
    64-bit), each linked to the first row of its value in keep order: `exact_edges.parquet`. A GROUP BY over the per-shard meta tables in DuckDB, spilling
    to disk past 1 GB; on Spark (an active session in the driver) the same query in Spark SQL."""
    wd = work_dir(ds)
    out = wd / "exact_edges.parquet"
    sources = ["SELECT key, uid, prio, sha256 AS v, 4 AS kind FROM meta WHERE sha256 IS NOT NULL AND sha256 <> ''"]
    if cfg.phash:
        # with --phash-distance the 256-bit hash: equal 64-bit pHashes join blank images and look-alike
        # drawings (two clock faces), equal 256-bit ones far fewer (bench/dedup_evidence.py)
        col = "phash256" if cfg.phash_distance >= 0 else "phash"
        sources.append(f"SELECT m.key, m.uid, m.prio, p.{col} AS v, 2 AS kind FROM meta m JOIN phash p "
                       f"ON m.key = p.key WHERE p.{col} IS NOT NULL")
    sql = (f"WITH m AS ({' UNION ALL '.join(sources)}), "
           "r AS (SELECT *, row_number() OVER (PARTITION BY kind, v ORDER BY prio DESC, key) AS rn FROM m) "
           "SELECT h.key AS a_key, o.key AS b_key, h.uid AS a_uid, o.uid AS b_uid, h.prio AS a_prio, "
           "o.prio AS b_prio, o.kind AS kind FROM r o JOIN r h ON o.kind = h.kind AND o.v = h.v AND h.rn = 1 "
           "WHERE o.rn > 1")
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
    con.execute(f"SET memory_limit='1GB'; SET threads=2; SET temp_directory='{wd / 'duckdb-tmp'}'")
    con.execute(f"CREATE VIEW meta AS SELECT * FROM read_parquet({meta!r})")
    if cfg.phash:
        con.execute(f"CREATE VIEW phash AS SELECT * FROM read_parquet({phash!r})")
    if out.is_dir():
        shutil.rmtree(out)
    with atomic_path(out) as tmp:
        con.execute(f"COPY ({sql}) TO '{tmp}' (FORMAT parquet)")
    con.close()
    return out


# --- decide --------------------------------------------------------------------------------------------


def _edge_arrays(ds: DatasetDir, plan: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Every near edge (from the pair tasks) and exact/perceptual edge (from the GROUP BY) as arrays, and how
    many of them are near edges."""
    import pyarrow.parquet as pq

    wd = work_dir(ds)
    fields = ("a_key", "b_key", "a_uid", "b_uid", "a_prio", "b_prio")
    parts = [np.load(wd / "pairs" / f"{g:05d}.edges.npy") for g in range(len(plan["group_bounds"]) - 1)]
    ex = pq.read_table(wd / "exact_edges.parquet")
    cols: dict[str, list[np.ndarray]] = {f: [p[f] for p in parts] for f in fields}
    for f in fields:
        v = ex[f].to_numpy(zero_copy_only=False)
        cols[f].append(np.array([x.encode() for x in v], dtype="S") if f.endswith("key") and len(v)
                       else (np.zeros(0, "S1") if f.endswith("key") else v))
    n_near = sum(len(p) for p in parts)
    out = {}
    for f in fields:
        if f.endswith("key"):
            width = max([a.dtype.itemsize for a in cols[f]] + [1])
            out[f] = np.concatenate([a.astype(f"S{width}") for a in cols[f]])
        else:
            out[f] = np.concatenate(cols[f]).astype(np.float64 if f.endswith("prio") else np.int64)
    from curate.semdedup import NEAR

    out["kind"] = np.concatenate([np.full(n_near, NEAR, np.int8), ex["kind"].to_numpy().astype(np.int8)])
    return out, n_near


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


def confirm_near(cfg: DedupConfig, ds: DatasetDir, plan: dict[str, Any], e: dict[str, np.ndarray],
                 n_near: int) -> tuple[dict[str, np.ndarray], int, int]:
    """With --phash-distance D: keep a near (embedding) edge only when both images have a pHash and their
    256-bit pHashes differ in at most D bits (exact and equal-pHash edges always stay). Returns the edges, how
    many near edges remain and how many the check removed."""
    if cfg.phash_distance < 0 or n_near == 0:
        return e, n_near, 0
    wd = work_dir(ds)
    ha, fa = _phash_of(wd, plan["shards"], e["a_key"][:n_near])
    hb, fb = _phash_of(wd, plan["shards"], e["b_key"][:n_near])
    ok = fa & fb & (np.bitwise_count(ha ^ hb).sum(axis=1) <= cfg.phash_distance)
    keep = np.r_[ok, np.ones(len(e["kind"]) - n_near, bool)]
    return {f: v[keep] for f, v in e.items()}, int(ok.sum()), int((~ok).sum())


def run_decide(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """SemDeDup's rule over the rows that have any duplicate edge (never over all rows): rank them by the keep
    policy (ties: lowest key), keep a row unless it duplicates a kept higher row; per-shard decision files."""
    from curate import semdedup as sd

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    e, n_near = _edge_arrays(ds, plan)
    e, n_near, unconfirmed = confirm_near(cfg, ds, plan, e, n_near)
    m = len(e["kind"])
    keys, first, inv = np.unique(np.concatenate([e["a_key"], e["b_key"]]), return_index=True,
                                 return_inverse=True)
    n = len(keys)  # nodes in key order
    uid = np.concatenate([e["a_uid"], e["b_uid"]])[first]
    prio = np.concatenate([e["a_prio"], e["b_prio"]])[first]
    a, b = inv[:m], inv[m:]
    by_rank = np.lexsort((np.arange(n), -prio))
    rank_of = np.empty(n, np.int64)
    rank_of[by_rank] = np.arange(n)
    ra, rb = rank_of[a], rank_of[b]
    kept_by, ev = sd.greedy_keep(n, np.minimum(ra, rb), np.maximum(ra, rb), e["kind"])
    kept = np.arange(n)
    dropped = np.flatnonzero(kept_by >= 0)
    kept[by_rank[dropped]] = by_rank[kept_by[dropped]]
    evidence = np.zeros(n, np.int8)
    evidence[by_rank[dropped]] = sd.strongest(ev[dropped])
    group = sd.group_ids(kept)
    exact = np.zeros(n, bool)
    is_exact = (e["kind"] & sd.EXACT) > 0
    exact[a[is_exact]], exact[b[is_exact]] = True, True
    near_pairs = np.unique(np.minimum(a[:n_near], b[:n_near]) * n + np.maximum(a[:n_near], b[:n_near]))
    ordinal = uid >> UID_SHIFT
    for o in np.unique(ordinal):
        sel = np.flatnonzero(ordinal == o)
        with atomic_path(wd / "decide" / f"{int(o)}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, pos=uid[sel] & ((1 << UID_SHIFT) - 1), kept_key=keys[kept[sel]], group=group[sel],
                     evidence=evidence[sel], exact=exact[sel])
    counts = {
        "exact_duplicates": int(exact.sum()),  # rows sharing their sha256 with another row
        "near_duplicate_pairs": int(len(near_pairs)),
        "near_pairs_without_phash_match": unconfirmed,  # embedding pairs --phash-distance did not confirm
        "near_duplicates": int(len(np.unique(np.r_[a[:n_near], b[:n_near]]))),  # rows in a near pair
        "groups": int(group.max() + 1) if n else 0,
        "duplicates": int(len(dropped)),
        "drops_by_evidence": {name: int((evidence == bit).sum()) for bit, name in sd.EVIDENCE.items()},
    }
    write_json(wd / "decide" / "summary.json", counts)
    return counts


# --- write ------------------------------------------------------------------------------------------------


def _nearest(wd: Path, plan: dict[str, Any], ordinal: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best neighbour over every group it probed: (cosine (-inf if none), key bytes)."""
    parts = []
    groups = [f"{g:05d}" for g in range(len(plan["group_bounds"]) - 1)]
    for g, (a, b) in zip(groups, _offsets_column(wd / "pairs", groups, ".nn_offsets.npy", ordinal), strict=True):
        if b > a:
            parts.append(np.array(np.load(wd / "pairs" / f"{g}.nn.npy", mmap_mode="r")[a:b]))
    sim = np.full(n, -np.inf, np.float32)
    key = np.zeros(n, "S1")
    if parts:
        width = max(p.dtype["key"].itemsize for p in parts)
        pos = np.concatenate([p["uid"] for p in parts]) & ((1 << UID_SHIFT) - 1)
        s = np.concatenate([p["sim"] for p in parts])
        k = np.concatenate([p["key"].astype(f"S{width}") for p in parts])
        o = np.lexsort((k, -s, pos))
        first = np.r_[True, pos[o][1:] != pos[o][:-1]]
        key = np.zeros(n, f"S{width}")
        sim[pos[o][first]], key[pos[o][first]] = s[o][first], k[o][first]
    return sim, key


def run_write(cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
    """signals/dedup/{shard}.parquet: one row per scored sample of the shard, in key order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate import semdedup as sd
    from curate.io.tables import write_table

    wd = work_dir(ds)
    plan = read_json(wd / "plan.json")
    meta = pq.read_table(wd / "meta" / f"{task['source']}.parquet")
    n = meta.num_rows
    keys = np.asarray(meta["key"].to_numpy(zero_copy_only=False), dtype=object)
    nn_sim, nn_key = _nearest(wd, plan, task["ordinal"], n)
    kept_key, group = keys.copy(), np.full(n, -1, np.int64)
    evidence, exact = np.zeros(n, np.int8), np.zeros(n, bool)
    dec = wd / "decide" / f"{task['ordinal']}.npz"
    if dec.exists():
        with np.load(dec) as z:
            pos = z["pos"]
            kept_key[pos] = np.char.decode(z["kept_key"], "utf-8").astype(object)
            group[pos], evidence[pos], exact[pos] = z["group"], z["evidence"], z["exact"]
    nn_ok = np.isfinite(nn_sim)
    names = np.array([None, *(sd.EVIDENCE[b] for b in (sd.NEAR, sd.PHASH, sd.EXACT))], dtype=object)
    columns = {
        "key": meta["key"],
        "exact_dup": pa.array(exact),
        "dup_group": pa.array(group, pa.int64()),
        "is_duplicate": pa.array(evidence > 0),
        "kept_key": pa.array(kept_key, pa.string()),
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
    return {"rows": n, "eval_contaminated": int(np.sum(columns["eval_contaminated"].to_numpy(zero_copy_only=False)))}
