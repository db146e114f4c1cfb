"""Filter-model recipes for the demo's search, compared over several seeds: each recipe trains the demo's filter
model on the trusted seed split (as `curate train-probe --save-model` does: 20% of the pairs held out, half of
them to stop early, half for the check), then every eval-split class name is a text query and precision@10 of
that class is measured against 3x its share, through image embeddings, caption embeddings and both fused by
reciprocal rank (the same rule as `curate search --modality both`), plain and as clipart prompt ensembles.

    python bench/filter_recipes.py [--seeds 3] [--recipe NAME ...]

The recipe is chosen on the held-out trusted pairs (their retrieval R@5), never on the eval split; the eval
labels only measure. In-process (the train-probe and search code, exact brute force over the same
embeddings); bench/search_demo.py runs the chosen recipe through the CLI (train-probe, score, index, search).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from curate.search.searcher import RRF_DEPTH, RRF_K

# name -> TrainConfig fields (the rest at train-probe's defaults, plus what --save-model adds: crops, 10
# evaluation points); bench/search_demo.py --recipe lays them over pipelines/demo.yaml's filter-model step
RECIPES: dict[str, dict[str, Any]] = {
    "before": {"samples_seen": 12288, "caption_augment": False},  # the demo's filter model before issue 17's work
    "caption-aug": {"caption_augment": True, "samples_seen": 12288},
    "caption-aug-24k": {"caption_augment": True, "samples_seen": 24576},
    "caption-aug-49k": {"caption_augment": True, "samples_seen": 49152},
    "caption-aug-98k": {"caption_augment": True, "samples_seen": 98304},
    "caption-aug-inflect-24k": {"caption_augment": True, "caption_inflect": 0.5, "samples_seen": 24576},
    "caption-aug-inflect-49k": {"caption_augment": True, "caption_inflect": 0.5, "samples_seen": 49152},
    "caption-aug-jitter-24k": {"caption_augment": True, "jitter": 0.3, "samples_seen": 24576},
    "caption-aug-49k-batch64": {"caption_augment": True, "samples_seen": 49152, "batch_size": 64},
}
MODES = ("image", "caption", "both", "image+tpl", "caption+tpl", "both+tpl")


def rank_fuse(lists: list[np.ndarray]) -> np.ndarray:
    """Reciprocal rank fusion of score vectors over the same rows, each cut at its top RRF_DEPTH."""
    total = np.zeros(len(lists[0]))
    for s in lists:
        top = np.argsort(-s, kind="stable")[:RRF_DEPTH]
        total[top] += 1.0 / (RRF_K + np.arange(1, len(top) + 1))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/filter-recipes")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="Default: all.")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    import open_clip

    from curate.demo.corpus import write_split_dataset
    from curate.train_probe.data import load_samples
    from curate.train_probe.train import TrainConfig, model_config

    out = Path(args.out)
    model_config(TrainConfig())  # registers curate's model configs with open_clip
    tok = open_clip.get_tokenizer("curate-tiny")
    seed = load_samples(write_split_dataset("seed", out / "demo-seed"), 64, tok)
    ev = load_samples(write_split_dataset("eval", out / "demo-eval"), 64, tok, label_column="label")
    labels = np.array(ev.labels)
    classes = sorted(set(ev.labels))
    share = np.array([(labels == c).mean() for c in classes])
    done = json.loads((out / "results.json").read_text())["runs"] if (out / "results.json").exists() else {}
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.recipe or list(RECIPES):
        results[name] = []
        for s in range(args.seeds):
            prev = [r for r in done.get(name, []) if r["seed"] == s and r.get("recipe") == RECIPES[name]]
            if prev:  # resumed: each finished run is written as it ends
                results[name].append(prev[0])
                continue
            t0 = time.time()
            model, check = train_filter(seed, replace(TrainConfig(threads=2), **RECIPES[name]), s)
            p = precision_at_k(model, tok, ev, classes, labels, args.k)
            results[name].append({"seed": s, "recipe": RECIPES[name], "check_r5": check, "p": p})
            done.setdefault(name, []).append(results[name][-1])
            (out / "results.json").write_text(json.dumps({"classes": classes, "share": share.tolist(), "runs": done}))
            passed = {m: int((np.array(v) >= 3 * share).sum()) for m, v in p.items()}
            print(f"{name} seed {s}: held-out R@5 {check:.3f}, classes at >= 3x share {passed} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    print_tables(results, classes, share, args.seeds)


def train_filter(seed: Any, cfg: Any, s: int) -> tuple[Any, float]:
    """The --save-model path of train-probe: (model, held-out check R@5)."""
    from curate.train_probe.quality import heldout_retrieval, split_holdout
    from curate.train_probe.run import filter_train_config
    from curate.train_probe.train import train_run

    train_rows, held = split_holdout(seed.keys, 0.2)
    stop, check = seed.select(held[0::2]), seed.select(held[1::2])
    model, _ = train_run(seed.select(train_rows), filter_train_config(cfg), s, patience=3,
                         early_stop=lambda m: heldout_retrieval(m, stop, "cpu")["retrieval_r5"])
    return model, heldout_retrieval(model, check, "cpu")["retrieval_r5"]


def precision_at_k(model: Any, tok: Any, ev: Any, classes: list[str], labels: np.ndarray,
                   k: int) -> dict[str, list[float]]:
    """{mode: [p@k per class]} for class-name queries against the eval split's image and caption embeddings."""
    import torch

    from curate.train_probe.data import tokenize
    from curate.train_probe.evaluate import class_prompt_name, encode_images, encode_texts
    from curate.train_probe.templates import load_templates

    img = encode_images(model, ev.images, 256, "cpu").numpy()
    cap = encode_texts(model, ev.tokens, 256, "cpu").numpy()
    out: dict[str, list[float]] = {}
    for suffix, tpl in (("", ("{c}",)), ("+tpl", load_templates("clipart"))):
        prompts = [t.format(c=class_prompt_name(c)) for c in classes for t in tpl]
        q = encode_texts(model, tokenize(tok, prompts), 64, "cpu").view(len(classes), len(tpl), -1).mean(1)
        q = torch.nn.functional.normalize(q, dim=-1).numpy()
        si, sc = q @ img.T, q @ cap.T
        for mode, scores in (("image", si), ("caption", sc), ("both", None)):
            vals = []
            for i, c in enumerate(classes):
                s = rank_fuse([si[i], sc[i]]) if scores is None else scores[i]
                vals.append(float((labels[np.argsort(-s, kind="stable")[:k]] == c).mean()))
            out[mode + suffix] = vals
    return out


def print_tables(results: dict[str, list[dict[str, Any]]], classes: list[str], share: np.ndarray,
                 seeds: int) -> None:
    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    print(f"\nclasses (of {len(classes)}) at >= 3x share, mean ± sd over {seeds} seed(s); held-out R@5 chooses")
    print("| recipe | held-out R@5 | " + " | ".join(MODES) + " |")
    print("|---|---:|" + "---:|" * len(MODES))
    for name, runs in results.items():
        passed = {m: [float((np.array(r["p"][m]) >= 3 * share).sum()) for r in runs] for m in MODES}
        print(f"| {name} | {ms([r['check_r5'] for r in runs])} | " + " | ".join(ms(passed[m]) for m in MODES) + " |")
    best = max(results, key=lambda n: statistics.mean(r["check_r5"] for r in results[n]))
    print(f"\nper class, recipe {best} (best held-out R@5), mean p@10 over seeds (✓: mean >= 3x share)")
    print("| class | 3x share | " + " | ".join(MODES) + " |")
    print("|---|---:|" + "---:|" * len(MODES))
    for i, c in enumerate(classes):
        cells = []
        for m in MODES:
            v = statistics.mean(r["p"][m][i] for r in results[best])
            cells.append(f"{v:.2f}{' ✓' if v >= 3 * share[i] else ''}")
        print(f"| {c} | {3 * share[i]:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
