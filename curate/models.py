"""open_clip model loading for scoring: architecture name or config JSON, pretrained tag or local checkpoint.

A local checkpoint is read with safetensors or `torch.load(weights_only=True)` only, so a pickle that
would run code on load is refused; `--checksum` pins its SHA-256. A pretrained tag goes through
open_clip's own download path (which needs the network the first time, then its cache).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError, InputError
from curate.hashing import file_sha256

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"  # the model LAION-5B's CLIP filter used
RANDOM_INIT = "none"  # --pretrained none: seeded random init (benchmarks, tests); scores mean nothing
CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_lock = threading.Lock()
_models: dict[tuple, LoadedModel] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What `--model/--pretrained/--checksum` resolved to; JSON-able for the manifest."""

    model: str  # --model as given
    arch: str  # the name in open_clip's config registry
    config_path: str | None
    config_sha256: str | None
    pretrained: str  # --pretrained as given
    source: str  # "tag" | "file" | "none"
    checkpoint: str | None  # absolute path of a local checkpoint
    checkpoint_sha256: str | None
    checksum: str | None  # --checksum, verified against the checkpoint file

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any  # open_clip CLIP, eval mode, on `device`
    preprocess: Any  # PIL image -> tensor (open_clip's inference transform)
    tokenizer: Any
    device: str
    image_size: int
    embed_dim: int
    checkpoint_sha256: str | None


def _register_configs() -> None:
    import open_clip

    if CONFIG_DIR not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
        open_clip.add_model_config(CONFIG_DIR)


def _resolve_arch(model: str) -> tuple[str, str | None, str | None]:
    """(open_clip name, config path, config sha256) for an architecture name or a config JSON path."""
    import open_clip

    _register_configs()
    looks_like_path = model.endswith(".json") or os.sep in model
    if not looks_like_path:
        if open_clip.get_model_config(model) is None:
            known = ", ".join(sorted(open_clip.list_models())[:12])
            raise InputError(
                f"--model: unknown open_clip model '{model}' (a name such as {known}, ... "
                f"or the path of a model config .json)"
            )
        return model, None, None
    path = Path(model).expanduser()
    if not path.is_file():
        raise InputError(f"--model: config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--model: {path} is not a readable JSON model config ({e})") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise InputError(f"--model: {path} lacks open_clip config key(s): {', '.join(missing)}")
    name = path.stem
    existing = open_clip.get_model_config(name)
    if existing is not None and existing != cfg:
        raise InputError(
            f"--model: {path} would register open_clip model '{name}', which already exists with "
            f"another config; rename the file"
        )
    if existing is None:
        open_clip.add_model_config(path.resolve())
    return name, str(path.resolve()), file_sha256(path)


def resolve_model(model: str, pretrained: str, checksum: str | None = None) -> ModelSpec:
    """Check the model choice without building it (no download): exit-2 errors name the flag and file."""
    import open_clip

    arch, config_path, config_sha = _resolve_arch(model)
    if checksum is not None:
        checksum = checksum.strip().lower()
        if not _SHA256.match(checksum):
            raise InputError(f"--checksum: '{checksum}' is not a 64-hex-digit SHA-256")
    if pretrained.lower() in (RANDOM_INIT, ""):
        if checksum:
            raise InputError("--checksum: there is no checkpoint to check with --pretrained none")
        return ModelSpec(model, arch, config_path, config_sha, RANDOM_INIT, "none", None, None, None)
    path = Path(pretrained).expanduser()
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in pretrained or path.exists():
        if not path.is_file():
            raise InputError(f"--pretrained: checkpoint file not found: {path}")
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise InputError(
                f"--pretrained: {path}: unsupported checkpoint type '{path.suffix}' "
                f"(use {', '.join(CHECKPOINT_SUFFIXES)})"
            )
        sha = file_sha256(path)
        if checksum and sha != checksum:
            raise InputError(f"--checksum: {path} has SHA-256 {sha}, expected {checksum}")
        return ModelSpec(model, arch, config_path, config_sha, pretrained, "file", str(path.resolve()), sha,
                         checksum)
    if not open_clip.get_pretrained_cfg(arch, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise InputError(
            f"--pretrained: '{pretrained}' is neither a checkpoint file nor an open_clip tag of {arch} "
            f"(tags: {', '.join(tags) or 'none'}; or 'none' for random init)"
        )
    return ModelSpec(model, arch, config_path, config_sha, pretrained, "tag", None, None, checksum)


def _download(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Fetch a tag's weights through open_clip (its cache first); verify --checksum."""
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    try:
        path = open_clip.download_pretrained(pcfg)
    except Exception as e:  # noqa: BLE001 - network, hub and cache errors all mean "no weights"
        raise CurateError(
            f"--pretrained {spec.pretrained}: could not fetch the {spec.arch} weights through open_clip "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network, score "
            f"offline with a local checkpoint: --pretrained /path/to/open_clip_model.safetensors"
        ) from None
    if not path:
        raise CurateError(f"--pretrained {spec.pretrained}: open_clip has no download source for it")
    if spec.checksum and file_sha256(path) != spec.checksum:
        raise InputError(f"--checksum: {path} has SHA-256 {file_sha256(path)}, expected {spec.checksum}")
    return path, pcfg


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from a .safetensors file or a weights-only torch pickle; anything else is refused."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
            raise InputError(f"--pretrained: {path} is not a readable safetensors file ({e})") from None
    else:
        try:
            # weights_only: the unpickler accepts tensors and containers only, never callables
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ...
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch bolds part of its message
            first = text.splitlines()[0] if text else type(e).__name__
            raise InputError(
                f"--pretrained: refused {path}: not a plain weights checkpoint "
                f"(torch.load(weights_only=True) rejected it: {first})"
            ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise InputError(f"--pretrained: {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _apply_state_dict(model: Any, sd: dict[str, Any], path: str) -> None:
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(
            f"--pretrained: {path} does not fit model {model.__class__.__name__} "
            f"({str(e).splitlines()[0]}; {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else ''})"
        ) from None


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns "initialized randomly" because our weights are loaded after create_model."""
    f = _DropRandomInitWarning()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def build_model(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """Build the model and its transforms (not cached; see `load_model`)."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    _register_configs()
    if spec.config_path:
        _resolve_arch(spec.config_path)  # register it in this process too (spawned workers)
    pcfg: dict[str, Any] = {}
    ckpt = spec.checkpoint
    if spec.source == "tag":
        ckpt, pcfg = _download(spec)
    with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
        torch.manual_seed(0)  # random init (and any unloaded buffer) is the same in every process
        model = open_clip.create_model(spec.arch, pretrained=None, device="cpu",
                                       force_quick_gelu=bool(pcfg.get("quick_gelu", False)))
    sha = None
    if ckpt:
        sha = file_sha256(ckpt)
        if spec.checkpoint_sha256 and sha != spec.checkpoint_sha256:
            raise InputError(f"--pretrained: {ckpt} changed since it was checked (SHA-256 {sha})")
        _apply_state_dict(model, load_state_dict(ckpt), ckpt)
    pp = merge_preprocess_dict(dict(model.visual.preprocess_cfg), pcfg)
    open_clip.set_model_preprocess_cfg(model, pp)
    model = model.to(device).eval()
    size = pp["size"]
    image_size = int(size if isinstance(size, int) else max(size))
    embed_dim = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[-1])
    return LoadedModel(
        spec=spec,
        model=model,
        preprocess=image_transform_v2(PreprocessCfg(**pp), is_train=False),
        tokenizer=open_clip.get_tokenizer(spec.arch),
        device=device,
        image_size=image_size,
        embed_dim=embed_dim,
        checkpoint_sha256=sha,
    )


def load_model(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """The model for `spec` on `device`, built once per process and reused by every shard task."""
    key = (spec, device)
    with _lock:
        if key not in _models:
            _models[key] = build_model(spec, device)
        return _models[key]


def check_loadable(spec: ModelSpec, device: str = "cpu") -> None:
    """Build the model once before any shard, so a refused or ill-fitting checkpoint exits 2 up front
    (and a tag's weights are downloaded once, not by every task). On the CPU the model stays cached."""
    if device == "cpu":
        load_model(spec, device)
    else:
        build_model(spec, "cpu")


def clear_cache() -> None:
    with _lock:
        _models.clear()
