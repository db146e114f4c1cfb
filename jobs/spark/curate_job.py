"""spark-submit entry: run any curate command inside the submitted application's SparkSession.

    spark-submit ... jobs/spark/curate_job.py export DIR --out OUT --policy laion
Adds `--engine spark` to commands that take it; the engine reuses the active session (spark-submit's
master and resources), so --spark-master is not needed.
"""

import sys


def main(argv: list[str]) -> int:
    from pyspark.sql import SparkSession

    from curate.cli import cli
    from curate.cli import main as curate_main

    SparkSession.builder.appName("curate " + " ".join(argv[:1])).getOrCreate()
    cmd = cli.commands.get(argv[0]) if argv else None
    takes_engine = cmd is not None and any("--engine" in getattr(p, "opts", ()) for p in cmd.params)
    if takes_engine and "--engine" not in argv:
        argv = [argv[0], "--engine", "spark", *argv[1:]]
    return curate_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
