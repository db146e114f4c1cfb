"""Safe image decoding and resizing for `curate download`: allowlist, pixel limit before decoding, resize, encode.

`Image.open` only parses the header, so the format and the pixel count are checked before a single
pixel is allocated. JPEGs that will be shrunk are decoded at reduced scale (libjpeg DCT scaling via
Pillow's draft mode), which is both the speed and the memory lever.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# our own --max-pixels check runs first and is stricter; Pillow's warning would only be noise
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

ALLOWED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# recognised so that they are reported as format_not_allowed instead of decode_error (never parsed)
_OTHER_MAGIC = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"), (b"%PDF", "PDF"),
    (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "EXR"),
)
# EXIF orientation -> the transpose that makes the image upright
_ORIENT = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,),
}


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
    max_aspect_ratio: float = 0.0   # 0: no limit
    max_pixels: int = 40_000_000
    draft: bool = True              # reduced-scale JPEG decoding when shrinking


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    mime: str            # of the original bytes
    orig_width: int      # upright (after EXIF orientation)
    orig_height: int
    width: int
    height: int


def sniff_other_format(data: bytes) -> str | None:
    head = data[:16]
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF/MP4"
    text = data[:256].lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    return None


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


def open_checked(data: bytes, opt: ImageOptions) -> tuple[Image.Image, int, int, int]:
    """Open lazily and check format, pixel count, size and aspect ratio; nothing is decoded yet.

    Returns (image, upright width, upright height, EXIF orientation).
    """
    other = sniff_other_format(data)
    if other:
        raise ImageRejected("format_not_allowed", f"{other} is not in the format allowlist")
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected("decode_error", "not a decodable image (unknown bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected("decode_error", f"bad image header ({e})"[:300]) from None
    mime = ALLOWED_FORMATS[img.format]
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected("decode_error", f"image header says {w}x{h}", mime=mime)
    if w * h > opt.max_pixels:
        raise ImageRejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > --max-pixels {opt.max_pixels}",
                            (w, h), mime)
    orientation = 1
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, like browsers do
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if opt.min_image_size and min(w, h) < opt.min_image_size:
        raise ImageRejected("too_small", f"{w}x{h} < --min-image-size {opt.min_image_size}", (w, h), mime)
    if opt.max_aspect_ratio and max(w, h) / min(w, h) > opt.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{w}x{h} aspect {max(w, h) / min(w, h):.2f} > "
                            f"--max-aspect-ratio {opt.max_aspect_ratio}", (w, h), mime)
    return img, w, h, orientation


def process_image(data: bytes, opt: ImageOptions) -> ProcessedImage:
    """Decode (safely), orient, convert to RGB, resize and encode one image; raises ImageRejected."""
    img, w, h, orientation = open_checked(data, opt)
    mime = ALLOWED_FORMATS[img.format]
    tw, th = target_size(w, h, opt)
    try:
        if opt.draft and img.format == "JPEG" and tw < w:
            # ask for at least the target size in stored orientation; libjpeg picks the 1/2, 1/4, 1/8 scale
            req = (math.ceil(tw), math.ceil(th)) if orientation < 5 else (math.ceil(th), math.ceil(tw))
            img.draft("RGB", req)
        img.load()
        for op in _ORIENT.get(orientation, ()):
            img = img.transpose(op)
        img = to_rgb(img)
        img = resize(img, tw, th, opt)
        out = io.BytesIO()
        fmt = ENCODE_FORMATS[opt.encode_format]
        if fmt == "JPEG":
            img.save(out, "JPEG", quality=opt.encode_quality)
        elif fmt == "PNG":
            level = opt.encode_quality if 0 <= opt.encode_quality <= 9 else 6
            img.save(out, "PNG", compress_level=level)
        else:
            img.save(out, "WEBP", quality=opt.encode_quality, method=4)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", str(e), (w, h), mime) from None
    except MemoryError:
        raise ImageRejected("decompression_bomb", "out of memory while decoding", (w, h), mime) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as e:
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}"[:300], (w, h), mime) from None
    return ProcessedImage(out.getvalue(), opt.encode_format, mime, w, h, img.width, img.height)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent images are composited on white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        # 16-bit greyscale: keep the high byte (Pillow's own conversion clips at 255)
        arr = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


def resize(img: Image.Image, tw: int, th: int, opt: ImageOptions) -> Image.Image:
    if opt.resize_mode == "no":
        return img
    if (img.width, img.height) != (tw, th):
        shrink = tw < img.width
        method = Image.Resampling.BICUBIC if shrink else Image.Resampling.LANCZOS
        img = img.resize((tw, th), method, reducing_gap=3.0 if shrink else None)
    s = opt.image_size
    if opt.resize_mode == "center_crop" and (tw, th) != (s, s):
        left, top = (tw - s) // 2, (th - s) // 2
        img = img.crop((left, top, left + s, top + s))
    elif opt.resize_mode == "border" and (tw, th) != (s, s):
        canvas = Image.new("RGB", (s, s), (0, 0, 0))
        canvas.paste(img, ((s - tw) // 2, (s - th) // 2))
        img = canvas
    return img
