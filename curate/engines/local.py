"""Local engine: a process pool; with one worker, tasks run in this process (debuggable).

Workers die with their driver: each watches its parent's pid and exits within a second of the
driver's death (SIGKILL included), so no orphan keeps writing shards. At most two tasks per worker
are queued at a time, so the payloads in flight do not grow with the number of shards.

For a stage whose tasks end in a long wait (`overlap_tails`: download's last slow answers), the pool has
a quarter more processes than workers (at least one) and a semaphore of `workers` places: a task holds a
place while it works and gives it up when only its wait is left (`curate.stages.base.leave_place`), so
the next task starts beside the tail instead of after it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from curate.engines.base import OnResult, Payload
from curate.io.layout import task_id
from curate.logs import configure_task_process
from curate.stages.base import TaskResult, execute_task, set_places


def _watch_parent(parent: int, places: Any = None) -> None:
    """Pool initializer: the driver's log level (-v/-q), the pool's places (overlap_tails), and exit as
    soon as the driver is gone."""
    configure_task_process()
    set_places(places)

    def loop() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the driver died
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True, name="curate-watch-parent").start()


# overlap_tails: one more process per this many places (a download shard's tail is about a tenth of it)
TAIL_SHARE = 4


class LocalEngine:
    attempts_per_run = 1  # the runner owns retries: one attempt per task per run

    def __init__(self, workers: int = 1, overlap_tails: bool = False):
        self.workers = max(1, int(workers))
        self.overlap_tails = overlap_tails

    def run(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        if self.workers == 1:
            out = []
            for p in payloads:
                r = execute_task(*p)
                on_result(r)
                out.append(r)
            return out
        return self._run_pool(payloads, on_result)

    def _run_pool(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        # spawn: workers start clean (no forked torch/thread state). A worker that dies breaks the whole
        # pool; the tasks that were in flight are then rerun one per pool, so only the task that kills
        # its worker fails, and the rest go on in a fresh pool.
        ctx = mp.get_context("spawn")
        results: dict[int, dict[str, Any]] = {}
        pending = list(range(len(payloads)))
        while pending:
            broken, suspects = self._one_pool(ctx, payloads, pending, results, on_result, self.workers)
            if not broken:
                break
            for i in suspects:
                if i in results:
                    continue
                alone, _ = self._one_pool(ctx, payloads, [i], results, on_result, 1)
                if alone and i not in results:
                    r = TaskResult(task_id(payloads[i][3]), False, error="worker process died").to_dict()
                    results[i] = r
                    on_result(r)
            pending = [i for i in pending if i not in results]
        return [results[i] for i in range(len(payloads))]

    def _one_pool(self, ctx: Any, payloads: list[Payload], pending: list[int], results: dict[int, dict[str, Any]],
                  on_result: OnResult, workers: int) -> tuple[bool, list[int]]:
        """Run `pending` on one pool fed a bounded window; returns (the pool broke, the tasks then in flight)."""
        places = ctx.Semaphore(workers) if self.overlap_tails and workers > 1 else None
        if places is not None:  # room for a quarter of the places' tasks to be in their tails at once
            workers += -(-workers // TAIL_SHARE)
        workers = min(workers, len(pending))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_watch_parent,
                                 initargs=(os.getpid(), places)) as pool:
            queue = iter(pending)
            futs: dict[Future, int] = {}

            def feed() -> None:
                while len(futs) < 2 * workers:
                    i = next(queue, None)
                    if i is None:
                        return
                    futs[pool.submit(execute_task, *payloads[i])] = i

            feed()
            broken: list[int] = []
            while futs and not broken:
                done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
                for f in done:
                    i = futs.pop(f)
                    try:
                        r = f.result()
                    except BrokenProcessPool:
                        broken.append(i)  # the other finished results are still kept
                        continue
                    except Exception as e:  # noqa: BLE001 - reported as a failed task
                        r = TaskResult(task_id(payloads[i][3]), False, error=repr(e)).to_dict()
                    results[i] = r
                    on_result(r)
                if not broken:
                    feed()
            return bool(broken), broken + list(futs.values())
