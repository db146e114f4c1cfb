"""score's data path: a tar index, loader workers that read disjoint runs of samples, safe decoding on the
CPU (Pillow, in the workers) or on the scoring device (torchvision's decode_jpeg: nvjpeg on CUDA), and the
merging of small worker chunks into device-sized batches.

Why it is built this way:
- Each loader worker reads one contiguous run of the tar's samples, found by an index of member offsets
  built once in the task process (headers only), so no byte of a tar is read twice, however many workers.
- Workers send one packed chunk per ~64 samples (one tensor per kind, not one per sample): shared-memory
  tensors cost a file descriptor each, which at 10,000 images/s would dominate.
- On the device path a worker only reads bytes, checks the JPEG header (format allowlist, pixel cap) and
  tokenises; decoding, resizing and normalising run batched on the GPU. Anything else (PNG, WebP, CMYK or
  progressive JPEG, oversized, a bad header) takes the CPU path in the worker, exactly as without a GPU.
- Workers also compute the caption signals (language ID, caption statistics) for a disjoint slice of the
  ledger, so the task process only launches GPU work.

Kept apart from `curate.stages.score` so that torch is imported only when a shard is actually scored;
the dataset class lives at module level so spawned loader workers can unpickle it.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data as tud

from curate import langid
from curate.captions import caption_signals
from curate.errors import ShardError
from curate.io.shards import IndexEntry, index_tar  # noqa: F401 - the loader's index (re-exported)

DECODERS = ("auto", "cpu", "device")
CHUNK_ITEMS = 64  # samples per worker chunk on the device path
MAX_PIXELS = 40_000_000  # the download stage's default --max-pixels: above it, nothing is decoded
DEVICE_MAX_PIXELS = 2048 * 2048  # larger JPEGs decode on the CPU with DCT scaling (GPU memory per batch)
DECODE_PIXEL_BUDGET = 256 * 1024 * 1024  # pixels per nvjpeg call: bounds the decoded uint8 batch (~768 MB)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JPEG_MAGIC = b"\xff\xd8\xff"



class ImageSkipped(Exception):
    """An image that is not scored; `code` becomes the row's skip_reason."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(message or code)
        self.code = code


# --- safe decoding: curate.imaging's shared decoder (allowlist by magic bytes, one Pillow format, pixel cap)


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Any:
    """Open lazily (header only) with the format allowlist and the pixel cap checked; nothing decoded yet.

    Raises ImageSkipped("decode_error" | "format_not_allowed" | "decompression_bomb").
    """
    from curate.imaging import ImageRejected, safe_open

    try:
        return safe_open(data, max_pixels)
    except ImageRejected as e:
        raise ImageSkipped(e.code, e.message) from None


def decode_image(data: bytes, preprocess: Any, image_size: int) -> tuple[Any, int, int]:
    """CPU path: (tensor, stored width, stored height); raises ImageSkipped for bytes not scored.

    JPEG DCT scaling: decoded at >= 2x the model's input size (never below it), which cuts decode time
    for large photos; the bicubic resize that follows still downsamples by >= 2. Transparent images are
    composited on white, as in every stage."""
    from curate.imaging import ImageRejected, safe_decode

    try:
        d = safe_decode(data, MAX_PIXELS, draft=(2 * image_size, 2 * image_size))
    except ImageRejected as e:
        raise ImageSkipped(e.code, e.message) from None
    try:
        return preprocess(d.image), d.width, d.height
    except Exception as e:  # noqa: BLE001 - a transform failure is this sample's decode_error
        raise ImageSkipped("decode_error", str(e)[:200]) from None


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when these bytes may go to the device decoder, else None (CPU path).

    Only complete (end marker present), baseline RGB/greyscale JPEGs within DEVICE_MAX_PIXELS qualify; the
    header is parsed with the same allowlist and pixel cap as the CPU path before a byte reaches nvjpeg.
    """
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        return None  # not a JPEG, or one cut short (no end marker): Pillow refuses those, nvjpeg might not
    try:
        img = open_image(data)
    except ImageSkipped:
        return None  # the CPU path reports the same rejection with its code
    with img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        if img.info.get("progressive") or img.info.get("progression"):
            return None
        w, h = img.size
    return (w, h) if w * h <= DEVICE_MAX_PIXELS else None


# --- the tar index and disjoint reading ----------------------------------------------------------


def split_ranges(n: int, parts: int) -> list[range]:
    """`parts` contiguous, disjoint ranges covering 0..n (the first ones one longer when uneven)."""
    parts = max(1, parts)
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append(range(start, stop))
        start = stop
    return out


def read_run(path: str, entries: list[IndexEntry], reads: list[tuple[int, int]]) -> Iterator[dict[str, Any]]:
    """Samples of one contiguous run of index entries, read with one read per chunk of samples."""
    import json

    with open(path, "rb") as fh:
        for c in range(0, len(entries), CHUNK_ITEMS):
            part = entries[c:c + CHUNK_ITEMS]
            start, end = part[0][2], part[-1][3]
            fh.seek(start)
            blob = fh.read(end - start)
            reads.append((start, end))
            if len(blob) != end - start:
                raise ShardError(f"{path}: truncated tar (short read at byte {start})")
            for key, members, _s, _e in part:
                sample: dict[str, Any] = {"key": key, "image": None, "caption": None}
                for ext, off, size in members:
                    data = blob[off - start:off - start + size]
                    if ext in IMAGE_EXTS:
                        sample["image"] = data
                    elif ext == "txt":
                        sample["caption"] = data.decode("utf-8", errors="replace")
                    elif ext == "json":
                        try:
                            json.loads(data)
                        except json.JSONDecodeError as e:
                            raise ShardError(f"{path}: member '{key}.json' is not valid JSON ({e})") from e
                yield sample


# --- the loader dataset ----------------------------------------------------------------------------


@dataclass
class LoaderJob:
    """What one shard's loader needs (the workers get their part of it, see worker_part)."""

    tar: str
    index: list[IndexEntry]
    wanted: frozenset[str]
    captions: list[str | None]  # the ledger's captions, in ledger order
    preprocess: Any
    tokenizer: Any
    image_size: int
    decoder: str  # "cpu" | "device"
    chunk_items: int  # items per chunk (the CPU path uses the batch size: the old batching exactly)
    workers: int


def worker_part(job: LoaderJob, wid: int, n: int) -> dict[str, Any]:
    """What worker `wid` of `n` reads: a contiguous run of the tar's samples and of the ledger's rows."""
    r = split_ranges(len(job.index), n)[wid]
    rows = split_ranges(len(job.captions), n)[wid]
    entries = job.index[r.start:r.stop]
    return {"tar": job.tar, "entries": entries, "wanted": frozenset(e[0] for e in entries) & job.wanted,
            "row_start": rows.start, "captions": job.captions[rows.start:rows.stop], "decoder": job.decoder,
            "chunk_items": job.chunk_items}


class ShardChunks(tud.IterableDataset):
    """Worker w of n reads samples split_ranges(len(index), n)[w] and ledger rows likewise.

    In-process (job_dir None) it reads `job` itself. Persistent workers serve one shard after another:
    before each pass the task process writes each worker's part to job_dir/{w}.pkl, so the workers are
    forked once per process, not once per shard.
    """

    def __init__(self, job: LoaderJob, job_dir: str | None = None):
        self.job, self.job_dir = job, job_dir

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pickle

        info = tud.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        reads: list[tuple[int, int]] = []
        try:
            if self.job_dir is None:
                part = worker_part(self.job, wid, n)
            else:
                with open(os.path.join(self.job_dir, f"{wid}.pkl"), "rb") as fh:
                    part = pickle.load(fh)  # written by this task's own process, never by a user
            static = self.job
            items: list[dict[str, Any]] = []
            for s in read_run(part["tar"], part["entries"], reads):
                if s["key"] not in part["wanted"]:
                    continue
                items.append(prepare(s, part["decoder"], static.preprocess, static.image_size))
                if len(items) >= part["chunk_items"]:
                    yield pack(items, static.tokenizer)
                    items = []
            if items:
                yield pack(items, static.tokenizer)
            rows = range(part["row_start"], part["row_start"] + len(part["captions"]))
            yield {"worker": wid, "reads": reads, "caption_rows": caption_rows(part["captions"], rows)}
        except ShardError as e:
            # handed to the task process as data: DataLoader would re-wrap the exception's message
            yield {"worker": wid, "reads": reads, "shard_error": str(e)}


def caption_rows(caps: list[str | None], rows: range) -> list[tuple[int, Any, Any]]:
    """(ledger row, Language, CaptionSignals) for a slice of the ledger (language ID runs batched)."""
    langs = langid.detect_many(caps) if caps else []
    return [(i, lang, caption_signals(c)) for i, lang, c in zip(rows, langs, caps, strict=True)]


def prepare(s: dict[str, Any], decoder: str, preprocess: Any, image_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"key": s["key"], "nbytes": len(s["image"] or b""), "width": None, "height": None,
                           "error": None, "kind": None, "image": None, "caption": s["caption"] or ""}
    data = s["image"]
    if data is None:
        out["error"] = "missing_image"
        return out
    if decoder == "device":
        size = device_jpeg_size(data)
        if size is not None:
            out.update(kind="jpeg", image=data, width=size[0], height=size[1])
            return out
    try:
        out["image"], out["width"], out["height"] = decode_image(data, preprocess, image_size)
        out["kind"] = "dense"
    except ImageSkipped as e:
        out["error"] = e.code
    return out


def pack(items: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """One chunk: per-sample metadata plus one tensor per kind (dense images, JPEG bytes, tokens)."""
    import numpy as np

    ok = [it for it in items if it["kind"] is not None]
    dense = [it["image"] for it in ok if it["kind"] == "dense"]
    jpegs = [it["image"] for it in ok if it["kind"] == "jpeg"]
    pixels = [it["width"] * it["height"] for it in ok if it["kind"] == "jpeg"]
    offsets, pos = [], 0
    for b in jpegs:
        offsets.append((pos, pos + len(b)))
        pos += len(b)
    blob = torch.from_numpy(np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy()) if jpegs else None
    return {
        "meta": [{k: it[k] for k in ("key", "nbytes", "width", "height", "error")} for it in items],
        "keys": [it["key"] for it in ok],
        "kinds": "".join("d" if it["kind"] == "dense" else "j" for it in ok),
        "tokens": tokenizer([it["caption"] for it in ok]) if ok else None,
        "dense": torch.stack(dense) if dense else None,
        "jpeg_blob": blob,
        "jpeg_offsets": offsets,
        "jpeg_pixels": pixels,
    }


def merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunks -> one batch (same layout)."""
    if len(chunks) == 1:
        return chunks[0]
    blobs = [c["jpeg_blob"] for c in chunks if c["jpeg_blob"] is not None]
    offsets, base = [], 0
    for c in chunks:
        offsets += [(a + base, b + base) for a, b in c["jpeg_offsets"]]
        base += len(c["jpeg_blob"]) if c["jpeg_blob"] is not None else 0
    dense = [c["dense"] for c in chunks if c["dense"] is not None]
    tokens = [c["tokens"] for c in chunks if c["tokens"] is not None]
    return {
        "meta": [m for c in chunks for m in c["meta"]],
        "keys": [k for c in chunks for k in c["keys"]],
        "kinds": "".join(c["kinds"] for c in chunks),
        "tokens": torch.cat(tokens) if tokens else None,
        "dense": torch.cat(dense) if dense else None,
        "jpeg_blob": torch.cat(blobs) if blobs else None,
        "jpeg_offsets": offsets,
        "jpeg_pixels": [p for c in chunks for p in c["jpeg_pixels"]],
    }


@dataclass
class LoaderReport:
    """What the workers reported besides batches: byte runs read per worker and the caption signals."""

    reads: dict[int, list[tuple[int, int]]]
    caption_rows: list[tuple[int, Any, Any]]


_POOL: dict[str, Any] = {}  # this process's persistent loader: {"key", "loader", "dir"}
atexit.register(lambda: close_loader_pool())


def open_loader(job: LoaderJob, pin_memory: bool) -> Iterator[dict[str, Any]]:
    """Chunks of this shard from the process's loader workers, started in the calling (main) thread
    before any other thread exists. The workers persist across shards (forked once per process, which
    matters at GPU speed: forking 8 workers from a process holding a CUDA context costs ~0.1 s a shard);
    a job with other static parts (model transform, worker count) replaces them."""
    import pickle
    import tempfile

    if job.workers == 0:
        return iter(tud.DataLoader(ShardChunks(job), batch_size=None, num_workers=0, collate_fn=_identity))
    key = (job.preprocess, job.tokenizer, job.image_size, job.workers, pin_memory)
    old = _POOL.get("key")
    if old is None or old[0] is not key[0] or old[1] is not key[1] or old[2:] != key[2:]:
        close_loader_pool()
        job_dir = tempfile.mkdtemp(prefix="curate-loader-")
        static = LoaderJob("", [], frozenset(), [], job.preprocess, job.tokenizer, job.image_size, job.decoder,
                           job.chunk_items, job.workers)
        loader = tud.DataLoader(
            ShardChunks(static, job_dir), batch_size=None, num_workers=job.workers, collate_fn=_identity,
            pin_memory=pin_memory, prefetch_factor=4, persistent_workers=True, multiprocessing_context="fork",
        )
        _POOL.update(key=key, loader=loader, dir=job_dir)
    for w in range(job.workers):
        path = os.path.join(_POOL["dir"], f"{w}.pkl")
        with open(path + ".tmp", "wb") as fh:
            pickle.dump(worker_part(job, w, job.workers), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".tmp", path)  # complete before the workers are told to start this pass
    try:
        return iter(_POOL["loader"])
    except Exception:
        close_loader_pool()
        raise


def close_loader_pool() -> None:
    """Stop the persistent loader workers (a new model or worker count, a failed shard, exit)."""
    import shutil

    loader = _POOL.pop("loader", None)
    it = getattr(loader, "_iterator", None) if loader is not None else None
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    if _POOL.get("dir"):
        shutil.rmtree(_POOL["dir"], ignore_errors=True)
    _POOL.clear()


def merged_batches(chunks: Iterator[dict[str, Any]], batch_size: int, report: LoaderReport) -> Iterator[dict]:
    """Merge chunks into batches of >= batch_size items (the last may be smaller); fills `report`."""
    pending: list[dict[str, Any]] = []
    count = 0
    for item in chunks:
        if "worker" in item:
            report.reads.setdefault(item["worker"], []).extend(item["reads"])
            report.caption_rows += item.get("caption_rows", [])
            if item.get("shard_error"):
                raise ShardError(item["shard_error"])
            continue
        pending.append(item)
        count += len(item["meta"])
        if count >= batch_size:
            yield merge(pending)
            pending, count = [], 0
    if pending:
        yield merge(pending)


def _identity(x: Any) -> Any:
    return x


# --- on the device: JPEG decoding, resize, normalise ------------------------------------------------


@dataclass(frozen=True)
class DevicePreprocess:
    """open_clip's inference transform as tensor ops (the subset the device path supports)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"
    squash: bool  # resize_mode "squash" (else "shortest" + centre crop)

    @classmethod
    def from_model(cls, model: Any) -> DevicePreprocess | None:
        """None when the model's transform is one the device path does not reproduce."""
        pp = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
        size = pp.get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                return None
            size = size[0]
        if pp.get("mode", "RGB") != "RGB" or pp.get("interpolation", "bicubic") not in ("bicubic", "bilinear"):
            return None
        if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
            return None
        return cls(int(size), tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),  # type: ignore[arg-type]
                   tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),  # type: ignore[arg-type]
                   pp.get("interpolation", "bicubic"), pp.get("resize_mode") == "squash")

    def __call__(self, images: list[Any]) -> Any:
        """uint8 CHW tensors of any sizes (on one device) -> normalised float32 [N, 3, size, size]."""
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        dev = images[0].device
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32, device=dev)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        for idx in groups.values():  # one resize per distinct size: shards are mostly one size
            x = torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]][None]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            size = [self.size, self.size] if self.squash else [self.size]
            x = TF.resize(x, size, interpolation=mode, antialias=True)
            if not self.squash:
                x = TF.center_crop(x, [self.size, self.size])
            out[torch.as_tensor(idx, device=dev)] = x.float()
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1) * 255.0
        return out.sub_(mean).div_(std)


def decode_jpegs(datas: list[Any], pixels: list[int], device: str) -> list[Any | None]:
    """torchvision decode_jpeg in pixel-budgeted batches; an image the batch call fails on is retried
    alone, and None marks one the device cannot decode (the caller falls back to the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Any | None] = []
    i = 0
    while i < len(datas):
        j, budget = i, 0
        while j < len(datas) and (j == i or budget + pixels[j] <= DECODE_PIXEL_BUDGET):
            budget += pixels[j]
            j += 1
        part = datas[i:j]
        try:
            out += list(decode_jpeg(part, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - one bad image fails the whole call (no partial results)
            for d in part:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except Exception:  # noqa: BLE001
                    out.append(None)
        i = j
    return out


@dataclass
class StagedBatch:
    """A batch ready for the encoders: tensors on the device, plus what the CPU must know."""

    meta: list[dict[str, Any]]
    keys: list[str]
    images: Any
    tokens: Any
    failed: dict[str, str]  # key -> skip_reason for images that failed to decode here
    on_device: int = 0  # images decoded by the device decoder (nvjpeg on CUDA)
    event: Any = None


def stage_batch(batch: dict[str, Any], device: str, pre: DevicePreprocess | None, fallback: Callable) -> StagedBatch:
    """Move one merged batch to `device`: dense images copied, JPEGs decoded there, order kept."""
    keys, kinds = batch["keys"], batch["kinds"]
    failed: dict[str, str] = {}
    if not keys:
        return StagedBatch(batch["meta"], [], None, None, failed)
    nb = device.startswith("cuda")
    parts: list[Any] = [None] * len(keys)
    if batch["dense"] is not None:
        dense = batch["dense"].to(device, non_blocking=nb)
        for n, i in enumerate(i for i, k in enumerate(kinds) if k == "d"):
            parts[i] = dense[n]
    jpos = [i for i, k in enumerate(kinds) if k == "j"]
    n_fallback = 0
    if jpos:
        assert pre is not None, "a JPEG reached the device path without a device transform"
        blob = batch["jpeg_blob"]
        datas = [blob[a:b] for a, b in batch["jpeg_offsets"]]
        decoded = decode_jpegs(datas, batch["jpeg_pixels"], device)
        good = [(i, im) for i, im in zip(jpos, decoded, strict=True) if im is not None]
        if good:
            ready = pre([im for _, im in good])
            for n, (i, _) in enumerate(good):
                parts[i] = ready[n]
        for i, d, im in zip(jpos, datas, decoded, strict=True):
            if im is None:  # nvjpeg refused it: the CPU path decides (same rules, same codes)
                n_fallback += 1
                try:
                    parts[i] = fallback(bytes(d.numpy().tobytes())).to(device)
                except ImageSkipped as e:
                    failed[keys[i]] = e.code
    keep = [i for i in range(len(keys)) if parts[i] is not None]
    tokens = batch["tokens"]
    if len(keep) != len(keys):
        tokens = tokens[torch.as_tensor(keep)]
    if not keep:
        return StagedBatch(batch["meta"], [], None, None, failed)
    if "j" not in kinds:  # the CPU path: the loader's stacked batch as it is (no extra copy)
        images = dense
    elif "d" not in kinds and n_fallback == 0:
        images = ready
    else:
        images = torch.stack([parts[i] for i in keep])
    return StagedBatch(batch["meta"], [keys[i] for i in keep], images, tokens.to(device, non_blocking=nb), failed,
                       on_device=len(jpos) - n_fallback)


def timed(items: Iterable[Any], into: dict[str, float], key: str) -> Iterator[Any]:
    """Yield from `items`, adding the seconds spent waiting for each item to into[key]."""
    import time

    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            into[key] += time.perf_counter() - t0
            return
        into[key] += time.perf_counter() - t0
        yield x


def background(items: Iterable[Any], depth: int = 2, device: str = "cpu") -> Iterator[Any]:
    """Iterate `items` in a thread (on its own CUDA stream for a CUDA device), `depth` ahead.

    This is the overlap of reading/decoding with the forward pass: while the encoders run batch k on the
    default stream, the thread decodes batch k+1 on its stream. Each item may be a StagedBatch; it gets
    an event that the consumer's stream waits on. Errors in the thread re-raise in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()
    cuda = device.startswith("cuda")

    def run() -> None:
        try:
            stream = None
            if cuda:
                torch.cuda.set_device(device)  # the current device is per host thread
                stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream) if cuda else _null():
                for it in items:
                    if cuda and isinstance(it, StagedBatch):
                        it.event = torch.cuda.Event()
                        it.event.record(stream)
                    while not stop.is_set():
                        try:
                            q.put(it, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(_Raised(e))

    t = threading.Thread(target=run, name="curate-score-stage", daemon=True)
    t.start()
    try:
        while True:
            it = q.get()
            if it is done:
                break
            if isinstance(it, _Raised):
                raise it.error
            if cuda and isinstance(it, StagedBatch) and it.event is not None:
                cur = torch.cuda.current_stream(device)
                cur.wait_event(it.event)
                for tensor in (it.images, it.tokens):
                    if tensor is not None:
                        tensor.record_stream(cur)  # freed on the thread's stream only after this use
            yield it
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        t.join()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def device_decoder_status(device: str) -> tuple[bool, str]:
    """(usable, why): can torchvision decode a JPEG on `device`? Tried on a tiny image, once per device."""
    if device in _probe:
        return _probe[device]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    try:
        from torchvision.io import decode_jpeg

        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], device=device)[0]
        ok = tuple(out.shape) == (3, 16, 16) and abs(int(out[0, 8, 8]) - 200) < 16
        res = (ok, "torchvision.io.decode_jpeg " + ("(nvjpeg)" if device.startswith("cuda") else "(libjpeg)")
               + (" works" if ok else " gave a wrong image"))
    except Exception as e:  # noqa: BLE001 - any failure means "use the CPU path"
        res = (False, f"torchvision.io.decode_jpeg on {device} failed: {type(e).__name__}: {str(e)[:160]}")
    _probe[device] = res
    return res


_probe: dict[str, tuple[bool, str]] = {}
