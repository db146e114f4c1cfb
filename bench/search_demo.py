"""Demo acceptance for search: each eval-split class name as a text query, precision@10 of that class,
measured with the demo's filter model, against the class's share of the split.

    python bench/search_demo.py [--out bench-out/search-demo] [--recipe NAME]
    python bench/search_demo.py --model ViT-B-32 --pretrained /path/to/weights   # a model you bring

Runs only the demo steps search needs: the trusted seed and labelled eval splits as dataset dirs, the filter
model trained on the seed split with pipelines/demo.yaml's filter-model step (read from the file; `--recipe`
overrides fields with one of bench/filter_recipes.py's recipes), the eval split scored with it (`curate
score`), indexed (`curate index`) and searched (`curate search --json`, so the query goes through the CLI
and the scorer's own tokenizer) through image embeddings, caption embeddings and both fused, plain and with
`--templates clipart`. With `--model`/`--pretrained` the same splits and queries go through that open_clip
model instead (no training): the check to run with a pretrained CLIP, which this offline machine cannot
download. Resumable: every step skips what is already done.
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
    # long because it is the bench's script: build, train, score, index, query, then one printed table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from filter_recipes import RECIPES

    ap.add_argument("--out", default="bench-out/search-demo")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                    help="Train the filter model with this recipe of bench/filter_recipes.py instead of the "
                         "pipeline's (its fields override the filter-model step's).")
    ap.add_argument("--pipeline", default="pipelines/demo.yaml")
    ap.add_argument("--model", default=None,
                    help="Score with this open_clip model (a name such as ViT-B-32, or a model_config.json) "
                         "instead of training the filter model: the same queries through a model you bring.")
    ap.add_argument("--pretrained", default=None, help="Weights for --model (a file, or an open_clip tag).")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from curate.demo.corpus import write_split_dataset
    from curate.io.layout import DatasetDir
    from curate.train_probe.evaluate import class_prompt_name

    if args.model and (args.recipe or not args.pretrained):
        ap.error("--model needs --pretrained and replaces the filter model, so it takes no --recipe")
    out = Path(args.out) / (args.recipe or ("model-" + Path(args.model).stem if args.model else "pipeline"))
    seed, evalset = write_split_dataset("seed", out / "demo-seed"), write_split_dataset("eval", out / "demo-eval")
    model = out / "filter-model"
    step = filter_model_step(args.pipeline, RECIPES[args.recipe] if args.recipe else {})
    if not args.model and not (model / "model.safetensors").exists():
        from curate.api import to_argv

        fields = {**step, "subset": [f"trusted={seed}"], "eval": str(evalset), "save_model": str(model),
                  "out": str(out / "filter-model-probe")}
        run(to_argv("train-probe", fields, args.pipeline))
    weights = (["--model", args.model, "--pretrained", args.pretrained] if args.model else
               ["--model", str(model / "model_config.json"), "--pretrained", str(model / "model.safetensors")])
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
    hits: dict[str, list[dict]] = {}
    for modality, name in (("image", "images"), ("text", "captions"), ("both", "both")):
        for tpl in ((), ("--templates", "clipart")):
            doc = json.loads(run(["search", str(evalset), *queries, "-k", str(args.k), "--json",
                                  "--modality", modality, *tpl]))
            hits[name + (" +clipart" if tpl else "")] = doc["queries"]
    hits["seed images of the class -> images"] = [{"hits": h} for h in
                                                 seed_example_hits(Path(seed), Path(evalset), classes, args.k)]
    n = len(label)

    def precision(c: str, found: list[dict]) -> float:
        return sum(label[h["key"]] == c for h in found) / max(1, len(found))

    recipe = {k: v for k, v in step.items() if k not in ("stage", "id")}
    source = (f"{args.model} with {args.pretrained}" if args.model else
              f"trained on the seed split by {args.pipeline}'s filter-model step"
              f"{f' with recipe {args.recipe}' if args.recipe else ''}: {recipe}")
    print(f"\neval split: {n} images, {len(classes)} classes; model: {source}")
    print(f"p@{args.k} of each class name as a text query, through: " + "; ".join(hits))
    print("| class | share | 3x share | " + " | ".join(hits) + " |")
    print("|---|---:|---:|" + "---:|" * len(hits))
    passed = {name: 0 for name in hits}
    for i, c in enumerate(classes):
        share = counts[c] / n
        cells = []
        for name, per_query in hits.items():
            v = precision(c, per_query[i]["hits"])
            passed[name] += v >= 3 * share
            cells.append(f"{v:.2f}{' ✓' if v >= 3 * share else ''}")
        print(f"| {c} | {share:.3f} | {3 * share:.2f} | " + " | ".join(cells) + " |")
    print("| **classes at >= 3x share** | | | " + " | ".join(f"**{v}/{len(classes)}**" for v in passed.values())
          + " |")


def filter_model_step(pipeline: str, recipe: dict) -> dict:
    """The pipeline's filter-model step fields (paths left out), with the recipe's fields over them."""
    import yaml

    stages = yaml.safe_load(Path(pipeline).read_text())["stages"]
    step = next(s for s in stages if s.get("id") == "filter-model")
    fields = {k: v for k, v in step.items() if k not in ("stage", "id", "subset", "eval", "save_model", "out")}
    return {**fields, **recipe}


def seed_example_hits(seed: Path, evalset: Path, classes: list[str], k: int) -> list[list[dict]]:
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
        out = []
        for c in classes:
            q = np.mean(vecs[c], axis=0) if c in vecs else None
            out.append(s.search(q / np.linalg.norm(q), k) if q is not None else [])
        return out
    finally:
        s.close()

if __name__ == "__main__":
    main()
