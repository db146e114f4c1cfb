"""A stage that lives only in the tests, to show what adding a stage takes: this module plus one
`curate.stages.register(...)` line (tests/test_new_stage.py adds it).

"wordcount": one task per downloaded shard, writing signals/wordcount/{shard}.parquet (key, words, short):
the caption's word count and whether it is under --min-words. Export's samples view then has
`wordcount_words` and `wordcount_short`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.io.layout import DatasetDir
from curate.io.tables import write_table
from curate.options import option
from curate.stages.base import Stage

NAME = "wordcount"


@dataclass(frozen=True)
class WordCountConfig:
    min_words: int = option(2, help="Captions with fewer words than this are marked short.")


class WordCountStage(Stage):
    name = NAME
    config_cls = WordCountConfig

    def validate(self, cfg: WordCountConfig, ds: DatasetDir) -> None:
        if cfg.min_words < 0:
            raise InputError("--min-words: must be 0 or more")

    def fingerprint_inputs(self, cfg: WordCountConfig, ds: DatasetDir) -> dict[str, Any]:
        return {"ledgers": {s: ds.ledger(s).stat().st_size for s in ds.shards()}}

    def plan(self, cfg: WordCountConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        shards = ds.shards()
        if not shards:
            raise InputError(f"{ds.root}: no downloaded shards")
        return [{"shard": s} for s in shards]

    def reads(self, cfg: WordCountConfig, ds: DatasetDir, task: dict[str, Any]) -> list[tuple[str, str]]:
        return [(ds.source_stage_of(task["shard"]), task["shard"])]

    def run_shard(self, cfg: WordCountConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        rows = pq.read_table(ds.ledger(task["shard"]), columns=["key", "caption"]).to_pylist()
        words = [len((r["caption"] or "").split()) for r in rows]
        short = [w < cfg.min_words for w in words]
        write_table(ds.signals(NAME, task["shard"]), pa.table({
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "words": pa.array(words, pa.int32()),
            "short": pa.array(short, pa.bool_()),
        }))
        return {"rows": len(rows), "short": sum(short)}


STAGE = WordCountStage()
