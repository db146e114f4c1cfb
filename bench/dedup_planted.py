"""dedup's defaults on a corpus curate was never tuned on: random drawings with planted copies (exact,
re-encoded, downscaled, brightened; tests/planted_copies.py), scored by an untrained tiny open_clip model
(random init: look-alike drawings sit close together, as under a small filter model), then `curate dedup`
with its defaults, with --no-phash, and with --threshold auto. Prints precision and recall against the
planted groups and the flagged share against the planted share, one line per run.

    python bench/dedup_planted.py [--originals 360] [--copies-per-kind 10] [--seed 0] [--out bench-out/planted]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the corpus generator and the dataset writer the tests use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--originals", type=int, default=360)
    ap.add_argument("--copies-per-kind", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/planted"))
    a = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    from dataset_factory import make_dataset
    from pipeline_data import score_args, write_tiny_config
    from planted_copies import planted_corpus, scores

    from curate.cli import main as curate
    from curate.io import manifest
    from curate.io.layout import DatasetDir
    from curate.io.tables import write_table

    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    images, truth, _ = planted_corpus(a.originals, a.copies_per_kind, a.seed)
    base = a.out / "scored"
    ds = make_dataset(base, [(img, f"a drawing, number {i}", "success") for i, img in enumerate(images)],
                      shard_size=1000)
    for f in ds.ledger_files():
        t = pq.read_table(f)
        sha = [hashlib.sha256(images[r]).hexdigest() for r in t["row"].to_pylist()]
        write_table(f, t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string())))
    assert curate(score_args(base, write_tiny_config(a.out))) == 0
    print(f"planted corpus: {len(images)} rows, {sum(t is not None for t in truth)} planted copies "
          f"(seed {a.seed}); untrained tiny open_clip embeddings")
    for name, args in (("default", []), ("--no-phash", ["--no-phash"]), ("--threshold auto", ["--threshold", "auto"]),
                       ("--threshold auto --no-phash", ["--threshold", "auto", "--no-phash"])):
        run = a.out / name.replace(" ", "_").replace("-", "")
        shutil.copytree(base, run)
        t0 = time.perf_counter()
        assert curate(["dedup", str(run), "--no-progress", "--device", "cpu", *args]) == 0
        d = DatasetDir.at(run)
        row_of = {r["key"]: r["row"] for f in d.ledger_files()
                  for r in pq.read_table(f, columns=["key", "row"]).to_pylist()}
        flagged = {row_of[r["key"]] for f in d.signal_files("dedup")
                   for r in pq.read_table(f, columns=["key", "is_duplicate"]).to_pylist() if r["is_duplicate"]}
        s = scores(flagged, truth)
        c = manifest.load(d)["stages"]["dedup"]["counts"]
        print(f"  dedup {name:<28} precision {s['precision']:.3f}  recall {s['recall']:.3f}  flagged "
              f"{s['flagged']} ({s['flagged_share']:.1%}, {s['flagged_share'] / s['planted_share']:.2f}x planted)  "
              f"threshold {c.get('threshold')}  warning {'yes' if c.get('overflag_warning') else 'no'}  "
              f"{time.perf_counter() - t0:.1f} s")
        print("    " + json.dumps({"drops_by_evidence": c.get("drops_by_evidence"),
                                   "near_pairs_without_phash_match": c.get("near_pairs_without_phash_match")}))


if __name__ == "__main__":
    main()
