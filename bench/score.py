"""Benchmark `curate score`: images/s of the whole stage vs the model's forward pass alone, in one run.

The stage figure covers everything a shard task does (index and read the tar, decode, preprocess,
tokenize, both encoders, language ID, write parquet + npy, markers); the forward figure runs both
encoders on already-preprocessed batches on the same device, same batch size and precision.
ratio = stage / forward (1.0 = the data path costs nothing). The model is loaded before timing.
On a GPU the stage is timed with each JPEG decoder (nvjpeg on the device, Pillow in the workers).

    python bench/score.py                                   # shipped curate-tiny config (64 px), CPU
    python bench/score.py --model ViT-B-32 --images 512     # ViT-B-32, random init (no download)
    python bench/score.py --device cuda --model ViT-B-32 --precision fp16 --images 8192 --per-shard 2048
"""

from __future__ import annotations

import argparse
import io
import json
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


def forward_only(lm, ds: DatasetDir, batch_size: int, precision: str, n: int) -> tuple[float, int]:
    """Seconds for both encoders over n images: real preprocessed batches already on the device."""
    import torch

    from curate.io.shards import iter_samples
    from curate.stages.score import encode, torch_settings
    from curate.stages.score_loader import decode_image

    imgs, caps = [], []
    for s in iter_samples(ds.shard_tar(ds.shards()[0])):
        imgs.append(decode_image(s["image"], lm.preprocess, lm.image_size)[0])
        caps.append(s["caption"] or "")
        if len(imgs) == batch_size:
            break
    while len(imgs) < batch_size:  # a small dataset: repeat its images up to one batch
        imgs, caps = imgs + imgs[:batch_size - len(imgs)], caps + caps[:batch_size - len(caps)]
    images = torch.stack(imgs).to(lm.device)
    tokens = lm.tokenizer(caps).to(lm.device)
    cuda = lm.device.startswith("cuda")
    # the baseline is the model at its best: all cores, no decoding beside it
    with torch_settings(0, deterministic=not cuda):
        for _ in range(2):  # warm-up (cuBLAS handles, autocast weight casts)
            encode(lm, images, tokens, precision, to_cpu=False)
        if cuda:
            torch.cuda.synchronize(lm.device)
        steps = max(1, n // batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            encode(lm, images, tokens, precision, to_cpu=False)
        if cuda:
            torch.cuda.synchronize(lm.device)
        return time.perf_counter() - t0, steps * batch_size


def components(lm, ds: DatasetDir, device: str, batch: int) -> dict[str, float]:
    """Rates of the data path's parts on their own (one core each, or the device), to see what bounds it."""
    import torch

    from curate.io.shards import iter_samples
    from curate.stages import score_loader as sl

    tar = str(ds.shard_tar(ds.shards()[0]))
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    n = len(sl.index_tar(tar))
    out["tar index, samples/s"] = n / (time.perf_counter() - t0)
    samples = list(iter_samples(tar))[:batch]
    jpegs = [s["image"] for s in samples]
    caps = [s["caption"] or "" for s in samples]
    t0 = time.perf_counter()
    for d in jpegs[:256]:
        sl.decode_image(d, lm.preprocess, lm.image_size)
    out["Pillow decode+preprocess, images/s per core"] = min(256, len(jpegs)) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(caps), 64):
        lm.tokenizer(caps[i:i + 64])
    out["tokenizer, captions/s per core"] = len(caps) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for d in jpegs[:256]:
        sl.device_jpeg_size(d)
    out["JPEG header check, images/s per core"] = min(256, len(jpegs)) / (time.perf_counter() - t0)
    pre = sl.DevicePreprocess.from_model(lm.model)
    if pre is not None and sl.device_decoder_status(device)[0]:
        datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
        px = [256 * 256] * len(datas)
        cuda = device.startswith("cuda")
        for _rep in range(3):  # first pass warms nvjpeg up
            t0 = time.perf_counter()
            dec = sl.decode_jpegs(datas, px, device)
            if cuda:
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            pre([x for x in dec if x is not None])
            if cuda:
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
        out[f"decode_jpeg on {device} (batch {len(datas)}), images/s"] = len(datas) / (t1 - t0)
        out[f"resize+normalise on {device}, images/s"] = len(datas) / (t2 - t1)
    return out


def main(argv: list[str] | None = None) -> int:
    # long because it is a flat script: arguments, dataset build, warm-up, timed runs, one print
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="curate-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default=None, help="fp32 | fp16 | bf16 (default: fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--decoders", default=None,
                    help="comma-separated --decoder values to time the stage with (default: device,cpu on CUDA, "
                         "cpu on the CPU)")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--per-shard", type=int, default=1024)
    ap.add_argument("--image-px", type=int, default=256, help="stored image size (img2dataset's default)")
    ap.add_argument("--batch-size", type=int, default=0, help="0 = the stage's choice for the device")
    ap.add_argument("--loader-workers", type=int, default=-1, help="-1 = the stage's choice for the device")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="alternating passes; the best of each counts")
    ap.add_argument("--out", default="bench-out/score")
    args = ap.parse_args(argv)

    import torch

    from curate import langid
    from curate.devices import current_device
    from curate.models import load_model, resolve_model
    from curate.runner import run_stage
    from curate.stages.score import ScoreConfig, auto_batch_size, auto_threads

    device = current_device(args.device)
    cuda = device.startswith("cuda")
    precision = args.precision or ("fp16" if cuda else "fp32")
    decoders = (args.decoders or ("device,cpu" if cuda else "cpu")).split(",")
    batch = auto_batch_size(args.batch_size, device)
    out = Path(args.out)
    t0 = time.perf_counter()
    ds = build_dataset(out / "ds", args.images, args.per_shard, args.image_px)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm = load_model(resolve_model(args.model, args.pretrained), device)
    langid.load_model()
    load_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"

    def cfg_for(decoder: str) -> ScoreConfig:
        return ScoreConfig(model=args.model, pretrained=args.pretrained, batch_size=batch, precision=precision,
                           loader_workers=args.loader_workers, threads=args.threads, device=device,
                           decoder=decoder)

    # a warm-up pass of each decoder (CUDA context, cuBLAS, nvjpeg handles), then timed passes that
    # alternate with the forward-only pass; the best of each counts, so a burst of load from another
    # process does not bias the ratio one way
    results: dict[str, dict] = {}
    for dec in decoders:
        run_stage("score", cfg_for(dec), str(ds.root), EngineSpec("local", 1), redo=True, progress=False)
    fwd_s, fwd_n = float("inf"), 0
    for _ in range(args.repeat):
        for dec in decoders:
            t0 = time.perf_counter()
            summary = run_stage("score", cfg_for(dec), str(ds.root), EngineSpec("local", 1), redo=True,
                                progress=False)
            wall = time.perf_counter() - t0
            if not summary.ok:
                print(f"stage failed ({dec}): {summary.failed}", file=sys.stderr)
                return 1
            c = summary.counts
            best = results.get(dec)
            if best is None or wall < best["seconds"]:
                results[dec] = {"seconds": wall, "scored": c["scored"],
                                "times": {k: v for k, v in c.items() if k.startswith("t_")},
                                "decoded_on_device": c.get("decoded_on_device", 0),
                                "loader_workers": c.get("loader_workers", 0) // max(1, len(ds.shards()))}
        f_s, fwd_n = forward_only(lm, ds, batch, precision, args.images)
        fwd_s = min(fwd_s, f_s)
    fwd_rate = fwd_n / fwd_s
    threads = args.threads or auto_threads(device)
    print(f"device {device} ({gpu}), torch {torch.__version__}; model {args.model} (pretrained={args.pretrained}), "
          f"{precision}; {args.images} images of {args.image_px}px in {len(ds.shards())} tar shards; batch {batch}; "
          f"torch threads {threads or torch.get_num_threads()}; best of {args.repeat}")
    print(f"dataset build {build_s:.1f}s, model load (once per process) {load_s:.2f}s")
    report = {"device": device, "gpu": gpu, "model": args.model, "precision": precision, "images": args.images,
              "batch_size": batch, "forward_images_per_s": round(fwd_rate, 1), "stage": {}}
    for dec, r in results.items():
        rate = r["scored"] / r["seconds"]
        label = "nvjpeg on the GPU" if dec == "device" and cuda else f"--decoder {dec}"
        print(f"stage ({label}, {r['loader_workers']} loader workers, {r['decoded_on_device']} decoded on device): "
              f"{rate:9.1f} images/s  ({r['scored']} images in {r['seconds']:.2f}s)  "
              f"ratio stage/forward {rate / fwd_rate:.2f}")
        report["stage"][dec] = {**r, "images_per_s": round(rate, 1), "ratio": round(rate / fwd_rate, 3)}
    print(f"forward only: {fwd_rate:9.1f} images/s  ({fwd_n} images in {fwd_s:.2f}s)")
    for dec, r in results.items():
        split = ", ".join(f"{k[2:-2]} {v:.2f}s" for k, v in r["times"].items())
        print(f"time split ({dec}, summed over shards): {split}")
    comp = components(lm, ds, device, batch)
    for k, v in comp.items():
        print(f"component: {k}: {v:,.0f}")
    report["components"] = {k: round(v, 1) for k, v in comp.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
