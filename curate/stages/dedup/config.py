"""dedup's config, its checks and the helpers every phase shares: reading a shard's embeddings and hashes,
the work folder, the input digest, the pair-task groups and the over-flagging warning."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from curate import extras
from curate.config import runtime
from curate.errors import InputError
from curate.hashing import json_digest
from curate.io import manifest
from curate.io.layout import DatasetDir
from curate.io.lineage import marker_identity, require_current
from curate.options import AUTO, absolute, at_least, cosine_or_auto, option, parse_k
from curate.stages.dedup import core as sd
from curate.stages.dedup.core import DEVICES, KEEP_POLICIES

log = logging.getLogger(__name__)

WORK = ("_work", "dedup")
PLAN_VERSION = 5  # 5: hubs probe every cluster that can hold a partner; 4: exact copies collapse first, pairs bounded
ROWS_PER_TASK = 65536  # with tasks=0: about this many rows' clusters per pair task
SAMPLE_PER_CENTROID = 64
PHASES = ("assign", "collapse", "pairs", "resolve", "decide", "write")
# 8 of 256 bits: re-encoded and downscaled copies stay within it, distinct look-alike drawings do not
# (bench/dedup_evidence.py on the demo web; bench/dedup_planted.py on drawings the demo never saw)
DEFAULT_PHASH_DISTANCE = 8
# the over-flagging warning: flagged rows above this share of the rows AND this many times the share of
# rows that are byte-identical copies (near copies of web data run at a few times the exact ones)
OVERFLAG_MIN_SHARE = 0.05
OVERFLAG_EXACT_RATIO = 5.0



@dataclass(frozen=True)
class DedupConfig:
    # a cosine, or 'auto' (DedupConfig(threshold="auto") too): then threshold_auto is set and the threshold
    # stored stays the default until the calibration decides it
    threshold: float = option(
        0.95, cli_type=str, cli_default="0.95", convert=cosine_or_auto, metavar="COSINE|auto",
        help="Cosine at or above which two images are near duplicates, or 'auto': calibrate it for the scoring "
             "model on augmented copies (re-encoded, downscaled, cropped) of a sample of the dataset's own images, "
             "above every random pair of that sample. 0.95 suits CLIP ViT image embeddings; a small or weakly "
             "trained model needs another value (or 'auto').")
    auto_target: float = option(0.95, help="With --threshold auto: the share of augmented copies the threshold must "
                                           "find.")
    k: int = option(0, cli_type=str, cli_default="auto", convert=parse_k,
                    help="k-means clusters, or 'auto' (about 2 sqrt(N): 1M samples -> 2000 clusters).")
    probes: int = option(2, help="Nearest clusters each sample searches, so pairs split by a cluster border are "
                                 "found.")
    keep: str = option("best-clip-score", choices=KEEP_POLICIES,
                       help="Which sample of a duplicate group is kept (ties: lowest key).")
    against: str | None = option(None, convert=absolute, click_type=click.Path(exists=True, file_okay=False),
                                 help="A scored evaluation dataset dir: flag samples close to (or byte-equal to) "
                                      "its images.")
    eval_threshold: float = option(0.95, help="Cosine to an evaluation image at or above which a sample is "
                                              "eval_contaminated.")
    # on by default: a model the project has never seen (a small or weakly trained one above all) packs
    # look-alike pictures together, and an embedding threshold alone then flags far more than the copies
    phash: bool = option(True, help="Perceptual hashes of the pictures (reads the tars): near (embedding) pairs "
                                    "count only when the pixels agree (--phash-distance), and equal pHashes "
                                    "group. --no-phash: the embeddings alone decide.")
    phash_distance: int | None = option(
        None, help=f"With --phash: a near (embedding) pair counts only when the two images' 256-bit pHashes "
                   f"differ in at most this many bits, and equal pHashes are compared at 256 bits (default: "
                   f"{DEFAULT_PHASH_DISTANCE}; -1: no check, equal 64-bit pHashes group).")
    seed: int = option(0, help="k-means sample and init seed.")
    tasks: int = option(0, help="Pair-search tasks (groups of clusters) for the engine (0 = one per ~65k samples).")
    pairs_per_row: int = option(32, help="Near pairs kept per sample: its highest-priority partners above the "
                                         "threshold, all the keep rule reads (decisions are exact while no sample "
                                         "has more partners than this that are all dropped).")
    batch_rows: int = runtime(65536)
    scorer: str = option("score", help="The score stage whose image embeddings are compared (signals/SCORER/, "
                                       "`curate score --name`).")
    device: str = option("auto", runtime=True, choices=DEVICES,
                         help="Where k-means, assignment and pair search run: cuda uses torch matrix products on the "
                              "GPU (same decisions as cpu, which uses faiss/numpy).")
    threshold_auto: bool = False  # calibrate the threshold on augmented copies of the dataset's images

    def __post_init__(self) -> None:
        if self.threshold == AUTO:
            object.__setattr__(self, "threshold", 0.95)
            object.__setattr__(self, "threshold_auto", True)
        if self.phash_distance is None:  # the default: the pixel check whenever there are pHashes
            object.__setattr__(self, "phash_distance", DEFAULT_PHASH_DISTANCE if self.phash else -1)


def check_config(cfg: DedupConfig) -> None:
    if not 0.0 < cfg.auto_target <= 1.0:
        raise InputError(f"--auto-target: {cfg.auto_target} is not a share in (0, 1]")
    if not cfg.threshold_auto and not -1.0 <= cfg.threshold <= 1.0:
        raise InputError(f"--threshold: {cfg.threshold} is not a cosine in [-1, 1]")
    if not -1.0 <= cfg.eval_threshold <= 1.0:
        raise InputError(f"--eval-threshold: {cfg.eval_threshold} is not a cosine in [-1, 1]")
    if cfg.k < 0:
        raise InputError("--k: must be 'auto' or a positive number of clusters")
    if not -1 <= cfg.phash_distance <= 256 or (cfg.phash_distance >= 0 and not cfg.phash):
        raise InputError(f"--phash-distance: {cfg.phash_distance} must be -1 (no check) or 0..256 bits with --phash")
    at_least("--probes", cfg.probes, 1)
    if cfg.tasks < 0:
        raise InputError("--tasks: must be 0 (auto) or more")
    at_least("--pairs-per-row", cfg.pairs_per_row, 1)
    if cfg.keep not in KEEP_POLICIES:
        raise InputError(f"--keep: '{cfg.keep}' (choose {', '.join(KEEP_POLICIES)})")
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", cfg.scorer):
        raise InputError(f"--scorer: '{cfg.scorer}' is not a scorer name (lower-case letters, digits, '_', '-')")
    if cfg.threshold_auto:  # calibrates through the scorer's model
        extras.require("score", "curate dedup --threshold auto", ("torch", "open_clip", "safetensors"))
    if cfg.device not in DEVICES:
        raise InputError(f"--device: '{cfg.device}' (choose {', '.join(DEVICES)})")
    if cfg.against is not None and not Path(cfg.against).is_dir():
        raise InputError(f"--against: {cfg.against} is not a directory")


def device_of(cfg: DedupConfig) -> str:
    try:
        return sd.resolve_device(cfg.device)
    except ValueError as e:
        raise InputError(str(e)) from None


def work_dir(ds: DatasetDir) -> Path:
    return ds.root.joinpath(*WORK)


# --- inputs ----------------------------------------------------------------------------------------


def input_digest(ds: DatasetDir, scorer: str = "score") -> dict[str, Any]:
    """What dedup reads from a dataset dir: the score fingerprint, each scored shard's file sizes and the
    identity of each score run (its marker, curate.io.lineage), so a shard scored again re-plans dedup.

    Sizes and marker bytes, not mtimes, so a copied dataset dir still resumes. Dedup compares every shard
    with every other (k-means on a sample of all shards, pairs across shards), so one changed shard can
    change any shard's duplicates: the plan, and every task after it, runs again. Score output computed
    from a download that has changed since is refused (run score first).
    """
    require_current(ds, scorer, "dedup")
    score = manifest.load(ds)["stages"].get(scorer, {})
    files = {}
    for shard in ds.done_shards(scorer):
        paths = (ds.signals(scorer, shard), ds.signals(scorer, shard, ".img_emb.npy"), ds.ledger(shard))
        files[shard] = [p.stat().st_size if p.exists() else None for p in paths]
        files[shard].append(marker_identity(ds, scorer, shard))
    return {"score_fingerprint": score.get("fingerprint"), "shards": len(files), "files_sha256": json_digest(files)}


def input_config(ds: DatasetDir, scorer: str = "score") -> dict[str, Any]:
    """The part of dedup's input that is configuration (its fingerprint): the score stage's fingerprint. Which
    shards are scored, and which run of each, is in the plan's digest (input_digest): a shard scored again
    re-plans dedup, a score run with another config is refused."""
    return {"score_fingerprint": manifest.load(ds)["stages"].get(scorer, {}).get("fingerprint")}


def read_shard(ds: DatasetDir, shard: str, with_sha: bool = True, scorer: str = "score") -> tuple[Any, np.ndarray]:
    """One shard's scored samples sorted by key, as a table (key, emb_row, clip_score[, sha256]), and its
    memory-mapped embeddings. Bad or missing inputs raise InputError naming the file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ds.signals(scorer, shard)
    try:
        t = pq.read_table(path, columns=["key", "scored", "emb_row", "clip_score"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise InputError(f"{path}: unreadable score table or missing column ({e})") from None
    t = t.filter(pc.and_(pc.fill_null(t["scored"], False), pc.greater_equal(t["emb_row"], 0)))
    cols = {"key": t["key"].cast(pa.string()), "emb_row": t["emb_row"].cast(pa.int64()),
            "clip_score": t["clip_score"].cast(pa.float32())}
    if with_sha:
        lk, lsha = _ledger_sha(ds, shard)
        pos = pc.index_in(cols["key"], value_set=lk)
        cols["sha256"] = pc.take(lsha, pos) if len(lk) else pa.nulls(len(t), pa.string())
    t = pa.table(cols).sort_by("key")
    emb_path = ds.signals(scorer, shard, ".img_emb.npy")
    try:
        emb = np.load(emb_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"{emb_path}: unreadable embeddings ({e})") from None
    if emb.ndim != 2 or (len(t) and int(pc.max(t["emb_row"]).as_py()) >= emb.shape[0]):
        raise InputError(f"{emb_path}: shape {emb.shape} does not hold the emb_row values of {path}")
    if len(t) > 1 and pc.count_distinct(t["key"]).as_py() != len(t):
        raise InputError(f"{path}: a key appears in more than one scored row")
    return t, emb


def gather(emb: np.ndarray, emb_row: np.ndarray) -> np.ndarray:
    """emb[emb_row] read front to back through the memory map."""
    o = np.argsort(emb_row, kind="stable")
    out = np.empty((len(emb_row), emb.shape[1]), emb.dtype)
    out[o] = emb[emb_row[o]]
    return out


def _ledger_sha(ds: DatasetDir, shard: str) -> tuple[Any, Any]:
    """(key, sha256) arrays of the shard's current successful ledger rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ds.ledger(shard)
    if not path.exists():
        return pa.array([], pa.string()), pa.array([], pa.string())
    t = pq.read_table(path)
    if "sha256" not in t.column_names:
        raise InputError(f"{path}: no sha256 column")
    ok = pc.and_(pc.equal(t["status"], "success"), pc.invert(pc.is_null(t["sha256"])))
    ok = pc.and_(ok, pc.not_equal(t["sha256"], ""))
    if "superseded_by" in t.column_names:
        # a row a download retry superseded is history: its key is not a sample any more
        ok = pc.and_(ok, pc.fill_null(pc.equal(t["superseded_by"], ""), True))
    t = t.filter(pc.fill_null(ok, False))
    return t["key"].cast(pa.string()).combine_chunks(), t["sha256"].cast(pa.string()).combine_chunks()


# --- the stage -------------------------------------------------------------------------------------

def overflag_warning(counts: dict[str, Any], cfg: DedupConfig) -> str | None:
    """A warning when dedup flags far more rows than the byte-identical copies suggest (OVERFLAG_*): the
    sign of a threshold the embedding model does not support, as with a small model on unseen data."""
    rows, flagged = counts.get("rows") or 0, counts.get("duplicates") or 0
    if rows <= 0:
        return None
    exact = (counts.get("drops_by_evidence") or {}).get("exact", 0)
    share, exact_share = flagged / rows, exact / rows
    if share <= OVERFLAG_MIN_SHARE or share <= OVERFLAG_EXACT_RATIO * exact_share:
        return None
    check = (f"pHash check at {cfg.phash_distance} bits" if cfg.phash and cfg.phash_distance >= 0
             else "no pixel check (--phash off or --phash-distance -1)")
    return (f"{flagged} of {rows} rows ({share:.1%}) flagged as duplicates, more than {OVERFLAG_EXACT_RATIO:g}x the "
            f"byte-identical copies ({exact_share:.1%}); threshold {counts.get('threshold')}, {check}. Check the "
            f"duplicate groups (curate report) before dropping them; --threshold auto calibrates the threshold for "
            f"this model, and --phash with --phash-distance confirms pairs by their pixels")


def groups_for(n: int, k: int, tasks: int, cluster_entries: np.ndarray | None = None) -> list[int]:
    """Cluster bounds of the pair tasks: `tasks` (0 = one per ~ROWS_PER_TASK rows) contiguous cluster ranges
    holding about equal numbers of (row, probe) entries, as estimated on the training sample (cluster sizes
    vary several-fold, and equal cluster counts made one task of a 4M-row run 5x the average)."""
    n_tasks = tasks or max(1, math.ceil(n / ROWS_PER_TASK))
    n_tasks = max(1, min(n_tasks, k))
    if cluster_entries is None or cluster_entries.sum() == 0:
        return [int(b) for b in np.linspace(0, k, n_tasks + 1).round().astype(int)]
    cum = np.cumsum(cluster_entries)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_tasks) / n_tasks)
    return [0, *sorted({int(c) for c in np.clip(cuts + 1, 1, k - 1)} if k > 1 else []), k]
