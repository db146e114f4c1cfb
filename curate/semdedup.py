"""The numeric core of dedup: spherical k-means, multi-probe cluster assignment, per-cluster pair search,
duplicate groups and the kept sample of each group. Pure functions over arrays (memmaps welcome).

Pair search is exact *within* the clusters a point probes: a point is stored in its nearest cluster and
queries its `probes` nearest clusters, so a pair split by a cluster border is still found when either
point has the other's cluster among its probes (an IVF index with nprobe = `probes`, done blockwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KEEP_POLICIES = ("best-clip-score", "farthest-from-centroid", "first")
# S = Q @ M.T is computed in row blocks of at most this many float32 cells (64 MB)
BLOCK_CELLS = 16 * 1024 * 1024
ASSIGN_BATCH = 65536


def choose_k(n: int, k: int | None = None) -> int:
    """Clusters for n points: about 2 sqrt(n) (1M points -> 2000 clusters of ~500).

    Pair search costs ~ n * probes * (n / k) dot products (more with unequal clusters) and assignment
    ~ n * k, so k ~ sqrt(n) balances the two; at 1M x 512, 2 sqrt(n) measured 107 s against 128 s for
    sqrt(n) (bench/dedup.py). k is capped so each centroid has at least 40 training points.
    """
    if n <= 0:
        return 1
    if k is None:
        k = round(2 * math.sqrt(n))
    return int(max(1, min(k, n // 40 if n >= 40 else 1)))


def _gpu() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def train_centroids(emb: Any, k: int, seed: int, niter: int = 10, points_per_centroid: int = 64) -> np.ndarray:
    """Spherical k-means centroids (k, d) float32, trained on a seeded sample of `emb` rows.

    The sample is drawn by `seed` over row positions (rows are key-sorted by the caller), so the result does
    not depend on shard order; faiss then trains on exactly those points.
    """
    import faiss

    n, d = emb.shape
    size = min(n, k * points_per_centroid)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    sample = _f32(emb[rows])
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(points_per_centroid, size // k + 1),
                      min_points_per_centroid=1, gpu=_gpu())
    km.train(sample)
    return _f32(km.centroids)


def flat_ip_index(vectors: np.ndarray) -> Any:
    """An exact inner-product index over `vectors`, on the GPU(s) when faiss sees one."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if _gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(_f32(vectors))
    return index


def assign(emb: Any, centroids: np.ndarray, probes: int, batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """The `probes` nearest centroids of every row: (ids int32 (n, p), cosine float32 (n, p)), nearest first."""
    n = emb.shape[0]
    p = min(probes, centroids.shape[0])
    index = flat_ip_index(centroids)
    ids = np.empty((n, p), dtype=np.int32)
    sims = np.empty((n, p), dtype=np.float32)
    for s in range(0, n, batch):
        dist, idx = index.search(_f32(emb[s:s + batch]), p)
        ids[s:s + batch], sims[s:s + batch] = idx, dist
    return ids, sims


def _rows_in(labels: np.ndarray, clusters: range) -> tuple[np.ndarray, np.ndarray]:
    """(entries, bounds): the entries of `labels` equal to clusters[c] are entries[bounds[c]:bounds[c + 1]],
    ascending."""
    sel = np.flatnonzero((labels >= clusters.start) & (labels < clusters.stop))
    lab = labels[sel]
    o = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[o], np.arange(clusters.start, clusters.stop + 1))
    return sel[o], bounds


@dataclass
class PairResult:
    """What one range of clusters found. Indices are row positions of `emb`."""

    i: np.ndarray  # int64, pair endpoints with i < j, cosine >= threshold
    j: np.ndarray
    sim: np.ndarray  # float32
    nn_idx: np.ndarray  # int64 rows that queried at least one cluster of the range
    nn_sim: np.ndarray  # float32 their best cosine to another row in the probed clusters (-inf if none)
    nn_nbr: np.ndarray  # int64 that row (-1 if none)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)

    @classmethod
    def empty(cls) -> PairResult:
        e64, e32 = np.empty(0, np.int64), np.empty(0, np.float32)
        return cls(e64, e64.copy(), e32, e64.copy(), e32.copy(), e64.copy())


def cluster_pairs(emb: Any, ids: np.ndarray, clusters: range, threshold: float,
                  block_cells: int = BLOCK_CELLS) -> PairResult:
    """Pairs with cosine >= threshold among the rows stored in (nearest cluster) `clusters`, queried by
    every row that probes those clusters, and each querying row's nearest neighbour there."""
    p = ids.shape[1]
    members_rows, members_bounds = _rows_in(ids[:, 0], clusters)
    queries_flat, queries_bounds = _rows_in(ids.reshape(-1), clusters)
    out_i, out_j, out_s = [], [], []
    nn: dict[str, list[np.ndarray]] = {"idx": [], "sim": [], "nbr": []}
    members_x = _f32(emb[members_rows])  # one gather per range: per-cluster slices are then views
    queries_rows = queries_flat // p  # flat entry -> row
    queries_x = _f32(emb[queries_rows])
    for c in range(len(clusters)):
        m0, m1 = members_bounds[c], members_bounds[c + 1]
        q0, q1 = queries_bounds[c], queries_bounds[c + 1]
        if m0 == m1 or q0 == q1:
            continue
        members, xm = members_rows[m0:m1], members_x[m0:m1]
        rows = max(1, block_cells // len(members))
        for s in range(q0, q1, rows):
            q = queries_rows[s:min(s + rows, q1)]
            sim = queries_x[s:s + len(q)] @ xm.T
            # a row is not its own neighbour (both lists are ascending, so a binary search finds it)
            pos = np.minimum(np.searchsorted(members, q), len(members) - 1)
            self_hit = np.flatnonzero(members[pos] == q)
            sim[self_hit, pos[self_hit]] = -np.inf
            best = np.argmax(sim, axis=1)
            nn["idx"].append(q)
            nn["sim"].append(sim[np.arange(len(q)), best])
            nn["nbr"].append(members[best])
            r, m = np.nonzero(sim >= threshold)
            if len(r):
                a, b = q[r], members[m]
                out_i.append(np.minimum(a, b))
                out_j.append(np.maximum(a, b))
                out_s.append(sim[r, m])
    if not nn["idx"]:
        return PairResult.empty()
    cat = np.concatenate
    res = PairResult(
        i=cat(out_i).astype(np.int64) if out_i else np.empty(0, np.int64),
        j=cat(out_j).astype(np.int64) if out_j else np.empty(0, np.int64),
        sim=cat(out_s).astype(np.float32) if out_s else np.empty(0, np.float32),
        nn_idx=cat(nn["idx"]).astype(np.int64), nn_sim=cat(nn["sim"]).astype(np.float32),
        nn_nbr=cat(nn["nbr"]).astype(np.int64),
    )
    res.nn_nbr[~np.isfinite(res.nn_sim)] = -1
    return res


def merge_pairs(results: list[PairResult], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique pairs (i, j, sim) and per-row nearest neighbour (nn_sim, nn_nbr) over all cluster ranges.

    A pair found in two clusters keeps its higher cosine; a row's neighbour is the best over its probes,
    ties to the lower row, so the merge does not depend on the order of `results`.
    """
    cat = np.concatenate
    i = cat([r.i for r in results]) if results else np.empty(0, np.int64)
    j = cat([r.j for r in results]) if results else np.empty(0, np.int64)
    s = cat([r.sim for r in results]) if results else np.empty(0, np.float32)
    code = i * n + j
    o = np.lexsort((-s, code))
    code, s = code[o], s[o]
    first = np.ones(len(code), bool)
    first[1:] = code[1:] != code[:-1]
    code, s = code[first], s[first]
    nn_sim = np.full(n, -np.inf, np.float32)
    nn_nbr = np.full(n, -1, np.int64)
    if results:
        idx = cat([r.nn_idx for r in results])
        sim = cat([r.nn_sim for r in results])
        nbr = cat([r.nn_nbr for r in results])
        o = np.lexsort((nbr, -sim, idx))  # per row: highest cosine, then lowest neighbour
        idx, sim, nbr = idx[o], sim[o], nbr[o]
        head = np.ones(len(idx), bool)
        head[1:] = idx[1:] != idx[:-1]
        nn_sim[idx[head]] = sim[head]
        nn_nbr[idx[head]] = nbr[head]
    return code // n, code % n, s, nn_sim, nn_nbr


def equal_value_pairs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first row, other row) linking every row to the first row with the same value (None/"" ignored)."""
    values = np.asarray(values, dtype=object)
    valid = np.array([v is not None and v == v and v != "" for v in values], bool)
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, inverse = np.unique(values[rows].astype(str), return_inverse=True)
    o = np.lexsort((rows, inverse))
    inv, r = inverse[o], rows[o]
    head = np.ones(len(r), bool)
    head[1:] = inv[1:] != inv[:-1]
    first = r[np.maximum.accumulate(np.where(head, np.arange(len(r)), 0))]
    keep = ~head
    return first[keep].astype(np.int64), r[keep].astype(np.int64)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph: group id per row (int64), -1 for rows without a pair.

    Group ids are numbered by their lowest row, so they are stable for a fixed key order.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = np.full(n, -1, np.int64)
    if len(i) == 0:
        return out
    g = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)).tocsr()
    _, comp = connected_components(g, directed=False)
    size = np.bincount(comp)
    in_group = size[comp] > 1
    # renumber components by their lowest row: deterministic and independent of scipy's numbering
    first_row = np.full(len(size), n, np.int64)
    np.minimum.at(first_row, comp, np.arange(n))
    order = np.argsort(first_row[size > 1])
    rank = np.full(len(size), -1, np.int64)
    rank[np.flatnonzero(size > 1)[order]] = np.arange(len(order))
    out[in_group] = rank[comp[in_group]]
    return out


def kept_rows(group: np.ndarray, policy: str, clip_score: np.ndarray | None = None,
              centroid_sim: np.ndarray | None = None) -> np.ndarray:
    """The kept row of each row's group (the row itself when not in a group).

    best-clip-score: highest clip_score (missing counts lowest); farthest-from-centroid: lowest cosine to its
    cluster centroid (SemDeDup's choice); first: lowest row. Ties always go to the lowest row (= lowest key).
    """
    n = len(group)
    if policy == "best-clip-score":
        score = np.nan_to_num(np.asarray(clip_score, np.float64), nan=-np.inf)
    elif policy == "farthest-from-centroid":
        score = -np.asarray(centroid_sim, np.float64)
    elif policy == "first":
        score = np.zeros(n)
    else:
        raise ValueError(f"unknown keep policy {policy!r}; choose {', '.join(KEEP_POLICIES)}")
    rows = np.arange(n)
    kept = rows.copy()
    ing = np.flatnonzero(group >= 0)
    if len(ing) == 0:
        return kept
    o = np.lexsort((ing, -score[ing], group[ing]))  # per group: best score, then lowest row
    g, r = group[ing][o], ing[o]
    head = np.ones(len(g), bool)
    head[1:] = g[1:] != g[:-1]
    best_of_group = np.empty(g.max() + 1, np.int64)
    best_of_group[g[head]] = r[head]
    kept[ing] = best_of_group[group[ing]]
    return kept


def max_similarity(emb: Any, reference: np.ndarray, batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Every row's highest cosine to any `reference` row and that row's index ((n,) float32, int64)."""
    n = emb.shape[0]
    sims = np.full(n, -np.inf, np.float32)
    nbr = np.full(n, -1, np.int64)
    if len(reference) == 0 or n == 0:
        return sims, nbr
    index = flat_ip_index(reference)
    for s in range(0, n, batch):
        d, i = index.search(_f32(emb[s:s + batch]), 1)
        sims[s:s + batch], nbr[s:s + batch] = d[:, 0], i[:, 0]
    return sims, nbr


@dataclass
class DedupResult:
    group: np.ndarray
    kept: np.ndarray
    exact_dup: np.ndarray
    cluster: np.ndarray
    nn_sim: np.ndarray
    nn_nbr: np.ndarray
    n_pairs: int


def dedup_arrays(emb: Any, threshold: float, *, k: int | None = None, probes: int = 2, seed: int = 0,
                 sha256: np.ndarray | None = None, keep: str = "first", clip_score: np.ndarray | None = None,
                 clusters_per_task: int = 64) -> DedupResult:
    """The whole algorithm in one process (for the benchmark and library use); the stage splits the same
    steps into driver (train, assign), tasks (cluster_pairs over cluster ranges) and finalize."""
    n = emb.shape[0]
    k = choose_k(n, k)
    centroids = train_centroids(emb, k, seed)
    ids, sims = assign(emb, centroids, probes)
    results = [cluster_pairs(emb, ids, range(a, min(a + clusters_per_task, k)), threshold)
               for a in range(0, k, clusters_per_task)]
    i, j, _, nn_sim, nn_nbr = merge_pairs(results, n)
    exact = np.zeros(n, bool)
    if sha256 is not None:
        ei, ej = equal_value_pairs(sha256)
        exact[ei], exact[ej] = True, True
        i, j = np.concatenate([i, ei]), np.concatenate([j, ej])
    group = groups(n, i, j)
    kept = kept_rows(group, keep, clip_score, sims[:, 0])
    return DedupResult(group, kept, exact, ids[:, 0].copy(), nn_sim, nn_nbr, len(i))
