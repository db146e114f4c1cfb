"""Per-phase timers for the download task (connect, headers, body, decode, resize, encode, hash, write).

Off unless the environment sets CURATE_PROFILE=1 (bench/download.py --profile does); then each download
shard's stats carry {"phases": {name: {"seconds": wall seconds, "cpu": CPU seconds of the timing thread,
"count": n}}}, both summed over threads. Wall time of network phases is mostly waiting; the CPU column
(time.thread_time) is what a phase costs the machine, whichever thread holds the GIL meanwhile.
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
        self._cpu: dict[str, float] = {}

    def add(self, name: str, seconds: float, cpu: float = 0.0) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._cpu[name] = self._cpu.get(name, 0.0) + cpu
            self._count[name] = self._count.get(name, 0) + 1

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        if not ENABLED:
            yield
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.thread_time() - c0)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"seconds": round(v, 4), "cpu": round(self._cpu[k], 4), "count": self._count[k]}
                    for k, v in sorted(self._seconds.items())}

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._cpu.clear()
            self._count.clear()


PHASES = Phases()  # one per process: a download task runs alone in its worker process
