"""A LAION-shaped synthetic scored dataset: heavy-tailed duplicate groups, written in the layout dedup reads.

    python bench/heavy_tail.py OUT --rows 1M [--heavy 100000] [--dup-share 0.3] [--jitter 0.3] [--seed 0] [--jobs 2]

Web image data is dominated by heavy tails: a placeholder image behind 10^4-10^5 URLs, thousands of images
repeated hundreds of times, and about 30% of the rows in duplicate groups. Here:
- one heavy group of `--heavy` rows (a placeholder: one sha256, one embedding), spread over every shard;
- a Zipf spread of smaller groups (size 1 + Zipf(2), at most 1000) until `--dup-share` of the rows are grouped;
- in every group (the heavy one included) a share `--jitter` of the members are near copies (a re-encoded or
  resized image: its own sha256, an embedding at cosine 0.96-0.995 to the group's), the rest exact copies;
- embeddings in a cone around one direction, grouped in topics whose popularity is Zipf-distributed (cluster
  imbalance: the largest topic holds ~10% of the rows);
- clip_score uniform in [0.2, 0.4] per row (the default keep policy, best-clip-score, has no ties).

Per shard, as `curate score` leaves it: a download ledger (key, status, sha256), a score table, float16
embeddings and the download/score markers. OUT/truth.npz holds each row's group (-1 for none) and whether it is
an exact copy. Memory: the group embeddings (groups x 512 float16) and a few arrays of one int per row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D = 512
MAX_GROUP = 1000


def parse_count(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


class Topics:
    """Topic centres in a cone around one direction, chosen with Zipf popularity."""

    def __init__(self, n: int, seed: int):
        g = np.random.default_rng([seed, 0])
        self.count = max(1, n // 1000)
        mean = unit(g.standard_normal(D))
        self.centers = unit(0.6 * mean + 0.8 * unit(g.standard_normal((self.count, D)))).astype(np.float32)
        w = 1.0 / np.arange(1, self.count + 1) ** 0.9
        self.cum = np.cumsum(w / w.sum())

    def draw(self, g: np.random.Generator, m: int) -> np.ndarray:
        t = np.minimum(np.searchsorted(self.cum, g.random(m)), self.count - 1)
        z = g.standard_normal((m, D), dtype=np.float32) / np.sqrt(D)
        return unit(0.75 * self.centers[t] + 0.66 * z).astype(np.float32)


def plan_groups(n: int, heavy: int, dup_share: float, jitter: float, seed: int) -> dict[str, np.ndarray]:
    """group (-1: a row of its own; 0: the heavy group) and jitter cosine (0: exact copy or group original) of
    every row; rows of a group are spread over the whole dataset."""
    rng = np.random.default_rng([seed, 1])
    sizes = [heavy] if heavy >= 2 else []
    target = max(int(dup_share * n), sum(sizes))
    total = sum(sizes)
    while total < target:
        s = np.minimum(1 + rng.zipf(2.0, 10_000), MAX_GROUP)
        for v in s.tolist():
            if total + v > target:
                break
            sizes.append(v)
            total += v
        else:
            continue
        break
    sizes = np.asarray(sizes, np.int64)
    order = rng.permutation(n)[:total]
    group = np.full(n, -1, np.int32)
    group[order] = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    is_first = np.zeros(total, bool)
    is_first[first] = True
    cos = np.where(~is_first & (rng.random(total) < jitter), rng.uniform(0.96, 0.995, total), 0.0).astype(np.float32)
    jit = np.zeros(n, np.float32)
    jit[order] = cos
    return {"group": group, "jitter": jit, "sizes": sizes}


def jittered(x: np.ndarray, cos: np.ndarray, g: np.random.Generator) -> np.ndarray:
    z = g.standard_normal(x.shape, dtype=np.float32)
    z = unit(z - np.sum(z * x, axis=1, keepdims=True) * x)  # orthogonal to x: the cosine is exactly `cos`
    return cos[:, None] * x + np.sqrt(1 - cos[:, None] ** 2) * z


_JOB: tuple | None = None  # (out, n, per, seed, topics, group, jit, group_emb) for _write_shards


def _write_shards(starts: list[int]) -> None:
    """Write the shards starting at `starts` (rows) of the dataset generate() set up in _JOB."""
    import pyarrow as pa

    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.tables import write_table
    from curate.stages.score import signal_schema

    out, n, per, seed, topics, group, jit, group_emb = _JOB
    ds = DatasetDir.at(out)
    for s in starts:
        shard = shard_name(s // per)
        m = min(per, n - s)
        g = np.random.default_rng([seed, 3, s // per])
        emb = topics.draw(g, m)  # rows of their own
        grp, cos = group[s:s + m], jit[s:s + m]
        in_group = grp >= 0
        emb[in_group] = group_emb[grp[in_group]].astype(np.float32)
        near = cos > 0
        if near.any():
            emb[near] = jittered(emb[near], cos[near], g)
        sha = np.array([f"{s + r:064x}" for r in range(m)], object)
        exact = in_group & ~near
        sha[exact] = [f"g{v:063x}" for v in grp[exact].tolist()]
        keys = [sample_key(shard, r) for r in range(m)]
        ledger = pa.table({"key": keys, "status": ["success"] * m, "sha256": pa.array(sha, pa.string())})
        write_table(ds.ledger(shard), pa.table({f.name: ledger[f.name] if f.name in ledger.column_names
                                                else pa.nulls(m, f.type) for f in LEDGER_FIELDS}))
        score = {f.name: pa.nulls(m, f.type) for f in signal_schema()}
        score.update(key=pa.array(keys), scored=pa.array([True] * m),
                     clip_score=pa.array(g.uniform(0.2, 0.4, m).astype(np.float32)),
                     emb_row=pa.array(np.arange(m, dtype=np.int32)))
        write_table(ds.signals("score", shard), pa.table(score, schema=signal_schema()))
        np.save(ds.signals("score", shard, ".img_emb.npy"), emb.astype(np.float16))
        write_json(ds.marker("download", shard), {"shard": shard})
        write_json(ds.marker("score", shard), {"shard": shard})


def generate(out: Path, n: int, per: int = 10_000, heavy: int = 100_000, dup_share: float = 0.3,
             jitter: float = 0.3, seed: int = 0, jobs: int = 1) -> dict[str, object]:
    """Write the dataset under `out` shard by shard; returns what was planted."""
    import shutil

    from curate.io.layout import DatasetDir

    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    DatasetDir.at(out)
    topics = Topics(n, seed)
    plan = plan_groups(n, heavy, dup_share, jitter, seed)
    group, jit = plan["group"], plan["jitter"]
    n_groups = len(plan["sizes"])
    group_emb = np.empty((n_groups, D), np.float16)
    for s in range(0, n_groups, 100_000):
        group_emb[s:s + 100_000] = topics.draw(np.random.default_rng([seed, 2, s]), min(100_000, n_groups - s))
    global _JOB
    _JOB = (out, n, per, seed, topics, group, jit, group_emb)
    starts = list(range(0, n, per))
    if jobs > 1:  # shards are independent (each from its own seeded generator): forked workers write them
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            pool.map(_write_shards, [starts[i::jobs] for i in range(jobs)])
    else:
        _write_shards(starts)
    _JOB = None
    np.savez(out / "truth.npz", group=group, jitter=jit, sizes=plan["sizes"])
    return {"rows": n, "shards": -(-n // per), "heavy": int(heavy), "groups": n_groups,
            "grouped_rows": int((group >= 0).sum()), "largest_small_group": int(plan["sizes"][1:].max(initial=0)),
            "near_copies": int((jit > 0).sum()), "generate_s": round(time.perf_counter() - t0, 1)}


def brute_force(root: Path, threshold: float, block: int = 2048) -> dict[str, str]:
    """SemDeDup's greedy keep rule over every row of a (small) dataset dir by brute force: rows in keep order
    (clip_score, then lowest key); a row is dropped by the first kept row, in that order, that is within the
    threshold or byte-equal (sha256). Returns {dropped key: kept key}. O(rows x kept) products: 100k rows take
    a minute or two on two cores."""
    import pyarrow.parquet as pq

    from curate.io.layout import DatasetDir

    ds = DatasetDir.at(root)
    keys, clip, sha, embs = [], [], [], []
    for shard in ds.done_shards("score"):
        t = pq.read_table(ds.signals("score", shard), columns=["key", "clip_score", "emb_row"])
        led = pq.read_table(ds.ledger(shard), columns=["key", "sha256"])
        assert led["key"].to_pylist() == t["key"].to_pylist()
        keys += t["key"].to_pylist()
        clip.append(t["clip_score"].to_numpy().astype(np.float32))
        sha += led["sha256"].to_pylist()
        embs.append(np.load(ds.signals("score", shard, ".img_emb.npy"))[t["emb_row"].to_numpy()])
    prio = np.concatenate(clip).astype(np.float64)
    key_arr = np.array(keys)
    order = np.lexsort((key_arr, -prio))
    x = np.concatenate(embs).astype(np.float32)[order]
    sha_o = [sha[i] for i in order]
    kept_rows = np.empty(len(order), np.int64)  # positions (in keep order) of the kept rows, in keep order
    n_kept = 0
    kept_mat = np.empty((len(order), D), np.float32)
    first_kept_sha: dict[str, int] = {}
    out: dict[str, str] = {}
    for s in range(0, len(order), block):
        xb = x[s:s + block]
        prev = xb @ kept_mat[:n_kept].T if n_kept else np.zeros((len(xb), 0), np.float32)
        hit_prev = prev >= threshold
        first_prev = np.where(hit_prev.any(axis=1), hit_prev.argmax(axis=1), -1) if n_kept else \
            np.full(len(xb), -1)
        inside = xb @ xb.T
        kept_in: list[int] = []
        for i in range(len(xb)):
            cands = []
            if first_prev[i] >= 0:
                cands.append(int(first_prev[i]))
            j = first_kept_sha.get(sha_o[s + i])
            if j is not None and j < n_kept:
                cands.append(j)
            if cands:
                hit = kept_rows[min(cands)]
            else:
                hit = next((s + b for b in kept_in if inside[i, b] >= threshold or sha_o[s + b] == sha_o[s + i]), -1)
            if hit >= 0:
                out[key_arr[order[s + i]]] = key_arr[order[hit]]
            else:
                kept_in.append(i)
        for i in kept_in:
            kept_rows[n_kept] = s + i
            kept_mat[n_kept] = xb[i]
            first_kept_sha.setdefault(sha_o[s + i], n_kept)
            n_kept += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", default="1M")
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--heavy", type=parse_count, default=100_000, help="rows of the one heavy group (0: none)")
    ap.add_argument("--dup-share", type=float, default=0.3)
    ap.add_argument("--jitter", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="processes writing shards (the output does not change)")
    a = ap.parse_args()
    print(generate(a.out, parse_count(a.rows), a.rows_per_shard, a.heavy, a.dup_share, a.jitter, a.seed, a.jobs))


if __name__ == "__main__":
    main()
