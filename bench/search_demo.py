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
             "--samples-seen", str(args.samples_seen), "--out", str(out / "filter-model-probe")])
    run(["score", str(evalset), "--model", str(model / "model_config.json"),
         "--pretrained", str(model / "model.safetensors"), "--no-progress"])
    run(["index", str(evalset), "--no-progress"])

    ds = DatasetDir.at(evalset)
    label = {r["key"]: r["label"] for f in ds.ledger_files() for r in pq.read_table(f, columns=["key", "label"]).to_pylist()}
    counts = Counter(label.values())
    classes = sorted(counts)
    doc = json.loads(run(["search", str(evalset), *[class_prompt_name(c) for c in classes], "-k", str(args.k), "--json"]))
    n = len(label)
    print(f"\neval split: {n} images, {len(classes)} classes; query = class name; filter model: curate-tiny trained "
          f"on the seed split ({args.samples_seen} samples seen)")
    print(f"| class | query | share | precision@{args.k} | ratio | >= 3x |")
    print("|---|---|---:|---:|---:|:---:|")
    passed = 0
    for c, q in zip(classes, doc["queries"], strict=True):
        hits = q["hits"]
        prec = sum(label[h["key"]] == c for h in hits) / len(hits)
        share = counts[c] / n
        ok = prec >= 3 * share
        passed += ok
        print(f"| {c} | {q['query']} | {share:.3f} | {prec:.2f} | {prec / share:.1f}x | {'yes' if ok else 'no'} |")
    mean_p = sum(sum(label[h["key"]] == c for h in q["hits"]) / len(q["hits"])
                 for c, q in zip(classes, doc["queries"], strict=True)) / len(classes)
    print(f"\n{passed}/{len(classes)} classes at >= 3x their share; mean precision@{args.k} {mean_p:.3f} "
          f"(random: {sum((counts[c] / n) for c in classes) / len(classes):.3f})")


if __name__ == "__main__":
    main()
