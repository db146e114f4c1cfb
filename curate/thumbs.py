"""Small base64 JPEG thumbnails of chosen samples, reading only their image members from the tar shards."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from curate.errors import ShardError
from curate.io.layout import DatasetDir
from curate.io.shards import IMAGE_EXTS, index_tar, read_entries

log = logging.getLogger(__name__)


def image_members(path: Path, keys: set[str]) -> dict[str, bytes]:
    """The image bytes of `keys` found in the tar at `path`, read through curate.io.shards' tar index
    (headers only, then one read per wanted image): a few dozen samples from a big shard cost a header
    scan, not a full read. The index refuses what every reader refuses (unsafe names, truncation)."""
    wanted = [e for e in index_tar(str(path)) if e[0] in keys]
    return {key: next(iter(members.values())) for key, members in read_entries(path, wanted, IMAGE_EXTS) if members}


def thumbnail(data: bytes, size: int = 112, quality: int = 70) -> str | None:
    """A data: URI of a JPEG at most `size` px a side; None when the bytes do not decode.

    Decoded through curate.imaging's safe decoder (format allowlist by magic bytes, pixel cap first).
    """
    from curate.imaging import ImageRejected, safe_decode_rgb

    try:
        im = safe_decode_rgb(data, draft=(size, size))
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
    except ImageRejected as e:  # the tile says "no image"
        log.debug("thumbnail refused: %s (%s)", e.code, e.message)
        return None
    except Exception as e:  # noqa: BLE001 - a bad image must not break the report
        log.debug("thumbnail failed: %s", e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_thumbnails(ds: DatasetDir, samples: Iterable[tuple[str, str]], size: int = 112) -> dict[str, str]:
    """{key: data URI} for (key, shard) pairs; shards that are missing or unreadable are logged and skipped."""
    by_shard: dict[str, set[str]] = {}
    for key, shard in samples:
        by_shard.setdefault(shard, set()).add(key)
    out: dict[str, str] = {}
    for shard, keys in sorted(by_shard.items()):
        path = ds.shard_tar(shard)
        if not path.exists():
            continue
        try:
            members = image_members(path, keys)
        except ShardError as e:
            log.warning("report: %s", e)
            continue
        for key, data in members.items():
            uri = thumbnail(data, size)
            if uri:
                out[key] = uri
    return out
