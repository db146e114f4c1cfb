"""Time `curate adopt` on an img2dataset folder of 10,000 samples and check that no image bytes were copied.

    .venv/bin/python bench/adopt.py [--samples 10000] [--per-shard 2500] [--workers 1]

Synthesises img2dataset's webdataset output layout ({shard}.tar written with webdataset's TarWriter
as img2dataset does, {shard}.parquet with its columns, {shard}_stats.json) with small JPEGs and ~5%
failed rows, runs `curate adopt` in a child process, and prints the wall time, whether each tar was
hard-linked (same inode as the source), the bytes copied, and whether every source row appears
exactly once in the ledger. Target: under a minute, no bytes copied.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.io.layout import shard_name  # noqa: E402


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (rng.randint(48, 96), rng.randint(48, 96)), tuple(rng.randint(0, 255) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def make_img2dataset_folder(root: Path, samples: int, per_shard: int) -> int:
    """img2dataset's webdataset output for `samples` input rows; returns the number of rows written."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    images = jpegs(64)
    rng = random.Random(1)
    digits = len(str(per_shard - 1))
    for shard_id, start in enumerate(range(0, samples, per_shard)):
        shard = f"{shard_id:05d}"
        rows = []
        with open(root / f"{shard}.tar", "wb") as fh:
            w = wds.TarWriter(fh)
            for i in range(min(per_shard, samples - start)):
                key = f"{shard}{i:0{digits}d}"
                ok = rng.random() > 0.05
                img = images[rng.randrange(len(images))] if ok else None
                meta = {"url": f"http://127.0.0.1/{key}.jpg", "caption": f"a photo {key}", "key": key,
                        "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404: Not Found", "width": None, "height": None,
                        "original_width": None, "original_height": None, "exif": None, "sha256": None}
                if ok:
                    w.write({"__key__": key, "jpg": img, "txt": meta["caption"], "json": json.dumps(meta, indent=4)})
                rows.append(meta)
            w.close()
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard}.parquet")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--per-shard", type=int, default=2_500)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate-bench-adopt-"))
    src, out = work / "i2d", work / "adopted"
    shutil.rmtree(work, ignore_errors=True)
    n = make_img2dataset_folder(src, args.samples, args.per_shard)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "curate.cli", "adopt", str(src), "--out", str(out),
                           "--workers", str(args.workers)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    secs = time.time() - t0
    if proc.returncode:
        sys.exit(f"curate adopt failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tars = sorted(src.glob("*.tar"))
    # img2dataset's numeric shard id N becomes curate shard shard_name(N)
    linked = sum(os.stat(out / "shards" / f"{shard_name(int(t.stem))}.tar").st_ino == os.stat(t).st_ino for t in tars)
    counts = json.loads((out / "manifest.json").read_text())["stages"]["adopt"]["counts"]
    keys = pq.read_table(out / "ledger", columns=["key"])["key"].to_pylist()
    once = len(keys) == len(set(keys)) == n
    print(f"curate adopt: {n:,} source rows in {len(tars)} shard(s), {secs:.1f}s; tars hard-linked: "
          f"{linked}/{len(tars)}; image bytes copied: {counts.get('copied_bytes')}; "
          f"every source row once in the ledger: {once} ({len(keys):,} rows)")


if __name__ == "__main__":
    main()
