"""webdataset tar shards: a deterministic writer and a streaming reader that refuses unsafe members.

Member names follow img2dataset (`{key}.jpg`, `{key}.txt`, `{key}.json`), so webdataset and
img2dataset readers read our shards. Members get mtime 0 and fixed owners so the same samples
always give byte-identical tars (the local and Spark engines are compared byte for byte).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curate.errors import ShardError
from curate.io.atomic import atomic_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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

    A truncated or corrupt tar raises ShardError naming the file; nothing is extracted to disk.
    """
    path = Path(path)
    key_now: str | None = None
    members: dict[str, bytes] = {}
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for m in tar:
                _check_member(path, m)
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                member = tar.extractfile(m)
                data = member.read() if member is not None else b""
                if len(data) != m.size:
                    raise ShardError(f"{path}: truncated tar (member '{m.name}' is cut short)")
                if key_now is not None and key_now != key:
                    yield key_now, members
                    members = {}
                key_now = key
                members[ext.lower()] = data
            # tarfile stops silently at a cut header; a complete tar ends with two zero blocks
            fh.seek(tar.offset)
            if fh.read(1024) != b"\0" * 1024:
                raise ShardError(f"{path}: truncated tar (no end-of-archive marker after {tar.offset} bytes)")
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise ShardError(f"{path}: truncated or unreadable tar ({e})") from e
    if key_now is not None:
        yield key_now, members


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
