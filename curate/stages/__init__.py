"""Stage logic: each stage turns one task's inputs plus its config into that task's outputs.

Stages never import an engine or know where they run: `curate.runner` plans them and `curate.engines`
schedules their tasks; what a stage needs of the run (the Spark SQL session, the array slice) comes through
`curate.stages.base.context()`.

THE stage registry: one line per stage pairs its name with its Stage object, the command that runs it and
the help line `curate --help` shows. A stage without a command module of its own gets the generic stage
command (`curate NAME DATASET` + its config's options + the engine options, curate/commands/stage.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageEntry:
    name: str  # the stage's name: its outputs' default key, the runner's and the engines' name for it
    target: str  # "module:attribute" of its Stage object, imported on first use (heavy deps load only then)
    command: str | None = None  # a command module of its own ("curate.commands.X", its `command`); None: generic
    cli_name: str | None = None  # the command's name where it differs from the stage's (target -> target-filter)
    help: str = ""  # the generic command's help (a command module has its own)

    @property
    def command_name(self) -> str:
        return self.cli_name or self.name


_REGISTRY: dict[str, StageEntry] = {}


def register(name: str, target: str, *, command: str | None = None, cli_name: str | None = None,
             help: str = "") -> StageEntry:  # noqa: A002 - click's word
    """Register a stage (once; the same entry again is a no-op, another one under the name an error)."""
    entry = StageEntry(name, target, command, cli_name, help)
    if name in _REGISTRY and _REGISTRY[name] != entry:
        raise ValueError(f"stage '{name}' is already registered as {_REGISTRY[name].target}")
    _REGISTRY[name] = entry
    return entry


def unregister(name: str) -> None:
    """Forget a registered stage (a test's own stage, after the test)."""
    _REGISTRY.pop(name, None)


def entries() -> list[StageEntry]:
    """Every registered stage, in registration order."""
    return list(_REGISTRY.values())


def get_stage(name: str) -> Any:
    try:
        target = _REGISTRY[name].target
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; known: {', '.join(sorted(_REGISTRY))}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


register("download", "curate.stages.download:STAGE", command="curate.commands.download")
register("score", "curate.stages.score:STAGE", command="curate.commands.score")
register("dedup", "curate.stages.dedup:STAGE", command="curate.commands.dedup")
register("export", "curate.stages.export:STAGE", command="curate.commands.export")
register("adopt", "curate.stages.adopt:STAGE", command="curate.commands.adopt")
register("index", "curate.stages.index:STAGE", command="curate.commands.index")
register("balance", "curate.stages.balance:STAGE", command="curate.commands.balance")
register("target", "curate.stages.target:STAGE", command="curate.commands.target", cli_name="target-filter")
