"""Read a curate dataset or export as a webdataset pipeline, for training code that already speaks webdataset.

    from curate.io.wds import pipeline
    for sample in pipeline("curated/"):          # an export: only the samples it kept
        sample["__key__"], sample["image"], sample["txt"], sample["json"]

The shards are those whose stage marker exists (download, export or adopt), so a tar still being written
or left by a crash is never read. Images are decoded by curate.imaging's safe decoder (format allowlist,
pixel cap), never by webdataset's own Pillow handler; a sample whose image is refused is skipped and
logged. Anything webdataset's WebDataset accepts (nodesplitter, shardshuffle, ...) can be passed through.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from curate.errors import InputError
from curate.io.layout import DatasetDir
from curate.io.shards import IMAGE_EXTS

log = logging.getLogger(__name__)


def shard_paths(directory: str | Path) -> list[str]:
    """The tars of a dataset or export dir's completed shards, in shard order (exit-2 error if none)."""
    ds = DatasetDir.at(directory)
    tars = [str(ds.shard_tar(s)) for s in ds.shards() if ds.shard_tar(s).exists()]
    if not tars:
        raise InputError(f"{ds.root}: no completed shards to read (is it a curate dataset or export dir?)")
    return tars


def decode_sample(sample: dict[str, Any], decode: bool = True) -> dict[str, Any]:
    """webdataset's raw member bytes -> {"__key__", "__url__", "image" (RGB PIL image, or the bytes with
    decode=False), "ext", "txt" (str), "json" (dict)}. Raises ImageRejected for an image curate refuses."""
    from curate.imaging import safe_decode_rgb

    out: dict[str, Any] = {"__key__": sample["__key__"], "__url__": sample.get("__url__"), "image": None,
                           "ext": None, "txt": None, "json": {}}
    for ext in IMAGE_EXTS:
        if ext in sample:
            out["image"] = safe_decode_rgb(sample[ext]) if decode else sample[ext]
            out["ext"] = ext
            break
    if "txt" in sample:
        out["txt"] = sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        out["json"] = json.loads(sample["json"])
    return out


def _skip_refused(exn: Exception) -> bool:
    """webdataset handler: log a refused image and go on; any other error is raised."""
    from curate.imaging import ImageRejected

    if isinstance(exn, ImageRejected):
        log.warning("webdataset reader: skipped a sample whose image was refused (%s: %s)", exn.code, exn.message)
        return True
    raise exn


def pipeline(directory: str | Path, *, keys: Iterable[str] | None = None, decode: bool = True,
             where: Callable[[dict[str, Any]], bool] | None = None, **webdataset_args: Any) -> Any:
    """A `webdataset.WebDataset` over `directory`'s completed shards, yielding decoded samples.

    keys: only these sample keys (e.g. the keys a policy selected); where: a predicate over the decoded
    sample (its "json" holds the ledger metadata). An export dir already holds only the kept samples.
    """
    import webdataset as wds

    webdataset_args.setdefault("shardshuffle", False)  # curate's order: shard by shard, key order within
    wanted = frozenset(keys) if keys is not None else None
    ds = wds.WebDataset(shard_paths(directory), **webdataset_args)
    if wanted is not None:
        ds = ds.select(lambda s: s["__key__"] in wanted)
    ds = ds.map(lambda s: decode_sample(s, decode), handler=_skip_refused)
    if where is not None:
        ds = ds.select(where)
    return ds
