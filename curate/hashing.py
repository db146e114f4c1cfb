"""Hashes curate computes in more than one place: a file's SHA-256 (model checkpoints and configs, the
language-ID model) and the short digest of a JSON-able value that names inputs in fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

# (path, size, mtime_ns) -> hex digest: a large checkpoint is hashed once per process
_file_hashes: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB chunks; cached per (path, size, mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _file_hashes.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    with _lock:
        _file_hashes[key] = h.hexdigest()
    return h.hexdigest()


def json_digest(value: Any, length: int = 16) -> str:
    """The first `length` hex digits of SHA-256 over `json.dumps(value, sort_keys=True)`.

    The encoding (default separators, sorted keys) is part of every fingerprint that uses it: changing it
    would make existing outputs refuse to resume, so it stays as it is."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]
