"""One training run: an open_clip model trained contrastively on in-memory samples for exactly N samples seen.

Same config + seed -> same model on CPU: the init, the data order and the augmentation each draw from
their own seeded generator and torch runs with deterministic algorithms. A subset smaller than another
is repeated for more epochs, which is the quality-versus-quantity trade-off the probe measures.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.devices import cuda_count, require_cuda, torch_settings
from curate.errors import InputError
from curate.io.atomic import atomic_path, write_json
from curate.models import resolve_model
from curate.options import option
from curate.train_probe.data import Samples, normalize, tokenize
from curate.train_probe.quality import METADATA_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    samples_seen: int = option(4096,  # ~45 s per run on 2 CPU cores at ~95 samples/s (bench/train_probe.py)
                               help="Training samples seen per run, equal for every subset (smaller subsets repeat "
                                    "more epochs).")
    batch_size: int = option(128, help="Contrastive batch size.")
    lr: float = option(1e-3, help="Peak AdamW learning rate.")
    weight_decay: float = option(0.1, help="AdamW weight decay.")
    warmup: float = option(0.1, help="Share of the steps with linear warmup (cosine decay after).")
    augment: bool = option(True, help="Random horizontal flips.")
    crop: float = option(0.0, help="Random square crops of (1 - CROP)..100% of the image area (0: off; --save-model "
                                   "uses 0.3 when 0).")
    jitter: float = option(0.0, help="Random brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER] "
                                     "per image (0: off).")
    caption_augment: bool = option(False, help="Each time a caption is drawn, train on a random non-empty subset of "
                                               "its comma-separated parts in random order (keyword captions of a "
                                               "small trusted set; off by default).")
    caption_inflect: float = option(0.0, help="With --caption-augment: the chance that a part's last word switches "
                                              "grammatical number (bird <-> birds), so a word seen in one form is "
                                              "learnt in both (0: off).")
    curve_points: int = option(3, help="Evaluations per run (for the quality-vs-samples-seen plot); the last is the "
                                       "result.")
    model: str = option("curate-tiny", help="open_clip architecture name or model config .json (random init).")
    image_size: int = option(64, help="Input resolution of the model (px).")
    device: str = option("auto", runtime=True, help="auto, cpu, cuda or cuda:N.")
    threads: int = option(0, runtime=True, help="torch intra-op threads (0 = torch's default, all cores).")


def check_config(cfg: TrainConfig) -> None:
    if cfg.samples_seen < 1:
        raise InputError(f"--samples-seen: must be at least 1 (got {cfg.samples_seen})")
    if cfg.batch_size < 2:
        raise InputError(f"--batch-size: a contrastive batch needs at least 2 samples (got {cfg.batch_size})")
    if not cfg.lr > 0:
        raise InputError(f"--lr: must be positive (got {cfg.lr})")
    if not 0 <= cfg.warmup < 1:
        raise InputError(f"--warmup: must be in [0, 1) (got {cfg.warmup})")
    if cfg.image_size < 8:
        raise InputError(f"--image-size: must be at least 8 (got {cfg.image_size})")
    if cfg.curve_points < 1:
        raise InputError(f"--curve-points: must be at least 1 (got {cfg.curve_points})")
    if not 0 <= cfg.crop < 1:
        raise InputError(f"--crop: must be in [0, 1) (got {cfg.crop})")
    if not 0 <= cfg.caption_inflect <= 1:
        raise InputError(f"--caption-inflect: must be in [0, 1] (got {cfg.caption_inflect})")
    if cfg.caption_inflect and not cfg.caption_augment:
        raise InputError("--caption-inflect: needs --caption-augment")
    if not 0 <= cfg.jitter < 1:
        raise InputError(f"--jitter: must be in [0, 1) (got {cfg.jitter})")
    require_cuda(cfg.device)


def resolve_device(requested: str) -> str:
    """auto -> cuda when torch sees a GPU (training uses one device: cuda:0 unless cuda:N was named)."""
    if requested == "auto":
        return "cuda" if cuda_count() else "cpu"
    return requested


def model_config(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(open_clip architecture name, its config dict with the image size actually trained)."""
    import copy

    import open_clip

    arch = resolve_model(cfg.model, "none").arch
    conf = copy.deepcopy(open_clip.get_model_config(arch))
    conf["vision_cfg"]["image_size"] = cfg.image_size
    return arch, conf


def create_model(cfg: TrainConfig, seed: int, device: str) -> tuple[Any, Any]:
    """(model with a seeded random init, its tokenizer)."""
    import open_clip
    import torch

    arch, conf = model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        force = cfg.image_size if cfg.image_size != open_clip.get_model_config(arch)["vision_cfg"]["image_size"] else None
        model = open_clip.create_model(arch, pretrained=None, device="cpu", output_dict=True,
                                       force_image_size=force)
    return model.to(device), open_clip.get_tokenizer(arch)


def batch_plan(samples_seen: int, batch_size: int) -> list[int]:
    """Batch sizes summing to exactly `samples_seen` (the last batch holds the remainder)."""
    full, rest = divmod(samples_seen, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def batch_indices(n: int, sizes: list[int], generator: Any) -> Iterator[Any]:
    """Row indices per batch: a fresh seeded permutation of the n rows each epoch, read in order.

    A batch that straddles two epochs would otherwise hold a sample twice (a false negative for the
    contrastive loss): the new epoch's rows already in the batch are moved to the back of its order.
    Needs n >= every batch size.
    """
    import torch

    perm = torch.randperm(n, generator=generator)
    pos = 0
    for size in sizes:
        parts = []
        while size:
            if pos == n:
                perm, pos = torch.randperm(n, generator=generator), 0
                if parts:
                    taken = torch.zeros(n, dtype=torch.bool)
                    taken[torch.cat(parts)] = True
                    perm = torch.cat([perm[~taken[perm]], perm[taken[perm]]])
            take = min(size, n - pos)
            parts.append(perm[pos:pos + take])
            pos += take
            size -= take
        yield torch.cat(parts)


def augment_batch(images: Any, cfg: TrainConfig, generator: Any) -> Any:
    """uint8 (B, 3, S, S) -> augmented uint8: random horizontal flips, and random square crops of
    (1 - cfg.crop)..100% of the area resized back to S (bilinear) when cfg.crop > 0."""
    import torch

    b, _, size, _ = images.shape
    if cfg.crop > 0:
        areas = 1 - cfg.crop * torch.rand(b, generator=generator)
        out = []
        for i in range(b):
            side = max(2, int(round(size * float(areas[i]) ** 0.5)))
            y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
            patch = images[i:i + 1, :, y:y + side, x:x + side].float()
            out.append(torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear",
                                                       align_corners=False))
        images = torch.cat(out).round().clamp(0, 255).to(torch.uint8)
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if cfg.jitter > 0:
        images = jitter_batch(images, cfg.jitter, generator)
    return images


def jitter_batch(images: Any, strength: float, generator: Any) -> Any:
    """uint8 (B, 3, S, S) -> uint8: brightness, contrast and saturation each scaled by a factor drawn from
    [1 - strength, 1 + strength] per image (torchvision's ColorJitter without hue, on the whole batch)."""
    import torch

    b = images.shape[0]
    f = 1 + strength * (2 * torch.rand(3, b, 1, 1, 1, generator=generator) - 1)
    x = images.float() * f[0]
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = grey.mean(dim=(2, 3), keepdim=True) + f[1] * (x - grey.mean(dim=(2, 3), keepdim=True))
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = grey + f[2] * (x - grey)
    return x.round().clamp(0, 255).to(torch.uint8)


def augment_caption(caption: str, rng: random.Random, inflect: float = 0.0) -> str:
    """A random non-empty subset of the caption's comma-separated parts, in random order ("Hen, chicken,
    farm" -> "farm, Hen"): a keyword caption is a set, and a few hundred pairs otherwise teach the text
    tower one fixed string per image. With `inflect`, each kept part's last word switches number with
    that chance ("farm" -> "farms"). A caption without commas keeps its one part (and may be inflected)."""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    if not parts:
        return caption
    kept = [p for p in parts if rng.random() < 0.5] or [rng.choice(parts)]
    rng.shuffle(kept)
    if inflect > 0:
        kept = [switch_number(p) if rng.random() < inflect else p for p in kept]
    return ", ".join(kept)


def switch_number(phrase: str) -> str:
    """The phrase with its last word's grammatical number switched by plain English rules (bird <-> birds,
    box <-> boxes, city <-> cities); words under 3 letters, non-alphabetic or ending in -ss are left alone.
    The rules are approximate (bus -> bu): it is an augmentation, a wrong form costs one noisy caption."""
    head, _, word = phrase.rpartition(" ")
    low = word.lower()
    if len(low) < 3 or not low.isalpha() or low.endswith("ss"):
        return phrase
    if low.endswith("ies") and len(low) > 4:
        new = word[:-3] + "y"
    elif low.endswith(("ches", "shes", "xes", "zes", "sses")):
        new = word[:-2]
    elif low.endswith("s"):
        new = word[:-1]
    elif low.endswith(("ch", "sh", "x", "z")):
        new = word + "es"
    elif low.endswith("y") and low[-2] not in "aeiou":
        new = word[:-1] + "ies"
    else:
        new = word + "s"
    return f"{head} {new}" if head else new


def lr_at(step: int, steps: int, base_lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Any, cfg: TrainConfig) -> Any:
    import torch

    # as open_clip's training: no weight decay on gains, biases and the temperature
    def no_decay(name: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
    ]
    # fused: one kernel over all tensors; ~4x faster than the per-tensor loop on CPU, where the 6.3M-entry
    # token embedding makes the optimizer step a large share of a small-batch step
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def curve_steps(steps: int, points: int) -> list[int]:
    """The step counts after which to evaluate: evenly spaced, always including the last step."""
    return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


def train_run(train: Samples, cfg: TrainConfig, seed: int, *,
              evaluate: Callable[[Any, Any], dict[str, float]] | None = None,
              device: str = "cpu", early_stop: Callable[[Any], float] | None = None,
              patience: int = 3) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model on `train` for cfg.samples_seen samples; returns (model, result record).

    `evaluate(model, tokenizer)` is called at cfg.curve_points evenly spaced points; the last call's
    metrics are the run's metrics. With `early_stop(model) -> score` (higher is better, e.g. retrieval
    on held-out pairs), it is called at the same points: training stops after `patience` points without
    a better score and the model returned is the best one seen (its weights are restored).

    Long because it is the training loop itself: one pass of steps with its evaluation points.
    """
    import torch
    from open_clip.loss import ClipLoss

    n = len(train)
    if n < cfg.batch_size:
        raise InputError(f"--batch-size: a subset has {n} samples, fewer than the batch size {cfg.batch_size}; "
                         f"lower --batch-size (a batch must not hold the same sample twice)")
    # deterministic (and an error, not a warning, on a nondeterministic kernel) on the CPU: runs repeat exactly
    with torch_settings(max(0, cfg.threads), deterministic=True if device == "cpu" else None, warn_only=False):
        model, tokenizer = create_model(cfg, seed, device)
        model.train()
        optimizer = make_optimizer(model, cfg)
        loss_fn = ClipLoss()
        mean, std = model.visual.image_mean, model.visual.image_std
        order = torch.Generator().manual_seed(seed)
        flips = torch.Generator().manual_seed(seed + 1_000_003)
        captions_rng = random.Random(seed + 2_000_003)
        sizes = batch_plan(cfg.samples_seen, cfg.batch_size)
        steps = len(sizes)
        warmup_steps = max(1, round(cfg.warmup * steps)) if cfg.warmup > 0 else 0
        evals = set(curve_steps(steps, cfg.curve_points)) if (evaluate or early_stop) else set()
        items_at: dict[int, Any] = {}
        stop = {"best": -math.inf, "best_step": 0, "state": None, "since": 0, "stopped_step": None, "scores": []}
        seen_per_row = torch.zeros(n, dtype=torch.long)
        losses: list[float] = []
        curve: list[dict[str, Any]] = []
        train_seconds = 0.0
        t0 = time.perf_counter()
        for step, idx in enumerate(batch_indices(n, sizes, order)):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, steps, cfg.lr, warmup_steps)
            images = train.images.index_select(0, idx)
            if cfg.augment:
                images = augment_batch(images, cfg, flips)
            images = normalize(images.to(device), mean, std)
            if cfg.caption_augment:
                tokens = tokenize(tokenizer, [augment_caption(train.captions[i], captions_rng, cfg.caption_inflect)
                                             for i in idx.tolist()])
            else:
                tokens = train.tokens.index_select(0, idx)
            tokens = tokens.to(device)
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as open_clip: temperature at most 100
            seen_per_row += torch.bincount(idx, minlength=n)
            losses.append(float(loss.detach()))
            if step + 1 in evals:
                train_seconds += time.perf_counter() - t0
                seen = int(seen_per_row.sum())
                metrics = evaluate(model, tokenizer) if evaluate else {}
                recent = losses[-max(1, steps // (2 * cfg.curve_points)):]
                # per-item outcomes are kept for the reported point only (they are as long as the eval set)
                items_at[step + 1] = metrics.pop("items", None)
                point = {"step": step + 1, "samples_seen": seen, "epochs": round(seen / n, 4),
                         "train_loss": sum(recent) / len(recent), **metrics}
                if early_stop is not None:
                    score = float(early_stop(model))
                    point["heldout_score"] = score
                    stop["scores"].append(score)
                    if score > stop["best"]:
                        stop.update(best=score, best_step=step + 1, since=0,
                                    state={k: v.detach().clone() for k, v in model.state_dict().items()})
                    else:
                        stop["since"] += 1
                curve.append(point)
                log.info("seed %d step %d/%d seen %d loss %.4f %s", seed, step + 1, steps, seen,
                         losses[-1], {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
                t0 = time.perf_counter()
                if early_stop is not None and stop["since"] >= patience:
                    stop["stopped_step"] = step + 1
                    break
        train_seconds += time.perf_counter() - t0
        if stop["state"] is not None:
            model.load_state_dict(stop["state"])
        model.eval()
    seen = int(seen_per_row.sum())
    tail = losses[-max(1, steps // 10):]
    result: dict[str, Any] = {
        "seed": seed, "subset_size": n, "samples_seen": seen, "steps": steps,
        "epochs": round(seen / n, 4), "repeats_min": int(seen_per_row.min()), "repeats_max": int(seen_per_row.max()),
        "train_seconds": round(train_seconds, 3), "samples_per_second": round(seen / max(train_seconds, 1e-9), 1),
        "loss_first": losses[0], "loss_last": sum(tail) / len(tail),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "curve": curve,
    }
    if early_stop is not None:
        result["early_stop"] = {"best_step": stop["best_step"], "best_score": stop["best"],
                                "stopped_step": stop["stopped_step"], "planned_steps": steps, "patience": patience,
                                "scores": stop["scores"]}
    if curve:
        # the reported metrics are those of the model returned: the best point when stopping early
        final = next((p for p in curve if p["step"] == stop["best_step"]), curve[-1]) if early_stop else curve[-1]
        result.update({k: v for k, v in final.items()
                       if k not in ("step", "samples_seen", "epochs", "train_loss", "heldout_score")})
        if items_at.get(final["step"]) is not None:
            result["items"] = items_at[final["step"]]
    return model, result


def saved_model_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) for --save-model: X.safetensors -> X.safetensors + X.json; a directory X ->
    X/model.safetensors + X/model_config.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "model.safetensors", path / "model_config.json"


def save_model(model: Any, conf: dict[str, Any], path: str | Path,
               quality: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the weights (safetensors) and the open_clip model config beside them (see saved_model_paths).

    `curate score --model CONFIG.json --pretrained WEIGHTS.safetensors` loads the pair. `quality` (the
    held-out check, curate.train_probe.quality) goes into the safetensors metadata, where score reads it.
    """
    import json

    from safetensors.torch import save_file

    weights, cfg_path = saved_model_paths(path)
    write_json(cfg_path, conf)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        meta = {"format": "pt", "producer": "curate train-probe"}
        if quality is not None:
            meta[METADATA_KEY] = json.dumps(quality, sort_keys=True)
        save_file(state, str(tmp), metadata=meta)
    return weights, cfg_path
