"""Test-only crash injection, outside the curate package: put this folder on PYTHONPATH to arm it.

Python imports `sitecustomize` at start-up in every process that has this folder on its PYTHONPATH (the
CLI, a local pool worker, a Spark Python worker), so the hooks below reach processes a test cannot
monkeypatch. tests/conftest.py's `crash_env` builds the environment.

- CURATE_TEST_CRASH_TASK=STAGE:TASK: the process that picks up that task dies (os._exit(17)) before
  running it, as a killed worker would; engines must report the task failed and finish the others.
- CURATE_TEST_CRASH_ONCE=DIR: the first export shard task dies after its tar is in place and before its
  ledger is written. DIR/export-crashed (created exclusively) names the shard, so only one task attempt
  ever crashes, across processes and machines sharing DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

CRASH_EXIT = 17


def _arm_task(target: str) -> None:
    import curate.stages.base as base

    real = base.execute_task

    def execute_task(stage_name, config, root, task):  # noqa: ANN001, ANN202 - same signature as the real one
        if f"{stage_name}:{base.task_id(task)}" == target:
            os._exit(CRASH_EXIT)
        return real(stage_name, config, root, task)

    # engines look the function up by name when a task runs (pickled by reference to the pool, imported
    # in the Spark task), so replacing the module attribute reaches every engine
    execute_task.__module__ = real.__module__
    execute_task.__qualname__ = real.__qualname__
    base.execute_task = execute_task


def _arm_export_once(folder: str) -> None:
    import curate.stages.export as export

    real = export.write_table

    def write_table(path, table):  # noqa: ANN001, ANN202 - same signature as curate.io.tables.write_table
        if Path(path).parent.name == "ledger":
            Path(folder).mkdir(parents=True, exist_ok=True)
            try:
                with open(Path(folder) / "export-crashed", "x") as fh:
                    fh.write(f"{Path(path).stem}\n")
            except FileExistsError:
                return real(path, table)
            os._exit(CRASH_EXIT)
        return real(path, table)

    export.write_table = write_table


if os.environ.get("CURATE_TEST_CRASH_TASK"):
    _arm_task(os.environ["CURATE_TEST_CRASH_TASK"])
if os.environ.get("CURATE_TEST_CRASH_ONCE"):
    _arm_export_once(os.environ["CURATE_TEST_CRASH_ONCE"])
