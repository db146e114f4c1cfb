"""Which device a scoring process uses: one GPU per local worker process, the GPU Spark assigned a task,
or what the user named. The choice is a pure function of its inputs (tested without a GPU); `current_device`
gathers those inputs from torch and the environment.
"""

from __future__ import annotations

import multiprocessing as mp
import os

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


def local_workers(requested_device: str, workers: int, workers_explicit: bool, cuda_count: int) -> int:
    """Local engine worker processes: one per visible GPU for --device cuda/auto when --workers was not
    given (each then picks its GPU by pool index); otherwise what the user asked for."""
    if workers_explicit or requested_device not in ("cuda", "auto") or cuda_count < 2:
        return workers
    return cuda_count


def current_device(requested: str) -> str:
    """pick_device with this process's facts: torch's GPU count, the Spark task's GPUs, the pool index."""
    if requested == "cpu":
        return "cpu"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    task = [a for a in os.environ.get(TASK_GPUS_ENV, "").split(",") if a.strip()]
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in vis.split(",")] if vis else None
    ident = mp.current_process()._identity  # (k,) in a pool worker, () in the main process
    return pick_device(requested, cuda_count=count, task_gpus=task or None, visible=visible,
                       worker_index=ident[0] if ident else None)


def spark_task_gpus(resources: dict) -> list[str]:
    """GPU addresses from a Spark TaskContext.resources() mapping ({} when the task got none)."""
    gpu = resources.get("gpu") if resources else None
    return [str(a) for a in getattr(gpu, "addresses", None) or []]


def gpu_names() -> list[str]:
    """Names of the GPUs torch sees ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
