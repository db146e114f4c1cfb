"""Stage "target": DataComp's image-based filtering (Gadre et al. 2023, Sec. 3.4): keep the pool samples whose
image embeddings fall in the k-means clusters nearest to a target set's images.

plan() (driver): spherical k-means (faiss) on a seeded sample of the pool's image embeddings (the sample is
drawn by a hash of key and seed, so it does not depend on shard layout, and holds about 256 rows per
cluster, at most --sample rows: DataComp also clustered a sample of its larger pools); then the target dataset's embeddings, read shard by shard, each pick their nearest centroid; the
union of those clusters is the selected set (at most k ids). Tasks (one per scored pool shard) assign each
sample to its nearest centroid and write signals/target/{shard}.parquet:

    key, cluster, similarity (cosine to that centroid), selected (cluster is in the selected set)

Export's samples view prefixes the columns (`target_selected`), so the policy is a plain predicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from curate.config import output_fields, runtime
from curate.errors import InputError
from curate.io import manifest
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.options import absolute, at_least, option, parse_k
from curate.stages.base import Stage, sum_stats
from curate.stages.dedup import core as sd
from curate.stages.dedup import input_digest

log = logging.getLogger(__name__)

NAME = "target"
PLAN_VERSION = 2  # 2: the sample is drawn by a vectorised key hash (curate.stages.dedup.core.key_hash)
POINTS_PER_CLUSTER = 256  # k-means training rows per cluster (faiss's own default cap)


@dataclass(frozen=True)
class TargetConfig:
    target: str = option(  # the target dataset dir (absolute path), scored with the same model as the pool
        convert=absolute, click_type=click.Path(exists=True, file_okay=False),
        help="A scored dataset dir of target images (e.g. a trusted seed set; DataComp used ImageNet's training "
             "images), embedded with the same model as DATASET. Not your evaluation set.")
    k: int = option(0, cli_type=str, cli_default="auto", convert=parse_k,
                    help="k-means clusters of the pool's image embeddings, or 'auto' (about 2 sqrt(N), at least 40 "
                         "samples each). DataComp used 100,000 for pools of 12.8M to 12.8B.")
    seed: int = option(0, help="k-means sample and init seed.")
    niter: int = option(20, help="k-means iterations.")
    sample: int = option(1_000_000,  # the driver holds them: 3 GB at 768-d
                         help="At most this many pool samples (a seeded sample, ~256 per cluster) train the k-means; "
                              "the driver holds them in memory (about 3 GB at 768-d).")
    batch_rows: int = runtime(65536)


def check_config(cfg: TargetConfig) -> None:
    if cfg.k < 0:
        raise InputError("--k: must be 'auto' or a positive number of clusters")
    at_least("--niter", cfg.niter, 1)
    at_least("--sample", cfg.sample, 1)
    if not Path(cfg.target).is_dir():
        raise InputError(f"--target: {cfg.target} is not a directory")


def work_dir(ds: DatasetDir) -> Path:
    return ds.work(NAME)


def check_same_model(pool: DatasetDir, target: DatasetDir) -> None:
    """Embeddings of two models are not comparable even when their dimensions agree: refuse the mix."""
    def model(ds: DatasetDir) -> tuple[Any, Any] | None:
        cfg = manifest.load(ds)["stages"].get("score", {}).get("config") or {}
        return (cfg.get("model"), cfg.get("pretrained")) if "model" in cfg else None

    a, b = model(pool), model(target)
    if a is not None and b is not None and a != b:
        raise InputError(f"--target {target.root}: scored with model {b[0]} / {b[1]}, but {pool.root} with "
                         f"{a[0]} / {a[1]}; score both with the same model")


def validate(cfg: TargetConfig, ds: DatasetDir) -> None:
    """Every check that needs no clustering, so a bad --target stops before any earlier output is touched."""
    check_config(cfg)
    target = DatasetDir.at(cfg.target)
    _scored_shards(ds, "")
    _scored_shards(target, "--target ")
    check_same_model(ds, target)


def _unit_draw(seed: int, keys: np.ndarray) -> np.ndarray:
    """A uniform draw in [0, 1) per key, from a 64-bit hash of (key, seed): vectorised, no per-row Python."""
    return (sd.key_hash(keys, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _scored_rows(ds: DatasetDir, shard: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys as bytes, emb_row) of the shard's scored rows with an embedding, from the score table alone."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ds.signals("score", shard)
    try:
        t = pq.read_table(path, columns=["key", "scored", "emb_row"])
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: unreadable score table ({e})") from None
    t = t.filter(pc.fill_null(pc.and_(t["scored"], pc.greater_equal(t["emb_row"], 0)), False))
    keys = np.asarray(t["key"].to_numpy(zero_copy_only=False)).astype("S") if t.num_rows else np.zeros(0, "S1")
    return keys, t["emb_row"].to_numpy().astype(np.int64)


def shard_embeddings(ds: DatasetDir, shard: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(keys with an embedding, their embeddings (memory-mapped rows, float16), every scored-table key)."""
    import pyarrow.parquet as pq

    path = ds.signals("score", shard)
    emb_path = ds.signals("score", shard, ".img_emb.npy")
    try:
        t = pq.read_table(path, columns=["key", "scored", "emb_row"]).to_pydict()
        emb = np.load(emb_path, mmap_mode="r")
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: unreadable score table or embeddings ({e})") from None
    rows = [(k, r) for k, s, r in zip(t["key"], t["scored"], t["emb_row"], strict=True) if s and r is not None and r >= 0]
    if rows and (emb.ndim != 2 or max(r for _, r in rows) >= emb.shape[0]):
        raise InputError(f"{emb_path}: shape {emb.shape} does not hold the emb_row values of {path}")
    keys = [k for k, _ in rows]
    idx = np.asarray([r for _, r in rows], dtype=np.int64)
    return keys, (emb[idx] if len(idx) else np.zeros((0, emb.shape[1] if emb.ndim == 2 else 0), np.float16)), list(t["key"])


def _scored_shards(ds: DatasetDir, flag: str) -> list[str]:
    shards = ds.done_shards("score")
    if not shards:
        raise InputError(f"{flag}{ds.root / 'signals' / 'score'}: no scored shards (no _done/score markers); "
                         f"run `curate score` first")
    return shards


def nearest(emb: np.ndarray, centroids: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (by cosine: rows and centroids are unit vectors) of every row: (ids, cosines)."""
    if not len(emb):
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    ids, sims = sd.assign(emb, centroids, 1, batch)
    return ids[:, 0], sims[:, 0]


class TargetStage(Stage):
    name = NAME
    config_cls = TargetConfig

    def validate(self, cfg: TargetConfig, ds: DatasetDir) -> None:
        validate(cfg, ds)

    def fingerprint_inputs(self, cfg: TargetConfig, ds: DatasetDir) -> dict[str, Any]:
        return {"dataset": input_digest(ds), "target": input_digest(DatasetDir.at(cfg.target))}

    def plan(self, cfg: TargetConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        validate(cfg, ds)
        target = DatasetDir.at(cfg.target)
        shards = _scored_shards(ds, "")
        digest = {"config": output_fields(cfg), "pool": input_digest(ds), "target": input_digest(target),
                  "version": PLAN_VERSION}
        plan_path = work_dir(ds) / "plan.json"
        if not (plan_path.exists() and read_json(plan_path).get("digest") == digest):
            ds.discard(self.name)  # centroids changed: no assignment may be reused
            self._build(cfg, ds, target, shards, digest)
        return [{"shard": s} for s in shards]

    def _build(self, cfg: TargetConfig, ds: DatasetDir, target: DatasetDir, shards: list[str],
               digest: dict[str, Any]) -> None:
        """Centroids from a seeded sample of the pool, then the clusters nearest to the target's images."""
        n = 0
        for s in shards:  # a first pass over the score tables only (no embeddings), to size the sample
            n += len(_scored_rows(ds, s)[0])
        if n == 0:
            raise InputError(f"{ds.root}: no scored samples with an image embedding")
        k = min(cfg.k, n) if cfg.k else sd.choose_k(n)  # an explicit k is honoured down to one row a cluster
        rate = min(1.0, min(k * POINTS_PER_CLUSTER, cfg.sample) / n)
        drawn_keys = []  # a second pass over the key columns: the drawn keys only
        for s in shards:
            sk = _scored_rows(ds, s)[0]
            drawn_keys.append(sk[_unit_draw(cfg.seed, sk) < rate])
        # each drawn row's place in key order (shard layout does not matter): the sample is filled in place,
        # one float32 array of the sample's size, never a list of parts and their concatenations
        place = np.empty(sum(len(x) for x in drawn_keys), np.int64)
        place[np.argsort(np.concatenate(drawn_keys) if drawn_keys else np.zeros(0, "S1"), kind="stable")] = \
            np.arange(len(place))
        sample, at, dim = None, 0, 0
        for s in shards:  # a last pass: only the drawn rows' embeddings are read
            sk, rows = _scored_rows(ds, s)
            pick = np.flatnonzero(_unit_draw(cfg.seed, sk) < rate)
            emb = np.load(ds.signals("score", s, ".img_emb.npy"), mmap_mode="r")
            if len(pick) and (emb.ndim != 2 or rows[pick].max() >= emb.shape[0]):
                raise InputError(f"{ds.signals('score', s, '.img_emb.npy')}: shape {emb.shape} does not hold the "
                                 f"emb_row values of {ds.signals('score', s)}")
            if sample is None and emb.ndim == 2:
                dim = emb.shape[1]
                sample = np.empty((len(place), dim), np.float32)
            if len(pick):
                o = np.argsort(rows[pick], kind="stable")  # read front to back through the memory map
                sample[place[at + o]] = emb[rows[pick][o]]
            at += len(pick)
        sample = sample if sample is not None else np.zeros((0, dim), np.float32)
        dim = sample.shape[1]
        log.info("target: %d pool rows, k-means with %d clusters on %d sampled rows", n, k, len(sample))
        centroids = sd.train_centroids(sample, k, cfg.seed, niter=cfg.niter,
                                       points_per_centroid=POINTS_PER_CLUSTER) if len(sample) > k else \
            np.ascontiguousarray(sample / np.linalg.norm(sample, axis=1, keepdims=True), np.float32)
        hits: dict[int, int] = {}
        images = 0
        for s in _scored_shards(target, "--target "):
            _, temb, _ = shard_embeddings(target, s)
            if len(temb) and temb.shape[1] != dim:
                raise InputError(f"--target {target.root}: embedding dimension {temb.shape[1]}, the pool's is {dim}")
            ids, _ = nearest(temb, centroids, cfg.batch_rows)
            images += len(ids)
            for c in ids.tolist():
                hits[c] = hits.get(c, 0) + 1
        if not images:
            raise InputError(f"--target {target.root}: no scored images with an embedding")
        wd = work_dir(ds)
        with atomic_path(wd / "centroids.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, centroids, allow_pickle=False)
        selected = sorted(hits)
        write_json(wd / "plan.json", {  # last: its presence says the centroids above are complete
            "digest": digest, "rows": n, "k": int(len(centroids)), "sampled": int(len(sample)),
            "target_images": images, "selected": selected, "target_per_cluster": {str(c): hits[c] for c in selected},
        })

    def run_shard(self, cfg: TargetConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        from curate.io.tables import write_table

        wd = work_dir(ds)
        plan = read_json(wd / "plan.json")
        centroids = np.load(wd / "centroids.npy")
        selected = np.asarray(plan["selected"], np.int64)
        keys, emb, all_keys = shard_embeddings(ds, task["shard"])
        ids, sims = nearest(emb, centroids, cfg.batch_rows)
        pos = {k: i for i, k in enumerate(keys)}
        order = sorted(all_keys)
        at = np.asarray([pos.get(k, -1) for k in order], np.int64)
        has = at >= 0
        cluster = np.where(has, ids[np.maximum(at, 0)] if len(ids) else 0, 0)
        sim = np.where(has, sims[np.maximum(at, 0)] if len(sims) else 0, 0)
        chosen = has & np.isin(cluster, selected)
        write_table(ds.signals(NAME, task["shard"]), pa.table({
            "key": pa.array(order, pa.string()),
            "cluster": pa.array(cluster.astype(np.int32), pa.int32(), mask=~has),
            "similarity": pa.array(sim.astype(np.float32), pa.float32(), mask=~has),
            "selected": pa.array(chosen),
        }))
        return {"rows": len(order), "assigned": int(has.sum()), "selected": int(chosen.sum())}

    def finalize(self, cfg: TargetConfig, ds: DatasetDir) -> dict[str, Any]:
        plan_path = work_dir(ds) / "plan.json"
        if not plan_path.exists():
            return {}
        plan = read_json(plan_path)
        counts = {k: v for k, v in sum_stats(ds, NAME).items()}
        return {**counts, "clusters": plan["k"], "selected_clusters": len(plan["selected"]),
                "target_images": plan["target_images"], "sampled": plan["sampled"]}

    def inputs(self, cfg: TargetConfig) -> dict[str, Any]:
        return {"target": cfg.target}


STAGE = TargetStage()
