"""Test-only crash injection, outside the curate package: put this folder on PYTHONPATH to arm it.

With CURATE_TEST_CRASH_ONCE=DIR, the first export shard task (in any process that has this folder on
its PYTHONPATH: the CLI, a local worker, a Spark executor) dies with os._exit after its tar is in place
and before its ledger is written, as a killed executor would. DIR/export-crashed (created exclusively)
names the shard, so only one task attempt ever crashes, across processes and machines sharing DIR.
"""

from __future__ import annotations

import os
from pathlib import Path


def _arm(folder: str) -> None:
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
            os._exit(17)
        return real(path, table)

    export.write_table = write_table


if os.environ.get("CURATE_TEST_CRASH_ONCE"):
    _arm(os.environ["CURATE_TEST_CRASH_ONCE"])
