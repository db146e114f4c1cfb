"""`curate dedup --threshold auto`: calibrate the near-duplicate cosine for the embedding model at hand.

A fixed threshold means something different for every model (CLIP ViT-B/32 copies sit above ~0.95, a small or
weak model puts unrelated images there too). So: take a seeded sample of the dataset's own images, make
augmented copies (JPEG re-encode, downscale, small centre crop), embed originals and copies with the model the
score stage used, and pick the threshold that finds `target` of the copies. Random pairs of the sampled
originals guard the other side: the threshold is raised above all but 0.1% of the random pairs (pairs of
byte-identical images left out: they are exact duplicates, not random), which keeps a weak model from flagging
the pool; up to 256 images give ~32k pairs. Both rates go into the plan and the manifest's counts.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from curate.errors import InputError
from curate.imaging import safe_decode_rgb, safe_open
from curate.io import manifest
from curate.io.layout import DatasetDir
from curate.io.shards import iter_samples
from curate.models import load_model, resolve_model
from curate.stages.dedup import core as sd
from curate.stages.dedup.config import read_shard

log = logging.getLogger(__name__)
SAMPLES = 256
RANDOM_PAIR_RATE = 1e-3  # the threshold sits above all but this share of the sample's random pairs
AUGMENTATIONS = ("jpeg-q40", "downscale-0.5", "crop-0.9")


def augment(im: Any) -> list[Any]:
    """The near copies a web crawl produces from one image: re-encoded, downscaled, slightly cropped."""
    from PIL import Image

    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40)
    reencoded = safe_decode_rgb(buf.getvalue())
    w, h = im.size
    small = im.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    dw, dh = round(w * 0.05), round(h * 0.05)
    crop = im.crop((dw, dh, w - dw, h - dh))
    return [reencoded, small, crop]


def sample_keys(ds: DatasetDir, shards: list[str], seed: int, scorer: str, size: int = SAMPLES) -> dict[str, list[str]]:
    """Up to `size` scored keys with the lowest hash of (key, seed), by shard: order- and placement-free."""
    best_h = np.zeros(0, np.uint64)
    best_k = np.zeros(0, "S1")
    best_s = np.zeros(0, np.int64)
    for i, shard in enumerate(shards):
        t, _ = read_shard(ds, shard, with_sha=False, scorer=scorer)
        k = np.asarray(t["key"].to_numpy(zero_copy_only=False)).astype("S")
        h = np.concatenate([best_h, sd.key_hash(k, seed)])
        width = max(best_k.dtype.itemsize, k.dtype.itemsize)
        keys = np.concatenate([best_k.astype(f"S{width}"), k.astype(f"S{width}")])
        src = np.concatenate([best_s, np.full(len(k), i)])
        o = np.lexsort((keys, h))[:size]
        best_h, best_k, best_s = h[o], keys[o], src[o]
    out: dict[str, list[str]] = {}
    for k, s in zip(best_k.tolist(), best_s.tolist(), strict=True):
        out.setdefault(shards[s], []).append(k.decode())
    return out


def _images(ds: DatasetDir, keys: dict[str, list[str]]) -> list[tuple[Any, bytes]]:
    """(image, sha256 of its bytes) of each sampled key, in key order."""
    import hashlib

    out = []
    for shard in sorted(keys):
        wanted = set(keys[shard])
        for s in iter_samples(ds.shard_tar(shard)):
            if s["key"] in wanted and s["image"]:
                try:
                    with safe_open(s["image"]) as im:  # allowlist and pixel cap (adopted bytes too)
                        out.append((s["key"], im.convert("RGB"), hashlib.sha256(s["image"]).digest()))
                except Exception:  # noqa: BLE001 - an undecodable image simply is not in the sample
                    continue
    return [(im, h) for _, im, h in sorted(out, key=lambda x: x[0])]


def calibrate(ds: DatasetDir, shards: list[str], seed: int, target: float, device: str,
              scorer: str = "score") -> dict[str, Any]:
    """The threshold and the evidence for it (see the module docstring)."""
    import torch

    score = manifest.load(ds)["stages"].get(scorer, {}).get("config") or {}
    if "model" not in score:
        raise InputError(f"{ds.manifest}: --threshold auto needs the score stage's model in the manifest "
                         "(run `curate score` first, or give --threshold a number)")
    sampled = _images(ds, sample_keys(ds, shards, seed, scorer))
    images, digests = [im for im, _ in sampled], [h for _, h in sampled]
    if len(images) < 8:
        raise InputError(f"{ds.root}/shards: --threshold auto needs at least 8 decodable scored images, found "
                         f"{len(images)}; give --threshold a number")
    lm = load_model(resolve_model(score["model"], score.get("pretrained", "none"), score.get("checksum")), device)

    def embed(ims: list[Any]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, len(ims), 64):
                x = torch.stack([lm.preprocess(im) for im in ims[s:s + 64]]).to(lm.device)
                out.append(torch.nn.functional.normalize(lm.model.encode_image(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    orig = embed(images)
    copies = embed([c for im in images for c in augment(im)]).reshape(len(images), len(AUGMENTATIONS), -1)
    copy_sim = np.einsum("nd,nad->na", orig, copies).reshape(-1)
    i, j = np.triu_indices(len(orig), 1)
    distinct = np.array([digests[a] != digests[b] for a, b in zip(i.tolist(), j.tolist(), strict=True)], bool)
    random_sim = np.sum(orig[i[distinct]] * orig[j[distinct]], axis=1)
    by_copies = float(np.quantile(copy_sim, 1 - target))
    by_random = float(np.nextafter(np.float32(np.quantile(random_sim, 1 - RANDOM_PAIR_RATE)), np.float32(1)))
    threshold = round(min(1.0, max(by_copies, by_random)), 6)
    out = {"threshold": threshold, "target_copy_share": target, "copy_share": float(np.mean(copy_sim >= threshold)),
           "random_pair_share": float(np.mean(random_sim >= threshold)), "images": len(images),
           "copies": int(copy_sim.size), "random_pairs": int(random_sim.size), "augmentations": list(AUGMENTATIONS),
           "limited_by": "random_pairs" if by_random > by_copies else "copies", "model": score["model"]}
    if out["copy_share"] < 0.5:
        log.warning("dedup --threshold auto: %s can tell only %.0f%% of augmented copies from random pairs of "
                    "images (threshold %.4f); its near-duplicate decisions are weak", score["model"],
                    100 * out["copy_share"], threshold)
    return out
