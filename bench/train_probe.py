"""Benchmark train-probe: training samples/s of the shipped small config, decode and eval cost, demo estimate.

    .venv/bin/python bench/train_probe.py [--samples-seen 2048] [--batch-size 128] [--device auto]
                                          [--model curate-tiny] [--image-size 64] [--threads 0]

Trains on the demo corpus's trusted seed split (written as a dataset dir under bench-out/) and evaluates on
its eval split, exactly as `curate train-probe` does; prints one figure per line. The demo estimate counts
the runs pipelines/demo.yaml asks for (filter model + raw/curated x 3 seeds + a 4-fraction sweep).
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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
