"""The whole dedup algorithm on arrays in one process, for bench/dedup.py's core figures.

`dedup_arrays` runs on rows in key order held in memory what the stage (curate/stages/dedup/) runs as
map/reduce tasks over files: k-means (faiss's, core.train_centroids, on the CPU; `torch_kmeans` with --device
cuda), multi-probe assignment (core.assign), an unbounded pair search within clusters (`search_clusters`:
every pair above the threshold) and SemDeDup's keep rule (core.greedy_keep). `emb` may be a torch tensor on the
GPU, where everything then runs. The stage trains k-means on the CPU on every device, bounds its pair search
per row (core.search_candidates) and holds no more than a task's rows at once; its figures come from
`python bench/dedup.py --stage-size N`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.stages.dedup.core import (
    BLOCK_CELLS,
    EXACT,
    NEAR,
    _is_torch,
    _sim_blocks,
    _torch_top,
    assign,
    choose_k,
    greedy_keep,
    priority,
    strongest,
    train_centroids,
)

GPU_BLOCK_CELLS = 256 * 1024 * 1024  # the pair search's similarity blocks on a GPU (1 GB of float32)


def torch_kmeans(sample: Any, k: int, seed: int, niter: int = 10, device: str = "cuda") -> np.ndarray:
    """Spherical k-means (Lloyd) as torch matrix products: seeded init from the sample, an empty cluster keeps
    its previous centroid: the core mode's k-means on a GPU (the stage trains faiss's on the CPU on every
    device)."""
    import torch

    # to the device in the sample's own dtype (float16), then float32 there: no host copy
    x = sample if isinstance(sample, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(sample))
    x = x.to(device=device).float()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(n, generator=g)[:k].to(device)].clone()
    for _ in range(niter):
        a = _torch_top(x, c, 1)[0][:, 0]
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        norm = sums.norm(dim=1, keepdim=True)
        c = torch.where((counts > 0)[:, None], sums / norm.clamp_min(1e-12), c)
    return c.cpu().numpy().astype(np.float32)


@dataclass
class Hits:
    """What a pair search over entries found; indices are entry positions."""

    q: np.ndarray  # int64 querying entry of each pair (cosine >= threshold)
    m: np.ndarray  # int64 member entry of each pair
    sim: np.ndarray  # float32
    best_sim: np.ndarray  # float32 per entry: best cosine to another row's member entry (-inf if none)
    best_m: np.ndarray  # int64 per entry: that member entry (-1 if none)


def search_clusters(vecs: Any, cluster: np.ndarray, member: np.ndarray, ident: np.ndarray, threshold: float,
                    device: str = "cpu", rows: np.ndarray | None = None, block_cells: int | None = None) -> Hits:
    """Near pairs and nearest neighbours among entries grouped by cluster.

    Entries are sorted by `cluster` (then in the order ties should go: the lowest-key member wins an equal
    cosine); entry e's vector is vecs[rows[e]] (vecs[e] without `rows`); `member[e]` says the entry is stored in
    its cluster (its nearest); `ident[e]` names the row, and a row is never its own neighbour. Every entry
    queries the members of its cluster. device 'cpu' uses numpy, anything else torch on that device.
    """
    n = len(cluster)
    rows = np.arange(n) if rows is None else rows
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True]) if n else np.zeros(1, np.int64)
    if device == "cpu" and not _is_torch(vecs):
        return _search_numpy(vecs, bounds, member, ident, rows, threshold, block_cells or BLOCK_CELLS)
    return _search_torch(vecs, bounds, member, ident, rows, threshold, device, block_cells or GPU_BLOCK_CELLS)


def _search_numpy(vecs: Any, bounds: np.ndarray, member: np.ndarray, ident: np.ndarray, rows: np.ndarray,
                  threshold: float, block_cells: int) -> Hits:
    n = len(member)
    best_sim = np.full(n, -np.inf, np.float32)
    best_m = np.full(n, -1, np.int64)
    out_q, out_m, out_s = [], [], []
    for c in range(len(bounds) - 1):
        e0, e1 = bounds[c], bounds[c + 1]
        mem = e0 + np.flatnonzero(member[e0:e1])
        if len(mem) == 0:
            continue
        step = max(1, block_cells // len(mem))
        for q, sim in _sim_blocks(vecs, rows, ident, mem, e0, e1, step, None):  # a row is not its own neighbour
            b = np.argmax(sim, axis=1)
            best_sim[q] = sim[np.arange(len(q)), b]
            best_m[q] = mem[b]
            r, m = np.nonzero(sim >= threshold)
            out_q.append(q[r])
            out_m.append(mem[m])
            out_s.append(sim[r, m])
    best_m[~np.isfinite(best_sim)] = -1
    return _hits(out_q, out_m, out_s, best_sim, best_m)


def _search_torch(vecs: Any, bounds: np.ndarray, member: np.ndarray, ident: np.ndarray, rows: np.ndarray,
                  threshold: float, device: str, block_cells: int) -> Hits:
    """The same loop as _search_numpy with the products on `device`; float32 throughout (no TF32), so
    the cosines, and the decisions, match the CPU path."""
    import torch

    dev = vecs.device if _is_torch(vecs) else torch.device(device)
    x = vecs if _is_torch(vecs) else torch.from_numpy(np.ascontiguousarray(vecs)).to(dev)
    t_rows = torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(dev)
    t_ident = torch.from_numpy(np.ascontiguousarray(ident, np.int64)).to(dev)
    t_member = torch.from_numpy(np.ascontiguousarray(member, bool)).to(dev)
    n = len(member)
    best_sim = torch.full((n,), -math.inf, device=dev)
    best_m = torch.full((n,), -1, dtype=torch.long, device=dev)
    out_q, out_m, out_s = [], [], []
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for c in range(len(bounds) - 1):
            e0, e1 = int(bounds[c]), int(bounds[c + 1])
            mem = e0 + torch.nonzero(t_member[e0:e1])[:, 0]
            if len(mem) == 0:
                continue
            xm = x[t_rows[mem]].float()
            step = max(1, block_cells // len(mem))
            for s in range(e0, e1, step):
                q = torch.arange(s, min(s + step, e1), device=dev)
                sim = x[t_rows[q]].float() @ xm.T
                sim.masked_fill_(t_ident[q][:, None] == t_ident[mem][None, :], -math.inf)
                v, b = sim.max(dim=1)  # first maximum, like numpy's argmax
                best_sim[q], best_m[q] = v, mem[b]
                r, m = torch.nonzero(sim >= threshold, as_tuple=True)
                out_q.append(q[r])
                out_m.append(mem[m])
                out_s.append(sim[r, m])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    best_m[~torch.isfinite(best_sim)] = -1
    cpu = [[t.cpu().numpy() for t in ts] for ts in (out_q, out_m, out_s)]
    return _hits(*cpu, best_sim.cpu().numpy(), best_m.cpu().numpy())


def _hits(q: list, m: list, s: list, best_sim: np.ndarray, best_m: np.ndarray) -> Hits:
    cat = np.concatenate
    return Hits(cat(q).astype(np.int64) if q else np.empty(0, np.int64),
                cat(m).astype(np.int64) if m else np.empty(0, np.int64),
                cat(s).astype(np.float32) if s else np.empty(0, np.float32),
                best_sim.astype(np.float32), best_m.astype(np.int64))


def equal_value_pairs(values: np.ndarray, rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first row, other row) linking every row to the first row (lowest `rank`, default lowest row)
    with the same value; None/"" ignored."""
    values = np.asarray(values, dtype=object)
    valid = np.array([v is not None and v == v and v != "" for v in values], bool)
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, inverse = np.unique(values[rows].astype(str), return_inverse=True)
    r_rank = rows if rank is None else np.asarray(rank)[rows]
    o = np.lexsort((r_rank, inverse))
    inv, r = inverse[o], rows[o]
    head = np.r_[True, inv[1:] != inv[:-1]]
    first = r[np.maximum.accumulate(np.where(head, np.arange(len(r)), 0))]
    keep = ~head
    return first[keep].astype(np.int64), r[keep].astype(np.int64)


@dataclass
class DedupResult:
    kept: np.ndarray  # int64 row of the kept sample each row duplicates (the row itself when kept)
    group: np.ndarray  # int64 group id (numbered by kept row) of duplicates and of kept rows with duplicates, else -1
    evidence: np.ndarray  # int8 strongest evidence of each drop (EXACT/PHASH/NEAR), 0 for kept rows
    exact_dup: np.ndarray
    cluster: np.ndarray
    nn_sim: np.ndarray
    nn_nbr: np.ndarray
    n_pairs: int
    seconds: dict[str, float]
    pairs: tuple[np.ndarray, np.ndarray]  # unique near pairs (i < j)


def dedup_arrays(emb: Any, threshold: float, *, k: int | None = None, probes: int = 2, seed: int = 0,
                 sha256: np.ndarray | None = None, keep: str = "first", clip_score: np.ndarray | None = None,
                 device: str = "cpu", sample_per_centroid: int = 64) -> DedupResult:
    """The whole algorithm on rows in key order in one process (the benchmark's core mode); the stage
    runs the same functions as map/reduce tasks over files. `emb` may be a torch tensor on the GPU.
    Long because it is the stage's four phases (assign, pairs, decide, write) in one readable sequence, with a
    timer around each for the benchmark."""
    t = [time.perf_counter()]
    secs: dict[str, float] = {}

    def lap(name: str) -> None:
        t.append(time.perf_counter())
        secs[name] = round(t[-1] - t[-2], 3)

    n = emb.shape[0]
    k = choose_k(n, k)
    rng = np.random.default_rng(seed)
    size = min(n, k * sample_per_centroid)
    sample_rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    if _is_torch(emb):
        import torch

        sample = emb[torch.from_numpy(sample_rows).to(emb.device)]
    else:
        sample = emb[sample_rows]
    centroids = train_centroids(sample, k, seed) if device == "cpu" else torch_kmeans(sample, k, seed, device=device)
    lap("train")
    ids, sims = assign(emb, centroids, probes, device=device)
    lap("assign")
    p = ids.shape[1]
    # entries (row, probe) sorted by cluster, rows ascending within a cluster (= key order)
    entry_cluster = ids.reshape(-1)
    o = np.argsort(entry_cluster, kind="stable")
    entry_row = (o // p).astype(np.int64)
    member = (o % p) == 0
    hits = search_clusters(emb, entry_cluster[o], member, entry_row, threshold, device, rows=entry_row)
    lap("pairs")
    a, b = entry_row[hits.q], entry_row[hits.m]
    # each row has exactly p entries: back to (row, probe) order, then the best per row (ties: lowest neighbour)
    flat_sim = np.empty(n * p, np.float32)
    flat_nbr = np.empty(n * p, np.int64)
    flat_sim[o] = hits.best_sim
    flat_nbr[o] = np.where(hits.best_m >= 0, entry_row[np.maximum(hits.best_m, 0)], -1)
    flat_sim, flat_nbr = flat_sim.reshape(n, p), flat_nbr.reshape(n, p)
    nn_sim = flat_sim.max(axis=1)
    nn_nbr = np.where(flat_sim == nn_sim[:, None], flat_nbr, np.iinfo(np.int64).max).min(axis=1)
    nn_nbr[~np.isfinite(nn_sim)] = -1
    prio = priority(keep, clip_score, sims[:, 0], n)
    rank_of = np.empty(n, np.int64)
    by_rank = np.argsort(-prio, kind="stable")  # ties: lowest row (= key) first
    rank_of[by_rank] = np.arange(n)
    i, j, kinds = [np.minimum(a, b)], [np.maximum(a, b)], [np.full(len(a), NEAR, np.int8)]
    codes = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    exact = np.zeros(n, bool)
    if sha256 is not None:
        ei, ej = equal_value_pairs(sha256, rank_of)
        exact[ei], exact[ej] = True, True
        i.append(ei)
        j.append(ej)
        kinds.append(np.full(len(ei), EXACT, np.int8))
    ri, rj = rank_of[np.concatenate(i)], rank_of[np.concatenate(j)]
    kept_by, evidence = greedy_keep(n, np.minimum(ri, rj), np.maximum(ri, rj), np.concatenate(kinds))
    kept = np.arange(n)
    dropped_ranks = np.flatnonzero(kept_by >= 0)
    kept[by_rank[dropped_ranks]] = by_rank[kept_by[dropped_ranks]]
    ev = np.zeros(n, np.int8)
    ev[by_rank[dropped_ranks]] = strongest(evidence[dropped_ranks])
    lap("decide")
    return DedupResult(kept, group_ids(kept), ev, exact, ids[:, 0].copy(), nn_sim, nn_nbr, len(codes), secs,
                       (codes // n, codes % n))


def group_ids(kept: np.ndarray) -> np.ndarray:
    """Group id per row from the kept row of each row: the kept rows that have duplicates numbered in row
    (= key) order; -1 for rows outside any group."""
    n = len(kept)
    dup = kept != np.arange(n)
    heads = np.unique(kept[dup])
    out = np.full(n, -1, np.int64)
    out[heads] = np.arange(len(heads))
    out[dup] = out[kept[dup]]
    return out
