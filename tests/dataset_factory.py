"""Build small downloaded dataset dirs in tests: tars, ledgers and download markers, with the real writers.

    ds = make_dataset(tmp_path / "ds", [(pil_image, "a caption", "success"), (None, "x", "timeout")], shard_size=4)

Each sample is (image, caption, status): image is a PIL image (stored as JPEG), raw bytes (stored as
given, e.g. corrupt bytes) or None; only "success" rows go into the tar, every row goes into the ledger.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.ledger import LEDGER_FIELDS
from curate.io.shards import ShardWriter
from curate.io.tables import write_table

Sample = tuple[Any, str | None, str]


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def color_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic image with some structure (a gradient and a block), different per seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (base[None, None, :] + 2 * xx[..., None] * (seed % 3 + 1) + yy[..., None]) % 256
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.astype("uint8"), "RGB")


def ledger_row(key: str, shard: str, row: int, caption: str | None, status: str, image: bytes | None,
               size: tuple[int, int] | None) -> dict[str, Any]:
    ok = status == "success"
    return {
        "key": key, "shard": shard, "row": row, "url": f"http://127.0.0.1/{row}.jpg", "caption": caption,
        "status": status, "error_code": None if ok else status, "error_message": None if ok else status,
        "attempts": 1, "http_status": 200 if ok else None, "final_url": None,
        "bytes": len(image) if ok and image is not None else None, "sha256": None,
        "mime": "image/jpeg" if ok else None,
        "orig_width": size[0] if size else None, "orig_height": size[1] if size else None,
        "width": size[0] if size else None, "height": size[1] if size else None,
        "elapsed": 0.01, "duplicate_of": None, "superseded_by": None,
    }


def make_dataset(root: str | Path, samples: Sequence[Sample], shard_size: int = 8) -> DatasetDir:
    """Write shards/, ledger/ and _done/download/ for `samples`; returns the DatasetDir."""
    ds = DatasetDir.at(root)
    schema = pa.schema(LEDGER_FIELDS)
    for start in range(0, len(samples), shard_size):
        index = start // shard_size
        shard = shard_name(index)
        rows = []
        with ShardWriter(ds.shard_tar(shard)) as w:
            for j, (image, caption, status) in enumerate(samples[start:start + shard_size]):
                key = sample_key(shard, j)
                size = None
                data = image
                if isinstance(image, Image.Image):
                    size, data = image.size, jpeg_bytes(image)
                row = ledger_row(key, shard, start + j, caption, status, data, size)
                if status == "success":
                    meta = {k: v for k, v in row.items() if k != "caption"}
                    w.write(key, data if data is not None else b"", "jpg", caption, meta)
                rows.append(row)
        write_table(ds.ledger(shard), pa.Table.from_pylist(rows, schema=schema))
        write_json(ds.marker("download", shard), {"shard": shard, "stats": {"rows": len(rows)}})
    return ds
