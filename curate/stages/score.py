"""Stage "score": CLIP image-text similarity, image/text embeddings, caption language and signals per shard.

One task per downloaded shard. The tar is streamed (never extracted); decoding and preprocessing run in
DataLoader worker processes; both encoders run batched in the task's process on `--device`.
Outputs: signals/score/{shard}.parquet (one row per ledger row) and {shard}.img_emb.npy (float16,
L2-normalised, row `emb_row`), plus {shard}.txt_emb.npy with `save_text_embeddings`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from curate.config import runtime
from curate.errors import InputError, ShardError
from curate.io.layout import DatasetDir
from curate.models import DEFAULT_MODEL, DEFAULT_PRETRAINED

log = logging.getLogger("curate.score")

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LEDGER_COLUMNS = ("key", "status", "caption", "width", "height", "orig_width", "orig_height", "bytes")


@dataclass(frozen=True)
class ScoreConfig:
    model: str = DEFAULT_MODEL  # open_clip name or config .json path
    pretrained: str = DEFAULT_PRETRAINED  # open_clip tag, checkpoint path, or "none"
    checksum: str | None = None  # SHA-256 the checkpoint must have
    precision: str = "fp32"
    save_text_embeddings: bool = False
    device: str = runtime("auto")
    batch_size: int = runtime(256)
    loader_workers: int = runtime(1)  # DataLoader worker processes per task (0 = decode in-process)
    threads: int = runtime(0)  # torch intra-op threads per task process (0 = auto, see auto_threads)
    shard_index: int = runtime(0)  # this task's slice of shards: shards[shard_index::num_shards]
    num_shards: int = runtime(1)


def check_config(cfg: ScoreConfig) -> None:
    """Flag-level checks, so a bad value stops the run before any shard (exit 2)."""
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision: '{cfg.precision}' (choose {', '.join(PRECISIONS)})")
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise InputError(f"--device: '{cfg.device}' (choose {', '.join(DEVICES)})")
    if cfg.batch_size < 1:
        raise InputError("--batch-size: must be at least 1")
    if cfg.loader_workers < 0:
        raise InputError("--loader-workers: must be 0 or more")
    if cfg.threads < 0:
        raise InputError("--threads: must be 0 or more")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        raise InputError(f"--shard-index/--num-shards: need 0 <= {cfg.shard_index} < {cfg.num_shards}")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {cfg.device}: no CUDA device is visible to torch")


def resolve_device(requested: str) -> str:
    """auto -> cuda if visible; plain "cuda" on a multi-GPU node -> one GPU per local worker process."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        n = torch.cuda.device_count()
        ident = mp.current_process()._identity  # (k,) in a pool worker, () in the main process
        return f"cuda:{(ident[0] - 1) % n if ident and n else 0}"
    return requested


# --- decode + preprocess (runs in DataLoader workers) -------------------------------------------


def decode_image(data: bytes, preprocess: Any, image_size: int) -> tuple[Any, int, int]:
    """(tensor, stored width, stored height); raises on bytes that are not a decodable image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        # JPEG DCT scaling: decode at >= 2x the model's input size (never below it), which cuts decode
        # time for large photos; the bicubic resize that follows still downsamples by >= 2.
        im.draft("RGB", (2 * image_size, 2 * image_size))
        im.load()
        return preprocess(im.convert("RGB")), width, height


class ShardSamples:
    """An IterableDataset over one tar's samples: worker w of n takes samples w, w+n, ..."""

    def __init__(self, tar: str, wanted: frozenset[str], preprocess: Any, tokenizer: Any, image_size: int):
        self.tar, self.wanted = tar, wanted
        self.preprocess, self.tokenizer, self.image_size = preprocess, tokenizer, image_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.utils.data as tud

        from curate.io.shards import iter_samples

        info = tud.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for i, s in enumerate(iter_samples(self.tar)):
                if i % n == wid and s["key"] in self.wanted:
                    yield self._prepare(s)
        except ShardError as e:
            # handed to the main process as data: DataLoader would re-wrap the exception's message
            yield {"shard_error": str(e)}

    def _prepare(self, s: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"key": s["key"], "nbytes": len(s["image"] or b""), "image": None,
                               "width": None, "height": None, "error": None}
        if s["image"] is None:
            out["error"] = "missing_image"
            return out
        try:
            out["image"], out["width"], out["height"] = decode_image(s["image"], self.preprocess, self.image_size)
        except Exception:  # noqa: BLE001 - any decoder failure is this sample's decode_error
            out["error"] = "decode_error"
            return out
        out["tokens"] = self.tokenizer([s["caption"] or ""])[0]
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    errors = [it["shard_error"] for it in items if "shard_error" in it]
    ok = [it for it in items if "shard_error" not in it and it["image"] is not None]
    return {
        "shard_error": errors[0] if errors else None,
        "meta": [{k: v for k, v in it.items() if k not in ("image", "tokens")} for it in items
                 if "shard_error" not in it],
        "keys": [it["key"] for it in ok],
        "images": torch.stack([it["image"] for it in ok]) if ok else None,
        "tokens": torch.stack([it["tokens"] for it in ok]) if ok else None,
    }


def make_loader(dataset: ShardSamples, batch_size: int, workers: int, pin_memory: bool) -> Any:
    import torch.utils.data as tud

    from curate.stages.score_loader import ShardIterable

    return tud.DataLoader(
        ShardIterable(dataset), batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )


# --- model forward ---------------------------------------------------------------------------------


def auto_threads(device: str) -> int:
    """On the CPU, torch gets every core: measured on 2 cores with ViT-B-32, 1 torch thread beside a
    decoding worker ran the stage at 0.49x the forward-only rate, 2 threads at 0.94x (the decoding
    worker mostly waits). A model so small that decoding dominates loses little (0.40x either way).
    0 = keep torch's setting."""
    if not device.startswith("cpu"):
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_settings(threads: int) -> Iterator[None]:
    """Deterministic kernels and the thread count for one task; restored afterwards (tests share a process)."""
    import torch

    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])


def autocast(device: str, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def encode(lm: Any, images: Any, tokens: Any, precision: str) -> tuple[Any, Any]:
    """L2-normalised float32 (image, text) embeddings of one batch."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode(), autocast(lm.device, precision):
        img = lm.model.encode_image(images.to(lm.device, non_blocking=True))
        txt = lm.model.encode_text(tokens.to(lm.device, non_blocking=True))
    # normalise in fp32 whatever the autocast dtype, so stored embeddings have unit norm
    return F.normalize(img.float(), dim=-1).cpu(), F.normalize(txt.float(), dim=-1).cpu()


# --- the stage -------------------------------------------------------------------------------------


def read_ledger(ds: DatasetDir, shard: str) -> Any:
    import pyarrow.parquet as pq

    path = ds.ledger(shard)
    if not path.exists():
        raise ShardError(f"{path}: ledger missing for shard {shard}")
    names = pq.read_schema(path).names
    missing = [c for c in ("key", "status") if c not in names]
    if missing:
        raise InputError(f"{path}: ledger lacks column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=[c for c in LEDGER_COLUMNS if c in names]).to_pylist()


def score_rows(cfg: ScoreConfig, ds: DatasetDir, shard: str) -> tuple[list[dict[str, Any]], Any, Any, dict]:
    """Score one shard: (signal rows in ledger order, image embeddings, text embeddings, stats)."""
    import numpy as np
    import torch

    from curate import langid
    from curate.captions import caption_signals
    from curate.models import load_model, resolve_model

    ledger = read_ledger(ds, shard)
    device = resolve_device(cfg.device)
    lm = load_model(resolve_model(cfg.model, cfg.pretrained, cfg.checksum), device)
    wanted = frozenset(r["key"] for r in ledger if r.get("status") == "success")
    tar = ds.shard_tar(shard)
    if wanted and not tar.exists():
        raise ShardError(f"{tar}: shard tar missing ({len(wanted)} successful rows in its ledger)")

    found: dict[str, dict[str, Any]] = {}
    emb: dict[str, tuple[Any, Any, float]] = {}
    with torch_settings(cfg.threads or auto_threads(device)):
        if wanted:
            samples = ShardSamples(str(tar), wanted, lm.preprocess, lm.tokenizer, lm.image_size)
            loader = make_loader(samples, cfg.batch_size, cfg.loader_workers, device.startswith("cuda"))
            for batch in loader:
                if batch["shard_error"]:
                    raise ShardError(batch["shard_error"])
                for m in batch["meta"]:
                    found[m["key"]] = m
                if batch["images"] is None:
                    continue
                img, txt = encode(lm, batch["images"], batch["tokens"], cfg.precision)
                sims = (img * txt).sum(-1)
                for j, key in enumerate(batch["keys"]):
                    emb[key] = (img[j], txt[j], float(sims[j]))

    languages = langid.detect_many([r.get("caption") for r in ledger])
    rows: list[dict[str, Any]] = []
    img_rows, txt_rows = [], []
    skipped: Counter[str] = Counter()
    for r, lang in zip(ledger, languages, strict=True):
        key, status = r["key"], r.get("status")
        seen = found.get(key, {})
        if status != "success":
            reason = status or "unknown"
        elif key not in found:
            reason = "missing_from_shard"  # the ledger says success but the tar lacks the sample
        else:
            reason = seen["error"]
        cap = caption_signals(r.get("caption"))
        width = seen.get("width") or r.get("width")
        height = seen.get("height") or r.get("height")
        ow, oh = r.get("orig_width") or width, r.get("orig_height") or height
        row = {
            "key": key, "scored": reason is None, "skip_reason": reason, "clip_score": None,
            "lang": lang.label, "lang_prob": lang.prob, "lang_fasttext": lang.fasttext,
            "lang_fasttext_prob": lang.fasttext_prob, "caption_chars": cap.chars,
            "caption_words": cap.words, "letter_share": cap.letter_share,
            "caption_boilerplate": cap.boilerplate, "width": width, "height": height,
            "orig_width": ow, "orig_height": oh,
            "aspect_ratio": max(ow, oh) / min(ow, oh) if ow and oh else None,
            "bytes": r.get("bytes") if r.get("bytes") is not None else seen.get("nbytes"),
            "emb_row": -1,
        }
        if reason is None:
            i_vec, t_vec, sim = emb[key]
            row["clip_score"], row["emb_row"] = sim, len(img_rows)
            img_rows.append(i_vec)
            txt_rows.append(t_vec)
        else:
            skipped[reason] += 1
        rows.append(row)

    def stack(vecs: list[Any]) -> Any:
        if not vecs:
            return np.zeros((0, lm.embed_dim), dtype=np.float16)
        return torch.stack(vecs).numpy().astype(np.float16)

    stats = {"rows": len(rows), "scored": len(img_rows), "skipped": dict(skipped),
             "device": device, "checkpoint_sha256": lm.checkpoint_sha256}
    return rows, stack(img_rows), stack(txt_rows), stats


def signal_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("scored", pa.bool_()), ("skip_reason", pa.string()),
        ("clip_score", pa.float32()), ("lang", pa.string()), ("lang_prob", pa.float32()),
        ("lang_fasttext", pa.string()), ("lang_fasttext_prob", pa.float32()),
        ("caption_chars", pa.int32()), ("caption_words", pa.int32()), ("letter_share", pa.float32()),
        ("caption_boilerplate", pa.bool_()), ("width", pa.int32()), ("height", pa.int32()),
        ("orig_width", pa.int32()), ("orig_height", pa.int32()), ("aspect_ratio", pa.float32()),
        ("bytes", pa.int64()), ("emb_row", pa.int32()),
    ])


def write_npy(path: Any, array: Any) -> None:
    import numpy as np

    from curate.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


class ScoreStage:
    name = "score"
    config_cls = ScoreConfig

    def plan(self, cfg: ScoreConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        check_config(cfg)
        shards = ds.shards()
        if not shards:
            raise InputError(f"{ds.root}: no downloaded shards (no _done/download markers); "
                             f"run `curate download` first")
        return [{"shard": s} for s in shards[cfg.shard_index::cfg.num_shards]]

    def run_shard(self, cfg: ScoreConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        from curate.io.tables import write_table

        shard = task["shard"]
        rows, img_emb, txt_emb, stats = score_rows(cfg, ds, shard)
        # embeddings first, the table that points into them last; the marker comes after both
        write_npy(ds.signals("score", shard, ".img_emb.npy"), img_emb)
        if cfg.save_text_embeddings:
            write_npy(ds.signals("score", shard, ".txt_emb.npy"), txt_emb)
        write_table(ds.signals("score", shard), pa.Table.from_pylist(rows, schema=signal_schema()))
        return stats

    def inputs(self, cfg: ScoreConfig) -> dict[str, Any]:
        return model_inputs(cfg)


def model_inputs(cfg: ScoreConfig) -> dict[str, Any]:
    """What the manifest records about the models: resolved model spec, checkpoint and langid hashes."""
    from curate import langid
    from curate.models import resolve_model
    from curate.train_probe.quality import read_quality

    spec = resolve_model(cfg.model, cfg.pretrained, cfg.checksum)
    out = {"model": spec.describe(), "langid": langid.detector_info()}
    quality = read_quality(spec.checkpoint) if spec.checkpoint else None  # a train-probe --save-model filter
    if quality is not None:
        out["filter_quality"] = quality
    return out


STAGE = ScoreStage()
