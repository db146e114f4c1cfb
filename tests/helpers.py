"""Small helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CRASH_HOOK = Path(__file__).parent / "crash_hook"  # test-only crash injection (see its sitecustomize.py)


def crash_env(base: dict[str, str] | None = None, **hooks: str) -> dict[str, str]:
    """An environment whose Python processes load tests/crash_hook with `hooks` set (e.g.
    CURATE_TEST_CRASH_TASK="download:00000001"); `base` defaults to os.environ."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(CRASH_HOOK), *filter(None, [env.get("PYTHONPATH")])])
    env.update(hooks)
    return env


def copy_dataset(src: Path, dst: Path) -> Path:
    """A private, writable copy of a (session-scoped, shared) dataset dir."""
    shutil.copytree(src, dst)
    return dst


class Concurrency:
    """Counts how many callers are inside `hold()` at once; `max` is the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, seconds: float = 0.0) -> Iterator[None]:
        with self._lock:
            self.now += 1
            self.max = max(self.max, self.now)
        try:
            time.sleep(seconds)
            yield
        finally:
            with self._lock:
                self.now -= 1


def run_threads(calls: list) -> None:
    """Run each zero-argument callable in its own thread, all at once, and wait for them all."""
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
