"""The dataset directory contract: where shards, ledgers, signal tables, stats and markers live.

    DIR/manifest.json                       stages run, resolved configs, fingerprints, versions, counts
    DIR/shards/{shard}.tar                  webdataset tars, members {key}.jpg|png|webp, {key}.txt, {key}.json
    DIR/ledger/{shard}.parquet              one row per input row (download) or per sample (export)
    DIR/signals/{stage}/{shard}.parquet     per-stage signal tables keyed by `key`
    DIR/signals/score/{shard}.img_emb.npy   float16 L2-normalised image embeddings, row-aligned with keys
    DIR/stats/{stage}/{shard}.json          per-shard stats
    DIR/_done/{stage}/{shard}.json          completion marker, written last
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class DatasetDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> DatasetDir:
        return cls(Path(path).expanduser().resolve())

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def shard_tar(self, shard: str) -> Path:
        return self.root / "shards" / f"{shard}.tar"

    def ledger(self, shard: str) -> Path:
        return self.root / "ledger" / f"{shard}.parquet"

    def signals(self, stage: str, shard: str, suffix: str = ".parquet") -> Path:
        return self.root / "signals" / stage / f"{shard}{suffix}"

    def stats(self, stage: str, shard: str) -> Path:
        return self.root / "stats" / stage / f"{shard}.json"

    def marker(self, stage: str, shard: str) -> Path:
        return self.root / "_done" / stage / f"{shard}.json"

    def done_shards(self, stage: str) -> list[str]:
        folder = self.root / "_done" / stage
        if not folder.exists():
            return []
        return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))

    def shards(self) -> list[str]:
        """Shards whose download (or export, or adopt) completed: they have a ledger and a marker."""
        for stage in ("download", "export", "adopt"):
            done = self.done_shards(stage)
            if done:
                return done
        return []

    def ledger_files(self) -> list[Path]:
        return [self.ledger(s) for s in self.shards() if self.ledger(s).exists()]

    def signal_files(self, stage: str) -> list[Path]:
        return [self.signals(stage, s) for s in self.done_shards(stage) if self.signals(stage, s).exists()]
