"""Stage "score": CLIP image-text similarity, image/text embeddings, caption language and signals per shard.

One task per downloaded shard. The tar is indexed once (headers only) and loader workers each read a
disjoint run of its samples; images are decoded either by Pillow in the workers (the CPU path) or, on a
GPU, batched by nvjpeg on the device (`curate.stages.score_loader`); both encoders run batched on
`--device` under autocast, overlapped with the decoding of the next batch.
Outputs: signals/NAME/{shard}.parquet (one row per ledger row; NAME is `--name`, default "score") and
{shard}.img_emb.npy (float16, L2-normalised, row `emb_row`), plus {shard}.txt_emb.npy with
`save_text_embeddings`. Each NAME is its own stage key (markers, stats, manifest entry, fingerprint), so
several scorers live side by side in one dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from curate import langid
from curate.devices import cuda_count, current_device, require_cuda, torch_settings, usable_cpus
from curate.errors import InputError, ShardError
from curate.io import manifest
from curate.io.atomic import atomic_path
from curate.io.layout import DatasetDir
from curate.models import DEFAULT_MODEL, DEFAULT_PRETRAINED, check_loadable, load_model, resolve_model
from curate.options import option
from curate.stages.base import Resources, Stage, sum_stats

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DECODERS = ("auto", "cpu", "device")
LEDGER_COLUMNS = ("key", "status", "caption", "width", "height", "orig_width", "orig_height", "bytes")
DEFAULT_NAME = "score"
# a scorer's name is a folder under signals/ and a column prefix in queries: a plain identifier
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
RESERVED_NAMES = frozenset({
    "download", "dedup", "export", "train_probe", "report", "inspect", "run", "demo", "doctor",
    "ledger", "shards", "signals", "stats", "manifest", "dropped", "key", "keys", "meta",
})


@dataclass(frozen=True)
class ScoreConfig:
    model: str = option(DEFAULT_MODEL, help="open_clip architecture name (e.g. ViT-B-32, curate-tiny) or a model "
                                            "config .json path.")
    pretrained: str = option(DEFAULT_PRETRAINED,
                             help="open_clip pretrained tag (downloaded by open_clip), a local .safetensors/.pt "
                                  "checkpoint (offline), or 'none' for seeded random init.")
    checksum: str | None = option(None, help="SHA-256 the checkpoint file must have.")
    # the stage key: signals/NAME/, _done/NAME/, stats/NAME/, manifest["stages"][NAME]; each name has its
    # own fingerprint there, so it is left out of this one (and "score" fingerprints stay as they were)
    name: str = option(DEFAULT_NAME, runtime=True,
                       help="Scorer name: outputs go to signals/NAME/ with their own manifest entry and fingerprint, "
                            "so several models can score one dataset (lowercase identifier; not a stage name).")
    device: str = option("auto", runtime=True,
                         help="auto, cpu, cuda or cuda:N. cuda with the local engine uses every visible GPU (one "
                              "worker process each, unless --workers is given); on Spark each task uses the GPU "
                              "Spark assigned it.")
    decoder: str = option("auto", runtime=True, choices=DECODERS,
                          help="JPEG decoding: cpu = Pillow in the loader workers; device = torchvision/nvjpeg on "
                               "the GPU, batched (other formats still decode on the CPU); auto = device on CUDA "
                               "when nvjpeg works.")
    precision: str = option("fp32", choices=PRECISIONS,
                            help="Autocast dtype for the encoders (fp16/bf16 are meant for GPUs).")
    batch_size: int = option(0, runtime=True,
                             help="Images per forward pass (0 = by device: 256 on the CPU, up to 1024 by GPU memory).")
    loader_workers: int = option(-1, runtime=True,
                                 help="DataLoader processes per task, each reading a disjoint part of the tar (0 = in "
                                      "the task's process; -1 = 1 on the CPU, the cores per GPU minus 2 (max 8) on a "
                                      "GPU).")
    threads: int = option(0, runtime=True, help="torch intra-op threads per task process (0 = on CPU, the cores left "
                                                "after --loader-workers).")
    save_text_embeddings: bool = option(False, help="Also write signals/score/{shard}.txt_emb.npy.")


def check_name(name: str) -> None:
    """A scorer name: lowercase identifier, not a reserved folder or stage name (exit 2 otherwise)."""
    if not NAME_RE.match(name or ""):
        raise InputError(f"--name: '{name}' is not a scorer name (lowercase letter first, then lowercase "
                         f"letters, digits or '_', at most 40 characters)")
    if name in RESERVED_NAMES:
        raise InputError(f"--name: '{name}' is reserved (it names a stage or a dataset folder)")


def check_config(cfg: ScoreConfig) -> None:
    """Flag-level checks, so a bad value stops the run before any shard (exit 2)."""
    check_name(cfg.name)
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision: '{cfg.precision}' (choose {', '.join(PRECISIONS)})")
    if cfg.device not in DEVICES and not re.match(r"^cuda:\d+$", cfg.device):
        raise InputError(f"--device: '{cfg.device}' (choose {', '.join(DEVICES)} or cuda:N)")
    if cfg.decoder not in DECODERS:
        raise InputError(f"--decoder: '{cfg.decoder}' (choose {', '.join(DECODERS)})")
    if cfg.batch_size < 0:
        raise InputError("--batch-size: must be 0 (auto) or more")
    if cfg.loader_workers < -1:
        raise InputError("--loader-workers: must be -1 (auto), 0 or more")
    if cfg.threads < 0:
        raise InputError("--threads: must be 0 or more")
    require_cuda(cfg.device)


def resolve_device(requested: str) -> str:
    """auto -> cuda if visible; plain "cuda" -> this process's GPU (see curate.devices.pick_device)."""
    return current_device(requested)


def decode_image(data: bytes, preprocess: Any, image_size: int) -> tuple[Any, int, int]:
    """The CPU decode path: curate.imaging's safe decoder, then the model's transform (see score_loader)."""
    from curate.stages.score_loader import decode_image as decode

    return decode(data, preprocess, image_size)


def auto_batch_size(requested: int, device: str) -> int:
    """--batch-size 0: 256 on the CPU (the batching the CPU figures were made with); on a GPU by its
    memory (ViT-B-32 in fp16 needs well under 10 GB at 1024; larger batches gain little)."""
    if requested > 0:
        return requested
    if not device.startswith("cuda"):
        return batch_size_for(None)
    import torch

    return batch_size_for(torch.cuda.get_device_properties(device).total_memory / 2**30)


def batch_size_for(gpu_mem_gib: float | None) -> int:
    """The auto batch size for a GPU with this much memory (None: the CPU)."""
    if gpu_mem_gib is None:
        return 256
    return 1024 if gpu_mem_gib >= 40 else 512 if gpu_mem_gib >= 16 else 256


def auto_loader_workers(requested: int, device: str) -> int:
    """--loader-workers -1: 1 on the CPU (torch keeps the cores); on a GPU the cores per GPU minus two
    (the task process and the pin-memory thread), at most 8. The same count for every shard, so the
    persistent workers serve them all (a worker with no samples just reports its caption rows)."""
    if requested >= 0:
        return requested
    if not device.startswith("cuda"):
        return 1
    return loader_workers_for(usable_cpus(), cuda_count())


def loader_workers_for(cpus: int, gpus: int) -> int:
    """Auto loader workers per GPU task: its share of the cores minus two, at least 1, at most 8."""
    return max(1, min(8, cpus // max(1, gpus) - 2))


def choose_decoder(requested: str, device: str, model: Any) -> tuple[str, str]:
    """("cpu" | "device", why). auto takes the device path on CUDA when nvjpeg works and the model's
    transform is one the device path reproduces; on the CPU, auto keeps Pillow (the reference path)."""
    from curate.stages.score_loader import DevicePreprocess, device_decoder_status

    if requested == "cpu":
        return "cpu", "--decoder cpu"
    if requested == "auto" and not device.startswith("cuda"):
        return "cpu", "Pillow in the loader workers (device is the CPU)"
    if DevicePreprocess.from_model(model) is None:
        why = "the model's preprocessing (resize mode/size/interpolation) has no device version"
        if requested == "device":
            raise InputError(f"--decoder device: {why}")
        return "cpu", why
    ok, why = device_decoder_status(device)
    if not ok:
        if requested == "device":
            raise InputError(f"--decoder device: {why}")
        return "cpu", why
    return "device", why


# --- model forward ---------------------------------------------------------------------------------


def auto_threads(device: str) -> int:
    """On the CPU, torch gets every core: measured on 2 cores with ViT-B-32, 1 torch thread beside a
    decoding worker ran the stage at 0.49x the forward-only rate, 2 threads at 0.94x (the decoding
    worker mostly waits). A model so small that decoding dominates loses little (0.40x either way).
    0 = keep torch's setting."""
    if not device.startswith("cpu"):
        return 0
    return usable_cpus()


def autocast(device: str, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def encode(lm: Any, images: Any, tokens: Any, precision: str, to_cpu: bool = True) -> tuple[Any, Any]:
    """L2-normalised float32 (image, text) embeddings of one batch (left on the device with to_cpu=False,
    so a GPU never waits for a copy between batches)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode(), autocast(lm.device, precision):
        img = lm.model.encode_image(images.to(lm.device, non_blocking=True))
        txt = lm.model.encode_text(tokens.to(lm.device, non_blocking=True))
    # normalise in fp32 whatever the autocast dtype, so stored embeddings have unit norm
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    return (img.cpu(), txt.cpu()) if to_cpu else (img, txt)


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


@dataclass
class Encoded:
    """What the loader and the encoders produced for one shard."""

    found: dict[str, dict[str, Any]]  # key -> loader metadata (width, height, nbytes, error)
    keys: list[str]  # row order of img/txt
    img: Any  # float32 [n, d] on the CPU
    txt: Any
    caption_rows: list[tuple[int, Any, Any]]  # (ledger row, Language, CaptionSignals)
    stats: dict[str, Any]


def encode_shard(cfg: ScoreConfig, lm: Any, device: str, tar: str, ledger: list[dict[str, Any]]) -> Encoded:
    """Read, decode and encode one shard's successful samples; caption signals for every ledger row.

    Long because the loader, the staging thread and the encode loop share one timing counter and one
    shutdown order on failure (staging thread, then loader workers); split apart they would pass both around.
    """
    import torch

    from curate.stages import score_loader as sl

    wanted = frozenset(r["key"] for r in ledger if r.get("status") == "success")
    if wanted and not os.path.exists(tar):
        raise ShardError(f"{tar}: shard tar missing ({len(wanted)} successful rows in its ledger)")
    langid.load_model()  # before the workers fork, so they inherit the loaded model (and word lists)
    if hasattr(langid, "load_lexicon"):
        langid.load_lexicon()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)  # pinned memory, nvjpeg and streams of this process on its own GPU
    decoder, why = choose_decoder(cfg.decoder, device, lm.model)
    tm: Counter[str] = Counter()  # where the task's time goes (summed over shards in the manifest)
    t_start = time.perf_counter()
    index = sl.index_tar(tar) if wanted else []
    tm["t_index_s"] += time.perf_counter() - t_start
    batch_size = auto_batch_size(cfg.batch_size, device)
    workers = auto_loader_workers(cfg.loader_workers, device) if index else 0
    # the CPU path cuts chunks of a whole batch, which keeps its batches (and numbers) as they were
    chunk = min(sl.CHUNK_ITEMS, batch_size) if decoder == "device" else batch_size
    job = sl.LoaderJob(tar, index, wanted, [r.get("caption") for r in ledger], lm.preprocess, lm.tokenizer,
                       lm.image_size, decoder, chunk, workers)
    report = sl.LoaderReport({}, [])
    pre = sl.DevicePreprocess.from_model(lm.model) if decoder == "device" else None

    def fallback(data: bytes) -> Any:
        return sl.decode_image(data, lm.preprocess, lm.image_size)[0]

    found: dict[str, dict[str, Any]] = {}
    keys: list[str] = []
    imgs, txts = [], []
    on_device = 0
    # on a GPU determinism is off: cuBLAS would need a fixed workspace and scores need no bit-exactness
    with torch_settings(cfg.threads or auto_threads(device), deterministic=not cuda):
        t0 = time.perf_counter()
        chunks = sl.open_loader(job, pin_memory=cuda)
        tm["t_loader_start_s"] += time.perf_counter() - t0

        def staged_batches() -> Iterator[Any]:
            for b in sl.timed(sl.merged_batches(chunks, batch_size, report), tm, "t_loader_wait_s"):
                t0 = time.perf_counter()
                sb = sl.stage_batch(b, device, pre, fallback)
                tm["t_stage_s"] += time.perf_counter() - t0
                yield sb

        staged: Any = staged_batches()
        if cuda:
            staged = sl.background(staged, depth=2, device=device)
        consumer = sl.timed(staged, tm, "t_main_wait_s")
        try:
            for sb in consumer:
                for m in sb.meta:
                    found[m["key"]] = m
                for key, code in sb.failed.items():
                    found[key]["error"] = code
                on_device += sb.on_device
                if not sb.keys:
                    continue
                t0 = time.perf_counter()
                img, txt = encode(lm, sb.images, sb.tokens, cfg.precision, to_cpu=False)
                tm["t_encode_launch_s"] += time.perf_counter() - t0
                imgs.append(img)
                txts.append(txt)
                keys += sb.keys
        except BaseException:
            # stop the staging thread first, then the persistent loader workers (they may be mid-shard)
            consumer.close()
            staged.close()
            sl.close_loader_pool()
            raise
    d = lm.embed_dim
    t0 = time.perf_counter()
    img_all = torch.cat(imgs).cpu() if imgs else torch.zeros((0, d))
    txt_all = torch.cat(txts).cpu() if txts else torch.zeros((0, d))
    tm["t_final_sync_s"] += time.perf_counter() - t0  # on a GPU: waits for the last forward passes
    tm["t_encode_shard_s"] += time.perf_counter() - t_start
    if len(report.caption_rows) != len(ledger):
        raise ShardError(f"{tar}: caption signals for {len(report.caption_rows)} of {len(ledger)} ledger rows")
    stats = {"device": device, "decoder": decoder, "decoder_reason": why, "batch_size": batch_size,
             "loader_workers": workers,
             "decoded_on_device": on_device if decoder == "device" else 0,
             "tar_bytes_read": sum(b - a for runs in report.reads.values() for a, b in runs),
             **{k: round(v, 4) for k, v in tm.items()}}
    return Encoded(found, keys, img_all, txt_all, sorted(report.caption_rows, key=lambda t: t[0]), stats)


def score_rows(cfg: ScoreConfig, ds: DatasetDir, shard: str) -> tuple[list[dict[str, Any]], Any, Any, dict]:
    """Score one shard: (signal rows in ledger order, image embeddings, text embeddings, stats)."""
    import numpy as np
    import torch

    ledger = read_ledger(ds, shard)
    device = resolve_device(cfg.device)
    lm = load_model(resolve_model(cfg.model, cfg.pretrained, cfg.checksum), device)
    enc = encode_shard(cfg, lm, device, str(ds.shard_tar(shard)), ledger)
    found, pos = enc.found, {k: i for i, k in enumerate(enc.keys)}
    sims = (enc.img * enc.txt).sum(-1)

    rows: list[dict[str, Any]] = []
    order: list[int] = []  # rows of enc.img/txt in ledger order of the scored rows
    skipped: Counter[str] = Counter()
    for r, (_i, lang, cap) in zip(ledger, enc.caption_rows, strict=True):
        key, status = r["key"], r.get("status")
        seen = found.get(key, {})
        if status != "success":
            reason = status or "unknown"
        elif key not in found:
            reason = "missing_from_shard"  # the ledger says success but the tar lacks the sample
        else:
            reason = seen["error"]
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
            row["clip_score"], row["emb_row"] = float(sims[pos[key]]), len(order)
            order.append(pos[key])
        else:
            skipped[reason] += 1
        rows.append(row)

    idx = torch.as_tensor(order, dtype=torch.long)
    img_rows = enc.img[idx].numpy().astype(np.float16)
    txt_rows = enc.txt[idx].numpy().astype(np.float16)
    stats = {"rows": len(rows), "scored": len(order), "skipped": dict(skipped),
             "checkpoint_sha256": lm.checkpoint_sha256, **enc.stats}
    return rows, img_rows, txt_rows, stats


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

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


class ScoreStage(Stage):
    name = "score"
    config_cls = ScoreConfig
    array_slices = True  # one task per shard, independent of each other

    def validate(self, cfg: ScoreConfig, ds: DatasetDir) -> None:
        """The config, then the model: unknown model, missing file, checksum mismatch or a model that does not
        load on the device exit 2 before any shard."""
        check_config(cfg)
        check_loadable(resolve_model(cfg.model, cfg.pretrained, cfg.checksum), resolve_device(cfg.device))

    def fingerprint_inputs(self, cfg: ScoreConfig, ds: DatasetDir) -> dict[str, Any]:
        inputs = model_inputs(cfg)
        if inputs.get("filter_quality", {}).get("weak"):
            from curate.train_probe.quality import warning_lines

            for line in warning_lines(inputs["filter_quality"], cfg.pretrained):
                log.warning("%s", line)
        return inputs

    def resources(self, cfg: ScoreConfig) -> Resources:
        """A GPU per task with --device cuda or auto: any one the engine gives it, so the local engine runs one
        worker per visible GPU. A pinned --device cuda:N is one GPU for every task: one worker unless told."""
        return Resources(gpus=1 if cfg.device in ("cuda", "auto") else 0)

    def output_key(self, cfg: ScoreConfig) -> str:
        """The stage key this config writes under (markers, stats, signals, manifest entry)."""
        return cfg.name

    def plan(self, cfg: ScoreConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        check_config(cfg)
        shards = ds.shards()
        if not shards:
            raise InputError(f"{ds.root}: no downloaded shards (no _done/download markers); "
                             f"run `curate download` first")
        return [{"shard": s} for s in shards]

    def reads(self, cfg: ScoreConfig, ds: DatasetDir, task: dict[str, Any]) -> list[tuple[str, str]]:
        """The shard's tar and ledger: the run of the stage that wrote them (lineage, see curate.io.lineage)."""
        return [(ds.source_stage_of(task["shard"]), task["shard"])]

    def run_shard(self, cfg: ScoreConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        import pyarrow as pa

        from curate.io.tables import write_table

        shard = task["shard"]
        t0 = time.perf_counter()
        rows, img_emb, txt_emb, stats = score_rows(cfg, ds, shard)
        t1 = time.perf_counter()
        # embeddings first, the table that points into them last; the marker comes after both
        write_npy(ds.signals(cfg.name, shard, ".img_emb.npy"), img_emb)
        if cfg.save_text_embeddings:
            write_npy(ds.signals(cfg.name, shard, ".txt_emb.npy"), txt_emb)
        write_table(ds.signals(cfg.name, shard), pa.Table.from_pylist(rows, schema=signal_schema()))
        stats["t_rows_s"] = round(t1 - t0 - stats.get("t_encode_shard_s", 0.0), 4)  # ledger, model, rows
        stats["t_write_s"] = round(time.perf_counter() - t1, 4)
        return stats

    def finalize(self, cfg: ScoreConfig, ds: DatasetDir) -> dict[str, Any]:
        """Every shard's stats added up, one row per input row: a failed row that `download --retry-failed`
        retried in a later shard is counted there, so its old row (superseded_by set, possibly after this
        shard was scored) is taken out of `rows` and `skipped` here and counted as `superseded`."""
        counts = sum_stats(ds, cfg.name)
        sup = superseded_by_status(ds, ds.done_shards(cfg.name))
        if sup:
            counts["rows"] = counts.get("rows", 0) - sum(sup.values())
            skipped = counts.setdefault("skipped", {})
            for status, n in sup.items():
                skipped[status] = skipped.get(status, 0) - n
                if skipped[status] <= 0:
                    skipped.pop(status)
            counts["superseded"] = sum(sup.values())
        return counts

    def inputs(self, cfg: ScoreConfig) -> dict[str, Any]:
        # "scorer" lets readers of the manifest find every score table (the default one is "score")
        return {**model_inputs(cfg), "scorer": cfg.name}


def superseded_by_status(ds: DatasetDir, shards: list[str]) -> dict[str, int]:
    """{ledger status: rows} of the rows of `shards`' ledgers that a download retry superseded (one DuckDB
    aggregate reading one column pair, never the rows)."""
    import duckdb
    import pyarrow.parquet as pq

    paths = [ds.ledger(s) for s in shards if ds.ledger(s).exists()]
    if not paths or "superseded_by" not in pq.read_schema(paths[0]).names:
        return {}
    files = "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"
    con = duckdb.connect()
    try:
        con.execute("SET memory_limit='256MB'")
        got = con.execute(f"SELECT status, count(*) FROM read_parquet({files}, union_by_name=true) "
                          f"WHERE superseded_by IS NOT NULL AND superseded_by <> '' GROUP BY 1").fetchall()
    finally:
        con.close()
    return {str(st): int(n) for st, n in got}


def model_inputs(cfg: ScoreConfig) -> dict[str, Any]:
    """What the manifest records about the models: resolved model spec, checkpoint and langid hashes."""
    from curate.train_probe.quality import read_quality

    spec = resolve_model(cfg.model, cfg.pretrained, cfg.checksum)
    out = {"model": spec.describe(), "langid": langid.detector_info()}
    quality = read_quality(spec.checkpoint) if spec.checkpoint else None  # a train-probe --save-model filter
    if quality is not None:
        out["filter_quality"] = quality
    return out


def scorers(ds: DatasetDir) -> list[str]:
    """Names of the scorers recorded in the dataset's manifest ("score" first when present)."""
    stages = manifest.load(ds).get("stages", {})
    names = [k for k, v in stages.items() if k == DEFAULT_NAME or (v.get("inputs") or {}).get("scorer") == k]
    return sorted(names, key=lambda n: (n != DEFAULT_NAME, n))


STAGE = ScoreStage()
