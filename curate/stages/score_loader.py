"""score's DataLoader dataset: a module-level IterableDataset, so spawned loader workers can unpickle it.

Kept apart from `curate.stages.score` so that torch is imported only when a shard is actually scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch.utils.data as tud


class ShardIterable(tud.IterableDataset):
    def __init__(self, samples: Iterable[Any]):
        self.samples = samples

    def __iter__(self) -> Iterator[Any]:
        return iter(self.samples)
