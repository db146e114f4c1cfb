"""Demo acceptance for search: each eval-split class name as a text query, precision@10 of that class,
measured with the demo's filter model, against the class's share of the split.

    python bench/search_demo.py [--out bench-out/search-demo] [--samples-seen 12288]

Runs only the demo steps search needs, with the same settings as pipelines/demo.yaml: the trusted seed and
labelled eval splits as dataset dirs, the filter model trained on the seed split (`curate train-probe
--save-model`), the eval split scored with it (`curate score`), indexed (`curate index`) and searched
(`curate search --json`, so the query goes through the CLI and the scorer's own tokenizer). Resumable:
every step skips what is already done.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections import Counter
from pathlib import Path


def run(argv: list[str]) -> str:
    """Run a curate command in-process; returns its stdout; a failure stops the bench."""
    from curate.cli import main

    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"curate {' '.join(argv[:2])} exited with {rc}")
    print(f"  curate {argv[0]} ... {time.time() - t0:.1f}s")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/search-demo")
    ap.add_argument("--samples-seen", type=int, default=12288, help="As pipelines/demo.yaml's filter-model step.")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from curate.demo.corpus import write_split_dataset
    from curate.io.layout import DatasetDir
    from curate.train_probe.evaluate import class_prompt_name

    out = Path(args.out)
    seed, evalset = write_split_dataset("seed", out / "demo-seed"), write_split_dataset("eval", out / "demo-eval")
    model = out / "filter-model"
    if not (model / "model.safetensors").exists():
        run(["train-probe", "--subset", f"trusted={seed}", "--eval", str(evalset), "--save-model", str(model),
             "--templates", "clipart", "--samples-seen", str(args.samples_seen),
             "--out", str(out / "filter-model-probe")])
    weights = ["--model", str(model / "model_config.json"), "--pretrained", str(model / "model.safetensors")]
    # text embeddings too (the demo pipeline does not save them): they add the caption-search column and
    # change nothing in the image embeddings or clip scores
    run(["score", str(evalset), *weights, "--save-text-embeddings", "--no-progress"])
    run(["score", str(seed), *weights, "--no-progress"])
    run(["index", str(evalset), "--no-progress"])

    ds = DatasetDir.at(evalset)
    label = {r["key"]: r["label"] for f in ds.ledger_files() for r in pq.read_table(f, columns=["key", "label"]).to_pylist()}
    counts = Counter(label.values())
    classes = sorted(counts)
    queries = [class_prompt_name(c) for c in classes]
    image_hits = json.loads(run(["search", str(evalset), *queries, "-k", str(args.k), "--json"]))["queries"]
    text_hits = json.loads(run(["search", str(evalset), *queries, "-k", str(args.k), "--json",
                                "--modality", "text"]))["queries"]
    example_hits = seed_example_hits(Path(seed), Path(evalset), classes, args.k)
    n = len(label)

    def precision(c: str, hits: list[dict]) -> float:
        return sum(label[h["key"]] == c for h in hits) / max(1, len(hits))

    print(f"\neval split: {n} images, {len(classes)} classes; filter model: curate-tiny trained on the seed split "
          f"({args.samples_seen} samples seen), as pipelines/demo.yaml trains it")
    print(f"| class | share | 3x share | p@{args.k} class name -> images | p@{args.k} class name -> captions "
          f"| p@{args.k} seed images of the class -> images |")
    print("|---|---:|---:|---:|---:|---:|")
    cols = {"image": [], "text": [], "examples": []}
    for c, qi, qt in zip(classes, image_hits, text_hits, strict=True):
        share = counts[c] / n
        row = {"image": precision(c, qi["hits"]), "text": precision(c, qt["hits"]),
               "examples": precision(c, example_hits.get(c, []))}
        for key, v in row.items():
            cols[key].append(v >= 3 * share)
        marks = {key: f"{v:.2f}{' ✓' if v >= 3 * share else ''}" for key, v in row.items()}
        print(f"| {c} | {share:.3f} | {3 * share:.2f} | {marks['image']} | {marks['text']} | {marks['examples']} |")
    print("| classes at >= 3x share | | | " + " | ".join(f"{sum(v)}/{len(classes)}" for v in cols.values()) + " |")


def seed_example_hits(seed: Path, evalset: Path, classes: list[str], k: int) -> dict[str, list[dict]]:
    """Query by example: the normalised mean of the class's seed-split image embeddings (the same model)."""
    import numpy as np
    import pyarrow.parquet as pq

    from curate.io.layout import DatasetDir
    from curate.search.searcher import Searcher

    sds = DatasetDir.at(seed)
    vecs: dict[str, list[np.ndarray]] = {}
    for shard in sds.done_shards("score"):
        lab = {r["key"]: r["label"] for r in pq.read_table(sds.ledger(shard), columns=["key", "label"]).to_pylist()}
        emb = np.load(sds.signals("score", shard, ".img_emb.npy")).astype(np.float32)
        for r in pq.read_table(sds.signals("score", shard), columns=["key", "scored", "emb_row"]).to_pylist():
            if r["scored"]:
                vecs.setdefault(lab[r["key"]], []).append(emb[r["emb_row"]])
    s = Searcher(evalset)
    try:
        out = {}
        for c in classes:
            if c in vecs:
                q = np.mean(vecs[c], axis=0)
                out[c] = s.search(q / np.linalg.norm(q), k)
        return out
    finally:
        s.close()

if __name__ == "__main__":
    main()
