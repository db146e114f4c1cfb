"""What every engine provides: run a batch of shard tasks and return one result per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Payload = tuple[str, dict[str, Any], str, dict[str, Any]]  # (stage, config, dataset root, task)
OnResult = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class EngineSpec:
    name: str = "local"
    workers: int = 1
    spark_master: str = "local[*]"


class Engine(Protocol):
    def run(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        """Run every payload once through `curate.stages.base.execute_task`.

        Returns one result dict per payload (a crashed worker gives a failed result, not an
        exception); `on_result` is called as results arrive, for progress.
        """
        ...
