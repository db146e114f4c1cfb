"""A second corpus for dedup, unlike the demo's: small random drawings with planted copies and their truth.

    rows, truth = planted_corpus(n_originals=360, seed=0)

Each original is a 64 px drawing (two to four outlined shapes in a few colours on white), so originals
look alike the way clip art does. Planted copies point at their original: byte-identical, re-encoded at
JPEG quality 60, downscaled to 48 px, or brightened by 8%. `truth[i]` is the original row of copy i
(None for an original); the copies are spread through the rows, each after its original.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageEnhance

PALETTE = [(20, 20, 20), (200, 30, 30), (30, 90, 200), (30, 150, 60), (230, 160, 20), (120, 40, 160)]
KINDS = ("exact", "reencoded", "downscaled", "brightened")


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def drawing(rng: random.Random, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randint(0, size - 16), rng.randint(0, size - 16)
        x1, y1 = rng.randint(x0 + 8, size), rng.randint(y0 + 8, size)
        colour, fill = rng.choice(PALETTE), rng.choice([None, None, rng.choice(PALETTE)])
        shape = rng.choice(("ellipse", "rectangle", "line", "polygon"))
        if shape == "ellipse":
            d.ellipse((x0, y0, x1, y1), outline=colour, fill=fill, width=3)
        elif shape == "rectangle":
            d.rectangle((x0, y0, x1, y1), outline=colour, fill=fill, width=3)
        elif shape == "line":
            d.line((x0, y0, x1, y1), fill=colour, width=4)
        else:
            pts = [(rng.randint(0, size), rng.randint(0, size)) for _ in range(rng.randint(3, 5))]
            d.polygon(pts, outline=colour, fill=fill, width=3)
    return im


def copy_of(kind: str, original: bytes) -> bytes:
    if kind == "exact":
        return original
    im = Image.open(io.BytesIO(original)).convert("RGB")
    if kind == "reencoded":
        return _jpeg(im, quality=60)
    if kind == "downscaled":
        return _jpeg(im.resize((48, 48), Image.Resampling.BILINEAR))
    if kind == "brightened":
        return _jpeg(ImageEnhance.Brightness(im).enhance(1.08))
    raise ValueError(kind)


def planted_corpus(n_originals: int = 360, copies_per_kind: int = 10, seed: int = 0
                   ) -> tuple[list[bytes], list[int | None], list[str | None]]:
    """(JPEG bytes per row, the original row of each copy or None, the copy's kind or None)."""
    rng = random.Random(seed)
    originals = [_jpeg(drawing(rng)) for _ in range(n_originals)]
    # (sort key, image, original index or None, kind): a copy sorts somewhere after its original
    items = [(float(i), img, None, None) for i, img in enumerate(originals)]
    for j, src in enumerate(rng.sample(range(n_originals), copies_per_kind * len(KINDS))):
        kind = KINDS[j % len(KINDS)]
        items.append((rng.uniform(src + 0.5, n_originals), copy_of(kind, originals[src]), src, kind))
    items.sort(key=lambda it: it[0])
    row_of = {int(k): r for r, (k, _, src, _) in enumerate(items) if src is None}
    return ([it[1] for it in items], [None if it[2] is None else row_of[it[2]] for it in items],
            [it[3] for it in items])


def scores(flagged: set[int], truth: list[int | None]) -> dict[str, float]:
    """Precision and recall of the flagged rows against the planted groups (an original and its copies: all
    but one row of a group should be flagged, whichever is kept), and the flagged and planted shares."""
    group: dict[int, int] = {}
    for i, t in enumerate(truth):
        if t is not None:
            root = t
            while truth[root] is not None:
                root = truth[root]  # type: ignore[assignment]
            group[i] = group[root] = root
    members: dict[int, list[int]] = {}
    for i, g in group.items():
        members.setdefault(g, []).append(i)
    planted = sum(len(m) - 1 for m in members.values())
    tp = sum(min(len([i for i in m if i in flagged]), len(m) - 1) for m in members.values())
    n = len(truth)
    return {"precision": tp / len(flagged) if flagged else 1.0, "recall": tp / planted if planted else 1.0,
            "flagged_share": len(flagged) / n, "planted_share": planted / n, "flagged": len(flagged),
            "planted": planted}
