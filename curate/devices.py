"""Devices and torch settings for every stage that runs a model (score, train-probe, dedup, search, index):
which device a process uses (one GPU per local worker process, the GPU Spark assigned a task, or what the
user named), the CPU count it may use, and the per-task torch settings (threads, determinism).

The choice is a pure function of its inputs (tested without a GPU); `current_device` gathers those inputs
from torch and the environment. torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Iterator

from curate.errors import InputError

# set by the Spark engine around each task from TaskContext.resources()["gpu"].addresses (comma-separated),
# so that stage code never imports pyspark
TASK_GPUS_ENV = "CURATE_TASK_GPUS"


def pick_device(requested: str, *, cuda_count: int, task_gpus: list[str] | None = None,
                visible: list[str] | None = None, worker_index: int | None = None) -> str:
    """The torch device string for this process.

    requested: "auto" | "cpu" | "cuda" | "cuda:N". task_gpus: the GPU addresses a cluster scheduler
    assigned this task (Spark). visible: CUDA_VISIBLE_DEVICES as a list (addresses are mapped through it
    when the scheduler names physical GPUs). worker_index: this local pool worker's 1-based number.
    """
    if requested == "auto":
        requested = "cuda" if cuda_count else "cpu"
    if requested != "cuda":
        return requested
    if cuda_count < 1:
        raise InputError("--device cuda: no CUDA device is visible to torch")
    if task_gpus:
        addr = task_gpus[0].strip()
        if visible and addr in visible:
            idx = visible.index(addr)  # the scheduler named a physical GPU; torch numbers the visible ones
        elif addr.isdigit():
            idx = int(addr)
        else:
            raise InputError(f"--device cuda: the scheduler assigned GPU '{addr}', which is not a GPU index")
        if idx >= cuda_count:
            raise InputError(f"--device cuda: the scheduler assigned GPU {addr}, but torch sees {cuda_count} "
                             f"GPU(s) (CUDA_VISIBLE_DEVICES={','.join(visible or []) or 'unset'})")
        return f"cuda:{idx}"
    if worker_index:
        return f"cuda:{(worker_index - 1) % cuda_count}"
    return "cuda:0"


def cuda_count() -> int:
    """GPUs torch can use in this process (0 without CUDA, or without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda(requested: str, flag: str = "--device") -> None:
    """A clear error (exit 2) when `requested` names CUDA and torch sees no GPU; nothing for cpu/auto."""
    if requested.startswith("cuda") and cuda_count() < 1:
        raise InputError(f"{flag} {requested}: no CUDA device is visible to torch")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_settings(threads: int = 0, deterministic: bool | None = None, warn_only: bool = True) -> Iterator[None]:
    """torch's intra-op thread count (0: leave it) and deterministic algorithms (None: leave them) for one
    task, restored afterwards: tests and the one-worker local engine run many tasks in one process."""
    import torch

    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    if threads:
        torch.set_num_threads(threads)
    if deterministic is not None:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])


def process_facts() -> dict:
    """What pick_device needs from this process besides torch's GPU count: the GPUs a cluster scheduler
    assigned this task (TASK_GPUS_ENV), CUDA_VISIBLE_DEVICES and the local pool worker's 1-based index.
    Kept apart from `current_device` so that tests on machines without a GPU read the very same facts
    from real Spark tasks and real pool workers."""
    task = [a.strip() for a in os.environ.get(TASK_GPUS_ENV, "").split(",") if a.strip()]
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in vis.split(",")] if vis else None
    # multiprocessing numbers the processes a parent starts 1, 2, ... and appends that to the parent's own
    # identity: (k,) in a pool worker of a top-level driver, (.., k) when the driver is itself a child, ()
    # in the driver. Consecutive within one pool, so (k - 1) mod GPUs spreads a pool over distinct GPUs.
    ident = mp.current_process()._identity
    return {"task_gpus": task or None, "visible": visible, "worker_index": ident[-1] if ident else None}


def current_device(requested: str) -> str:
    """pick_device with this process's facts: torch's GPU count, the Spark task's GPUs, the pool index."""
    if requested == "cpu":
        return "cpu"
    return pick_device(requested, cuda_count=cuda_count(), **process_facts())


def spark_task_gpus(resources: dict) -> list[str]:
    """GPU addresses from a Spark TaskContext.resources() mapping ({} when the task got none)."""
    gpu = resources.get("gpu") if resources else None
    return [str(a) for a in getattr(gpu, "addresses", None) or []]


def gpu_names() -> list[str]:
    """Names of the GPUs torch sees ([] without CUDA)."""
    n = cuda_count()
    if not n:
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(n)]
