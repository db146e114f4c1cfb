"""What this machine offers a process: memory and cores, and the memory limits derived from them (DuckDB's
memory_limit is a number per connection; a constant written for one machine is wrong on the next)."""

from __future__ import annotations

import contextlib
import ctypes
import os


def memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when one is set lower (a container, a Slurm allocation)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                v = fh.read().strip()
        except OSError:
            continue
        if v.isdigit():
            total = min(total, int(v))
    return total


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sql_memory_limit(share: float = 0.5, cap: int = 1 << 30, env: str = "CURATE_SQL_MEMORY") -> str:
    """A DuckDB memory_limit: `env` when set (e.g. '4GB'), else `share` of this machine's memory per core, at
    most `cap` (DuckDB spills past its limit, so the cap bounds the process, not the data) and at least 64 MB."""
    if os.environ.get(env):
        return os.environ[env]
    mb = max(64, min(cap, int(memory_bytes() * share / cores())) >> 20)
    return f"{mb}MB"


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim), after a phase that freed a big
    structure made of many allocations: freed blocks below a live one otherwise stay in the process, and
    the next phase's libraries (DuckDB, Arrow) allocate from their own heaps, not from these. A no-op
    where the C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
