"""The faster PNG (Wuffs) and WebP (libwebp) decoders behind the safe decoder give Pillow's sizes and colours.

They are optional packages (the `[wuffs]` and `[fast]` extras, both installed by `make setup`); a test of a
decoder is skipped where its package is absent, and tests/test_extras.py checks the Pillow fallback."""

from __future__ import annotations

import io
import struct
import zlib
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image, ImageFilter

from curate.imaging import ImageOptions, ImageRejected, decode_fast, process_image, safe_open, to_rgb

RNG = np.random.default_rng(7)
needs_wuffs = pytest.mark.skipif(find_spec("pywuffs") is None, reason="pywuffs (the [wuffs] extra) is not installed")
needs_webp = pytest.mark.skipif(find_spec("webp") is None, reason="webp (the [fast] extra) is not installed")


def noise(h: int, w: int, bands: int, dtype: type = np.uint8) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 65536
    # a gradient under the noise so that a flip or rotation changes the pixels a lot
    base = np.linspace(0, hi - 1, w, dtype=np.float64)[None, :, None] * np.ones((h, 1, bands))
    return np.clip(base + RNG.normal(0, hi / 16, (h, w, bands)), 0, hi - 1).astype(dtype)


def raw_png(arr: np.ndarray, color_type: int) -> bytes:
    """A PNG straight from an array (8 or 16 bits, any colour type without a palette), filter 0."""
    h, w = arr.shape[:2]
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    data = b"".join(b"\0" + rows[y].tobytes() for y in range(h))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    img = safe_open(data)
    img.load()
    return np.asarray(to_rgb(img), dtype=np.int16)


def fast_rgb(data: bytes, shrink_to: tuple[int, int] | None = None) -> np.ndarray:
    out = decode_fast(safe_open(data), data, shrink_to)
    assert out is not None, "the fast decoder gave up on a plain image"
    assert out.mode == "RGB"
    return np.asarray(out, dtype=np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


PNGS = {
    "rgb": lambda: saved(Image.fromarray(noise(50, 70, 3)), "PNG"),
    "rgba": lambda: saved(Image.fromarray(noise(50, 70, 4), "RGBA"), "PNG"),
    "la": lambda: saved(Image.fromarray(noise(50, 70, 4), "RGBA").convert("LA"), "PNG"),
    "grey": lambda: saved(Image.fromarray(noise(50, 70, 3)).convert("L"), "PNG"),
    "palette": lambda: saved(Image.fromarray(noise(50, 70, 3)).quantize(40), "PNG"),
    "palette-trns": lambda: saved(Image.fromarray(noise(50, 70, 3)).quantize(40), "PNG", transparency=5),
    "1bit": lambda: saved(Image.fromarray(noise(50, 70, 3)).convert("1"), "PNG"),
    "grey16": lambda: raw_png(noise(50, 70, 1, np.uint16)[..., 0], 0),
    "rgb16": lambda: raw_png(noise(50, 70, 3, np.uint16), 2),
    "rgba16": lambda: raw_png(noise(50, 70, 4, np.uint16), 6),
}


@needs_wuffs
@pytest.mark.parametrize("kind", sorted(PNGS))
def test_png_through_wuffs_has_pillows_size_and_colours(kind):
    data = PNGS[kind]()
    ref, got = pillow_rgb(data), fast_rgb(data)
    assert got.shape == ref.shape
    # transparency composited on white: Wuffs and Pillow round differently by at most one level
    assert np.abs(got - ref).max() <= 1, kind


@needs_webp
def test_webp_through_libwebp_has_pillows_size_and_colours():
    lossy = saved(Image.fromarray(noise(60, 80, 3)), "WEBP", quality=80)
    lossless = saved(Image.fromarray(noise(60, 80, 3)), "WEBP", lossless=True)
    alpha = saved(Image.fromarray(noise(60, 80, 4), "RGBA"), "WEBP", quality=80)
    for data, tol in ((lossy, 0), (lossless, 0), (alpha, 2)):
        ref, got = pillow_rgb(data), fast_rgb(data)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol


@needs_webp
def test_webp_shrinks_while_decoding_and_keeps_the_quality():
    big = Image.fromarray(noise(600, 800, 3)).filter(ImageFilter.SMOOTH)
    data = saved(big, "WEBP", quality=85)
    got = fast_rgb(data, (200, 150))
    assert got.shape == (150, 200, 3)
    ref = np.asarray(Image.fromarray(pillow_rgb(data).astype(np.uint8)).resize((200, 150), Image.Resampling.LANCZOS))
    assert psnr(got, ref) >= 35
    # with transparency it decodes at full size (libwebp would shrink colour and alpha apart)
    translucent = big.convert("RGBA")
    translucent.putalpha(Image.linear_gradient("L").resize(big.size))
    rgba = saved(translucent, "WEBP", quality=85)
    assert fast_rgb(rgba, (200, 150)).shape == (600, 800, 3)


def test_animated_webp_goes_to_pillow():
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 0, 0), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    data = buf.getvalue()
    assert decode_fast(safe_open(data), data) is None
    a = process_image(data, ImageOptions(image_size=20))
    b = process_image(data, ImageOptions(image_size=20, fast_decode=False))
    assert (a.width, a.height) == (b.width, b.height) == (27, 20)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border", "no"])
def test_process_image_exif_rotated_same_as_the_pillow_path(fmt, mode):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    data = saved(Image.fromarray(noise(120, 200, 3)), fmt, exif=exif, **({"quality": 90} if fmt == "WEBP" else {}))
    opt = ImageOptions(image_size=60, resize_mode=mode, encode_format="png")
    fast, slow = process_image(data, opt), process_image(data, ImageOptions(**{**opt.__dict__, "fast_decode": False}))
    assert (fast.orig_width, fast.orig_height) == (slow.orig_width, slow.orig_height) == (120, 200)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    a = np.asarray(Image.open(io.BytesIO(fast.data)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(slow.data)), dtype=np.int16)
    # a wrong rotation would put the gradient the other way: tens of dB lower
    assert psnr(a, b) >= 35, (fmt, mode)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_corrupt_bytes_are_decode_error_on_both_paths(fmt):
    good = saved(Image.fromarray(noise(120, 200, 3)), fmt)
    bad_crc = bytearray(good)
    bad_crc[len(good) // 2] ^= 0xFF  # inside the compressed pixels
    for data in (good[: len(good) * 2 // 3], bytes(bad_crc)):
        codes = []
        for fast in (True, False):
            try:
                process_image(data, ImageOptions(image_size=32, fast_decode=fast))
                codes.append("ok")
            except ImageRejected as e:
                codes.append(e.code)
        assert codes[0] == codes[1], (fmt, codes)
    with pytest.raises(ImageRejected) as e:
        process_image(good[: len(good) * 2 // 3], ImageOptions(image_size=32))
    assert e.value.code == "decode_error"


@pytest.mark.parametrize("size", [(801, 601), (4000, 2250), (300, 200), (257, 2000)])
def test_shrink_gives_the_size_and_pillows_colours(size):
    from curate.imaging import shrink

    img = Image.fromarray(noise(size[1], size[0], 3)).filter(ImageFilter.GaussianBlur(2))
    tw, th = max(1, size[0] * 256 // max(size)), max(1, size[1] * 256 // max(size))
    out = shrink(img, tw, th)
    assert out.mode == "RGB" and out.size == (tw, th)
    ref = img.resize((tw, th), Image.Resampling.LANCZOS)
    assert psnr(np.asarray(out), np.asarray(ref)) >= 35


@needs_wuffs
def test_the_budget_covers_the_fast_decoders():
    from curate.imaging import DecodeBudget, decode_cost, fast_decode_cost

    rgb16 = PNGS["rgb16"]()
    img = safe_open(rgb16)
    # Wuffs holds the 6-byte stored pixels, its RGB output and Pillow's copy: more than Pillow's decode
    assert fast_decode_cost(img, rgb16) == 70 * 50 * (6 + 3 + 4) > decode_cost(img)
    budget = DecodeBudget()
    process_image(rgb16, ImageOptions(image_size=32), budget)
    assert budget.peak == fast_decode_cost(img, rgb16) and budget.used == 0
    rgb8 = PNGS["rgb"]()
    assert fast_decode_cost(safe_open(rgb8), rgb8) == 70 * 50 * 10 == decode_cost(safe_open(rgb8))
