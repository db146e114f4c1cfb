"""The one safe image decoder of curate, and download's resize/encode.

Everything in curate that opens image bytes (download, score and its device path's header check, adopt,
dedup, report thumbnails and plots, train-probe data, search query images, the demo web's variants) goes
through `safe_open` / `safe_decode` / `safe_decode_rgb`: the format is decided by magic bytes against an allowlist (JPEG, PNG,
WebP, GIF, BMP), Pillow is opened with exactly that one format (`formats=[...]`, so no other plugin,
and never Ghostscript, sees the bytes), and the header's pixel count is checked before a single pixel
is allocated. Failures raise `ImageRejected` whose `code` is a ledger error code, the same in every stage.

Memory per image is bounded by the output, not the input: a resize whose output would exceed a pixel
budget is refused, centre crops resize only the source region they keep, and decodes reserve their
bytes from a per-task `DecodeBudget` first (see `decode_cost`). JPEGs that will be shrunk are decoded
at reduced scale (libjpeg DCT scaling via Pillow's draft mode), the speed and the memory lever.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import math
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from curate.phases import PHASES

log = logging.getLogger(__name__)

ALLOWED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
}
DEFAULT_MAX_PIXELS = 40_000_000
# keep_ratio's output may be at most this many times image_size squared (a 16:1 banner at 256 px is
# 256x4096); beyond it the row is bad_aspect_ratio, so a 1x100000 PNG never becomes 256x25,600,000
MAX_OUTPUT_FACTOR = 16
# per download task: decoded bytes in flight (see decode_cost); one image bigger than this runs alone
DECODE_BUDGET_BYTES = 384 * 2**20
# the copies a decode makes beside the decoded image: the RGB conversion (3) and, for transparent
# images, the RGBA composite (4)
_CONVERT_BYTES = 7
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
# Shrinking on both sides (the usual case): see shrink(), a box reduce then OpenCV's SIMD bilinear.
# A centre crop's box and a shrink on one side only use an integer box reduce (Image.reduce) down to
# within 2x of the target, then Hamming (a windowed sinc with bilinear's support): on #15's web-like
# mix about 0.6x the time of bicubic with a reducing gap of 3, at 44.3 dB median PSNR against a
# full-decode Lanczos reference (bicubic: 45.7 dB).
SHRINK_FILTER = Image.Resampling.HAMMING
SHRINK_REDUCING_GAP = 2.0
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# recognised so that they are reported as format_not_allowed instead of decode_error (never parsed)
_OTHER_MAGIC = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"%PDF", "PDF"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"qoif", "QOI"),
    (b"\x76\x2f\x31\x01", "EXR"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"DDS ", "DDS"), (b"icns", "ICNS"), (b"SIMPLE  =", "FITS"), (b"\x01\xda", "SGI"),
    (b"\x59\xa6\x6a\x95", "Sun raster"), (b"#define", "XBM"), (b"/* XPM */", "XPM"), (b"gimp xcf", "XCF"),
    (b"#?RADIANCE", "HDR"), (b"#?RGBE", "HDR"), (b"\xd7\xcd\xc6\x9a", "WMF"), (b"FORM", "IFF/ILBM"),
    (b"GIMP", "GBR"), (b"DanM", "MSP"), (b"LinS", "MSP"), (b"\x0a\x05\x01", "PCX"),
)
# EXIF orientation -> the transpose that makes the image upright
_ORIENT = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,),
}
# what a decoder may raise on hostile bytes; anything else is a bug and surfaces as one
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                  struct.error, ZeroDivisionError, OverflowError)


class ImageRejected(Exception):
    """The bytes were not turned into a sample; `code` is a ledger error code."""

    def __init__(self, code: str, message: str, orig_size: tuple[int, int] | None = None, mime: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.orig_size = orig_size
        self.mime = mime


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0   # 0: no limit beyond the output cap (max_output_pixels)
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True              # reduced-scale JPEG decoding when shrinking
    fast_decode: bool = True        # PNG through Wuffs, WebP through libwebp (see decode_fast); False: Pillow's


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    mime: str            # of the original bytes
    orig_width: int      # upright (after EXIF orientation)
    orig_height: int
    width: int
    height: int


# ---- the safe decoder (every stage) -------------------------------------------------------------

def sniff_other_format(data: bytes) -> str | None:
    """The name of a known image/document format outside the allowlist, or None."""
    head = bytes(data[:16])
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF/MP4"
    # Netpbm: P1..P7 then whitespace; PFM: Pf/PF then whitespace
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567fF" and head[2:3] in b" \t\r\n":
        return "PPM/PGM/PBM/PAM/PFM"
    text = bytes(data[:256]).lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in bytes(data[:4096]).lower()):
        return "SVG"
    return None


def sniff_format(data: bytes) -> str:
    """The allowlisted Pillow format of `data` by its magic bytes; ImageRejected otherwise.

    format_not_allowed for a recognised format outside the allowlist (EPS, PPM, TIFF, SVG, ...),
    decode_error for bytes that are no image at all (HTML, empty, garbage).
    """
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    other = sniff_other_format(data)
    if other:
        raise ImageRejected("format_not_allowed", f"{other} is not in the format allowlist "
                            f"({', '.join(ALLOWED_FORMATS)})")
    raise ImageRejected("decode_error", "not a decodable image (unknown bytes)")


def safe_open(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily with the sniffed format only and check the header's pixel count; nothing is decoded.

    Raises ImageRejected: format_not_allowed, decode_error or decompression_bomb (more than max_pixels).
    `img.format` may read "MPO" for a multi-picture JPEG (still Pillow's JPEG decoder).
    """
    fmt = sniff_format(data)
    mime = ALLOWED_FORMATS[fmt]
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", str(e), mime=mime) from None
    except UnidentifiedImageError:
        raise ImageRejected("decode_error", f"not a decodable {fmt} (bad header)", mime=mime) from None
    except _DECODE_ERRORS as e:
        raise ImageRejected("decode_error", f"bad image header ({e})"[:300], mime=mime) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected("decode_error", f"image header says {w}x{h}", mime=mime)
    if w * h > max_pixels:
        raise ImageRejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > max pixels {max_pixels}",
                            (w, h), mime)
    return img


def decode_cost(img: Image.Image) -> int:
    """Bytes a decode of `img` (at its current, possibly draft-reduced, size) may hold at its peak.

    width x height x (decoded bytes per pixel of its mode + 7 for the RGB / RGBA-composite copies).
    """
    bands = len(img.getbands())
    depth = 4 if img.mode in ("I", "F") else 2 if img.mode.startswith("I;16") else 1
    return img.width * img.height * (bands * depth + _CONVERT_BYTES)


class DecodeBudget:
    """A semaphore on decoded bytes: the decodes of one task together reserve at most `nbytes`.

    One image larger than the whole budget waits until it can run alone, so peak decoded memory per
    task is max(nbytes, the largest single decode_cost) whatever the thread count.
    """

    def __init__(self, nbytes: int = DECODE_BUDGET_BYTES):
        self.total = max(1, int(nbytes))
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        need = min(max(0, int(nbytes)), self.total)
        with self._cond:
            while self.used + need > self.total:
                self._cond.wait()
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


_ALLOCATOR_TUNED = False


def return_freed_memory_to_os() -> None:
    """Bound what glibc keeps of freed decode buffers, without a page fault storm (once per process).

    glibc raises its mmap threshold up to 32 MB after the first big free, so later decode buffers
    come from per-thread arenas that keep the memory after free: with 16 decoding threads the RSS grew
    to the sum of every thread's largest decode, whatever the DecodeBudget allowed at once (#12). A
    fixed threshold of 1 MB cured that but mapped and faulted in every buffer afresh (about 870 minor
    faults and 1.2 ms of system time per image on #15's web mix, 20% of the pixel work). Now the pixel
    work runs in few decode threads (download.run_shard), and the limits are: buffers of 16 MB and more
    (Pillow's blocks, any large decode) are mapped and unmapped at once; smaller ones are reused from
    at most 4 arenas, each trimmed once it holds more than 32 MB free at its top (on the web mix, `bench/
    download.py --web --n 3000`: 64 MB kept 820 MB over the tree, 32 MB 750 MB at the same CPU per image,
    8 MB 676 MB at 12% more CPU per image, the faults of regrowing the heaps); Pillow's blocks are
    raised to 32 MB so that every block of a big image is past the threshold (116 faults per image on
    the web mix; `bench/download.py --hostile` 570 MB instead of 690-900 MB with 16 MB blocks).
    The mallopt calls are a no-op where the C library has no mallopt.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    with contextlib.suppress(OSError, AttributeError):  # not glibc: no mallopt, nothing to do
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc among them
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD (a fixed value also turns the dynamic raising off)
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 4)         # M_ARENA_MAX
    # Pillow allocates big images in blocks of up to this size: at 32 MB every block of a decode of 16 MB
    # and more is itself past the mmap threshold, so it goes back to the OS when freed
    Image.core.set_block_size(32 << 20)


@dataclass
class Decoded:
    """A decoded image and what its header said before any draft reduction."""

    image: Image.Image   # RGB, loaded
    width: int           # stored size (no EXIF orientation applied)
    height: int
    format: str          # the allowlisted format (JPEG, PNG, WEBP, GIF, BMP; MPO reads as JPEG)
    mime: str


def safe_decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None,
                budget: DecodeBudget | None = None) -> Decoded:
    """Decode to a loaded RGB image (transparency composited on white) through `safe_open`.

    `draft`: for JPEG, decode at the smallest DCT scale that is still at least this size.
    `budget`: wait until this decode's decode_cost fits in it.
    Raises ImageRejected (the codes of safe_open, or decode_error for bytes that fail mid-decode).
    """
    img = safe_open(data, max_pixels)
    fmt = "JPEG" if img.format == "MPO" else (img.format or "JPEG")
    mime = ALLOWED_FORMATS.get(fmt, "image/jpeg")
    size = img.size
    try:
        if draft is not None and fmt == "JPEG":
            img.draft("RGB", draft)
        with budget.reserve(decode_cost(img)) if budget is not None else contextlib.nullcontext():
            img.load()
            rgb = to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", str(e), size, mime) from None
    except MemoryError:
        raise ImageRejected("decompression_bomb", "out of memory while decoding", size, mime) from None
    except _DECODE_ERRORS as e:
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}"[:300], size, mime) from None
    return Decoded(rgb, size[0], size[1], fmt, mime)


def safe_decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None,
                    budget: DecodeBudget | None = None) -> Image.Image:
    """`safe_decode(...).image`: the loaded RGB image only."""
    return safe_decode(data, max_pixels, draft, budget).image


# ---- download: check, resize, encode ------------------------------------------------------------

def target_size(w: int, h: int, opt: ImageOptions) -> tuple[int, int]:
    """The size the image is resized to before cropping or padding (img2dataset's semantics)."""
    s = opt.image_size
    if opt.resize_mode == "no":
        return w, h
    if opt.resize_mode in ("keep_ratio", "center_crop"):
        scale = s / min(w, h)
    else:  # keep_ratio_largest, border
        scale = s / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def max_output_pixels(opt: ImageOptions) -> int:
    """The most pixels one output image may have (resize_mode "no" is bounded by max_pixels instead)."""
    s2 = opt.image_size * opt.image_size
    return max(s2, min(MAX_OUTPUT_FACTOR * s2, opt.max_pixels))


def output_size(w: int, h: int, opt: ImageOptions) -> tuple[int, int]:
    """The size of the encoded output for an upright w x h source."""
    s = opt.image_size
    if opt.resize_mode in ("border", "center_crop"):
        return s, s
    return target_size(w, h, opt)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) read from the header only; 1 when absent or broken (as browsers do).

    Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels, which
    would happen outside the DecodeBudget: for PNG only an eXIf chunk before IDAT counts (what the
    PNG spec asks for).
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored
        return 1
    return value if 1 <= value <= 8 else 1


def open_checked(data: bytes, opt: ImageOptions) -> tuple[Image.Image, int, int, int]:
    """Open lazily and check format, pixel count, size, aspect ratio and output size; nothing is decoded yet.

    Returns (image, upright width, upright height, EXIF orientation).
    """
    img = safe_open(data, opt.max_pixels)
    mime = ALLOWED_FORMATS.get(img.format or "", "image/jpeg")
    w, h = img.size
    orientation = exif_orientation(img)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if opt.min_image_size and min(w, h) < opt.min_image_size:
        raise ImageRejected("too_small", f"{w}x{h} < --min-image-size {opt.min_image_size}", (w, h), mime)
    if opt.max_aspect_ratio and max(w, h) / min(w, h) > opt.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{w}x{h} aspect {max(w, h) / min(w, h):.2f} > "
                            f"--max-aspect-ratio {opt.max_aspect_ratio}", (w, h), mime)
    if opt.resize_mode != "no":
        ow, oh = output_size(w, h, opt)
        if ow * oh > max_output_pixels(opt):
            raise ImageRejected("bad_aspect_ratio", f"{w}x{h} (aspect {max(w, h) / min(w, h):.1f}) would become "
                                f"{ow}x{oh} = {ow * oh} output pixels > {max_output_pixels(opt)} "
                                f"({MAX_OUTPUT_FACTOR} x --image-size squared)", (w, h), mime)
    return img, w, h, orientation


def process_image(data: bytes, opt: ImageOptions, budget: DecodeBudget | None = None) -> ProcessedImage:
    """Decode (safely), orient, convert to RGB, resize and encode one image; raises ImageRejected.

    With `budget`, the decode waits until its decode_cost fits in the task's budget.
    """
    img, w, h, orientation = open_checked(data, opt)
    mime = ALLOWED_FORMATS.get(img.format or "", "image/jpeg")
    tw, th = target_size(w, h, opt)
    try:
        if opt.draft and img.format in ("JPEG", "MPO") and tw < w:
            # ask for at least the target size in stored orientation; libjpeg picks the 1/2, 1/4, 1/8 scale
            req = (math.ceil(tw), math.ceil(th)) if orientation < 5 else (math.ceil(th), math.ceil(tw))
            img.draft("RGB", req)
        use_fast = opt.fast_decode and img.format in ("PNG", "WEBP")
        # shrink during the decode where the decoder can (libwebp); the size is in stored orientation
        shrink_to = ((tw, th) if orientation < 5 else (th, tw)) if tw < w and th < h else None
        cost = max(decode_cost(img), fast_decode_cost(img, data, shrink_to)) if use_fast else decode_cost(img)
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            with PHASES.timed("decode"):
                fast = decode_fast_or_pillow(img, data, shrink_to) if use_fast else None
                if fast is not None:
                    img = fast
                else:
                    img.load()
                for op in _ORIENT.get(orientation, ()):
                    img = img.transpose(op)
                img = to_rgb(img)
            with PHASES.timed("resize"):
                img = resize(img, tw, th, opt)
        with PHASES.timed("encode"):
            out = _encode(img, opt)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", str(e), (w, h), mime) from None
    except MemoryError:
        raise ImageRejected("decompression_bomb", "out of memory while decoding", (w, h), mime) from None
    except _DECODE_ERRORS as e:
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}"[:300], (w, h), mime) from None
    return ProcessedImage(out, opt.encode_format, mime, w, h, img.width, img.height)


# ---- faster decoders behind the safe decoder (download) -----------------------------------------
#
# On #15's web-like mix Pillow takes about 18 ms for a 1 MP PNG (zlib and unfiltering) and 10 ms for a
# WebP (its plugin always goes through libwebp's animation decoder into RGBA). Wuffs decodes the same
# PNGs in about 7.6 ms, and is written in a memory-safe language; libwebp's plain WebPDecode takes
# 3.2 ms and can shrink while decoding (3.3 ms straight to 256 px, 47 dB median PSNR against a full
# decode and Lanczos). They only ever see bytes that safe_open has already sniffed, opened with Pillow
# and checked against the pixel cap, inside the caller's DecodeBudget reservation; the decoded size
# must be the one Pillow read from the header. Anything they do not handle the same way as the
# Pillow path (animated WebP, WebP with alpha when shrinking, an error of theirs) goes to Pillow.

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WEBP_LIB: Any = None


def _has_alpha(img: Image.Image) -> bool:
    """What to_rgb composites on white: an alpha band, or a palette with a transparent entry."""
    return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def fast_decoders() -> dict[str, bool]:
    """Which optional fast paths this process has: `png` (pywuffs), `webp` (the webp package), `shrink`
    (OpenCV). Each is an optional package (the `[fast]` and `[wuffs]` extras); without it Pillow does the
    work, with the same error codes and outputs within a grey level or two."""
    return {"png": _wuffs() is not None, "webp": _webp_lib() is not None, "shrink": _cv2() is not None}


def decode_fast(img: Image.Image, data: bytes, shrink_to: tuple[int, int] | None = None) -> Image.Image | None:
    """RGB pixels of a PNG (Wuffs) or WebP (libwebp) that `safe_open` has checked; None: use Pillow
    (also when the decoder's package is not installed).

    `img` is the lazily opened Pillow image of `data` (its header's size and mode decide the output);
    `shrink_to` (stored orientation, smaller than the image on both sides) lets libwebp shrink while
    decoding. Transparency is composited on white as to_rgb does (within one grey level).
    """
    if img.format == "PNG":
        return _decode_png_wuffs(img, data)
    if img.format == "WEBP":
        return _decode_webp(img, data, shrink_to)
    return None


# decode_fast raising (a bug or a missing library in pywuffs/webp), by exception type: read by download's
# shard stats (fast_decoder_errors), so a fallback that happens is visible, never silent
FAST_DECODER_ERRORS: Counter[str] = Counter()
_FAST_LOCK = threading.Lock()


def decode_fast_or_pillow(img: Image.Image, data: bytes, shrink_to: tuple[int, int] | None = None) -> Image.Image | None:
    """decode_fast, where any error of the fast decoder itself means "use Pillow": Pillow then decodes the
    same bytes (and rejects them with decode_error if they are bad), so the row never becomes
    internal_error because of a decoder that is only an accelerator. MemoryError keeps its own meaning."""
    try:
        return decode_fast(img, data, shrink_to)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the accelerator falls back to the reference decoder
        with _FAST_LOCK:
            first = not FAST_DECODER_ERRORS
            FAST_DECODER_ERRORS[type(e).__name__] += 1
        (log.warning if first else log.debug)("fast %s decoder failed (%s: %s); decoding with Pillow",
                                               img.format, type(e).__name__, str(e)[:200])
        return None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def fast_decode_cost(img: Image.Image, data: bytes, shrink_to: tuple[int, int] | None = None) -> int:
    """Bytes decode_fast may hold at its peak, for the DecodeBudget (decode_cost counts Pillow's decode).

    PNG: Wuffs's buffer of the stored pixels at their bit depth (16-bit PNGs: twice Pillow's), its RGB
    output and Pillow's 4-byte copy. WebP: libwebp's full-size ARGB (lossless) and the output with its
    copies (premultiplied RGBA, the composited RGB, Pillow's copy).
    """
    w, h = img.size
    if img.format == "PNG":
        depth, ctype = (data[24], data[25]) if len(data) > 25 else (16, 6)
        stored = max(1, _PNG_CHANNELS.get(ctype, 4) * depth // 8)  # sub-byte depths: at most one byte
        return w * h * (stored + 3 + 4)  # (and Wuffs's one filter byte per row)
    ow, oh = shrink_to if shrink_to is not None and img.mode != "RGBA" else (w, h)
    return w * h * 4 + ow * oh * (4 + 3 + 4)


_WUFFS: Any = None


def _wuffs() -> Any:
    """pywuffs's (ImageDecoderType, PixelBlend, PixelFormat, ImageDecoder, ImageDecoderConfig), or None
    when the package is not installed (it builds from source: the optional `[wuffs]` extra)."""
    global _WUFFS
    if _WUFFS is None:
        try:
            from pywuffs import ImageDecoderType, PixelBlend, PixelFormat
            from pywuffs.aux import ImageDecoder, ImageDecoderConfig
        except ImportError:
            _WUFFS = False
        else:
            _WUFFS = (ImageDecoderType, PixelBlend, PixelFormat, ImageDecoder, ImageDecoderConfig)
    return _WUFFS or None


def _decode_png_wuffs(img: Image.Image, data: bytes) -> Image.Image | None:
    wuffs = _wuffs()
    if wuffs is None or not _png_chunks_intact(data):
        return None
    ImageDecoderType, PixelBlend, PixelFormat, ImageDecoder, ImageDecoderConfig = wuffs
    w, h = img.size
    cfg = ImageDecoderConfig()
    cfg.enabled_decoders = [ImageDecoderType.PNG]
    cfg.pixel_format = PixelFormat.RGB
    # Wuffs parses the header itself: it may not decode anything larger than what Pillow read and checked
    cfg.max_incl_dimension = max(w, h)
    if _has_alpha(img):
        cfg.pixel_blend = PixelBlend.SRC_OVER
        cfg.background_color = 0xFFFFFFFF  # opaque white under the image, as to_rgb
    res = ImageDecoder(cfg).decode(data)
    pix = res.pixbuf
    if res.error_message or pix is None or pix.shape != (h, w, 3):
        return None  # Pillow decides (a stricter checksum, a truncated file, ...): the same codes as before
    return Image.fromarray(pix, "RGB")


def _png_chunks_intact(data: bytes) -> bool:
    """Every chunk up to IEND is whole and its CRC-32 matches (0.2 ms for a 1 MB PNG).

    Wuffs does not check the checksums that would catch a flipped byte in the pixel data, where Pillow's
    zlib stops with decode_error; a file that fails here goes to Pillow, which decides as before.
    """
    view = memoryview(data)
    pos, end = 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos:pos + 4], "big")
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(view[pos + 4:stop]) != int.from_bytes(view[stop:stop + 4], "big"):
            return False
        if view[pos + 4:pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def _webp_lib() -> Any:
    """The `webp` package's cffi handle of libwebp, once checked: its WebPDecoderOptions must have
    libwebp's layout, since use_scaling and scaled_width/height are set by their int offsets (the
    package's declarations name only use_threads). None when the package is not installed."""
    global _WEBP_LIB
    if _WEBP_LIB is None:
        try:
            from webp import ffi, lib
        except ImportError:
            _WEBP_LIB = False
            return None
        # libwebp's struct: 10 ints, use_threads, 3 more ints, 5 uint32 of padding
        if ffi.offsetof("struct WebPDecoderOptions", "use_threads") != 40 or \
                ffi.sizeof("struct WebPDecoderOptions") != 76:
            raise RuntimeError("the webp package's WebPDecoderOptions is not libwebp's layout")
        _WEBP_LIB = (ffi, lib)
    return _WEBP_LIB or None


def _decode_webp(img: Image.Image, data: bytes, shrink_to: tuple[int, int] | None) -> Image.Image | None:
    handle = _webp_lib()
    if handle is None:
        return None
    ffi, lib = handle
    cfg = ffi.new("WebPDecoderConfig*")
    if not lib.WebPInitDecoderConfig(cfg):
        return None
    if lib.WebPGetFeatures(data, len(data), ffi.addressof(cfg, "input")) != lib.VP8_STATUS_OK:
        return None
    feat = cfg.input
    w, h = img.size
    if feat.has_animation or (feat.width, feat.height) != (w, h):
        return None  # animations: Pillow's first frame, as before
    alpha = bool(feat.has_alpha)
    if alpha:
        shrink_to = None  # libwebp shrinks colour and alpha apart: composite at full size, then resize
    ow, oh = shrink_to or (w, h)
    if shrink_to is not None:
        opts = ffi.cast("int *", ffi.addressof(cfg, "options"))
        opts[7], opts[8], opts[9] = 1, ow, oh  # use_scaling, scaled_width, scaled_height
    bands = 4 if alpha else 3
    out = np.empty((oh, ow, bands), np.uint8)
    # premultiplied RGBA: on white, each channel is then c + (255 - a), exactly what a viewer shows
    cfg.output.colorspace = lib.MODE_rgbA if alpha else lib.MODE_RGB
    cfg.output.is_external_memory = 1
    cfg.output.u.RGBA.rgba = ffi.cast("uint8_t *", out.ctypes.data)
    cfg.output.u.RGBA.stride = ow * bands
    cfg.output.u.RGBA.size = out.nbytes
    if lib.WebPDecode(data, len(data), cfg) != lib.VP8_STATUS_OK:
        lib.WebPFreeDecBuffer(ffi.addressof(cfg, "output"))
        return None
    if alpha:
        rgb = out[..., :3]
        rgb += 255 - out[..., 3:4]  # premultiplied: c <= a, so no overflow
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    return Image.fromarray(out, "RGB")


def _encode(img: Image.Image, opt: ImageOptions) -> bytes:
    out = io.BytesIO()
    fmt = ENCODE_FORMATS[opt.encode_format]
    if fmt == "JPEG":
        img.save(out, "JPEG", quality=opt.encode_quality)
    elif fmt == "PNG":
        level = opt.encode_quality if 0 <= opt.encode_quality <= 9 else 6
        img.save(out, "PNG", compress_level=level)
    else:
        img.save(out, "WEBP", quality=opt.encode_quality, method=4)
    return out.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent images are composited on white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # convert() would copy an RGBA image
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the high byte (Pillow's own conversion clips at 255); uint16 keeps
        # the temporary arrays at 2 bytes a pixel (mode I is 32-bit and is clipped first)
        arr = np.asarray(img)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        img = Image.fromarray((arr >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


_CV2: Any = None


def _cv2() -> Any:
    """OpenCV, imported once and kept to the calling thread (its own thread pool would compete with
    the decode threads and the other download processes for the same cores); None when no OpenCV
    distribution (opencv-python-headless from the `[fast]` extra, or opencv-python) is installed."""
    global _CV2
    if _CV2 is None:
        try:
            import cv2
        except ImportError:
            _CV2 = False
            return None
        cv2.setNumThreads(1)
        _CV2 = cv2
    return _CV2 or None


def shrink(img: Image.Image, tw: int, th: int) -> Image.Image:
    """Shrink an RGB image to (tw, th), smaller on both sides: an integer box reduce (Image.reduce) to
    within 2x, then OpenCV's SIMD bilinear for the rest (Pillow's Hamming where OpenCV is not installed).

    The bilinear step's scale is under 2 (after the reduce, or after a JPEG draft decode), where its
    2 taps still see every source pixel once at least. On #15's web-like mix (8 PNGs, 13 WebPs, 59 JPEGs)
    it takes 0.7x the time of Pillow's Hamming after the same reduce (1.56 against 2.27 ms per JPEG,
    decode and encode included), at 44.3 dB median PSNR against a full-decode Lanczos reference for
    the JPEGs (Hamming 43.7) and 42.5 dB for the PNGs (45.1).
    """
    k = int(min(img.width / tw, img.height / th))
    if k >= 2:
        img = img.reduce(k)
    cv2 = _cv2()
    if cv2 is None:
        return img.resize((tw, th), SHRINK_FILTER)
    return Image.fromarray(cv2.resize(np.asarray(img), (tw, th), interpolation=cv2.INTER_LINEAR), "RGB")


def resize(img: Image.Image, tw: int, th: int, opt: ImageOptions) -> Image.Image:
    """Resize to (tw, th), then crop or pad to the square of the mode.

    A centre crop resizes only the source region it keeps (Pillow's `box`), so its memory is the
    output's whatever the source's aspect ratio; keep_ratio's output is capped by open_checked.
    """
    if opt.resize_mode == "no":
        return img
    s = opt.image_size
    if opt.resize_mode == "center_crop" and (tw, th) != (s, s):
        sx, sy = img.width / tw, img.height / th  # img may already be draft-reduced
        left, top = (tw - s) // 2, (th - s) // 2
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        down = sx > 1
        return img.resize((s, s), SHRINK_FILTER if down else Image.Resampling.LANCZOS, box=box,
                          reducing_gap=SHRINK_REDUCING_GAP if down else None)
    if (img.width, img.height) != (tw, th):
        if tw < img.width and th < img.height:
            img = shrink(img, tw, th)
        else:
            down = tw < img.width
            img = img.resize((tw, th), SHRINK_FILTER if down else Image.Resampling.LANCZOS,
                             reducing_gap=SHRINK_REDUCING_GAP if down else None)
    if opt.resize_mode == "border" and (tw, th) != (s, s):
        canvas = Image.new("RGB", (s, s), (0, 0, 0))
        canvas.paste(img, ((s - tw) // 2, (s - th) // 2))
        img = canvas
    return img
