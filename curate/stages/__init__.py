"""Stage logic: each stage turns one shard's inputs plus its config into that shard's outputs.

Stages never import pyspark or know where they run; `curate.engines` schedules them.
"""

from __future__ import annotations

import importlib
from typing import Any

# stage name -> "module:attribute" of its Stage object; imported lazily so heavy deps load only when used
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"stage '{name}' is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = target


def get_stage(name: str) -> Any:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; known: {', '.join(sorted(_REGISTRY))}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


register("download", "curate.stages.download:STAGE")
register("score", "curate.stages.score:STAGE")
register("dedup", "curate.stages.dedup:STAGE")
register("export", "curate.stages.export:STAGE")
register("adopt", "curate.stages.adopt:STAGE")
register("index", "curate.search.build:STAGE")
register("balance", "curate.stages.balance:STAGE")
register("target", "curate.stages.target:STAGE")
