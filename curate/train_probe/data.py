"""Dataset dirs -> in-memory tensors: uint8 images at the model's input size, caption tokens, optional labels.

Demo-scale subsets (thousands of small images) fit in memory, so each subset is decoded once and every
seed, epoch and sweep fraction indexes the same tensors; this keeps CPU training compute-bound.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import InputError
from curate.imaging import ImageRejected, safe_decode_rgb
from curate.io.layout import DatasetDir
from curate.io.shards import iter_samples

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Samples of one dataset dir (or a selection of them), row i of every field is sample i."""

    keys: list[str]
    images: Any  # torch.uint8 (N, 3, S, S)
    tokens: Any  # torch.long (N, context_length)
    captions: list[str]
    labels: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (error codes, no label, ...)

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: Sequence[int]) -> Samples:
        import torch

        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return Samples(
            keys=[self.keys[i] for i in rows],
            images=self.images.index_select(0, idx),
            tokens=self.tokens.index_select(0, idx),
            captions=[self.captions[i] for i in rows],
            labels=[self.labels[i] for i in rows] if self.labels is not None else None,
        )

    def select_keys(self, keys: Sequence[str]) -> Samples:
        pos = {k: i for i, k in enumerate(self.keys)}
        return self.select([pos[k] for k in keys if k in pos])


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """(3, S, S) uint8: shortest side resized to S (bicubic), centre crop, as open_clip's inference transform.

    Decoded through curate.imaging's safe decoder; raises curate.imaging.ImageRejected (with its code).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    # JPEG DCT scaling: a cheaper decode of big photos, still at least twice the model's input size
    im = safe_decode_rgb(data, draft=(2 * image_size, 2 * image_size))
    im = TF.resize(im, image_size, interpolation=InterpolationMode.BICUBIC)
    im = TF.center_crop(im, image_size)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def dataset_shards(path: str | Path, flag: str) -> tuple[DatasetDir, list[str]]:
    """The completed shards of a dataset dir; InputError naming `flag` and the path when there are none."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{flag}: {p} is not a directory")
    ds = DatasetDir.at(p)
    shards = [s for s in ds.shards() if ds.shard_tar(s).exists()]
    if not shards:
        raise InputError(f"{flag}: {ds.root} has no completed shards (no _done/download or _done/export markers "
                         f"with shards/*.tar)")
    return ds, shards


def read_labels(ds: DatasetDir, column: str, flag: str) -> dict[str, str]:
    """key -> label from the ledger's `column` (rows with a null label are left out)."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    files = ds.ledger_files()
    if not files:
        raise InputError(f"{flag}: {ds.root} has no ledger/*.parquet to read the '{column}' column from")
    for f in files:
        names = pq.read_schema(f).names
        if column not in names or "key" not in names:
            missing = column if column not in names else "key"
            raise InputError(f"{flag}: {f} has no '{missing}' column (columns: {', '.join(names)})")
        t = pq.read_table(f, columns=["key", column])
        for k, v in zip(t.column("key").to_pylist(), t.column(column).to_pylist(), strict=True):
            if v is not None and str(v).strip():
                out[k] = str(v)
    return out


def load_samples(path: str | Path, image_size: int, tokenizer: Any, *, flag: str = "--subset",
                 label_column: str | None = None, threads: int = 2) -> Samples:
    """Decode every sample of a dataset dir's shards (tar order, shard order) into memory.

    Undecodable images and samples without a label (when `label_column` is set) are skipped and counted.
    """
    import torch

    ds, shards = dataset_shards(path, flag)
    labels_by_key = read_labels(ds, label_column, flag) if label_column else None
    keys: list[str] = []
    blobs: list[bytes] = []
    captions: list[str] = []
    skipped: dict[str, int] = {}
    for shard in shards:
        for s in iter_samples(ds.shard_tar(shard)):
            reason = None
            if s["image"] is None:
                reason = "missing_image"
            elif labels_by_key is not None and s["key"] not in labels_by_key:
                reason = "no_label"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            keys.append(s["key"])
            blobs.append(s["image"])
            captions.append(s["caption"] or "")

    def decode(data: bytes) -> np.ndarray | str:
        """The array, or the error code (format_not_allowed, decompression_bomb, decode_error)."""
        try:
            return decode_image(data, image_size)
        except ImageRejected as e:
            return e.code
        except Exception:  # noqa: BLE001 - any other decoder failure is this sample's decode_error
            return "decode_error"

    # PIL releases the GIL while decoding and resizing, so threads overlap
    with ThreadPoolExecutor(max(1, threads)) as pool:
        arrays = list(pool.map(decode, blobs))
    ok = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
    for a in arrays:
        if isinstance(a, str):
            skipped[a] = skipped.get(a, 0) + 1
    if not ok:
        raise InputError(f"{flag}: {ds.root} has no decodable samples in {len(shards)} shard(s)")
    if skipped:
        log.info("%s: skipped %s", ds.root, skipped)
    keys = [keys[i] for i in ok]
    captions = [captions[i] for i in ok]
    images = torch.from_numpy(np.stack([arrays[i] for i in ok]))
    tokens = tokenize(tokenizer, captions)
    labels = [labels_by_key[k] for k in keys] if labels_by_key is not None else None
    return Samples(keys=keys, images=images, tokens=tokens, captions=captions, labels=labels, skipped=skipped)


def tokenize(tokenizer: Any, texts: list[str], chunk: int = 4096) -> Any:
    import torch

    parts = [tokenizer(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, 1), dtype=torch.long)


def normalize(images_u8: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 (B, 3, S, S) -> float, scaled to [0, 1] and normalised with the model's mean/std."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - m) / s
