"""Stage "index": a FAISS index over a scored dataset's image (and, when saved, text) embeddings.

The index kind is chosen by size, the way autofaiss does: an exact inner-product Flat index under
`exact_below` rows; above it an IVF index whose lists hold float16 vectors (exact distances inside the
probed lists) when they fit the memory budget, else IVF with product quantization sized to the budget.
plan() (driver) writes the id -> key table and trains the index on a seeded sample; each task encodes one
scored shard's vectors with the trained index (its part: the codes the index stores); finalize() adds the
parts' codes in id order, one part at a time, picks the
cheapest nprobe (and, for IVF-PQ, rerank depth) that reaches `target_recall` against brute force for each
kind of query a user sends (below),
writes the id-ordered row store (curate/search/rowstore.py) and writes index.json last.

Query kinds: an *image* query (an image file, or a sample's own vector: `--key`) sits inside the indexed
image clusters, while a *text* query (a caption through the text tower) sits across the modality gap and needs
many more lists probed for the same recall. Each modality's index is therefore tuned twice: on held-out rows'
image embeddings and on their caption embeddings when the scorer saved them, else on weakly aligned probes
(cosine TEXT_LIKE_COSINE to a held-out row, what a CLIP caption is to its image); index.json keeps both
settings and the searcher picks one by the query's encoder.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.config import output_fields, runtime
from curate.errors import InputError
from curate.hashing import json_digest
from curate.io import manifest
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.lineage import marker_identity, require_current
from curate.machine import release_free_heap, sql_memory_limit
from curate.options import option
from curate.search.rowstore import is_current, write_row_store

log = logging.getLogger(__name__)

INDEX_DIR = "index"
PLAN_VERSION = 3  # 2: ids.parquet one row group per shard, tasks read theirs; 3: parts hold codes
MODALITIES = {"image": ".img_emb.npy", "text": ".txt_emb.npy"}
KINDS = ("auto", "flat", "ivf-fp16", "ivf-pq")
PQ_CODE_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per vector tried, largest (most accurate) first
RECALL_K = 10
QUERY_KINDS = ("image", "text")  # the encoder a query vector came from
# PQ distances are approximate: an IVF-PQ search takes this many candidates and reranks them by their exact
# cosine, read from the score stage's embedding files (memory-mapped, so they stay on disk). Text queries need
# the depth: their top 10 sit among many near-ties that 64-byte codes cannot order (200k x 512, IVF1024,PQ64,
# text-like probes: recall@10 plateaus at 0.965 with 200 candidates, 0.995 with 500)
REFINE_DEPTH = 500
# ...and the depth grows with N (more near-ties): tuning tries these and keeps the cheapest (nprobe, depth) pair
# that reaches the target, a reranked row counted as ROW_COST scanned codes (a positional read, ~17 us, against
# ~60 ns a PQ64 code on 2 cores)
REFINE_DEPTHS = (500, 1000, 2000, 4000)
ROW_COST = 300
TEXT_LIKE_COSINE = 0.3  # a CLIP caption's cosine to its own image, roughly: the weakly aligned probes' cosine
ROW_STORE_SQL_CAP = 512 << 20  # DuckDB's memory limit for the row store's query, at most (curate.machine)
PLATEAU_STEPS, PLATEAU_GAIN = 3, 0.002  # tuning stops when 3 more nprobe steps gain under 0.002 recall
NLIST_PER_SQRT_N, MAX_AUTO_NLIST = 4, 8192  # auto IVF lists: 4 sqrt(N), capped so k-means (64 points a list) stays affordable
# From this many lists the coarse centroids are trained in two levels (k-means into ~sqrt(nlist) groups, then
# each group into its share of the lists): one k-means over nlist centroids costs O(sample x nlist) a pass,
# 8,192 lists on 524,288 rows about 25 s a pass on 2 cores; two levels cost O(sample x 2 sqrt(nlist)).
TWO_LEVEL_FROM = 2048
KMEANS_NITER = 20
REFINE_PASSES = 2  # Lloyd passes over the whole sample after the two levels (each one assignment to nlist)
# rows converted to float32 at once while training, tuning and computing ground truth: 8,192 x 512 is 16 MB
CHUNK_ROWS = 8192
ENCODER_TRAIN_ROWS = 65536  # what faiss's PQ training samples anyway (256 points for each of 256 centroids)


def _bytes(text: str) -> int:
    return parse_bytes(text)  # defined below, with the other size helpers


@dataclass(frozen=True)
class IndexConfig:
    scorer: str = option("score", help="The score stage whose embeddings (signals/NAME/) are indexed.")
    kind: str = option("auto", choices=KINDS,
                       help="auto: exact Flat under --exact-below rows; above, IVF with float16 lists when they fit "
                            "--memory-budget, else IVF with product quantization sized to it.")
    memory_budget: int = option(4 << 30, cli_type=str, cli_default="4G", convert=_bytes,  # bytes
                                help="Memory one modality's index may take (e.g. 512M, 4G).")
    exact_below: int = option(100_000, help="Rows under which the index is exact (brute force).")
    nlist: int = option(0, help="IVF lists (0: a power of two near 4 sqrt(N), at most 8192).")
    train_size: int = option(0, help="Rows of the seeded training sample (0: 64 per IVF list).")
    target_recall: float = option(0.97, help="recall@10 against brute force the chosen nprobe must reach, for "
                                             "image queries (held-out rows) and for text queries (their captions, "
                                             "else weakly aligned probes) alike.")
    queries: int = option(256, help="Held-out rows for the recall estimate.")
    text: bool = option(True, help="Also index text embeddings when the scorer saved them (--save-text-embeddings).")
    seed: int = option(0, help="Seed of the training sample and the held-out queries.")
    batch_rows: int = runtime(65536)


def check_config(cfg: IndexConfig) -> None:
    if cfg.kind not in KINDS:
        raise InputError(f"--kind: '{cfg.kind}' (choose {', '.join(KINDS)})")
    if cfg.memory_budget <= 0:
        raise InputError("--memory-budget: must be positive")
    if cfg.nlist < 0 or cfg.train_size < 0 or cfg.exact_below < 0:
        raise InputError("--nlist/--train-size/--exact-below: must be 0 or more")
    if not 0.0 < cfg.target_recall <= 1.0:
        raise InputError(f"--target-recall: {cfg.target_recall} is not in (0, 1]")
    if cfg.queries < 1:
        raise InputError("--queries: must be at least 1")


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "KMGT" else t) * mult
    except ValueError:
        raise InputError(f"--memory-budget: '{text}' is not a size such as 4G, 512M or 1000000") from None
    if value <= 0:
        raise InputError(f"--memory-budget: '{text}' must be positive")
    return int(value)


def index_dir(ds: DatasetDir) -> Path:
    return ds.root / INDEX_DIR


# --- choosing the index ------------------------------------------------------------------------------


def auto_nlist(n: int) -> int:
    """A power of two near 4 sqrt(N) (at most MAX_AUTO_NLIST), with at least ~39 training points per list
    (faiss's k-means minimum). Text queries sit across the modality gap, so their true neighbours spread
    over many lists: finer lists let them reach the recall target scanning fewer vectors (at 1M rows, 4,096
    lists of ~250 scan fewer vectors for recall@10 0.95 than 1,024 lists of ~1,000), for a training cost
    (64 points per list) that still fits a small machine."""
    if n < 2:
        return 1
    nlist = 2 ** round(math.log2(NLIST_PER_SQRT_N * math.sqrt(n)))
    return int(max(1, min(nlist, n // 39 or 1, MAX_AUTO_NLIST)))


def choose_index(n: int, d: int, cfg: IndexConfig) -> dict[str, Any]:
    """{kind, factory, nlist, bytes}: the index for n vectors of dimension d under cfg (autofaiss's rule)."""
    kind = cfg.kind
    if kind == "auto":
        kind = "flat" if n < cfg.exact_below else "ivf-fp16" if n * (2 * d + 8) <= cfg.memory_budget else "ivf-pq"
    if kind == "flat":
        return {"kind": "flat", "factory": "Flat", "nlist": 0, "bytes": n * d * 4}
    nlist = cfg.nlist or auto_nlist(n)
    if kind == "ivf-fp16":
        return {"kind": kind, "factory": f"IVF{nlist},SQfp16", "nlist": nlist, "bytes": n * (2 * d + 8)}
    fits = [m for m in PQ_CODE_SIZES if d % m == 0 and n * (m + 8) <= cfg.memory_budget]
    if not fits:
        raise InputError(f"--memory-budget: {cfg.memory_budget} bytes cannot hold {n} vectors even as "
                         f"{min(PQ_CODE_SIZES)}-byte PQ codes plus ids; raise it")
    m = fits[0]
    return {"kind": "ivf-pq", "factory": f"IVF{nlist},PQ{m}", "nlist": nlist, "bytes": n * (m + 8),
            "refine": REFINE_DEPTH}


# --- inputs ----------------------------------------------------------------------------------------


def input_digest(ds: DatasetDir, scorer: str) -> dict[str, Any]:
    """The scorer's fingerprint, each scored shard's file sizes and the identity of each score run (its
    marker, curate.io.lineage): a rescored dataset, or one shard scored again, is another input. Score
    output computed from a download that changed since is refused (run score first)."""
    require_current(ds, scorer, "index")
    entry = manifest.load(ds)["stages"].get(scorer, {})
    files = {}
    for shard in ds.done_shards(scorer):
        paths = [ds.signals(scorer, shard)] + [ds.signals(scorer, shard, s) for s in MODALITIES.values()]
        files[shard] = [p.stat().st_size if p.exists() else None for p in paths]
        files[shard].append(marker_identity(ds, scorer, shard))
    return {"scorer": scorer, "fingerprint": entry.get("fingerprint"), "shards": len(files),
            "files_sha256": json_digest(files)}


def shard_ids(ds: DatasetDir, scorer: str, shard: str) -> Any:
    """One shard's part of the id table (key, shard, emb_row): its scored rows with an embedding, emb_row
    ascending. The id table is these parts, shards in order (ids = row positions)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ds.signals(scorer, shard)
    try:
        t = pq.read_table(path, columns=["key", "scored", "emb_row"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise InputError(f"{path}: unreadable score table or missing column ({e})") from None
    t = t.filter(pc.and_(pc.fill_null(t["scored"], False), pc.greater_equal(t["emb_row"], 0)))
    t = t.sort_by("emb_row")
    return pa.table({"key": t["key"].cast(pa.string()), "shard": pa.array([shard] * t.num_rows, pa.string()),
                     "emb_row": t["emb_row"].cast(pa.int64())})


def write_ids(ds: DatasetDir, scorer: str, path: Path) -> list[dict[str, Any]]:
    """ids.parquet written shard by shard, one row group per non-empty shard (a task reads only its own):
    returns the tasks [{shard, lo, n, row_group}]. Holds one shard's ids at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = ds.done_shards(scorer)
    if not shards:
        raise InputError(f"{ds.root / 'signals' / scorer}: no scored shards (no _done/{scorer} markers); "
                         f"run `curate score` first")
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("emb_row", pa.int64())])
    tasks, lo, group = [], 0, 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for shard in shards:
            t = shard_ids(ds, scorer, shard)
            task = {"shard": shard, "lo": lo, "n": t.num_rows, "row_group": -1}
            if t.num_rows:
                w.write_table(t, row_group_size=t.num_rows)
                task["row_group"] = group
                group += 1
            tasks.append(task)
            lo += t.num_rows
    return tasks


def distinct_ids(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`size` distinct ids of range(n) in random order, in O(size) memory (numpy's choice without
    replacement permutes all n once size passes n/50)."""
    if size * 2 >= n:
        return rng.permutation(n)[:size]
    got = np.zeros(0, np.int64)
    while len(got) < size:
        got = np.unique(np.r_[got, rng.integers(0, n, size=size - len(got) + 64)])
    return rng.permutation(got)[:size]


class IdMap:
    """Index id -> (shard, emb_row) through the plan's per-shard ranges and ids.parquet's row groups: a
    lookup reads only the row groups of the shards it touches, never the whole id table."""

    def __init__(self, path: Path, tasks: list[dict[str, Any]], cache: bool = False):
        self.path = path
        self.tasks = [t for t in tasks if t["n"]]
        self.lo = np.array([t["lo"] for t in self.tasks], np.int64)
        # tuning reads the same shards' rows again and again: their emb_row column kept (4 bytes an id, or only its
        # length when it is 0, 1, 2, ... as the score stage writes it)
        self._cache: dict[int, np.ndarray | int] | None = {} if cache else None

    def emb_rows(self, i: int) -> np.ndarray:
        import pyarrow.parquet as pq

        if self._cache is not None and i in self._cache:
            got = self._cache[i]
            return np.arange(got) if isinstance(got, int) else got
        t = self.tasks[i]
        pf = pq.ParquetFile(self.path)
        rows = pf.read_row_group(t["row_group"], columns=["emb_row"])["emb_row"].to_numpy()
        if self._cache is not None:
            if np.array_equal(rows, np.arange(len(rows))):  # the usual case: kept as a length, not 4 bytes an id
                self._cache[i] = len(rows)
            else:
                self._cache[i] = rows.astype(np.int32) if rows.size and rows.max() < 2 ** 31 else rows
        return rows

    def by_shard(self, ids: np.ndarray) -> Any:
        """(shard, positions into `ids`, emb_row of those ids) for every shard holding some of `ids`."""
        ids = np.asarray(ids, np.int64)
        part = np.searchsorted(self.lo, ids, side="right") - 1
        if len(ids) and (ids.min() < 0 or ids.max() >= self.lo[-1] + self.tasks[-1]["n"]):
            raise InputError(f"{self.path}: an index id outside the id table")
        for i, sel in grouped(part):
            yield self.tasks[i]["shard"], sel, self.emb_rows(i)[ids[sel] - self.lo[i]]

    def shards(self) -> Any:
        """(shard, emb_row of each of its ids) in id order, one shard at a time."""
        for i, t in enumerate(self.tasks):
            yield t["shard"], self.emb_rows(i)


def grouped(codes: np.ndarray) -> Any:
    """(code, positions of it in `codes`, ascending) for each distinct code, ascending: one sort, not a pass
    over every position for each code."""
    order = np.argsort(codes, kind="stable")
    groups, starts = np.unique(codes[order], return_index=True)
    return zip(groups.tolist(), np.split(order, starts[1:]), strict=True)


def open_embeddings(ds: DatasetDir, scorer: str, shard: str, modality: str) -> np.ndarray:
    path = ds.signals(scorer, shard, MODALITIES[modality])
    try:
        emb = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable embeddings ({e})") from None
    if emb.ndim != 2:
        raise InputError(f"{path}: shape {emb.shape} is not (rows, dim)")
    return emb


def gather(ds: DatasetDir, scorer: str, modality: str, idmap: IdMap, positions: np.ndarray,
           dtype: Any = np.float32) -> np.ndarray:
    """Vectors of the ids at `positions` (any order), read shard by shard from the memory maps."""
    out: np.ndarray | None = None
    for shard, sel, rows in idmap.by_shard(positions):
        emb = open_embeddings(ds, scorer, shard, modality)
        if out is None:
            out = np.zeros((len(positions), emb.shape[1]), dtype)
        o = np.argsort(rows)
        out[sel[o]] = emb[rows[o]]
    return out if out is not None else np.zeros((0, 0), dtype)


def train_index(index: Any, draw: Callable[[], np.ndarray], nlist: int, seed: int) -> str:
    """Train `index` on the sample `draw()` returns (float16 rows, kept so: the float32 copies are one group or
    one slice at a time); returns how the coarse centroids were trained. The sample is drawn here so that this
    function holds its only reference and frees it before the encoder's training (10M rows: 537 MB of
    sample, then 134 MB of encoder rows and their residuals). Under TWO_LEVEL_FROM lists faiss trains it all;
    from there the coarse centroids come from two_level_kmeans and faiss trains only the encoder (PQ codes
    on residuals, on at most ENCODER_TRAIN_ROWS rows). PQ's polysemous training (a code-ordering for
    Hamming-distance filtering, which this index never uses) is switched off: about a minute for 10k rows."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    sample = draw()
    if nlist < TWO_LEVEL_FROM:
        index.train(np.asarray(sample, np.float32))
        return "k-means"
    ivf.quantizer.add(two_level_kmeans(sample, nlist, seed))
    rows = np.random.default_rng(seed).permutation(len(sample))[:ENCODER_TRAIN_ROWS]
    encoder_rows = np.asarray(sample[np.sort(rows)], np.float32)
    del sample  # the only reference: freed before faiss computes the residuals
    index.train(encoder_rows)  # the quantizer is complete: the encoder only
    return "two-level k-means"


def two_level_kmeans(x: np.ndarray, nlist: int, seed: int, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """`nlist` unit centroids of the rows of x (spherical k-means, as faiss's IVF trains for inner product),
    in two levels: k-means into round(sqrt(nlist)) groups on a subsample, every row assigned to its group,
    then each group split into a share of nlist proportional to its size (so every list gets about as many
    training rows). Holds float32 copies of one group or one chunk at a time."""
    import faiss

    d = x.shape[1]
    nc1 = max(1, round(math.sqrt(nlist)))
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.permutation(len(x))[:256 * nc1])
    top = faiss.Kmeans(d, nc1, niter=KMEANS_NITER, spherical=True, seed=seed, max_points_per_centroid=256)
    top.train(np.asarray(x[sub], np.float32))
    group = np.concatenate([top.index.search(np.asarray(x[s:s + chunk], np.float32), 1)[1][:, 0]
                            for s in range(0, len(x), chunk)])
    sizes = np.bincount(group, minlength=nc1)
    share = np.diff(np.r_[0, np.cumsum(sizes) * nlist // len(x)])  # sums to nlist; each at most its group's size
    order = np.argsort(group, kind="stable")
    out, start = [], 0
    for g in range(nc1):
        rows = np.sort(order[start:start + sizes[g]])
        start += sizes[g]
        if share[g] == 0:
            continue
        xg = np.asarray(x[rows], np.float32)
        if share[g] == 1:
            c = xg.mean(axis=0, keepdims=True)
            out.append(c / max(float(np.linalg.norm(c)), 1e-12))
            continue
        km = faiss.Kmeans(d, int(share[g]), niter=KMEANS_NITER, spherical=True, seed=seed + g,
                          max_points_per_centroid=256)
        km.train(xg)
        out.append(km.centroids)
    centroids = np.ascontiguousarray(np.concatenate(out), np.float32)
    for _ in range(REFINE_PASSES):  # the groups were split apart: a few passes over all lists mend the borders
        centroids = lloyd_pass(x, centroids, chunk)
    return centroids


def lloyd_pass(x: np.ndarray, centroids: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """One spherical k-means pass: each row to its nearest centroid, each centroid to its rows' normalised
    mean (one with no rows stays). x is read in float32 chunks."""
    import faiss

    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(centroids)
    sums = np.zeros(centroids.shape, np.float64)
    for s in range(0, len(x), chunk):
        xc = np.asarray(x[s:s + chunk], np.float32)
        a = flat.search(xc, 1)[1][:, 0]
        order = np.argsort(a, kind="stable")
        lists, starts = np.unique(a[order], return_index=True)
        sums[lists] += np.add.reduceat(xc[order], starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.ascontiguousarray(np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids), np.float32)


# --- the stage -------------------------------------------------------------------------------------


class IndexStage:
    name = "index"
    config_cls = IndexConfig

    def plan(self, cfg: IndexConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        check_config(cfg)
        wd = index_dir(ds)
        digest = {"inputs": input_digest(ds, cfg.scorer), "config": output_fields(cfg), "version": PLAN_VERSION}
        plan_path = wd / "plan.json"
        if plan_path.exists() and read_json(plan_path).get("digest") == digest:
            plan = read_json(plan_path)
        else:
            # another (or a half-written) plan: none of its parts may be reused
            self._discard(ds)
            plan = self._build(cfg, ds, digest)
        for t in plan["tasks"]:  # a marker without its part file means the task must run again
            if not all(part_path(ds, t["shard"], m).exists() for m in plan["modalities"]):
                ds.marker(self.name, t["shard"]).unlink(missing_ok=True)
        return plan["tasks"]

    def _build(self, cfg: IndexConfig, ds: DatasetDir, digest: dict[str, Any]) -> dict[str, Any]:
        """ids.parquet (streamed shard by shard), the trained index on a seeded sample, the held-out queries:
        O(shards + sample) memory, never the whole id table."""
        import faiss

        wd = index_dir(ds)
        tasks = write_ids(ds, cfg.scorer, wd / "ids.parquet")
        n = sum(t["n"] for t in tasks)
        if n == 0:
            raise InputError(f"{ds.root}: no scored samples with embeddings to index")
        idmap = IdMap(wd / "ids.parquet", tasks)
        modalities = self._modalities(cfg, ds)
        d = open_embeddings(ds, cfg.scorer, idmap.tasks[0]["shard"], "image").shape[1]
        choice = choose_index(n, d, cfg)
        n_queries = min(cfg.queries, max(1, n // 10)) if n > 1 else 1
        train_n = (cfg.train_size or 64 * choice["nlist"]) if choice["nlist"] else 0  # Flat needs no training
        # held-out queries, then the training sample: distinct ids drawn without a permutation of all n
        rng = np.random.default_rng(cfg.seed)
        if n > n_queries:
            drawn = distinct_ids(rng, n, n_queries + min(train_n, n - n_queries))
            queries, train = np.sort(drawn[:n_queries]), np.sort(drawn[n_queries:])
        else:  # one row: it is the query and, for an IVF index, the whole training set
            queries, train = np.arange(n), np.arange(n)[:train_n]
        coarse = ""
        for m in modalities:
            index = faiss.index_factory(d, choice["factory"], faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                t0 = time.time()
                # the sample stays float16 (as stored): 524,288 x 512 is 0.5 GB, not 1 GB
                coarse = train_index(index, lambda m=m: gather(ds, cfg.scorer, m, idmap, train, np.float16),
                                     choice["nlist"], cfg.seed)
                log.info("index: trained %s %s on %d rows (%s) in %.1fs", m, choice["factory"], len(train), coarse,
                         time.time() - t0)
            _write_index(wd / f"trained-{m}.faiss", index)
            del index
            release_free_heap()  # the sample's float32 copies and the training's buffers
        _save(wd / "queries.npy", queries.astype(np.int64))
        plan = {"digest": digest, "rows": n, "dim": d, **choice, "modalities": modalities, "tasks": tasks,
                "train_rows": int(len(train)), "coarse_training": coarse}
        write_json(wd / "plan.json", plan)  # last: its presence says every file above is complete
        return plan

    def _modalities(self, cfg: IndexConfig, ds: DatasetDir) -> list[str]:
        """image, plus text when every scored shard saved text embeddings row-aligned with the image ones."""
        out = ["image"]
        if cfg.text:
            shards = ds.done_shards(cfg.scorer)
            paths = [ds.signals(cfg.scorer, s, MODALITIES["text"]) for s in shards]
            if paths and all(p.exists() for p in paths):
                out.append("text")
        return out

    def _discard(self, ds: DatasetDir) -> None:
        shutil.rmtree(index_dir(ds), ignore_errors=True)
        for sub in (ds.root / "_done" / self.name, ds.root / "stats" / self.name):
            shutil.rmtree(sub, ignore_errors=True)

    def discard_outputs(self, cfg: IndexConfig, ds: DatasetDir) -> None:
        self._discard(ds)

    def run_shard(self, cfg: IndexConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        import faiss
        import pyarrow.parquet as pq

        wd = index_dir(ds)
        plan = read_json(wd / "plan.json")
        # this shard's row group of the id table only
        rows = pq.ParquetFile(wd / "ids.parquet").read_row_group(task["row_group"], columns=["emb_row"])[
            "emb_row"].to_numpy() if task["n"] else np.zeros(0, np.int64)
        if len(rows) != task["n"]:
            raise InputError(f"{wd / 'ids.parquet'}: row group {task['row_group']} holds {len(rows)} ids of "
                             f"{task['shard']}, the plan says {task['n']}")
        (wd / "index.json").unlink(missing_ok=True)  # the merged index no longer holds every part as it is
        for m in plan["modalities"]:
            index = faiss.read_index(str(wd / f"trained-{m}.faiss"))
            emb = open_embeddings(ds, cfg.scorer, task["shard"], m)
            if len(rows) and int(rows.max()) >= emb.shape[0]:
                raise InputError(f"{ds.signals(cfg.scorer, task['shard'], MODALITIES[m])}: {emb.shape[0]} rows, "
                                 f"the score table names emb_row {int(rows.max())}")
            # the part is the shard's codes as the index stores them (IVF: list number + code), not a copy of
            # the trained index: 66 bytes a row for IVF-PQ64, where the coarse centroids alone are 16 MB
            codes = [index.sa_encode(np.ascontiguousarray(emb[rows[start:start + cfg.batch_rows]], np.float32))
                     for start in range(0, len(rows), cfg.batch_rows)]
            _save(part_path(ds, task["shard"], m),
                  np.concatenate(codes) if codes else np.zeros((0, index.sa_code_size()), np.uint8))
        return {"rows": int(len(rows))}

    def finalize(self, cfg: IndexConfig, ds: DatasetDir) -> dict[str, Any]:
        wd = index_dir(ds)
        if not (wd / "plan.json").exists():
            return {}
        plan = read_json(wd / "plan.json")
        if any(not part_path(ds, t["shard"], m).exists() for t in plan["tasks"] for m in plan["modalities"]):
            return {"incomplete_tasks": sum(not ds.marker(self.name, t["shard"]).exists() for t in plan["tasks"])}

        plan_id = json_digest(plan["digest"])
        old = read_json(wd / "index.json") if (wd / "index.json").exists() else {}
        if old.get("plan") == plan_id and all((wd / v["file"]).exists() for v in old["modalities"].values()):
            # merged and tuned from these very parts already (a task that runs unlinks index.json)
            meta = old
        else:
            meta = {"format": "curate-index/1", "scorer": cfg.scorer, "rows": plan["rows"], "dim": plan["dim"],
                    "kind": plan["kind"], "factory": plan["factory"], "nlist": plan["nlist"],
                    "metric": "inner_product", "refine": plan.get("refine", 0), "train_rows": plan["train_rows"],
                    "coarse_training": plan.get("coarse_training", ""), "plan": plan_id,
                    "score_fingerprint": plan["digest"]["inputs"]["fingerprint"], "modalities": {}}
            (wd / "index.json").unlink(missing_ok=True)
            held = self._tuning_queries(cfg, ds, plan)
            for m in plan["modalities"]:
                meta["modalities"][m] = self._merge_and_tune(cfg, ds, plan, m, held)
                release_free_heap()  # the merged index (8,192 lists, each its own allocations), freed on return
        if not is_current(ds, wd):  # missing, or a ledger/signal file changed since: (re)written here
            # DuckDB's share of this machine (or $CURATE_SQL_MEMORY), at most 512 MB: it spills past it
            write_row_store(ds, wd, plan["rows"], memory_limit=sql_memory_limit(cap=ROW_STORE_SQL_CAP))
        write_json(wd / "index.json", meta)  # last: the searcher reads only a complete index
        img = meta["modalities"]["image"]
        return {"rows": plan["rows"], "kind": plan["kind"], "factory": plan["factory"], "nprobe": img["nprobe"],
                f"recall_at_{RECALL_K}": img["recall"], "nprobe_text": img["search"]["text"]["nprobe"],
                f"text_recall_at_{RECALL_K}": img["search"]["text"]["recall"],
                "index_bytes": sum(v["bytes"] for v in meta["modalities"].values()),
                "modalities": len(plan["modalities"])}

    def _tuning_queries(self, cfg: IndexConfig, ds: DatasetDir, plan: dict[str, Any]) -> dict[str, Any]:
        """{kind: (vectors, what they are)} of the held-out rows: image embeddings for image queries; caption
        embeddings for text queries when the scorer saved them, else weakly aligned probes of the images."""
        wd = index_dir(ds)
        idmap = IdMap(wd / "ids.parquet", plan["tasks"], cache=True)
        queries = np.load(wd / "queries.npy")
        img = gather(ds, cfg.scorer, "image", idmap, queries)
        if "text" in plan["modalities"]:
            text = (gather(ds, cfg.scorer, "text", idmap, queries), "held-out rows' caption embeddings")
        else:
            text = (weak_probes(img, TEXT_LIKE_COSINE, cfg.seed),
                    f"weakly aligned probes (cosine {TEXT_LIKE_COSINE} to held-out image rows)")
        return {"image": (img, "held-out rows' image embeddings"), "text": text, "ids": idmap, "n": len(queries)}

    def _merge_and_tune(self, cfg: IndexConfig, ds: DatasetDir, plan: dict[str, Any], m: str,
                        held: dict[str, Any]) -> dict[str, Any]:
        import faiss

        wd = index_dir(ds)
        index = faiss.read_index(str(wd / f"trained-{m}.faiss"))
        if plan["nlist"]:
            reserve_lists(index, (np.load(part_path(ds, t["shard"], m)) for t in plan["tasks"]))
        for t in plan["tasks"]:  # streamed: one shard's codes at a time, ids in plan order
            codes = np.load(part_path(ds, t["shard"], m))
            if len(codes) != t["n"] or (len(codes) and codes.shape[1] != index.sa_code_size()):
                raise InputError(f"{part_path(ds, t['shard'], m)}: {codes.shape} codes, the plan says {t['n']} rows "
                                 f"of {index.sa_code_size()} bytes; run `curate index {ds.root} --redo`")
            if len(codes):
                index.add_sa_codes(codes, np.arange(index.ntotal, index.ntotal + len(codes), dtype=np.int64))
        if index.ntotal != plan["rows"]:
            raise InputError(f"{wd}: merged {index.ntotal} vectors for {m}, the id table has {plan['rows']}")
        idmap = held["ids"]
        search: dict[str, dict[str, Any]] = {}
        for kind in QUERY_KINDS:
            q, source = held[kind]
            gt = brute_force(ds, cfg.scorer, m, idmap, q, RECALL_K)
            nprobe, recall, curve, depth = tune_nprobe(
                index, plan["nlist"], q, gt, cfg.target_recall,
                lambda ids, q=q: exact_sims(ds, cfg.scorer, m, idmap, q, ids),
                REFINE_DEPTHS if plan.get("refine") else (), plan["rows"] / max(1, plan["nlist"]))
            search[kind] = {"nprobe": nprobe, "recall": recall, "recall_curve": curve, "queries": held["n"],
                            "source": source, "refine": depth}
            log.info("index: %s %s, %d vectors, %s queries: nprobe %d, rerank %d, recall@%d %.4f", m, plan["factory"],
                     index.ntotal, kind, nprobe, depth, RECALL_K, recall)
        path = wd / f"{m}.faiss"
        _write_index(path, index)
        own = search["text" if m == "text" else "image"]  # queries of the index's own modality
        return {"file": path.name, "nprobe": own["nprobe"], "recall": own["recall"],
                "recall_curve": own["recall_curve"], "bytes": path.stat().st_size, "queries": held["n"],
                "search": search}

    def inputs(self, cfg: IndexConfig) -> dict[str, Any]:
        return {"scorer": cfg.scorer}


def reserve_lists(index: Any, parts: Any) -> None:
    """Size each list of the IVF `index` for the codes `parts` (arrays of sa_encode codes) will add, before
    they are added: a list grown by appending reallocates as it goes and ends up to twice its size (a merged
    10M x PQ64 index about 1.0 GB in memory instead of 737 MB). A code starts with its list number,
    little-endian."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    width = ivf.coarse_code_size()
    place = 256 ** np.arange(width, dtype=np.int64)
    counts = np.zeros(ivf.nlist, np.int64)
    for codes in parts:
        if len(codes):
            counts += np.bincount(codes[:, :width].astype(np.int64) @ place, minlength=ivf.nlist)[:ivf.nlist]
    for no in np.flatnonzero(counts).tolist():  # resized up, then back: the room stays, empty
        size = lists.list_size(no)
        lists.resize(no, size + int(counts[no]))
        lists.resize(no, size)


def part_path(ds: DatasetDir, shard: str, modality: str) -> Path:
    return index_dir(ds) / "parts" / f"{shard}.{modality}.codes.npy"


def _write_index(path: Path, index: Any) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


# --- recall against brute force --------------------------------------------------------------------


def brute_force(ds: DatasetDir, scorer: str, modality: str, idmap: IdMap, q: np.ndarray, k: int,
                chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Exact top-k similarities (descending) of each query over every indexed vector, streamed by shard."""
    best = np.full((len(q), k), -np.inf, np.float32)
    for shard, emb_row in idmap.shards():
        emb = open_embeddings(ds, scorer, shard, modality)
        rows = np.sort(emb_row)
        for start in range(0, len(rows), chunk):
            sims = q @ np.asarray(emb[rows[start:start + chunk]], np.float32).T
            best = -np.sort(-np.concatenate([best, sims], axis=1), axis=1)[:, :k]
    return best


def recall_at_k(found_sims: np.ndarray, gt_sims: np.ndarray, tol: float = 1e-4) -> float:
    """Share of the returned k whose true similarity reaches the k-th exact one (ties count as found)."""
    kth = gt_sims[:, -1:]
    return float(np.mean(found_sims >= kth - tol))


def probe_steps(nlist: int) -> list[int]:
    """nprobe values tried, ascending: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (half steps between powers of two,
    so text queries, which need many lists, do not pay up to twice the latency they need), then nlist."""
    steps = {nlist}
    for i in range(int(math.log2(max(nlist, 1))) + 1):
        steps.update(s for s in (2 ** i, 3 * 2 ** i // 2) if 0 < s <= nlist)
    return sorted(steps)


def weak_probes(x: np.ndarray, cosine: float, seed: int = 0) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each row of x, the rest of their length in a random direction
    orthogonal to it: stand-ins for text queries (a caption sits across the modality gap from its image)."""
    rng = np.random.default_rng(seed + 1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= np.sum(u * x, axis=1, keepdims=True) * x
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(cosine * x + math.sqrt(1.0 - cosine ** 2) * u, dtype=np.float32)


def tune_nprobe(index: Any, nlist: int, q: np.ndarray, gt: np.ndarray, target: float,
                true_sims: Callable[[np.ndarray], np.ndarray], depths: Any = (),
                list_size: float = 1.0) -> tuple[int, float, list[list[float]], int]:
    """(nprobe, recall, curve, rerank depth): the cheapest setting whose recall@k reaches `target`, nprobe over
    probe_steps() (exact indexes: 0, measured once). With rerank `depths` (IVF-PQ), each search takes that many
    candidates and keeps the k of highest exact cosine, as the searcher does; every depth is measured at every
    nprobe and the pair of least cost (nprobe x list_size codes scanned + ROW_COST a reranked row) is kept.
    The curve holds each nprobe's best recall over the depths. A compressed index may never reach the target
    (its codes, not the lists probed, limit recall): once PLATEAU_STEPS more steps gain less than PLATEAU_GAIN
    the search stops, and the cheapest setting within PLATEAU_GAIN of the best recall is chosen."""
    import faiss

    k = gt.shape[1]
    ivf = faiss.extract_index_ivf(index) if nlist else None
    depths = sorted(depths) or [0]
    curve: list[list[float]] = []
    seen: list[tuple[float, int, int, float]] = []  # (cost, nprobe, depth, recall)
    for p in [0] if ivf is None else probe_steps(nlist):
        if ivf is not None:
            ivf.nprobe = p
        _, ids = index.search(q, max(k, depths[-1]))
        sims = true_sims(ids)
        for d in depths:
            rec = recall_at_k(-np.sort(-sims[:, :d], axis=1)[:, :k] if d else sims, gt)
            seen.append((p * list_size + ROW_COST * d, p, d, round(rec, 5)))
        curve.append([p, max(r for _, s, _, r in seen if s == p)])
        if curve[-1][1] >= target:
            break
        if len(curve) > PLATEAU_STEPS and curve[-1][1] - curve[-1 - PLATEAU_STEPS][1] < PLATEAU_GAIN:
            break
    best = max(r for *_, r in seen)
    floor = target if best >= target else best - PLATEAU_GAIN
    _, nprobe, depth, rec = min(x for x in seen if x[3] >= floor)
    if ivf is not None:
        ivf.nprobe = int(nprobe)
    return int(nprobe), float(rec), curve, int(depth)


def exact_sims(ds: DatasetDir, scorer: str, modality: str, idmap: IdMap, q: np.ndarray,
               ids: np.ndarray, chunk: int = CHUNK_ROWS, queries: int = 64) -> np.ndarray:
    """Similarities of returned ids (a row of ids per query) recomputed from the stored embeddings (PQ
    distances are approximate), for `queries` queries at a time: their candidates of a shard read with one
    opening of its file, `chunk` rows at a time (256 queries x 4,000 candidates as float32 would be 2 GB;
    8,192 rows are 16 MB, and 64 queries' positions and sims about 10 MB)."""
    out = np.full(ids.shape, -np.inf, np.float32)
    for start in range(0, len(ids), queries):
        part_ids = ids[start:start + queries]
        flat, sims = part_ids.reshape(-1), out[start:start + queries].reshape(-1)  # sims: a view into out
        valid = np.flatnonzero(flat >= 0)
        query_of = start + valid // max(1, ids.shape[1])
        for shard, sel, rows in idmap.by_shard(flat[valid].astype(np.int64)):
            emb = open_embeddings(ds, scorer, shard, modality)
            o = np.argsort(rows, kind="stable")
            for s in range(0, len(o), chunk):
                part = sel[o[s:s + chunk]]
                vecs = np.asarray(emb[rows[o[s:s + chunk]]], np.float32)
                sims[valid[part]] = np.einsum("ij,ij->i", vecs, q[query_of[part]])
    return out


STAGE = IndexStage()
