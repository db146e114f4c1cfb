"""Benchmark train-probe: training samples/s of the shipped small config, decode and eval cost, demo estimate.

    .venv/bin/python bench/train_probe.py [--samples-seen 2048] [--batch-size 128] [--device auto]
                                          [--model curate-tiny] [--image-size 64] [--threads 0]

    .venv/bin/python bench/train_probe.py --sensitivity [--misaligned 0.5] [--seeds 3] [--samples-seen 4096]

Trains on the demo corpus's trusted seed split (written as a dataset dir under bench-out/) and evaluates on
its eval split, exactly as `curate train-probe` does; prints one figure per line. The demo estimate counts
the runs pipelines/demo.yaml asks for (filter model + raw/curated x 3 seeds + a 4-fraction sweep).

--sensitivity measures which metric tells a clean training set from a damaged one: `curate train-probe`
trains on the seed split ("clean") and on the same images with a share of captions swapped for another
category's ("misaligned"), paired by seed, and prints each metric's difference with its 95% bootstrap CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DEMO_RUNS = 1 + 2 * 3 + (3 * 2 + 1)  # filter model, raw/curated x 3 seeds, sweep 0.1/0.3/0.5 top+random, 100%


def main() -> None:
    # long: argument parsing, one timed training run and the figures it prints, read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples-seen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="curate-tiny")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench-out/train_probe")
    ap.add_argument("--demo-samples-seen", type=int, default=None,
                    help="samples seen per run for the demo estimate (default: TrainConfig's default)")
    ap.add_argument("--sensitivity", action="store_true", help="clean vs misaligned captions, paired CIs per metric")
    ap.add_argument("--misaligned", type=float, default=0.5, help="--sensitivity: share of captions swapped")
    ap.add_argument("--seeds", type=int, default=3, help="--sensitivity: seeds per subset")
    args = ap.parse_args()
    if args.sensitivity:
        sensitivity(args)
        return

    import torch

    from curate.demo.corpus import write_split_dataset
    from curate.train_probe.data import load_samples
    from curate.train_probe.evaluate import evaluate_model
    from curate.train_probe.train import TrainConfig, model_config, resolve_device, train_run

    out = Path(args.out)
    seed_dir = write_split_dataset("seed", out / "demo-seed")
    eval_dir = write_split_dataset("eval", out / "demo-eval")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, image_size=args.image_size, samples_seen=args.samples_seen,
                      batch_size=args.batch_size, curve_points=1, device=device, threads=args.threads)
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_config(cfg)[0])
    t = time.perf_counter()
    train = load_samples(seed_dir, cfg.image_size, tokenizer, threads=os.cpu_count() or 1)
    decode_s = time.perf_counter() - t
    eval_set = load_samples(eval_dir, cfg.image_size, tokenizer, flag="--eval", label_column="label")
    eval_times: list[float] = []

    def evaluate(model, tok):
        t0 = time.perf_counter()
        m = evaluate_model(model, tok, eval_set, device)
        eval_times.append(time.perf_counter() - t0)
        return m

    # a short warm-up run first: allocator, oneDNN kernels and (on GPU) CUDA context are not steady-state
    train_run(train, TrainConfig(**{**cfg.__dict__, "samples_seen": 2 * cfg.batch_size}), 0, device=device)
    model, result = train_run(train, cfg, 0, evaluate=evaluate, device=device)
    params = sum(p.numel() for p in model.parameters())
    sps = result["samples_per_second"]
    demo_seen = args.demo_samples_seen or TrainConfig().samples_seen
    demo_min = DEMO_RUNS * (demo_seen / sps + eval_times[-1] * TrainConfig().curve_points) / 60
    figures = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": args.model, "params_millions": round(params / 1e6, 2), "image_size": cfg.image_size,
        "batch_size": cfg.batch_size, "samples_seen": result["samples_seen"],
        "train_samples_per_second": sps, "train_seconds": result["train_seconds"],
        "decode_images_per_second": round(len(train) / decode_s, 1), "eval_seconds": round(eval_times[-1], 2),
        "eval_samples": len(eval_set), "demo_runs": DEMO_RUNS, "demo_samples_seen_per_run": demo_seen,
        "demo_train_probe_minutes_estimate": round(demo_min, 1),
    }
    for k, v in figures.items():
        print(f"{k}: {v}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")


def write_misaligned(out: Path, share: float) -> Path:
    """The seed split as a dataset dir with `share` of its captions replaced by another category's caption."""
    import random

    import pyarrow as pa

    from curate.demo.corpus import _ledger_row, load_split
    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.shards import ShardWriter
    from curate.io.tables import write_table

    ds = DatasetDir.at(out)
    if ds.marker("download", "00000").exists():
        return ds.root
    rows = load_split("seed").to_pylist()
    rng = random.Random(0)
    for i in rng.sample(range(len(rows)), round(share * len(rows))):
        j = rng.randrange(len(rows))
        while rows[j]["category"] == rows[i]["category"]:
            j = rng.randrange(len(rows))
        rows[i] = {**rows[i], "caption": rows[j]["caption"]}
    ledger = []
    with ShardWriter(ds.shard_tar("00000")) as w:
        for k, r in enumerate(rows):
            row = _ledger_row(f"00000{k:05d}", "00000", k, r, "seed")
            w.write(row["key"], r["image"], "jpg", r["caption"], {c: v for c, v in row.items() if c != "caption"})
            ledger.append(row)
    schema = pa.schema([*LEDGER_FIELDS, pa.field("image_id", pa.string()), pa.field("category", pa.string()),
                        pa.field("label", pa.string())])
    write_table(ds.ledger("00000"), pa.Table.from_pylist(ledger, schema=schema))
    write_json(ds.marker("download", "00000"), {"shard": "00000", "stats": {"rows": len(rows)}})
    return ds.root


def sensitivity(args: argparse.Namespace) -> None:
    from curate.cli import main as curate
    from curate.demo.corpus import write_split_dataset

    out = Path(args.out)
    clean = write_split_dataset("seed", out / "demo-seed")
    eval_dir = write_split_dataset("eval", out / "demo-eval")
    bad = write_misaligned(out / f"misaligned-{args.misaligned:g}", args.misaligned)
    probe = out / f"sensitivity-{args.misaligned:g}-{args.seeds}x{args.samples_seen}"
    t = time.perf_counter()
    rc = curate(["train-probe", "--subset", f"clean={clean}", "--subset", f"misaligned={bad}", "--eval", str(eval_dir),
                 "--seeds", str(args.seeds), "--samples-seen", str(args.samples_seen), "--templates", "clipart",
                 "--batch-size", str(args.batch_size), "--model", args.model, "--image-size", str(args.image_size),
                 "--out", str(probe), "--curve-points", "1"])
    if rc:
        raise SystemExit(rc)
    res = json.loads((probe / "results.json").read_text())
    metrics = ("retrieval_r5", "zeroshot_balanced", "zeroshot_top1")
    print(f"clean vs {args.misaligned:.0%} misaligned captions, {args.seeds} seeds x {args.samples_seen} samples seen, "
          f"{time.perf_counter() - t:.0f} s")
    for c in res["comparisons"]:
        print(f"  {c['verdict']}")
    print(json.dumps({s["subset"]: {m: round(s[f"{m}_mean"], 4) for m in metrics} for s in res["summary"]}))


if __name__ == "__main__":
    main()
