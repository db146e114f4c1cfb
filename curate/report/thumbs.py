"""Small base64 JPEG thumbnails of chosen samples, reading only their image members from the tar shards.

Shard tars are uncompressed, so the reader walks the headers and skips every other member's bytes:
a few dozen samples from a big shard cost a header scan, not a full read.
"""

from __future__ import annotations

import base64
import io
import logging
import mmap
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from curate.errors import ShardError
from curate.io.layout import DatasetDir
from curate.io.shards import IMAGE_EXTS, _check_member

log = logging.getLogger("curate")


def image_members(path: Path, keys: set[str]) -> dict[str, bytes]:
    """The image bytes of `keys` found in the tar at `path` (same member safety rules as iter_samples).

    Plain ustar headers (what ShardWriter writes) are parsed straight from a memory map, which is
    tens of times faster than tarfile on shards of many small members; any other header kind (pax,
    GNU long names) falls back to tarfile.
    """
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ShardError(f"{path}: empty tar")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                found = _scan_ustar(path, mm, keys)
    except OSError as e:
        raise ShardError(f"{path}: unreadable tar ({e})") from e
    return found if found is not None else _read_with_tarfile(path, keys)


def _scan_ustar(path: Path, mm: mmap.mmap, keys: set[str]) -> dict[str, bytes] | None:
    """None when a header is not a plain ustar file header (the caller then uses tarfile)."""
    found: dict[str, bytes] = {}
    wanted = {k.encode("utf-8") for k in keys}
    off, end = 0, len(mm)
    while off + 512 <= end and len(found) < len(keys):
        # fields are read straight from the map: copying each 512-byte header would double the cost
        if mm[off] == 0 and mm[off:off + 512].count(0) == 512:  # end-of-archive block
            break
        if mm[off + 257:off + 262] != b"ustar" or mm[off + 156] not in (0x30, 0):  # regular file only
            return None
        try:
            size = int(mm[off + 124:off + 136].rstrip(b"\0 ").strip() or b"0", 8)
        except ValueError:
            return None
        data = off + 512
        hdr = mm[off:off + 100]
        raw = hdr.split(b"\0", 1)[0]
        # decode only the members whose base name starts with a wanted key
        if raw.rsplit(b"/", 1)[-1].partition(b".")[0] in wanted:
            try:
                name = raw.decode("utf-8")
                prefix = mm[off + 345:off + 500].split(b"\0", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                return None
            name = f"{prefix}/{name}" if prefix else name
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if ext.lower() in IMAGE_EXTS:
                if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                    raise ShardError(f"{path}: member '{name}' has an unsafe name")
                if data + size > end:
                    raise ShardError(f"{path}: truncated tar (member '{name}' is cut short)")
                found[key] = mm[data:data + size]
        off = data + (size + 511) // 512 * 512
    return found


def _read_with_tarfile(path: Path, keys: set[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key not in keys or ext.lower() not in IMAGE_EXTS:
                    continue
                _check_member(path, m)
                fh = tar.extractfile(m)
                data = fh.read() if fh is not None else b""
                if len(data) != m.size:
                    raise ShardError(f"{path}: truncated tar (member '{m.name}' is cut short)")
                found[key] = data
                if len(found) == len(keys):
                    break
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise ShardError(f"{path}: truncated or unreadable tar ({e})") from e
    return found


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
