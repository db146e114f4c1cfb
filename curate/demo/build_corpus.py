"""Rebuild the shipped demo corpus (curate/demo/corpus/*.parquet) from Debian's openclipart packages.

    apt-get install openclipart-png openclipart-svg
    python -m curate.demo.build_corpus [--source /usr/share/openclipart] [--out curate/demo/corpus]
    python -m curate.demo.build_corpus --from-corpus DIR [--max-side 64] [--pool-share 0.7]

Each PNG with a matching SVG becomes one row: metadata from the SVG's RDF block (dc:title,
dc:description, dc:subject keywords), the top-level folder as its category, and the PNG flattened
onto white, downscaled to at most --max-side px and stored as JPEG. Pool rows are kept when a second
hash of their image_id falls below --pool-share (seed and eval rows are all kept), which bounds the
size of pool.parquet. The output is deterministic. `--from-corpus` makes a smaller corpus from a built
one (its JPEGs downscaled again, its pool thinned by the same rule) without the openclipart packages.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import html
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.io.atomic import atomic_path
from curate.langid import detect

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/openclipart")
DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"

SPLITS = ("pool", "seed", "eval")
EVAL_SHARE = 0.10
SEED_SHARE = 0.13
# share of the pool rows shipped: the repository keeps every file under 5 MB, and the pool's JPEGs are
# most of the bytes (64 px JPEGs are ~1.3 kB each, about half of it tables and headers)
POOL_SHARE = 0.7
DEFAULT_MAX_SIDE = 64  # the probe and the filter model train at 64 px
# eval needs labels a probe can learn: a category with fewer images, or one that names no subject
# ("unsorted", "special": gradients and page templates), is left out of eval
EVAL_MIN_CATEGORY = 60
EVAL_EXCLUDED = frozenset({"unsorted", "special"})
# a title shared by this many images is a collection name ("Lemon SVG theme"), not a description
GENERIC_TITLE_MIN = 10
MAX_KEYWORDS = 5
# a handful of openclipart PNGs are rendered at poster size (up to 623 Mpx); decoding one takes
# minutes and gigabytes for a small thumbnail, so they are left out
MAX_SOURCE_PIXELS = 16_000_000

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_META = re.compile(r"<metadata\b.*?</metadata>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")
_CLIPART_BY = re.compile(r"^\s*clipart by [^-]+-\s*", re.I)
_JUNK_KEYWORD = re.compile(r"^(hash|0x[0-9a-f]+|\d+|.* theme icon|.* theme|mapsym|mimeicon|appicon|icons?|theme|magick|"
                           r"unsorted|special|clip ?art|openclipart|svg|png|media|hash\(0x[0-9a-f]+\))$", re.I)
_TRAILING_NUMBER = re.compile(r"[\s_-]*\d+$")
_SPACES = re.compile(r"\s+")

SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),      # path under png/ without extension (unique, readable)
    pa.field("category", pa.string()),      # top-level openclipart folder
    pa.field("folder", pa.string()),        # full folder path (finer label)
    pa.field("title", pa.string()),         # dc:title as published (any language)
    pa.field("description", pa.string()),   # dc:description
    pa.field("keywords", pa.list_(pa.string())),  # dc:subject, cleaned of empty/junk entries
    pa.field("caption", pa.string()),       # clean English-ish caption from title + keywords
    pa.field("lang_hint", pa.string()),     # language of the title ("en" unless clearly another)
    pa.field("image", pa.binary()),         # JPEG bytes, RGB, alpha flattened onto white
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("split", pa.string()),
])


@dataclass(frozen=True)
class Entry:
    image_id: str
    category: str
    folder: str
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str


def _text(m: re.Match | None) -> str:
    if m is None:
        return ""
    return _SPACES.sub(" ", html.unescape(_TAG.sub("", m.group(1)))).strip()


def parse_svg_metadata(svg: str) -> tuple[str, str, tuple[str, ...], str]:
    """(title, description, keywords, creator) from an openclipart SVG's RDF block ('' when absent)."""
    meta = _META.search(svg)
    block = meta.group(0) if meta else ""
    work = _WORK.search(block)
    block = work.group(0) if work else block
    # the Work's own dc:title comes before the Agents' dc:title (publisher, creator)
    creator_block = re.search(r"<dc:creator>(.*?)</dc:creator>", block, re.S)
    creator = _text(_TITLE.search(creator_block.group(1))) if creator_block else ""
    body = re.sub(r"<dc:(publisher|creator|rights)>.*?</dc:\1>", "", block, flags=re.S)
    subject = _SUBJECT.search(body)
    keywords = tuple(_text(re.match(r"(.*)", k, re.S)) for k in _LI.findall(subject.group(1))) if subject else ()
    return _text(_TITLE.search(body)), _text(_DESC.search(body)), keywords, creator


def scan(source: Path) -> list[Entry]:
    """Every PNG under source/png that has an SVG twin under source/svg, in path order."""
    png_root, svg_root = source / "png", source / "svg"
    if not png_root.is_dir() or not svg_root.is_dir():
        raise SystemExit(f"{source}: no png/ and svg/ folders (apt-get install openclipart-png openclipart-svg)")
    entries = []
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).with_suffix("")  # "microchip_v.2_01": only ".png" goes
        svg = svg_root / f"{rel.as_posix()}.svg"
        if not svg.is_file():
            continue
        title, desc, kws, creator = parse_svg_metadata(svg.read_bytes().decode("utf-8", errors="replace"))
        parts = rel.parts
        entries.append(Entry(rel.as_posix(), parts[0], "/".join(parts[:-1]), title, desc, kws, creator))
    return entries


def clean_keywords(keywords: Iterable[str], creator: str = "") -> list[str]:
    """Lower-case keywords without empty entries, perl hash dumps, collection tags or the author."""
    out: list[str] = []
    author = creator.strip().lower()
    for k in keywords:
        k = _SPACES.sub(" ", k.replace("_", " ").replace("-", " ")).strip().lower()
        if k and not _JUNK_KEYWORD.match(k) and k != author and k not in out:
            out.append(k)
    return out


def _words(name: str) -> str:
    return _SPACES.sub(" ", _TRAILING_NUMBER.sub("", name).replace("_", " ").replace("-", " ")).strip()


def subject_of(e: Entry, generic_titles: set[str]) -> str:
    """What the image shows, in words: the title without author prefixes, or the file name when the
    title is a collection name."""
    title = _CLIPART_BY.sub("", e.title).strip()
    if not title or e.title in generic_titles:
        stem = e.image_id.rsplit("/", 1)[-1]
        # openclipart file names end in "<author>_<nn>"; the author part says nothing about the image
        stem = re.sub(r"_[a-z]+_[a-z]+_\d+$", "", stem) if stem.count("_") >= 3 else stem
        title = stem
    return _words(title)


def lang_hint_of(e: Entry, subject: str, detect: Any) -> str:
    """"en" unless the title is clearly in another language (short titles fool language ID)."""
    if "rollandin" in e.creator.lower():
        return "it"  # Architetto Francesco Rollandin titled his many cliparts in Italian
    lang = detect(subject)
    if lang.label and lang.label != "en" and lang.prob >= 0.9 and len(subject.split()) >= 2:
        return lang.label
    return "en"


def caption_of(e: Entry, subject: str, lang: str) -> str:
    """Subject, then up to MAX_KEYWORDS keywords it does not already say; English-ish by construction:
    a non-English title is replaced by the folder name."""
    if lang != "en":
        subject = _words(e.folder.rsplit("/", 1)[-1])
    have = set(subject.lower().split())
    extra = [k for k in clean_keywords(e.keywords, e.creator) if not set(k.split()) <= have][:MAX_KEYWORDS]
    head = subject[:1].upper() + subject[1:]
    return ", ".join([head, *extra]) if extra else head


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from text (the split and the demo web draw from it)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_split(image_id: str, category: str, seed_ok: bool, eval_categories: set[str]) -> str:
    u = unit_hash(f"curate-demo-split:{image_id}")
    if u < EVAL_SHARE:
        return "eval" if category in eval_categories else "pool"
    if u < EVAL_SHARE + SEED_SHARE and seed_ok:
        return "seed"
    return "pool"


def in_pool_share(image_id: str, share: float) -> bool:
    """Whether a pool row ships: a hash independent of the split's keeps `share` of the pool."""
    return share >= 1 or unit_hash(f"curate-demo-pool:{image_id}") < share


def _flat_jpeg(rgba: Any, max_side: int, quality: int) -> tuple[bytes, int, int]:
    from PIL import Image

    rgba.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue(), flat.width, flat.height


def encode_image(path: str, max_side: int, quality: int) -> tuple[bytes, int, int] | None:
    """PNG -> RGB on white, long side <= max_side, JPEG (deterministic for a Pillow version);
    None for a source above MAX_SOURCE_PIXELS."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(path)
    except Image.DecompressionBombError:  # Pillow refuses to even open the largest ones
        return None
    with im:
        if im.width * im.height > MAX_SOURCE_PIXELS:
            return None
        im.load()
        rgba = im.convert("RGBA")
    return _flat_jpeg(rgba, max_side, quality)


def shrink(table: pa.Table, max_side: int, quality: int, pool_share: float = 1.0) -> pa.Table:
    """A built corpus made smaller: pool rows outside `pool_share` dropped, every JPEG larger than
    `max_side` downscaled and re-encoded (others kept byte for byte); deterministic for a Pillow version."""
    from PIL import Image

    rows = []
    for r in table.to_pylist():
        if r["split"] == "pool" and not in_pool_share(r["image_id"], pool_share):
            continue
        if max(r["width"], r["height"]) > max_side:
            with Image.open(io.BytesIO(r["image"])) as im:
                r["image"], r["width"], r["height"] = _flat_jpeg(im.convert("RGBA"), max_side, quality)
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _encode_job(args: tuple[str, int, int]) -> tuple[bytes, int, int] | None:
    return encode_image(*args)


def build(source: Path, max_side: int, quality: int, workers: int, pool_share: float = 1.0) -> pa.Table:
    entries = scan(source)
    title_count = collections.Counter(e.title for e in entries)
    generic = {t for t, n in title_count.items() if n >= GENERIC_TITLE_MIN}
    cat_count = collections.Counter(e.category for e in entries)
    eval_categories = {c for c, n in cat_count.items() if n >= EVAL_MIN_CATEGORY and c not in EVAL_EXCLUDED}
    jobs = [(str(source / "png" / f"{e.image_id}.png"), max_side, quality) for e in entries]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(_encode_job, jobs, chunksize=32))
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    skipped = [e.image_id for e, img in zip(entries, images, strict=True) if img is None]
    if skipped:
        log.info("skipped %d source(s) above %d pixels: %s", len(skipped), MAX_SOURCE_PIXELS, ", ".join(skipped))
    for e, img in zip(entries, images, strict=True):
        if img is None:
            continue
        jpeg, w, h = img
        subject = subject_of(e, generic)
        lang = lang_hint_of(e, subject, detect)
        caption = caption_of(e, subject, lang)
        # seed rows train the filter model: English captions that say more than one word
        seed_ok = lang == "en" and len(caption.split()) >= 2
        split = assign_split(e.image_id, e.category, seed_ok, eval_categories)
        if split == "pool" and not in_pool_share(e.image_id, pool_share):
            continue
        for k, v in (("image_id", e.image_id), ("category", e.category), ("folder", e.folder),
                     ("title", e.title), ("description", e.description),
                     ("keywords", clean_keywords(e.keywords, e.creator)), ("caption", caption), ("lang_hint", lang),
                     ("image", jpeg), ("width", w), ("height", h),
                     ("split", split)):
            cols[k].append(v)
    return pa.table(cols, schema=SCHEMA)


def write_corpus(table: pa.Table, out: Path) -> dict[str, int]:
    """One parquet file per split; returns bytes written per file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        path = out / f"{split}.parquet"
        with atomic_path(path) as tmp:
            # JPEG bytes do not compress; zstd still shrinks the text columns
            pq.write_table(part, tmp, compression="zstd", row_group_size=1024)
        sizes[path.name] = path.stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m curate.demo.build_corpus", description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="openclipart root (png/ and svg/)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for {pool,seed,eval}.parquet")
    p.add_argument("--from-corpus", type=Path, default=None,
                   help="shrink a built corpus folder ({pool,seed,eval}.parquet) instead of reading --source")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="long side of the stored JPEG, px")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--pool-share", type=float, default=POOL_SHARE, help="share of the pool rows kept (0, 1]")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < a.pool_share <= 1:
        p.error(f"--pool-share: must be in (0, 1], got {a.pool_share}")
    if a.from_corpus is not None:
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(a.from_corpus / f"{s}.parquet") for s in SPLITS])
        table = shrink(table.cast(SCHEMA), a.max_side, a.quality, a.pool_share)
    else:
        table = build(a.source, a.max_side, a.quality, a.workers, a.pool_share)
    sizes = write_corpus(table, a.out)
    for name, size in sizes.items():
        log.info("%s: %.2f MB", a.out / name, size / 1e6)
    counts = collections.Counter(table["split"].to_pylist())
    log.info("rows %d (%s), total %.2f MB", table.num_rows, dict(sorted(counts.items())), sum(sizes.values()) / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
