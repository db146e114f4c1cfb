"""Stage "dedup": exact (sha256), near-duplicate (SemDeDup over image embeddings) and optional perceptual-hash
duplicate groups, one kept sample per group, and contamination against an evaluation set.

plan() (driver) gathers the scored embeddings in key order into DIR/_work/dedup/emb.npy, trains spherical
k-means and assigns every row to its nearest `probes` clusters; each task ("c00000", ...) searches a range of
clusters for pairs and writes _work/dedup/pairs/{task}.npz; with --phash, tasks "p{shard}" hash one tar
each. finalize() (driver) unions all pairs and writes signals/dedup/{shard}.parquet per source shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.config import output_fields, runtime
from curate.errors import InputError
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.semdedup import KEEP_POLICIES

log = logging.getLogger("curate.dedup")

WORK = ("_work", "dedup")
PLAN_VERSION = 1
ROWS_PER_TASK = 65536  # with tasks=0: about this many rows' clusters per task


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.95  # cosine at or above which two images are near duplicates
    k: int = 0  # k-means clusters (0 = auto, about 2 sqrt(N))
    probes: int = 2  # clusters each row searches (its nearest `probes` centroids)
    keep: str = "best-clip-score"
    seed: int = 0
    against: str | None = None  # evaluation dataset dir (absolute path)
    eval_threshold: float = 0.95
    phash: bool = False
    tasks: int = 0  # cluster-range tasks (0 = auto: one per ~65k rows)
    batch_rows: int = runtime(65536)


def check_config(cfg: DedupConfig) -> None:
    if not -1.0 <= cfg.threshold <= 1.0:
        raise InputError(f"--threshold: {cfg.threshold} is not a cosine in [-1, 1]")
    if not -1.0 <= cfg.eval_threshold <= 1.0:
        raise InputError(f"--eval-threshold: {cfg.eval_threshold} is not a cosine in [-1, 1]")
    if cfg.k < 0:
        raise InputError("--k: must be 'auto' or a positive number of clusters")
    if cfg.probes < 1:
        raise InputError("--probes: must be at least 1")
    if cfg.tasks < 0:
        raise InputError("--tasks: must be 0 (auto) or more")
    if cfg.keep not in KEEP_POLICIES:
        raise InputError(f"--keep: '{cfg.keep}' (choose {', '.join(KEEP_POLICIES)})")
    if cfg.against is not None and not Path(cfg.against).is_dir():
        raise InputError(f"--against: {cfg.against} is not a directory")


def work_dir(ds: DatasetDir) -> Path:
    return ds.root.joinpath(*WORK)


# --- inputs ----------------------------------------------------------------------------------------


def input_digest(ds: DatasetDir) -> dict[str, Any]:
    """What dedup reads from a dataset dir: the score fingerprint and each scored shard's file sizes.

    Sizes, not mtimes, so a copied dataset dir still resumes; a rescored dataset has another fingerprint.
    """
    from curate.io import manifest

    score = manifest.load(ds)["stages"].get("score", {})
    files = {}
    for shard in ds.done_shards("score"):
        paths = (ds.signals("score", shard), ds.signals("score", shard, ".img_emb.npy"), ds.ledger(shard))
        files[shard] = [p.stat().st_size if p.exists() else None for p in paths]
    blob = json.dumps(files, sort_keys=True).encode()
    return {"score_fingerprint": score.get("fingerprint"), "shards": len(files),
            "files_sha256": hashlib.sha256(blob).hexdigest()[:16]}


def scored_rows(ds: DatasetDir, with_emb: bool = True) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """The scored samples of a dataset dir sorted by key: a table (key, shard, emb_row, clip_score, sha256)
    and the memory-mapped embedding file of each shard. Bad or missing inputs raise InputError."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = ds.done_shards("score")
    if not shards:
        raise InputError(f"{ds.root / 'signals' / 'score'}: no scored shards (no _done/score markers); "
                         "run `curate score` first")
    parts, embs = [], []
    dim = None
    for shard in shards:
        path = ds.signals("score", shard)
        try:
            t = pq.read_table(path, columns=["key", "scored", "emb_row", "clip_score"])
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"{path}: unreadable score table or missing column ({e})") from None
        t = t.filter(pc.and_(pc.fill_null(t["scored"], False), pc.greater_equal(t["emb_row"], 0)))
        sha = _ledger_sha(ds, shard)
        keys = t["key"].to_pylist()
        t = pa.table({"key": t["key"].cast(pa.string()), "shard": pa.array([shard] * len(keys), pa.string()),
                      "emb_row": t["emb_row"].cast(pa.int64()), "clip_score": t["clip_score"].cast(pa.float32()),
                      "sha256": pa.array([sha.get(k) for k in keys], pa.string())})
        parts.append(t)
        if with_emb:
            emb_path = ds.signals("score", shard, ".img_emb.npy")
            try:
                emb = np.load(emb_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise InputError(f"{emb_path}: unreadable embeddings ({e})") from None
            if emb.ndim != 2 or (len(t) and int(pc.max(t["emb_row"]).as_py()) >= emb.shape[0]):
                raise InputError(f"{emb_path}: shape {emb.shape} does not hold the emb_row values of {path}")
            if dim is not None and emb.shape[1] != dim and emb.shape[0]:
                raise InputError(f"{emb_path}: dimension {emb.shape[1]}, other shards have {dim}")
            if emb.shape[0]:
                dim = emb.shape[1]
            embs.append((shard, emb))
    table = pa.concat_tables(parts).sort_by("key")
    keys = table["key"]
    if len(keys) > 1 and pc.count_distinct(keys).as_py() != len(keys):
        raise InputError(f"{ds.root}/signals/score: a key appears in more than one scored row")
    return table, embs


def _ledger_sha(ds: DatasetDir, shard: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    path = ds.ledger(shard)
    if not path.exists():
        return {}
    t = pq.read_table(path)
    if "sha256" not in t.column_names:
        raise InputError(f"{path}: no sha256 column")
    cols = ["key", "status", "sha256"] + (["superseded_by"] if "superseded_by" in t.column_names else [])
    # a row a download retry superseded is history: its key is not a sample any more
    return {r["key"]: r["sha256"] for r in t.select(cols).to_pylist()
            if r["status"] == "success" and r["sha256"] and not r.get("superseded_by")}


def gather_embeddings(table: Any, embs: list[tuple[str, np.ndarray]], out: Path) -> tuple[int, int]:
    """Write the embeddings of `table`'s rows, in table (key) order, to one float16 .npy; returns (n, d)."""
    n = len(table)
    dims = [e.shape[1] for _, e in embs if e.shape[0]]
    d = dims[0] if dims else 0
    shard_col = np.asarray(table["shard"].to_numpy(zero_copy_only=False))
    emb_row = table["emb_row"].to_numpy()
    with atomic_path(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        for shard, emb in embs:
            pos = np.flatnonzero(shard_col == shard)
            if len(pos):
                src = emb_row[pos]
                o = np.argsort(src)  # read each shard file front to back
                arr[pos[o]] = emb[src[o]]
        arr.flush()
        del arr
    return n, d


# --- the stage -------------------------------------------------------------------------------------


class DedupStage:
    name = "dedup"
    config_cls = DedupConfig

    def plan(self, cfg: DedupConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        check_config(cfg)
        wd = work_dir(ds)
        digest = {"inputs": input_digest(ds), "config": output_fields(cfg), "version": PLAN_VERSION}
        if cfg.against:
            digest["against"] = input_digest(DatasetDir.at(cfg.against))
        plan_path = wd / "plan.json"
        if plan_path.exists() and read_json(plan_path).get("digest") == digest:
            plan = read_json(plan_path)
        else:
            # another (or a half-written) plan: none of its task outputs may be reused
            self._discard_work(ds)
            plan = self._build(cfg, ds, digest)
        # a marker without its output file (deleted pair file) means the task must run again
        for t in plan["tasks"]:
            if not task_output(ds, t).exists():
                ds.marker(self.name, t["shard"]).unlink(missing_ok=True)
        return plan["tasks"]

    def _build(self, cfg: DedupConfig, ds: DatasetDir, digest: dict[str, Any]) -> dict[str, Any]:
        from curate import semdedup as sd
        from curate.io.tables import write_table

        wd = work_dir(ds)
        table, embs = scored_rows(ds)
        write_table(wd / "samples.parquet", table)
        n, d = gather_embeddings(table, embs, wd / "emb.npy")
        emb = np.load(wd / "emb.npy", mmap_mode="r")
        k = sd.choose_k(n, cfg.k or None)
        if n >= 2:
            log.info("dedup: %d rows, k-means with %d clusters", n, k)
            centroids = sd.train_centroids(emb, k, cfg.seed)
            ids, sims = sd.assign(emb, centroids, cfg.probes, cfg.batch_rows)
        else:
            centroids = np.asarray(emb, np.float32).reshape(n, d)[:1]
            ids, sims = np.zeros((n, 1), np.int32), np.ones((n, 1), np.float32)
            k = 1
        _save(wd / "centroids.npy", centroids)
        _save(wd / "ids.npy", ids)
        _save(wd / "centroid_sim.npy", sims[:, 0].copy())
        if cfg.against:
            eval_ds = DatasetDir.at(cfg.against)
            eval_table, eval_embs = scored_rows(eval_ds)
            en, ed = gather_embeddings(eval_table, eval_embs, wd / "eval_emb.npy")
            if en and n and ed != d:
                raise InputError(f"--against {cfg.against}: embedding dimension {ed}, this dataset has {d}")
            write_table(wd / "eval_samples.parquet", eval_table.select(["key", "sha256"]))
        n_tasks = cfg.tasks or max(1, math.ceil(n / ROWS_PER_TASK))
        n_tasks = min(n_tasks, k) if n else 0
        bounds = np.linspace(0, k, n_tasks + 1).round().astype(int) if n_tasks else []
        tasks = [{"shard": f"c{i:05d}", "kind": "pairs", "lo": int(bounds[i]), "hi": int(bounds[i + 1])}
                 for i in range(n_tasks)]
        if cfg.phash:
            shards = sorted(set(table["shard"].to_pylist()))
            tasks += [{"shard": f"p{s}", "kind": "phash", "source": s} for s in shards]
        plan = {"digest": digest, "rows": n, "dim": d, "k": k, "tasks": tasks}
        write_json(wd / "plan.json", plan)  # last: its presence says every work file above is complete
        return plan

    def _discard_work(self, ds: DatasetDir) -> None:
        shutil.rmtree(work_dir(ds), ignore_errors=True)
        for sub in (ds.root / "_done" / self.name, ds.root / "stats" / self.name):
            if sub.exists():
                for p in sub.glob("[cp]*.json"):  # task markers; source-shard markers are finalize's
                    p.unlink(missing_ok=True)

    def discard_outputs(self, cfg: DedupConfig, ds: DatasetDir) -> None:
        from curate.runner import discard_stage_outputs

        discard_stage_outputs(ds, self.name)
        shutil.rmtree(work_dir(ds), ignore_errors=True)

    def run_shard(self, cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        if task["kind"] == "phash":
            return self._phash(ds, task)
        from curate import semdedup as sd

        wd = work_dir(ds)
        emb = np.load(wd / "emb.npy", mmap_mode="r")
        ids = np.load(wd / "ids.npy", mmap_mode="r")
        clusters = range(task["lo"], task["hi"])
        res = sd.cluster_pairs(emb, np.asarray(ids), clusters, cfg.threshold)
        arrays = res.arrays()
        members = np.flatnonzero((ids[:, 0] >= clusters.start) & (ids[:, 0] < clusters.stop))
        if cfg.against:
            eval_emb = np.load(wd / "eval_emb.npy", mmap_mode="r")
            sims, _ = sd.max_similarity(emb[members], np.asarray(eval_emb, np.float32), cfg.batch_rows)
            arrays["eval_idx"], arrays["eval_sim"] = members.astype(np.int64), sims
        with atomic_path(task_output(ds, task)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return {"clusters": len(clusters), "rows": int(len(members)), "pairs": int(len(res.i))}

    def _phash(self, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        import io

        import imagehash
        import pyarrow as pa
        from PIL import Image

        from curate.io.shards import iter_samples
        from curate.io.tables import write_table

        samples = _read_samples(ds)
        wanted = set(np.asarray(samples["key"])[np.asarray(samples["shard"]) == task["source"]].tolist())
        keys, hashes = [], []
        for s in iter_samples(ds.shard_tar(task["source"])):
            if s["key"] not in wanted or not s["image"]:
                continue
            try:
                with Image.open(io.BytesIO(s["image"])) as im:
                    h = str(imagehash.phash(im))
            except Exception:  # noqa: BLE001 - an undecodable image has no hash, and no hash match
                continue
            keys.append(s["key"])
            hashes.append(h)
        write_table(task_output(ds, task), pa.table({"key": pa.array(keys, pa.string()),
                                                     "phash": pa.array(hashes, pa.string())}))
        return {"hashed": len(keys)}

    def finalize(self, cfg: DedupConfig, ds: DatasetDir) -> dict[str, Any]:
        wd = work_dir(ds)
        if not (wd / "plan.json").exists():
            return {}
        plan = read_json(wd / "plan.json")
        missing = [t["shard"] for t in plan["tasks"] if not task_output(ds, t).exists()]
        if missing:
            return {"incomplete_tasks": len(missing)}
        return write_signals(cfg, ds, plan, decide(cfg, ds, plan))

    def inputs(self, cfg: DedupConfig) -> dict[str, Any]:
        return {"against": cfg.against} if cfg.against else {}


def task_output(ds: DatasetDir, task: dict[str, Any]) -> Path:
    sub, ext = ("pairs", ".npz") if task["kind"] == "pairs" else ("phash", ".parquet")
    return work_dir(ds) / sub / f"{task['shard']}{ext}"


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _read_samples(ds: DatasetDir) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(work_dir(ds) / "samples.parquet")
    return {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}


# --- finalize: decisions and signal tables -------------------------------------------------------


def decide(cfg: DedupConfig, ds: DatasetDir, plan: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every row's decision arrays (row = position in key order) from the plan's work files."""
    import pyarrow.parquet as pq

    from curate import semdedup as sd

    wd = work_dir(ds)
    s = _read_samples(ds)
    n = plan["rows"]
    results, eval_idx, eval_sim = [], [], []
    for t in plan["tasks"]:
        if t["kind"] != "pairs":
            continue
        with np.load(task_output(ds, t)) as z:
            results.append(sd.PairResult(*(z[f] for f in ("i", "j", "sim", "nn_idx", "nn_sim", "nn_nbr"))))
            if cfg.against:
                eval_idx.append(z["eval_idx"])
                eval_sim.append(z["eval_sim"])
    i, j, _, nn_sim, nn_nbr = sd.merge_pairs(results, n)
    near = np.zeros(n, bool)
    near[i], near[j] = True, True
    ei, ej = sd.equal_value_pairs(s["sha256"])
    exact = np.zeros(n, bool)
    exact[ei], exact[ej] = True, True
    links_i, links_j = [i, ei], [j, ej]
    if cfg.phash:
        key_pos = {k: p for p, k in enumerate(s["key"])}
        hashes = np.full(n, None, dtype=object)
        for t in plan["tasks"]:
            if t["kind"] == "phash":
                pt = pq.read_table(task_output(ds, t)).to_pydict()
                for k, h in zip(pt["key"], pt["phash"], strict=True):
                    hashes[key_pos[k]] = h
        pi, pj = sd.equal_value_pairs(hashes)
        links_i.append(pi)
        links_j.append(pj)
    group = sd.groups(n, np.concatenate(links_i), np.concatenate(links_j))
    centroid_sim = np.load(wd / "centroid_sim.npy")
    kept = sd.kept_rows(group, cfg.keep, s["clip_score"].astype(np.float64), centroid_sim)
    out = {"group": group, "kept": kept, "exact": exact, "near": near, "near_pairs": len(i),
           "nn_sim": nn_sim, "nn_nbr": nn_nbr,
           "cluster": np.load(wd / "ids.npy", mmap_mode="r")[:, 0].astype(np.int32)}
    if cfg.against:
        sim = np.full(n, -np.inf, np.float32)
        if eval_idx:
            sim[np.concatenate(eval_idx)] = np.concatenate(eval_sim)
        eval_sha = set(pq.read_table(wd / "eval_samples.parquet")["sha256"].drop_null().to_pylist())
        same_bytes = np.array([h in eval_sha for h in s["sha256"]], bool)
        out["eval_sim"] = sim
        out["eval_contaminated"] = (sim >= cfg.eval_threshold) | same_bytes
    return out


def write_signals(cfg: DedupConfig, ds: DatasetDir, plan: dict[str, Any], dec: dict[str, np.ndarray]) -> dict[str, Any]:
    """signals/dedup/{shard}.parquet for every scored source shard (rows in key order), each followed by its
    marker; returns the stage counts."""
    import pyarrow as pa

    from curate.io.tables import write_table

    s = _read_samples(ds)
    keys = s["key"].astype(object)
    n = len(keys)
    group = dec["group"]
    is_dup = (group >= 0) & (dec["kept"] != np.arange(n))
    nn_ok = np.isfinite(dec["nn_sim"]) & (dec["nn_nbr"] >= 0)
    nn_key = np.where(nn_ok, keys[np.maximum(dec["nn_nbr"], 0)] if n else keys, None)
    columns = {
        "key": pa.array(keys, pa.string()),
        "exact_dup": pa.array(dec["exact"]),
        "dup_group": pa.array(group, pa.int64()),
        "is_duplicate": pa.array(is_dup),
        "kept_key": pa.array(keys[dec["kept"]] if n else keys, pa.string()),
        "cluster": pa.array(dec["cluster"], pa.int32()),
        "nn_similarity": pa.array(dec["nn_sim"], pa.float32(), mask=~nn_ok),
        "nn_key": pa.array(nn_key, pa.string()),
    }
    if cfg.against:
        esim = dec["eval_sim"]
        columns["eval_contaminated"] = pa.array(dec["eval_contaminated"])
        columns["eval_similarity"] = pa.array(esim, pa.float32(), mask=~np.isfinite(esim))
    else:
        columns["eval_contaminated"] = pa.array(np.zeros(n, bool))
        columns["eval_similarity"] = pa.nulls(n, pa.float32())
    table = pa.table(columns)
    shard_col = s["shard"]
    for shard in ds.done_shards("score"):
        part = table.filter(pa.array(shard_col == shard)) if n else table
        write_table(ds.signals("dedup", shard), part)
        write_json(ds.marker("dedup", shard), {"shard": shard, "stats": {"rows": part.num_rows}})
    counts = {
        "rows": n, "clusters": plan["k"],
        "exact_duplicates": int(dec["exact"].sum()),  # rows sharing their sha256 with another row
        "near_duplicate_pairs": int(dec["near_pairs"]),
        "near_duplicates": int(dec["near"].sum()),  # rows in at least one near pair
        "groups": int(group.max() + 1) if n and group.max() >= 0 else 0,
        "duplicates": int(is_dup.sum()),
    }
    if cfg.against:
        counts["eval_contaminated"] = int(dec["eval_contaminated"].sum())
    return counts


STAGE = DedupStage()
