"""Benchmark `curate score`: images/s of the whole stage vs the model's forward pass alone, in one run.

The stage figure covers everything a shard task does (read the tar, decode, preprocess, tokenize, both
encoders, language ID, write parquet + npy, markers); the forward figure runs both encoders on the
same preprocessed batches, same batch size and thread count. ratio = stage / forward (1.0 = the
data path costs nothing). The model is loaded before timing (a one-time cost, printed separately).

    python bench/score.py                                   # shipped curate-tiny config (64 px)
    python bench/score.py --model ViT-B-32 --images 512     # ViT-B-32, random init (no download)
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.engines import EngineSpec
from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.ledger import LEDGER_FIELDS
from curate.io.shards import ShardWriter
from curate.io.tables import write_table

CAPTIONS = ["a dog running on the beach", "red sports car parked in front of a house",
            "Ein Haus am See im Sommer", "bowl of fresh fruit on a wooden table", "IMG_2041.JPG",
            "mountain landscape with snow and a blue sky", "a cat sleeping on a sofa"]


def synthetic_jpeg(rng: np.random.Generator, px: int) -> bytes:
    """A photo-like JPEG: smooth gradients plus mild noise (compresses like a photo, not like noise)."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    c = rng.uniform(0, 1, (3, 3))
    arr = np.stack([c[i, 0] * xx + c[i, 1] * yy + c[i, 2] * xx * yy for i in range(3)], -1) * 200
    arr += rng.normal(0, 12, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype("uint8"), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_dataset(root: Path, n: int, per_shard: int, px: int) -> DatasetDir:
    shutil.rmtree(root, ignore_errors=True)
    ds = DatasetDir.at(root)
    rng = np.random.default_rng(0)
    pool = [synthetic_jpeg(rng, px) for _ in range(64)]  # 64 distinct images, reused
    for s in range(0, n, per_shard):
        shard = shard_name(s // per_shard)
        rows = []
        with ShardWriter(ds.shard_tar(shard)) as w:
            for j in range(min(per_shard, n - s)):
                key = sample_key(shard_name(s // per_shard), j)
                data, cap = pool[(s + j) % len(pool)], CAPTIONS[(s + j) % len(CAPTIONS)]
                row = {f.name: None for f in LEDGER_FIELDS}
                row.update(key=key, shard=shard, row=s + j, caption=cap, status="success", bytes=len(data),
                           width=px, height=px, orig_width=px, orig_height=px)
                w.write(key, data, "jpg", cap, {"key": key})
                rows.append(row)
        write_table(ds.ledger(shard), pa.Table.from_pylist(rows, schema=pa.schema(LEDGER_FIELDS)))
        write_json(ds.marker("download", shard), {"shard": shard})
    return ds


def forward_only(cfg, ds: DatasetDir, lm) -> tuple[float, int]:
    """Seconds for both encoders over the same preprocessed batches the stage used."""
    from curate.stages.score import ShardSamples, encode, make_loader, torch_settings

    batches = []
    for shard in ds.shards():
        keys = frozenset(r["key"] for r in pq_rows(ds.ledger(shard)))
        loader = make_loader(ShardSamples(str(ds.shard_tar(shard)), keys, lm.preprocess, lm.tokenizer,
                                          lm.image_size), cfg.batch_size, 0, False)
        batches += [(b["images"], b["tokens"]) for b in loader if b["images"] is not None]
    # the baseline is the model at its best: all cores, no decoding beside it
    with torch_settings(0):
        encode(lm, *batches[0], cfg.precision)  # warm-up
        t0 = time.perf_counter()
        for images, tokens in batches:
            encode(lm, images, tokens, cfg.precision)
        return time.perf_counter() - t0, sum(len(b[0]) for b in batches)


def pq_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["key"]).to_pylist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="curate-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--per-shard", type=int, default=1024)
    ap.add_argument("--image-px", type=int, default=256, help="stored image size (img2dataset's default)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="alternating passes; the best of each counts")
    ap.add_argument("--out", default="bench-out/score")
    args = ap.parse_args(argv)

    import torch

    from curate.models import load_model, resolve_model
    from curate.runner import run_stage
    from curate.stages.score import ScoreConfig

    out = Path(args.out)
    ds = build_dataset(out / "ds", args.images, args.per_shard, args.image_px)
    cfg = ScoreConfig(model=args.model, pretrained=args.pretrained, batch_size=args.batch_size,
                      loader_workers=args.loader_workers, threads=args.threads, device="cpu")
    t0 = time.perf_counter()
    lm = load_model(resolve_model(cfg.model, cfg.pretrained), "cpu")
    from curate import langid

    langid.load_model()
    load_s = time.perf_counter() - t0

    # stage and forward-only passes alternate and the best of each counts, so a burst of load from
    # another process on a shared machine does not bias the ratio one way
    stage_s, fwd_s, scored, fwd_n = float("inf"), float("inf"), 0, 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        summary = run_stage("score", cfg, str(ds.root), EngineSpec("local", 1), redo=True, progress=False)
        stage_s = min(stage_s, time.perf_counter() - t0)
        if not summary.ok:
            print(f"stage failed: {summary.failed}", file=sys.stderr)
            return 1
        scored = summary.counts["scored"]
        f_s, fwd_n = forward_only(cfg, ds, lm)
        fwd_s = min(fwd_s, f_s)
    stage_rate, fwd_rate = scored / stage_s, fwd_n / fwd_s
    from curate.stages.score import auto_threads

    threads = args.threads or auto_threads("cpu")
    print(f"model {args.model} (pretrained={args.pretrained}), {args.images} images of {args.image_px}px "
          f"in {len(ds.shards())} shards, batch {args.batch_size}, loader workers {args.loader_workers}, "
          f"stage torch threads {threads} (forward-only: {torch.get_num_threads()}), cpu, best of {args.repeat}")
    print(f"model load (once per process): {load_s:.2f}s")
    print(f"stage:        {stage_rate:8.1f} images/s  ({scored} images in {stage_s:.2f}s)")
    print(f"forward only: {fwd_rate:8.1f} images/s  ({fwd_n} images in {fwd_s:.2f}s)")
    print(f"ratio stage/forward: {stage_rate / fwd_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
