"""Local engine: a process pool; with one worker, tasks run in this process (debuggable)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from curate.engines.base import OnResult, Payload
from curate.io.layout import task_id
from curate.stages.base import TaskResult, execute_task


class LocalEngine:
    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

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
        # spawn: workers start clean (no forked torch/thread state); a killed worker breaks the
        # pool, so the tasks still pending are resubmitted to a fresh one.
        ctx = mp.get_context("spawn")
        results: dict[int, dict[str, Any]] = {}
        pending = list(range(len(payloads)))
        while pending:
            with ProcessPoolExecutor(max_workers=min(self.workers, len(pending)), mp_context=ctx) as pool:
                futs = {pool.submit(execute_task, *payloads[i]): i for i in pending}
                broken = False
                not_done = set(futs)
                while not_done:
                    done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = futs[f]
                        try:
                            r = f.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        except Exception as e:  # noqa: BLE001 - reported as a failed shard
                            r = TaskResult(task_id(payloads[i][3]), False, error=repr(e)).to_dict()
                        results[i] = r
                        on_result(r)
                    if broken:
                        break
            if not broken:
                break
            still = [i for i in pending if i not in results]
            if len(still) == len(pending):
                # no progress at all: report them as failed instead of looping forever
                for i in still:
                    r = TaskResult(task_id(payloads[i][3]), False, error="worker process died").to_dict()
                    results[i] = r
                    on_result(r)
                break
            pending = still
        return [results[i] for i in range(len(payloads))]
