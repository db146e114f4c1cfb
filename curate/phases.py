"""Per-phase timers for the download task (connect, headers, body, decode, resize, encode, hash, write).

Off unless the environment sets CURATE_PROFILE=1 (bench/download.py --profile does); then each download
shard's stats carry {"phases": {name: {"seconds": total wall seconds over all threads, "count": n}}}.
Wall time per phase, summed over threads: network phases mostly wait, image phases mostly compute.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

ENABLED = os.environ.get("CURATE_PROFILE", "") not in ("", "0")


class Phases:
    """Thread-safe totals of seconds and counts per phase name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._count[name] = self._count.get(name, 0) + 1

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        if not ENABLED:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"seconds": round(v, 4), "count": self._count[k]} for k, v in sorted(self._seconds.items())}

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._count.clear()


PHASES = Phases()  # one per process: a download task runs alone in its worker process
