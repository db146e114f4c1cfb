"""webdataset tar shards: a deterministic writer, and the one tar reader (an index of member offsets built
from the headers, and sample iteration over it) that refuses unsafe members and truncation.

Member names follow img2dataset (`{key}.jpg`, `{key}.txt`, `{key}.json`), so webdataset and
img2dataset readers read our shards. Members get mtime 0 and fixed owners so the same samples
always give byte-identical tars (the local and Spark engines are compared byte for byte).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curate.errors import ShardError
from curate.io.atomic import atomic_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# (key, [(ext, data offset, size), ...], first header offset, end offset)
IndexEntry = tuple[str, list[tuple[str, int, int]], int, int]


class ShardWriter:
    """Write samples to `path` atomically: the tar appears under its name only after close()."""

    def __init__(self, path: str | Path):
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, caption: str | None, meta: dict[str, Any]) -> None:
        self._add(f"{key}.{ext}", image)
        if caption is not None:
            self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode("utf-8"))
        self.count += 1

    def write_raw(self, key: str, members: dict[str, bytes]) -> None:
        """Copy one sample's members byte for byte (export: never re-encoded), in img2dataset order."""
        order = {ext: i for i, ext in enumerate((*IMAGE_EXTS, "txt", "json"))}
        for ext in sorted(members, key=lambda e: (order.get(e, len(order)), e)):
            self._add(f"{key}.{ext}", members[ext])
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._tar.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


def _check_member(path: Path, m: tarfile.TarInfo) -> None:
    if not m.isfile():
        raise ShardError(f"{path}: member '{m.name}' is not a regular file (links and devices are refused)")
    if m.name.startswith("/") or ".." in m.name.split("/") or "\\" in m.name:
        raise ShardError(f"{path}: member '{m.name}' has an unsafe name")


def iter_raw(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) from a tar in tar order, member bytes untouched.

    The headers are indexed first (index_tar), so a truncated, corrupt or unsafe tar raises ShardError
    naming the file before any sample is yielded; nothing is extracted to disk.
    """
    yield from read_entries(path, index_tar(str(path)))


def read_entries(path: str | Path, entries: list[IndexEntry],
                 exts: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of the indexed samples `entries` (all of a tar, or a chosen few), reading only
    their members (only those with an extension in `exts`, if given)."""
    try:
        with open(path, "rb") as fh:
            for key, members, _start, _end in entries:
                out: dict[str, bytes] = {}
                for ext, offset, size in members:
                    if exts is not None and ext not in exts:
                        continue
                    fh.seek(offset)
                    data = fh.read(size)
                    if len(data) != size:  # the file shrank after it was indexed
                        raise ShardError(f"{path}: truncated tar (member '{key}.{ext}' is cut short)")
                    out[ext] = data
                yield key, out
    except OSError as e:
        raise ShardError(f"{path}: unreadable tar ({e})") from e


def index_tar(path: str) -> list[IndexEntry]:
    """Samples of a tar in tar order with their members' data offsets; reads headers only.

    Plain ustar headers (what curate, img2dataset and webdataset write) are parsed from a memory map
    (~5 us a member, where tarfile takes ~40); PAX or GNU long-name headers fall back to tarfile.
    Refuses links and devices, unsafe names and truncation (ShardError naming the file).
    """
    try:
        members = _ustar_members(path)
        if members is None:
            members = _tarfile_members(path)
    except (tarfile.ReadError, EOFError, OSError, ValueError) as e:
        raise ShardError(f"{path}: truncated or unreadable tar ({e})") from e
    out: list[IndexEntry] = []
    for name, header, data, size in members:
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        key, ext = base.split(".", 1)
        if out and out[-1][0] == key:
            out[-1][1].append((ext.lower(), data, size))
            out[-1] = (key, out[-1][1], out[-1][2], data + size)
        else:
            out.append((key, [(ext.lower(), data, size)], header, data + size))
    return out


_ZERO_BLOCK = b"\0" * 512


def _ustar_members(path: str) -> list[tuple[str, int, int, int]] | None:
    """(name, header offset, data offset, size) of each member, or None if a header needs tarfile."""
    out = []
    with open(path, "rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        if total == 0:
            raise ShardError(f"{path}: truncated tar (empty file)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0
            while True:
                if pos + 1024 > total:
                    raise ShardError(f"{path}: truncated tar (no end-of-archive marker after {pos} bytes)")
                hdr = mm[pos:pos + 512]
                if hdr == _ZERO_BLOCK:
                    if mm[pos + 512:pos + 1024] != _ZERO_BLOCK:
                        raise ShardError(f"{path}: truncated tar (no end-of-archive marker after {pos} bytes)")
                    return out
                kind = hdr[156:157]
                if kind in (b"x", b"g", b"L", b"K") or hdr[124] & 0x80:
                    return None  # PAX / GNU long names / base-256 sizes: tarfile knows them all
                chk = hdr[148:156].split(b"\0", 1)[0].strip()
                if not chk or int(chk, 8) != sum(hdr[:148]) + sum(hdr[156:]) + 256:
                    raise ShardError(f"{path}: unreadable tar (bad header checksum at byte {pos})")
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if hdr[257:262] == b"ustar":
                    prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}" if prefix else name
                size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                if kind not in (b"0", b"\0") or name.startswith("/") or "\\" in name or ".." in name.split("/"):
                    info = tarfile.TarInfo(name)
                    info.type = tarfile.REGTYPE if kind == b"\0" else kind
                    _check_member(path, info)  # type: ignore[arg-type]  # raises with the reader's message
                if pos + 512 + size > total:
                    raise ShardError(f"{path}: truncated tar (member '{name}' is cut short)")
                out.append((name, pos, pos + 512, size))
                pos += 512 + (size + 511) // 512 * 512


def _tarfile_members(path: str) -> list[tuple[str, int, int, int]]:
    size = os.path.getsize(path)
    out = []
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        for m in tar:
            _check_member(path, m)  # type: ignore[arg-type]
            if m.offset_data + m.size > size:
                raise ShardError(f"{path}: truncated tar (member '{m.name}' is cut short)")
            out.append((m.name, m.offset, m.offset_data, m.size))
        fh.seek(tar.offset)
        if fh.read(1024) != b"\0" * 1024:
            raise ShardError(f"{path}: truncated tar (no end-of-archive marker after {tar.offset} bytes)")
    return out


def iter_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream samples from a tar: yields {"key", "image", "ext", "caption", "meta"} in tar order.

    A truncated or corrupt tar raises ShardError naming the file; nothing is extracted to disk.
    """
    for key, members in iter_raw(path):
        sample: dict[str, Any] = {"key": key, "image": None, "ext": None, "caption": None, "meta": {}}
        for ext, data in members.items():
            if ext in IMAGE_EXTS:
                sample["image"], sample["ext"] = data, ext
            elif ext == "txt":
                sample["caption"] = data.decode("utf-8", errors="replace")
            elif ext == "json":
                try:
                    sample["meta"] = json.loads(data)
                except json.JSONDecodeError as e:
                    raise ShardError(f"{path}: member '{key}.json' is not valid JSON ({e})") from e
        yield sample


def count_samples(path: str | Path) -> int:
    return sum(1 for _ in iter_samples(path))
