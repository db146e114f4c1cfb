"""Stage "index" as the runner sees it: the FAISS index builder of curate/search/build.py (which holds its
config, plan, tasks and merge, beside the searcher that reads the index) on the Stage base class."""

from __future__ import annotations

from typing import Any

from curate.io.layout import DatasetDir
from curate.search import build
from curate.search.build import IndexConfig, check_config, input_digest
from curate.stages.base import Stage


class IndexStage(build.IndexStage, Stage):
    def validate(self, cfg: IndexConfig, ds: DatasetDir) -> None:
        check_config(cfg)

    def fingerprint_inputs(self, cfg: IndexConfig, ds: DatasetDir) -> dict[str, Any]:
        return {"dataset": input_digest(ds, cfg.scorer)}


STAGE = IndexStage()
