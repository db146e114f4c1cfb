"""The dataset directory contract: where shards, ledgers, signal tables, stats and markers live.

    DIR/manifest.json                       stages run, resolved configs, fingerprints, versions, counts
    DIR/_manifest/{stage}/{i}-of-{n}.json   one fragment per Slurm array task (readers merge them)
    DIR/shards/{shard}.tar                  webdataset tars, members {key}.jpg|png|webp, {key}.txt, {key}.json
    DIR/ledger/{shard}.parquet              one row per input row (download) or per sample (export)
    DIR/signals/{stage}/{shard}.parquet     per-stage signal tables keyed by `key`
    DIR/signals/score/{shard}.img_emb.npy   float16 L2-normalised image embeddings, row-aligned with keys
    DIR/stats/{stage}/{task}.json           per-task stats
    DIR/_done/{stage}/{task}.json           completion marker, written last
    DIR/_inputs/{shard}.parquet             download: the input rows of one shard (written by the plan)
    DIR/_inputs/duplicates.parquet          download: (shard, key, duplicate_of) of every repeated URL
    DIR/_inputs/plan.json                   download: the plan, written last (its presence = plan complete)
    DIR/_inputs/progress/{shard}.json       download: rows done so far in a running shard
    DIR/_work/{stage}/                      a stage's intermediate files (dedup buckets, export keep lists)
    DIR/dropped.parquet, DIR/dropped/*.parquet   export: the rows a selection dropped, with the clause
    DIR/_locks/{stage}.lock                 advisory lock: one run per dataset directory and stage

Identity. A shard id is its index written with SHARD_DIGITS (8) decimal digits, so ids sort as numbers up
to 10^8 shards. A sample key is its shard id followed by its row within the shard in ROW_DIGITS (5) digits
(13 characters), so keys are unique and sort in (shard, row) order up to 10^13 rows; shard_of_key() is
the only way to get a key's shard back. A *task* id names one unit of work of a stage (its marker and
stats file); for per-shard stages it is the shard id, other stages (dedup's pair tasks) name their
tasks freely with a "task" field.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARD_DIGITS = 8
ROW_DIGITS = 5
MAX_SHARDS = 10**SHARD_DIGITS
MAX_ROWS_PER_SHARD = 10**ROW_DIGITS
KEY_LENGTH = SHARD_DIGITS + ROW_DIGITS
LAYOUT_VERSION = "curate-dataset/2"  # /1 had 5-digit shard ids and 10-character keys

_SHARD_RE = re.compile(rf"^[0-9]{{{SHARD_DIGITS}}}$")
_KEY_RE = re.compile(rf"^[0-9]{{{KEY_LENGTH}}}$")


def shard_name(index: int) -> str:
    """The shard id of shard number `index` (fixed width, so ids sort as their numbers do)."""
    if not 0 <= index < MAX_SHARDS:
        raise ValueError(f"shard index {index} outside 0..{MAX_SHARDS - 1}")
    return f"{index:0{SHARD_DIGITS}d}"


def is_shard_name(name: str) -> bool:
    return bool(_SHARD_RE.match(name))


def shard_index(name: str) -> int:
    """The number of shard id `name`; a name that is not a shard id raises ValueError."""
    if not is_shard_name(name):
        raise ValueError(f"'{name}' is not a shard id ({SHARD_DIGITS} digits)")
    return int(name)


def sample_key(shard: str, row: int) -> str:
    """The key of row `row` (0-based, within the shard) of shard `shard`."""
    if not 0 <= row < MAX_ROWS_PER_SHARD:
        raise ValueError(f"row {row} outside 0..{MAX_ROWS_PER_SHARD - 1} within a shard")
    return f"{shard}{row:0{ROW_DIGITS}d}"


def is_sample_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def shard_of_key(key: str) -> str:
    """The shard id a sample key belongs to."""
    if not is_sample_key(key):
        raise ValueError(f"'{key}' is not a sample key ({KEY_LENGTH} digits)")
    return key[:SHARD_DIGITS]


def row_of_key(key: str) -> int:
    if not is_sample_key(key):
        raise ValueError(f"'{key}' is not a sample key ({KEY_LENGTH} digits)")
    return int(key[SHARD_DIGITS:])


def task_id(task: dict[str, Any]) -> str:
    """The id of a planned task: its "task" field, else its shard id."""
    return str(task.get("task") or task["shard"])


SOURCE_STAGES = ("download", "export", "adopt")  # the stages that write shards/ and ledger/

# what each stage owns beside its _done/{stage}, stats/{stage}, signals/{stage}, _work/{stage} and
# manifest fragments; discard() removes exactly these, so --redo of one stage never touches another's files
_STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "download": ("shards", "ledger", "_inputs"),
    "export": ("shards", "ledger", "dropped", "dropped.parquet"),
    "adopt": ("shards", "ledger"),
    "index": ("index",),
}


@dataclass(frozen=True)
class DatasetDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> DatasetDir:
        return cls(Path(path).expanduser().resolve())

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def manifest_fragments_dir(self, stage: str) -> Path:
        return self.root / "_manifest" / stage

    def manifest_fragment(self, stage: str, index: int, count: int) -> Path:
        return self.manifest_fragments_dir(stage) / f"{index:0{SHARD_DIGITS}d}-of-{count:0{SHARD_DIGITS}d}.json"

    def shard_tar(self, shard: str) -> Path:
        return self.root / "shards" / f"{shard}.tar"

    def ledger(self, shard: str) -> Path:
        return self.root / "ledger" / f"{shard}.parquet"

    def signals(self, stage: str, shard: str, suffix: str = ".parquet") -> Path:
        return self.root / "signals" / stage / f"{shard}{suffix}"

    def stats(self, stage: str, task: str) -> Path:
        return self.root / "stats" / stage / f"{task}.json"

    def marker(self, stage: str, task: str) -> Path:
        return self.root / "_done" / stage / f"{task}.json"

    # ---- intermediate files ----
    @property
    def inputs_dir(self) -> Path:
        return self.root / "_inputs"

    def input_slice(self, shard: str) -> Path:
        return self.inputs_dir / f"{shard}.parquet"

    def input_progress(self, shard: str) -> Path:
        return self.inputs_dir / "progress" / f"{shard}.json"

    @property
    def plan_file(self) -> Path:
        return self.inputs_dir / "plan.json"

    @property
    def duplicates_file(self) -> Path:
        return self.inputs_dir / "duplicates.parquet"

    def work(self, stage: str) -> Path:
        return self.root / "_work" / stage

    def dropped(self, shard: str | None = None) -> Path:
        return self.root / "dropped.parquet" if shard is None else self.root / "dropped" / f"{shard}.parquet"

    def tasks_tmp(self, stage: str) -> Path:
        """The folder of `stage`'s task temp folders (see curate.io.atomic)."""
        return self.root / "_work" / "_tmp" / stage

    def task_tmp(self, stage: str, task: str) -> Path:
        """The temp folder of one task of `stage` (see curate.io.atomic)."""
        return self.tasks_tmp(stage) / task

    @property
    def locks_dir(self) -> Path:
        return self.root / "_locks"

    def lock(self, name: str) -> Path:
        return self.locks_dir / f"{name}.lock"

    def stage_paths(self, stage: str) -> list[Path]:
        """Every file and folder that holds output of `stage` in this directory."""
        own = [self.root / "_done" / stage, self.root / "stats" / stage, self.root / "signals" / stage,
               self.work(stage), self.manifest_fragments_dir(stage), self.tasks_tmp(stage)]
        return own + [self.root / p for p in _STAGE_OUTPUTS.get(stage, ())]

    def discard(self, stage: str) -> None:
        """Remove every output of `stage` (--redo, or a new config): the one discard function."""
        for p in self.stage_paths(stage):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # ---- what is done ----
    def done_tasks(self, stage: str) -> list[str]:
        folder = self.root / "_done" / stage
        if not folder.exists():
            return []
        return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))

    def done_shards(self, stage: str) -> list[str]:
        """The shard ids among `stage`'s done tasks (tasks named otherwise are left out)."""
        return [t for t in self.done_tasks(stage) if is_shard_name(t)]

    def shards(self) -> list[str]:
        """Shards whose download (or export, or adopt) completed: they have a ledger and a marker."""
        stage = self.source_stage()
        return self.done_shards(stage) if stage else []

    def source_stage(self) -> str | None:
        """The stage that wrote this directory's shards and ledger: download, export or adopt (None: none yet)."""
        for stage in SOURCE_STAGES:
            if self.done_shards(stage):
                return stage
        return None

    def source_stage_of(self, shard: str) -> str:
        """The stage whose marker says `shard` is done (O(1) paths, for a task); "download" when none is."""
        for stage in SOURCE_STAGES:
            if self.marker(stage, shard).exists():
                return stage
        return "download"

    def ledger_files(self) -> list[Path]:
        return [self.ledger(s) for s in self.shards() if self.ledger(s).exists()]

    def signal_files(self, stage: str) -> list[Path]:
        return [self.signals(stage, s) for s in self.done_shards(stage) if self.signals(stage, s).exists()]
