"""Engines schedule shard tasks; they contain no stage logic.

`local`: a process pool (`workers=1` runs in-process, for debugging).
`spark`: pyspark, one Spark task per shard; reuses an active SparkSession (spark-submit).
"""

from __future__ import annotations

from curate.engines.base import Engine, EngineSpec
from curate.engines.local import LocalEngine
from curate.engines.spark import SparkEngine
from curate.errors import InputError


def make_engine(spec: EngineSpec) -> Engine:
    if spec.name == "local":
        return LocalEngine(spec.workers or 1, overlap_tails=spec.overlap_tails)
    if spec.name == "spark":
        return SparkEngine(spec.spark_master, spec.workers or 1)

    raise InputError(f"--engine: unknown engine '{spec.name}' (choose local or spark)")


__all__ = ["Engine", "EngineSpec", "make_engine"]
