"""Filters that check themselves: a held-out split of the trusted pairs, its retrieval next to chance, and
the record of it inside the saved checkpoint, so `curate score` can warn before trusting a weak filter.

A filter model trained on a few hundred pairs can memorise them (training loss near zero) and still be at
chance on pairs it has not seen; its scores and embeddings then drive every later decision. Held-out
retrieval recall@5 against chance (5 / held-out pairs) is the check: a model whose recall is below
WEAK_LIFT x chance is flagged weak.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from curate.train_probe.data import Samples
from curate.train_probe.evaluate import encode_images, encode_texts, retrieval

WEAK_LIFT = 2.0  # held-out R@5 below this multiple of chance: the filter is near chance
METADATA_KEY = "curate_filter_quality"
MIN_HELDOUT = 10


def split_holdout(keys: list[str], share: float) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a row is held out when the hash of its key falls below `share`, so the
    split does not depend on order or on the other rows."""
    held, train = [], []
    for i, k in enumerate(keys):
        u = int.from_bytes(hashlib.sha256(f"holdout:{k}".encode()).digest()[:8], "big") / 2 ** 64
        (held if u < share else train).append(i)
    return train, held


def heldout_retrieval(model: Any, held: Samples, device: str) -> dict[str, float]:
    """Retrieval on the held-out pairs: R@1/R@5 both ways, their R@5 mean, chance R@5 and the lift over it."""
    was_training = model.training
    model.eval()
    try:
        m = retrieval(encode_images(model, held.images, 256, device), encode_texts(model, held.tokens, 256, device))
    finally:
        model.train(was_training)
    n = len(held)
    chance = min(5, n) / n
    r5 = (m["i2t_r5"] + m["t2i_r5"]) / 2
    return {**m, "retrieval_r5": r5, "chance_r5": chance, "lift": r5 / chance, "heldout_pairs": n}


def quality_record(metrics: dict[str, float], train_pairs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The record saved with a filter model; `weak` is the verdict score warns on."""
    weak = metrics["lift"] < WEAK_LIFT
    verdict = (f"WEAK: held-out retrieval R@5 {metrics['retrieval_r5']:.3f} is {metrics['lift']:.1f}x chance "
               f"({metrics['chance_r5']:.3f}); its scores and embeddings are close to random"
               if weak else
               f"held-out retrieval R@5 {metrics['retrieval_r5']:.3f} is {metrics['lift']:.1f}x chance "
               f"({metrics['chance_r5']:.3f})")
    return {**{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}, "train_pairs": train_pairs,
            "weak_below_lift": WEAK_LIFT, "weak": weak, "verdict": verdict, **extra}


def read_quality(checkpoint: str | Path) -> dict[str, Any] | None:
    """The quality record a train-probe --save-model checkpoint carries (None for any other checkpoint)."""
    path = Path(checkpoint)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable header is score's error to report, not ours
        return None
    text = meta.get(METADATA_KEY)
    if not text:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def warning_lines(rec: dict[str, Any], checkpoint: str) -> list[str]:
    """The loud warning `curate score` prints for a weak filter model."""
    bar = "!" * 78
    return [bar, f"WARNING: the filter model {checkpoint} is near chance on its own held-out pairs.",
            f"  {rec.get('verdict', '')}",
            f"  trained on {rec.get('train_pairs')} pairs, checked on {rec.get('heldout_pairs')} held-out pairs.",
            "  Scores, top fractions and embedding-based dedup built on it will be close to random:",
            "  train it on more trusted pairs, or score with a pretrained CLIP model instead.", bar]
