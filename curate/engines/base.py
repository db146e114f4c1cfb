"""What every engine provides: run a batch of shard tasks and return one result per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from curate.engines.session import SPARK_EXTRA_HINT
from curate.errors import InputError

Payload = tuple[str, dict[str, Any], str, dict[str, Any]]  # (stage, config, dataset root, task)
OnResult = Callable[[dict[str, Any]], None]



def require_pyspark() -> None:
    """pyspark is an optional extra: without it, --engine spark is a clear exit-2 error, never a local run."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise InputError(f"--engine spark needs pyspark, which is not installed: it comes with the spark "
                         f"extra ({SPARK_EXTRA_HINT})") from None


@dataclass(frozen=True)
class EngineSpec:
    name: str = "local"
    workers: int | None = None  # None: the runner decides (one, or one per visible GPU for a GPU stage)
    spark_master: str = "local[*]"
    # a Slurm array: this run is task `shard_index` of `num_shards` and runs the planned tasks [index::num]
    shard_index: int = 0
    num_shards: int = 1
    # local: a quarter more processes than workers, `workers` places (curate.stages.base.leave_place); set by the
    # runner for a stage whose tasks end in a long wait
    overlap_tails: bool = False

    def __post_init__(self) -> None:
        # checked when the flags are read, before any output or manifest entry is written
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise InputError(f"--shard-index {self.shard_index}: must be within 0..{self.num_shards - 1} "
                             f"(--num-shards {self.num_shards})")
        if self.name == "spark":
            require_pyspark()

    @property
    def array_slice(self) -> tuple[int, int] | None:
        """(index, count) when this run is one task of a Slurm array (num_shards > 1), else None."""
        return (self.shard_index, self.num_shards) if self.num_shards > 1 else None


class Engine(Protocol):
    attempts_per_run: int  # attempts a task may have used in one run (an engine that retries inside: >1)

    def run(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        """Run every payload once through `curate.stages.base.execute_task`.

        Returns one result dict per payload (a crashed worker gives a failed result, not an
        exception); `on_result` is called as results arrive, for progress.
        """
        ...
