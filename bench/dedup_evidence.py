"""Which duplicate evidence, and which rule, finds the demo web's planted duplicates: precision, recall and the
largest group of each candidate rule, on a downloaded and scored dataset and its ground truth.

    python bench/dedup_evidence.py demo-out/pool demo-out/web/ground_truth.parquet [--scorer score]
    python bench/dedup_evidence.py demo-out/pool demo-out/web/ground_truth.parquet --stage   # what dedup wrote

Every rule is decided the way `curate dedup` decides (SemDeDup's rule over the rule's duplicate edges, kept
first by clip_score, ties to the lowest key), and scored the way the report scores it: a row is a true
duplicate when the ground truth names its original and that original is in the dataset too. The evidence:
sha256 (exact bytes), image-embedding cosine (the scorer's embeddings), and Hamming distances of perceptual
hashes of the decoded images (imagehash): pHash at 64 bits (hash_size 8) and 256 bits (hash_size 16, what
`curate dedup --phash-distance` compares), dHash at 256 bits. The largest true group of the demo web is 2 (one
copy each). Per-row figures depend on the keep policy (the truth calls the copy, never the original, the
duplicate, and the web serves originals first, so `--keep first` matches it); pair figures do not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def words(h: object) -> np.ndarray:
    """An imagehash hash as big-endian 64-bit words."""
    return np.packbits(h.hash.reshape(-1)).view(">u8").astype(np.uint64)  # type: ignore[attr-defined]


def load(dataset: Path, truth_path: Path, scorer: str) -> dict[str, np.ndarray]:
    """Scored rows in key order: key, embedding, clip_score, sha256, pHash (64 and 256 bits), dHash (256 bits),
    and the truth columns (orig: the row of a copy's original, -1 for other rows)."""
    import imagehash
    import pyarrow.parquet as pq

    from curate.imaging import safe_open
    from curate.io.layout import DatasetDir
    from curate.io.shards import iter_samples
    from curate.stages.dedup import gather, read_shard

    ds = DatasetDir.at(dataset)
    keys, embs, clip, sha, ph, ph256, dh = [], [], [], [], [], [], []
    sample_of: dict[str, str] = {}
    for shard in ds.done_shards(scorer):
        t, emb = read_shard(ds, shard, scorer=scorer)
        keys += t["key"].to_pylist()
        embs.append(gather(emb, t["emb_row"].to_numpy()).astype(np.float32))
        clip.append(t["clip_score"].to_numpy(zero_copy_only=False))
        sha += t["sha256"].to_pylist()
        led = pq.read_table(ds.ledger(shard), columns=["key", "SAMPLE_ID"]).to_pylist()
        sample_of.update({r["key"]: str(r["SAMPLE_ID"]) for r in led})
        hashes = {}
        for s in iter_samples(ds.shard_tar(shard)):
            if s["image"]:
                with safe_open(s["image"]) as im:
                    hashes[s["key"]] = (int(str(imagehash.phash(im)), 16), words(imagehash.phash(im, hash_size=16)),
                                        words(imagehash.dhash(im, hash_size=16)))
        want = t["key"].to_pylist()
        none = (0, np.zeros(4, np.uint64), np.zeros(4, np.uint64))
        ph += [hashes.get(k, none)[0] for k in want]
        ph256 += [hashes.get(k, none)[1] for k in want]
        dh += [hashes.get(k, none)[2] for k in want]
    truth = pq.read_table(truth_path, columns=["SAMPLE_ID", "dup_of", "dup_kind"]).to_pylist()
    dup_of = {str(r["SAMPLE_ID"]): (r["dup_of"], r["dup_kind"]) for r in truth}
    sids = [sample_of[k] for k in keys]
    row_of = {s: r for r, s in enumerate(sids)}
    orig = np.array([row_of.get(str(dup_of.get(s, (None, None))[0]), -1) for s in sids], np.int64)
    is_copy = orig >= 0
    kind = np.array([dup_of.get(s, (None, None))[1] or "" for s in sids], dtype=object)
    return {"key": np.array(keys, dtype=object), "emb": np.concatenate(embs), "clip": np.concatenate(clip),
            "sha": np.array(sha, dtype=object), "phash": np.array(ph, np.uint64), "phash256": np.stack(ph256),
            "dhash256": np.stack(dh),
            "is_copy": is_copy, "orig": orig, "kind": kind}


def candidate_pairs(emb: np.ndarray, phash: np.ndarray, min_cos: float, max_phash: int,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) with cosine >= min_cos or pHash distance <= max_phash: (i, j, cosine), brute force
    (a few thousand rows: this is a measurement, not the stage)."""
    n = len(emb)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    out_i, out_j, out_s = [], [], []
    for s in range(0, n, block):
        sim = x[s:s + block] @ x.T
        ham = np.bitwise_count(phash[s:s + block, None] ^ phash[None, :])
        i, j = np.nonzero((sim >= min_cos) | (ham <= max_phash))
        i = i + s
        keep = i < j
        out_i.append(i[keep])
        out_j.append(j[keep])
        out_s.append(sim[i[keep] - s, j[keep]])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def decide(n: int, i: np.ndarray, j: np.ndarray, clip: np.ndarray, keys: np.ndarray, keep: str) -> np.ndarray:
    """kept row per row under SemDeDup's rule with the stage's keep priority (best-clip-score or first)."""
    from curate.stages.dedup import core as sd

    prio = np.nan_to_num(clip.astype(np.float64), nan=-np.inf) if keep == "best-clip-score" else np.zeros(n)
    by_rank = np.lexsort((keys.astype(str), -prio))
    rank_of = np.empty(n, np.int64)
    rank_of[by_rank] = np.arange(n)
    ri, rj = rank_of[i], rank_of[j]
    kept_by, _ = sd.greedy_keep(n, np.minimum(ri, rj), np.maximum(ri, rj), np.full(len(i), sd.NEAR, np.int8))
    kept = np.arange(n)
    dropped = np.flatnonzero(kept_by >= 0)
    kept[by_rank[dropped]] = by_rank[kept_by[dropped]]
    return kept


def score(kept: np.ndarray, d: dict[str, np.ndarray]) -> dict[str, float]:
    """The report's per-row figures (a drop is right when the row is a copy whose original is present), and
    per true pair (right whichever member the keep policy kept): pair P = drops that name their true partner as
    kept_key / drops, pair R = true pairs with one member dropped for the other / true pairs."""
    n = len(kept)
    dup = kept != np.arange(n)
    partner = np.full(n, -1, np.int64)
    copies = np.flatnonzero(d["orig"] >= 0)
    partner[copies] = d["orig"][copies]
    partner[d["orig"][copies]] = copies
    right = dup & (partner >= 0) & (kept == partner)
    pair_r = float(np.mean(right[copies] | right[d["orig"][copies]])) if len(copies) else float("nan")
    tp, fp, fn = int((dup & d["is_copy"]).sum()), int((dup & ~d["is_copy"]).sum()), int((~dup & d["is_copy"]).sum())
    sizes = np.bincount(kept[dup], minlength=len(kept)) + 1
    by_kind = {k: round(float(dup[(d["kind"] == k) & d["is_copy"]].mean()), 2)
               for k in ("exact", "reencode", "resize", "crop")}
    return {"P": tp / (tp + fp) if tp + fp else float("nan"), "R": tp / (tp + fn) if tp + fn else float("nan"),
            "drops": int(dup.sum()), "largest": int(sizes.max() if dup.any() else 1), **by_kind,
            "pair_P": float(right.sum() / dup.sum()) if dup.any() else float("nan"), "pair_R": pair_r}


def stage_kept(dataset: Path, keys: np.ndarray) -> np.ndarray:
    """The kept row of each row (in `keys` order) as `curate dedup` wrote it in signals/dedup."""
    import pyarrow.parquet as pq

    from curate.io.layout import DatasetDir

    row = {k: i for i, k in enumerate(keys.tolist())}
    kept = np.arange(len(keys))
    for f in DatasetDir.at(dataset).signal_files("dedup"):
        t = pq.read_table(f, columns=["key", "kept_key"])
        for k, kk in zip(t["key"].to_pylist(), t["kept_key"].to_pylist(), strict=True):
            if k in row and kk in row:
                kept[row[k]] = row[kk]
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("ground_truth", type=Path)
    ap.add_argument("--scorer", default="score")
    ap.add_argument("--stage", action="store_true", help="score what `curate dedup` wrote (signals/dedup) instead "
                                                         "of the candidate rules")
    args = ap.parse_args()
    t0 = time.perf_counter()
    d = load(args.dataset, args.ground_truth, args.scorer)
    n = len(d["key"])
    if args.stage:
        s = score(stage_kept(args.dataset, d["key"]), d)
        print(f"curate dedup's signal tables ({n} scored rows, {int(d['is_copy'].sum())} true copies): precision "
              f"{s['P']:.3f}, recall {s['R']:.3f} per row; {s['pair_P']:.3f} / {s['pair_R']:.3f} per true pair; "
              f"{s['drops']} drops, largest group {s['largest']}; recall exact/reencode/resize/crop "
              f"{s['exact']}/{s['reencode']}/{s['resize']}/{s['crop']}")
        return
    i, j, cos = candidate_pairs(d["emb"], d["phash"], 0.95, 16)
    ph = np.bitwise_count(d["phash"][i] ^ d["phash"][j]).astype(int)
    p256 = np.bitwise_count(d["phash256"][i] ^ d["phash256"][j]).sum(axis=1).astype(int)
    d256 = np.bitwise_count(d["dhash256"][i] ^ d["dhash256"][j]).sum(axis=1).astype(int)
    same_sha = np.array([a is not None and a == b for a, b in zip(d["sha"][i], d["sha"][j], strict=True)])
    print(f"{n} scored rows, {int(d['is_copy'].sum())} true copies (original present), {len(i)} candidate pairs "
          f"(cosine >= 0.95 or 64-bit pHash <= 16), loaded in {time.perf_counter() - t0:.0f} s")
    rules: dict[str, np.ndarray] = {
        "sha256 only": same_sha,
        "curate v1 (demo): sha256 | pHash64 equal | cos >= 0.999": same_sha | (ph == 0) | (cos >= 0.999),
        "curate v2 (demo): sha256 | pHash256 equal | (cos >= 0.99 & pHash256 <= 8)":
            same_sha | (p256 == 0) | ((cos >= 0.99) & (p256 <= 8)),
    }
    for t in (0.999, 0.99, 0.98, 0.95):
        rules[f"sha256 | cos >= {t}"] = same_sha | (cos >= t)
    for h in (0, 4, 8):
        rules[f"sha256 | pHash64 <= {h}"] = same_sha | (ph <= h)
    for t in (0.999, 0.99):
        for h in (0, 4, 8):
            rules[f"sha256 | (cos >= {t} & pHash64 <= {h})"] = same_sha | ((cos >= t) & (ph <= h))
    for t in (0.999, 0.995, 0.99, 0.98, 0.95):
        for h in (4, 8, 16, 24):
            rules[f"sha256 | (cos >= {t} & pHash256 <= {h})"] = same_sha | ((cos >= t) & (p256 <= h))
    for t in (0.99,):
        for h in (8, 16):
            rules[f"sha256 | (cos >= {t} & dHash256 <= {h})"] = same_sha | ((cos >= t) & (d256 <= h))
            rules[f"sha256 | (cos >= {t} & pHash256 <= {h} & dHash256 <= {h})"] = \
                same_sha | ((cos >= t) & (p256 <= h) & (d256 <= h))
    print("| rule | keep | precision | recall | pair P | pair R | drops | largest group | "
          "recall exact/reencode/resize/crop |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, m in rules.items():
        for keep in ("best-clip-score", "first"):
            s = score(decide(n, i[m], j[m], d["clip"], d["key"], keep), d)
            print(f"| {name} | {keep} | {s['P']:.3f} | {s['R']:.3f} | {s['pair_P']:.3f} | {s['pair_R']:.3f} | "
                  f"{s['drops']} | {s['largest']} | {s['exact']}/{s['reencode']}/{s['resize']}/{s['crop']} |")
    true = (d["orig"][i] == j) | (d["orig"][j] == i)
    print(f"\ncandidate pairs: {int(true.sum())} true (copy, original) of {int(d['is_copy'].sum())}, "
          f"{int((~true).sum())} other; percentiles 5/25/50/75/95:")
    for name, v in (("cosine", cos), ("pHash64", ph), ("pHash256", p256), ("dHash256", d256)):
        for label, sel in (("true", true), ("other", ~true)):
            q = np.percentile(v[sel], [5, 25, 50, 75, 95]) if sel.any() else []
            print(f"  {name:8s} {label:5s} " + " ".join(f"{x:.4g}" for x in q))
    for k in ("exact", "reencode", "resize", "crop"):
        sel = true & ((d["kind"][i] == k) | (d["kind"][j] == k))
        if sel.any():
            print(f"  {k:8s} true pairs {int(sel.sum())}: pHash256 median {np.median(p256[sel]):.0f}, "
                  f"90th {np.percentile(p256[sel], 90):.0f}; cosine min {cos[sel].min():.4f}")


if __name__ == "__main__":
    main()
