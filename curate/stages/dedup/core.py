"""The numeric core of dedup: spherical k-means, multi-probe cluster assignment, per-cluster pair search and
SemDeDup's keep rule. Pure functions over arrays. k-means is faiss's, on the CPU; assignment and pair search each
have a numpy/faiss path (CPU) and a torch path (matrix products on the GPU, or on the CPU in tests) that give the
same decisions.

Pair search is exact *within* the clusters a point probes: a point is stored in its nearest cluster and
queries its `probes` nearest clusters, so a pair split by a cluster border is still found when either point
has the other's cluster among its probes (an IVF index with nprobe = `probes`, done blockwise).

Decisions follow SemDeDup, not a transitive closure: samples are ordered by the keep policy and a sample is
dropped only when it is within the threshold of a sample that is *kept* (`greedy_keep`), so a chain a~b~c with
a and c apart keeps a and c, and no group grows by chaining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.devices import cuda_count

KEEP_POLICIES = ("best-clip-score", "farthest-from-centroid", "first")
DEVICES = ("auto", "cpu", "cuda")
# S = Q @ M.T is computed in row blocks of at most this many float32 cells (64 MB; 4x that through torch)
BLOCK_CELLS = 16 * 1024 * 1024
ASSIGN_BATCH = 65536
# evidence of a drop, strongest first when one pair has several
EXACT, PHASH, NEAR = 4, 2, 1
EVIDENCE = {EXACT: "exact", PHASH: "phash", NEAR: "near"}


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


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU raises ValueError."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"

    has_gpu = cuda_count() > 0
    if device == "cuda" and not has_gpu:
        raise ValueError("--device cuda: torch sees no CUDA GPU")
    return "cuda" if has_gpu else "cpu"


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# --- sampling and k-means ----------------------------------------------------------------------------


def _splitmix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def key_hash(keys: Any, seed: int) -> np.ndarray:
    """A 64-bit hash of each key string mixed with `seed`: the same for a key wherever it is stored, so a
    sample drawn by hash does not depend on shard order or on the width of the key array."""
    b = np.asarray(keys).astype("S")
    w = b.dtype.itemsize
    u = b.view(np.uint8).reshape(len(b), w) if len(b) else np.zeros((0, 0), np.uint8)
    h = np.full(len(b), 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for c in range(w):  # FNV-1a over the bytes; NUL padding is skipped so widths do not matter
            col = u[:, c].astype(np.uint64)
            h = np.where(col != 0, (h ^ col) * np.uint64(0x100000001B3), h)
    return _splitmix(h ^ _splitmix(np.full(len(b), seed, np.uint64)))


def train_centroids(sample: Any, k: int, seed: int, niter: int = 10,
                    points_per_centroid: int | None = None) -> np.ndarray:
    """Spherical k-means centroids (k, d) float32 trained by faiss on the CPU on the rows of `sample` (already
    drawn and put in a shard-order-independent order by the caller), on every device: a GPU run sees the
    centroids a CPU run sees. With `points_per_centroid`, a larger sample is first cut to k *
    points_per_centroid rows by `seed`."""
    import faiss

    n = sample.shape[0]
    if points_per_centroid and n > k * points_per_centroid:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=k * points_per_centroid, replace=False))
        sample = sample[rows]
    x = _f32(sample)
    n, d = x.shape
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=n // k + 1, min_points_per_centroid=1)
    km.train(x)
    return _f32(km.centroids)


def _torch_top(x: Any, c: Any, p: int, batch: int = ASSIGN_BATCH) -> tuple[Any, Any]:
    import torch

    ids, sims = [], []
    for s in range(0, x.shape[0], batch):
        v, i = torch.topk(x[s:s + batch].float() @ c.T, p, dim=1)
        ids.append(i)
        sims.append(v)
    if not ids:
        return torch.zeros((0, p), dtype=torch.long, device=c.device), torch.zeros((0, p), device=c.device)
    return torch.cat(ids), torch.cat(sims)


def assign(emb: Any, centroids: np.ndarray, probes: int, batch: int = ASSIGN_BATCH,
           device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The `probes` nearest centroids of every row: (ids int32 (n, p), cosine float32 (n, p)), nearest first.

    device 'cpu': faiss exact inner-product search; otherwise torch top-k of x @ C.T on that device."""
    n = emb.shape[0]
    p = min(probes, centroids.shape[0])
    if device != "cpu" or _is_torch(emb):
        import torch

        x = emb if _is_torch(emb) else torch.from_numpy(_f32(emb))
        c = torch.from_numpy(_f32(centroids)).to(x.device if _is_torch(emb) else device)
        ids_t, sims_t = _torch_top(x.to(c.device), c, p, batch)
        return ids_t.int().cpu().numpy(), sims_t.float().cpu().numpy()
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(_f32(centroids))
    ids = np.empty((n, p), dtype=np.int32)
    sims = np.empty((n, p), dtype=np.float32)
    for s in range(0, n, batch):
        dist, idx = index.search(_f32(emb[s:s + batch]), p)
        ids[s:s + batch], sims[s:s + batch] = idx, dist
    return ids, sims


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


# --- probes and the nearest reference ------------------------------------------------------------------


def hub_probes(x: np.ndarray, centroids: np.ndarray, threshold: float, limit: int) -> list[np.ndarray]:
    """For each row of x, every cluster that can store a row y with cos(x, y) >= threshold, nearest first (at
    most `limit`). y is stored in its nearest centroid c_y, so angle(y, c_y) <= angle(y, c_x) <= a + t_x, where
    a = angle(x, y) <= arccos(threshold) and t_x = angle(x, c_x) (c_x: x's nearest centroid); hence
    angle(x, c_y) <= 2 arccos(threshold) + t_x: the clusters with their centroid inside that cone are all."""
    sims = _f32(x) @ _f32(centroids).T
    if sims.shape[1] == 0:
        return [np.zeros(0, np.int64) for _ in range(len(x))]
    own = np.arccos(np.clip(sims.max(axis=1), -1.0, 1.0))
    bound = np.cos(np.minimum(np.pi, 2 * np.arccos(np.clip(threshold, -1.0, 1.0)) + own + 1e-3))
    out = []
    for row, b in zip(sims, bound, strict=True):
        inside = np.flatnonzero(row >= b)
        out.append(inside[np.argsort(-row[inside], kind="stable")][:limit])
    return out


def max_similarity(emb: Any, reference: np.ndarray, batch: int = ASSIGN_BATCH,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Every row's highest cosine to any `reference` row and that row's index ((n,) float32, int64)."""
    n = emb.shape[0]
    if len(reference) == 0 or n == 0:
        return np.full(n, -np.inf, np.float32), np.full(n, -1, np.int64)
    ids, sims = assign(emb, reference, 1, batch, device)
    return sims[:, 0].copy(), ids[:, 0].astype(np.int64)


# --- decisions ---------------------------------------------------------------------------------------


def priority(policy: str, clip_score: Any = None, centroid_sim: Any = None, n: int | None = None) -> np.ndarray:
    """The keep score (higher is kept first; ties go to the lowest key): best-clip-score -> clip_score (missing
    lowest), farthest-from-centroid -> minus the cosine to the own centroid (SemDeDup's choice), first -> 0."""
    if policy == "best-clip-score":
        return np.nan_to_num(np.asarray(clip_score, np.float64), nan=-np.inf)
    if policy == "farthest-from-centroid":
        return -np.asarray(centroid_sim, np.float64)
    if policy == "first":
        return np.zeros(n if n is not None else len(np.asarray(clip_score if clip_score is not None
                                                               else centroid_sim)))
    raise ValueError(f"unknown keep policy {policy!r}; choose {', '.join(KEEP_POLICIES)}")


def greedy_keep(n: int, hi: np.ndarray, lo: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's rule over nodes ranked 0..n-1 by keep priority (0 is kept first) and duplicate edges
    (hi, lo) with rank hi < rank lo: a node is dropped when it has an edge to a higher node that is kept.

    Returns (kept_by, evidence): the highest-priority kept node each dropped node duplicates (-1 for kept
    nodes) and the strongest evidence on that edge (EXACT > PHASH > NEAR bits; 0 for kept nodes).
    Decided in rounds (a node is settled once all its higher neighbours are), each round vectorised; the
    lowest undecided node always settles, so it ends, in as many rounds as the longest chain of drops.
    """
    hi, lo, kind = (np.asarray(a, np.int64) for a in (hi, lo, kind))
    code = hi * n + lo
    o = np.argsort(code, kind="stable")
    code, kind = code[o], kind[o]
    head = np.r_[True, code[1:] != code[:-1]] if len(code) else np.zeros(0, bool)
    kind = np.bitwise_or.reduceat(kind, np.flatnonzero(head)) if len(code) else kind
    code = code[head]
    hi, lo = code // n, code % n
    status = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 dropped
    status[np.setdiff1d(np.arange(n), lo)] = 1
    live = np.ones(len(hi), bool)
    while (status == 0).any():
        e = np.flatnonzero(live)
        h, lw = hi[e], lo[e]
        dropped = np.unique(lw[status[h] == 1])
        pending = np.bincount(lw[status[h] == 0], minlength=n)
        status[dropped] = 2
        kept = np.flatnonzero((status == 0) & (pending == 0))
        status[kept] = 1
        live[e] = status[lw] == 0
    kept_by = np.full(n, -1, np.int64)
    evidence = np.zeros(n, np.int8)
    to_kept = np.flatnonzero((status[hi] == 1) & (status[lo] == 2))
    # edges are sorted by (hi, lo): the first edge to each dropped node is from its highest kept node
    o = np.lexsort((hi[to_kept], lo[to_kept]))
    e = to_kept[o]
    first = np.r_[True, lo[e][1:] != lo[e][:-1]] if len(e) else np.zeros(0, bool)
    kept_by[lo[e][first]] = hi[e][first]
    evidence[lo[e][first]] = kind[e][first]
    return kept_by, evidence


def strongest(evidence: np.ndarray) -> np.ndarray:
    """The strongest evidence bit of each value (EXACT over PHASH over NEAR), 0 for none."""
    ev = np.asarray(evidence)
    return np.where(ev & EXACT, EXACT, np.where(ev & PHASH, PHASH, np.where(ev & NEAR, NEAR, 0))).astype(np.int8)


# --- pair search: the highest-priority partners of each entry, bounded ---------------------------------------


@dataclass
class Candidates:
    """What a bounded pair search found; indices are entry positions. Each (lo, hi) pair has cosine >= threshold
    and rank[hi] < rank[lo] (hi is kept first); per lo entry and cluster, at most `per_row` pairs: the ones
    with the lowest rank[hi], which are all SemDeDup's keep rule reads (a row is dropped by its highest-priority
    kept neighbour)."""

    lo: np.ndarray  # int64
    hi: np.ndarray  # int64
    sim: np.ndarray  # float32
    best_sim: np.ndarray  # float32 per entry: best cosine to another row's member entry (-inf if none)
    best_m: np.ndarray  # int64 per entry: that member entry (-1 if none)
    near: np.ndarray  # bool per entry: the entry is in some pair >= threshold in this search (before any bound)
    more: np.ndarray  # bool per entry: it had more than per_row higher partners (the rest were not returned)
    unconfirmed: int = 0  # pairs above the threshold that `confirm` rejected (per cluster they were found in)


def _lowest_per_row(mask: np.ndarray, key: np.ndarray, k: int, chunk_cells: int = 1 << 22
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the True cells of `mask`, at most k per row: those with the lowest key[col]. Rows with k or
    fewer hits (nearly all) take np.nonzero; crowded rows (a crowd of look-alikes: thousands of hits each) see
    their columns in key order and keep the first k hits (a running count), in chunks of rows."""
    cnt = np.count_nonzero(mask, axis=1)
    crowded = cnt > k
    if not crowded.any():
        return np.nonzero(mask)
    light = np.flatnonzero(~crowded)
    r, c = np.nonzero(mask[light])
    rows, cols = [light[r]], [c]
    heavy = np.flatnonzero(crowded)
    order = np.argsort(key, kind="stable")
    step = max(1, chunk_cells // max(1, mask.shape[1]))
    count_t = np.int16 if mask.shape[1] < np.iinfo(np.int16).max else np.int32
    for s in range(0, len(heavy), step):
        h = heavy[s:s + step]
        hits = mask[h][:, order]  # columns in key order
        first = hits & (np.cumsum(hits, axis=1, dtype=count_t) <= k)
        rr, cc = np.nonzero(first)
        rows.append(h[rr])
        cols.append(order[cc])
    return np.concatenate(rows), np.concatenate(cols)


def _compact(lo: np.ndarray, hi: np.ndarray, sim: np.ndarray, rank: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (lo, hi) pairs, at most k per lo: the lowest rank[hi] (ties cannot happen: ranks are distinct)."""
    if len(lo) == 0:
        return lo, hi, sim
    o = np.lexsort((rank[hi], lo))
    lo, hi, sim = lo[o], hi[o], sim[o]
    new = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    lo, hi, sim = lo[new], hi[new], sim[new]
    start = np.flatnonzero(np.r_[True, lo[1:] != lo[:-1]])
    nth = np.arange(len(lo)) - np.repeat(start, np.diff(np.r_[start, len(lo)]))
    keep = nth < k
    return lo[keep], hi[keep], sim[keep]


def search_candidates(vecs: Any, cluster: np.ndarray, member: np.ndarray, ident: np.ndarray, rank: np.ndarray,
                      threshold: float, per_row: int, device: str = "cpu", rows: np.ndarray | None = None,
                      block_cells: int | None = None, confirm: Any = None) -> Candidates:
    """Pairs among entries grouped by cluster, each entry querying the members of its cluster; instead of every
    pair above the threshold it returns, for each entry, at most `per_row` higher-ranked partners per cluster
    (`rank`: per entry, lower = kept first, equal for the entries of one row). Both directions of a block are
    read: a query finds its higher members, and a member finds its higher non-member queries, so a pair found
    only from its higher end still reaches its lower end. Memory is O(entries * per_row) whatever the number of
    pairs: a cluster of 10^4 look-alikes yields 10^4 * per_row candidates, not 10^8 pairs. `confirm(a, b)`, given
    entry arrays, says which pairs above the threshold count (the pHash check), before any bound is applied.
    Long because both directions of a block, their bounds and the running compaction share one loop over blocks
    (a block is computed once)."""
    n = len(cluster)
    rows = np.arange(n) if rows is None else rows
    rank = np.asarray(rank, np.int64)
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True]) if n else np.zeros(1, np.int64)
    torch_path = device != "cpu" or _is_torch(vecs)
    best_sim = np.full(n, -np.inf, np.float32)
    best_m = np.full(n, -1, np.int64)
    near = np.zeros(n, bool)
    partners = np.zeros(n, np.int64)
    unconfirmed = 0
    out_lo, out_hi, out_s = [], [], []
    # the blocks come back to the host for the selection: a GPU gets 4x the CPU block, not the 1 GB one
    cells = block_cells or (4 * BLOCK_CELLS if torch_path else BLOCK_CELLS)
    for c in range(len(bounds) - 1):
        e0, e1 = int(bounds[c]), int(bounds[c + 1])
        mem = e0 + np.flatnonzero(member[e0:e1])
        if len(mem) == 0:
            continue
        step = max(1, cells // len(mem))
        blocks = _sim_blocks(vecs, rows, ident, mem, e0, e1, step, device if torch_path else None)
        acc_lo, acc_hi, acc_s = [], [], []
        for q, sim in blocks:
            b = np.argmax(sim, axis=1)
            best_sim[q] = sim[np.arange(len(q)), b]
            best_m[q] = mem[b]
            hit = sim >= threshold
            if confirm is not None:
                r, m = np.nonzero(hit & (rank[mem][None, :] != rank[q][:, None]))
                ok = confirm(q[r], mem[m])
                hit[r[~ok], m[~ok]] = False
                # each pair once: from its lower end as a query, or as a member with a non-member higher query
                lower = (rank[mem][m] < rank[q][r]) | ~member[q][r]
                unconfirmed += int((~ok & lower).sum())
            near[q] |= hit.any(axis=1)
            near[mem] |= hit.any(axis=0)
            # a query and its higher members
            down = hit & (rank[mem][None, :] < rank[q][:, None])
            partners[q] += down.sum(axis=1)
            r, m = _lowest_per_row(down, rank[mem], per_row)
            out_lo.append(q[r])
            out_hi.append(mem[m])
            out_s.append(sim[r, m])
            # a member and its higher non-member queries (member queries are found by the line above)
            up = hit & (rank[q][:, None] < rank[mem][None, :]) & ~member[q][:, None]
            if up.any():
                partners[mem] += up.sum(axis=0)
                m2, r2 = _lowest_per_row(up.T, rank[q], per_row)
                acc_lo.append(mem[m2])
                acc_hi.append(q[r2])
                acc_s.append(sim[r2, m2])
                if sum(len(a) for a in acc_lo) > 4 * per_row * len(mem):
                    acc_lo, acc_hi, acc_s = _compact_lists(acc_lo, acc_hi, acc_s, rank, per_row)
        if acc_lo:
            lo, hi, s = _compact(np.concatenate(acc_lo), np.concatenate(acc_hi), np.concatenate(acc_s), rank, per_row)
            out_lo.append(lo)
            out_hi.append(hi)
            out_s.append(s)
    best_m[~np.isfinite(best_sim)] = -1
    cat = np.concatenate
    lo = cat(out_lo).astype(np.int64) if out_lo else np.empty(0, np.int64)
    hi = cat(out_hi).astype(np.int64) if out_hi else np.empty(0, np.int64)
    s = cat(out_s).astype(np.float32) if out_s else np.empty(0, np.float32)
    lo, hi, s = _compact(lo, hi, s, rank, per_row)
    return Candidates(lo, hi, s, best_sim, best_m, near, partners > per_row, unconfirmed)


def _compact_lists(lo: list, hi: list, s: list, rank: np.ndarray, k: int) -> tuple[list, list, list]:
    a, b, c = _compact(np.concatenate(lo), np.concatenate(hi), np.concatenate(s), rank, k)
    return [a], [b], [c]


def _sim_blocks(vecs: Any, rows: np.ndarray, ident: np.ndarray, mem: np.ndarray, e0: int, e1: int, step: int,
                device: str | None) -> Any:
    """(query entries, cosine block to the members with a row's own entry at -inf) for the queries e0..e1 in
    blocks of `step`; float32 numpy blocks, computed with numpy (device None) or torch on `device` (no TF32)."""
    if device is None:
        xm = _f32(vecs[rows[mem]])
        m_order = np.argsort(ident[mem], kind="stable")
        m_ident = ident[mem][m_order]
        for s in range(e0, e1, step):
            q = np.arange(s, min(s + step, e1))
            sim = _f32(vecs[rows[q]]) @ xm.T
            pos = np.minimum(np.searchsorted(m_ident, ident[q]), len(mem) - 1)
            self_hit = np.flatnonzero(m_ident[pos] == ident[q])
            sim[self_hit, m_order[pos[self_hit]]] = -np.inf
            yield q, sim
        return
    import torch

    dev = vecs.device if _is_torch(vecs) else torch.device(device)
    x = vecs if _is_torch(vecs) else torch.from_numpy(np.ascontiguousarray(vecs))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        xm = x[torch.from_numpy(np.ascontiguousarray(rows[mem], np.int64))].to(dev).float()
        m_ident = torch.from_numpy(np.ascontiguousarray(ident[mem], np.int64)).to(dev)
        for s in range(e0, e1, step):
            q = np.arange(s, min(s + step, e1))
            xq = x[torch.from_numpy(np.ascontiguousarray(rows[q], np.int64))].to(dev).float()
            sim = xq @ xm.T
            q_ident = torch.from_numpy(np.ascontiguousarray(ident[q], np.int64)).to(dev)
            sim.masked_fill_(q_ident[:, None] == m_ident[None, :], -math.inf)
            yield q, sim.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
