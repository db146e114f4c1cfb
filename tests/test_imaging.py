"""The safe decoder: magic-byte allowlist, codes, output-size cap, centre crop by box, the decode budget."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from helpers import Concurrency, run_threads
from PIL import Image

from curate.imaging import (
    DecodeBudget,
    ImageOptions,
    ImageRejected,
    decode_cost,
    max_output_pixels,
    process_image,
    safe_decode_rgb,
    safe_open,
    sniff_format,
)


def png(w: int, h: int, rgb: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """A valid RGB PNG of one colour, compressed row block by row block (the raw pixels are never held)."""
    comp = zlib.compressobj(9)
    row = b"\0" + bytes(rgb) * w
    block = max(1, min(h, 2**22 // len(row)))
    parts = [comp.compress(row * block) for _ in range(h // block)]
    parts += [comp.compress(row * (h % block)), comp.flush()]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
NOT_ALLOWED = {
    "eps": EPS, "dos-eps": b"\xc5\xd0\xd3\xc6" + b"\0" * 40, "ppm": b"P6\n4 4\n255\n" + b"\0" * 48,
    "pgm": b"P5\n4 4\n255\n" + b"\0" * 16, "pbm": b"P4\n8 1\n\0", "pam": b"P7\nWIDTH 1\n", "pfm": b"Pf\n1 1\n-1\n",
    "tiff": encoded("TIFF"), "ico": encoded("ICO", (16, 16)), "pdf": b"%PDF-1.4\n", "xbm": b"#define x_width 1\n",
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "heif": b"\0\0\0\x18ftypheic" + b"\0" * 16,
    "sgi": encoded("SGI"), "pcx": encoded("PCX"), "dds": b"DDS " + b"\0" * 124,
}


@pytest.mark.parametrize("name", sorted(NOT_ALLOWED))
def test_formats_outside_the_allowlist_are_format_not_allowed_everywhere(name):
    data = NOT_ALLOWED[name]
    for call in (lambda: sniff_format(data), lambda: safe_open(data), lambda: safe_decode_rgb(data),
                 lambda: process_image(data, ImageOptions())):
        with pytest.raises(ImageRejected) as ei:
            call()
        assert ei.value.code == "format_not_allowed", (name, ei.value.message)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB"),
                                      ("GIF", "P"), ("BMP", "RGB"), ("PNG", "I;16"), ("PNG", "LA")])
def test_allowed_formats_decode_to_rgb(fmt, mode):
    data = encoded(fmt, (40, 30), mode)
    assert sniff_format(data) == fmt
    im = safe_decode_rgb(data)
    assert im.mode == "RGB" and im.size == (40, 30)
    assert process_image(data, ImageOptions(image_size=20)).height == 20


@pytest.mark.parametrize("data", [b"", b"<html>gone</html>", b"\xff\xd8\xff" + b"\0" * 20, b"\x89PNG\r\n\x1a\n",
                                  b"RIFF\0\0\0\0WEBPVP8 ", b"BM" + b"\xff" * 60, b"GIF89a\xff\xff"])
def test_garbage_and_truncated_headers_are_decode_error(data):
    with pytest.raises(ImageRejected) as ei:
        safe_decode_rgb(data)
    assert ei.value.code == "decode_error"


def test_pixel_cap_before_decoding():
    data = png(7_000, 7_000)  # 49 MP, about 0.1 MB of PNG
    t0 = time.monotonic()
    with pytest.raises(ImageRejected) as ei:
        safe_decode_rgb(data, max_pixels=40_000_000)
    assert ei.value.code == "decompression_bomb" and time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("w,h", [(1, 100_000), (100_000, 1), (20, 2000)])
def test_keep_ratio_output_is_capped(w, h):
    opt = ImageOptions(image_size=256, resize_mode="keep_ratio")
    t0 = time.monotonic()
    with pytest.raises(ImageRejected) as ei:
        process_image(png(w, h), opt)
    assert ei.value.code == "bad_aspect_ratio" and "output pixels" in ei.value.message
    assert ei.value.orig_size == (w, h)
    assert time.monotonic() - t0 < 1.0  # refused from the header, not after a 1.4 GB resize


def test_output_cap_allows_up_to_16_to_1():
    opt = ImageOptions(image_size=32, resize_mode="keep_ratio")
    ok = process_image(png(16 * 40, 40), opt)
    assert (ok.width, ok.height) == (16 * 32, 32)
    assert ok.width * ok.height <= max_output_pixels(opt)
    with pytest.raises(ImageRejected):
        process_image(png(17 * 40, 40), opt)


@pytest.mark.parametrize("mode", ["center_crop", "border", "keep_ratio_largest"])
def test_square_modes_handle_extreme_aspect_within_the_output(mode):
    for w, h in ((1, 100_000), (100_000, 1)):
        out = process_image(png(w, h, (10, 200, 30)), ImageOptions(image_size=64, resize_mode=mode))
        expect = (64, 64) if mode != "keep_ratio_largest" else ((1, 64) if w == 1 else (64, 1))
        assert (out.width, out.height) == expect


def test_center_crop_keeps_the_middle():
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = process_image(buf.getvalue(), ImageOptions(image_size=50, resize_mode="center_crop", encode_format="png"))
    got = Image.open(io.BytesIO(out.data)).convert("RGB")
    assert got.size == (50, 50)
    assert got.getpixel((25, 25)) == (0, 0, 255) and got.getpixel((2, 25))[2] > 200


def test_decode_budget_bounds_bytes_in_flight():
    img = safe_open(png(1000, 1000))
    cost = decode_cost(img)
    assert cost == 1000 * 1000 * (3 + 7)
    budget = DecodeBudget(int(cost * 2.5))  # room for two at a time
    active = Concurrency()

    def one() -> None:
        with budget.reserve(cost), active.hold(0.05):
            pass

    run_threads([one] * 8)
    assert active.max == 2 and budget.peak <= budget.total and budget.used == 0
    # one image larger than the whole budget still runs, alone
    with budget.reserve(cost * 10):
        assert budget.used == budget.total


def test_process_image_reserves_from_the_budget():
    budget = DecodeBudget()
    process_image(png(400, 300), ImageOptions(image_size=32), budget)
    assert budget.peak == 400 * 300 * 10 and budget.used == 0


def test_draft_reduces_jpeg_decode_and_its_cost():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 90, 90)).save(buf, "JPEG")
    im = safe_decode_rgb(buf.getvalue(), draft=(500, 375))
    assert im.size == (500, 375)


def test_open_checked_decodes_nothing_and_reads_png_orientation():
    from curate.imaging import open_checked

    img, w, h, orientation = open_checked(png(3000, 2000), ImageOptions())
    assert img.tile, "the PNG was decoded while reading its header (Pillow's getexif does that)"
    assert (w, h, orientation) == (3000, 2000, 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (1, 2, 3)).save(buf, "PNG", exif=exif)
    img, w, h, orientation = open_checked(buf.getvalue(), ImageOptions())
    assert img.tile and orientation == 6 and (w, h) == (20, 40)
    out = process_image(buf.getvalue(), ImageOptions(image_size=10))
    assert (out.orig_width, out.orig_height, out.width, out.height) == (20, 40, 10, 20)


def test_safe_decode_reports_the_stored_size_before_draft():
    from curate.imaging import safe_decode

    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (90, 90, 90)).save(buf, "JPEG")
    d = safe_decode(buf.getvalue(), draft=(200, 150))
    assert (d.width, d.height, d.format, d.mime) == (1600, 1200, "JPEG", "image/jpeg")
    assert d.image.size == (200, 150) and d.image.mode == "RGB"
