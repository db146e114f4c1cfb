"""Every fallback path is taken and counted: a fast PNG/WebP decoder that raises hands the row to Pillow
(success for good bytes, decode_error for bad ones, never internal_error), and an image dedup cannot hash
is counted in its stats and the manifest."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, jpeg_bytes, make_dataset
from loopback import LoopServer
from PIL import Image
from test_dedup import D, plant_scores, unit

from curate import imaging
from curate.cli import main
from curate.imaging import ImageOptions, ImageRejected, process_image
from curate.io import manifest
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables


def _encoded(fmt: str, size: tuple[int, int] = (120, 90)) -> bytes:
    buf = io.BytesIO()
    color_image(7, size).save(buf, format=fmt)
    return buf.getvalue()


def _break_fast_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the third-party decoders raise on any input. No real PNG or WebP we could find makes pywuffs or
    libwebp raise (rather than return an error status, which decode_fast already handles): 33,000 mutated
    files (bit flips, truncations, CRC-fixed IHDR/IDAT edits) all decoded or returned an error. So the two
    library calls themselves are replaced; everything around them is the product's code."""
    from pywuffs.aux import ImageDecoder

    def wuffs_raises(self, data):  # noqa: ANN001, ANN202
        raise RuntimeError("wuffs: internal error")

    monkeypatch.setattr(ImageDecoder, "decode", wuffs_raises)

    class _Lib:  # the webp package's cffi `lib`, whose first call raises as a broken libwebp binding would
        def __getattr__(self, name: str):  # noqa: ANN204
            raise OSError(f"libwebp: symbol {name} not found")

    from webp import ffi

    monkeypatch.setattr(imaging, "_WEBP_LIB", (ffi, _Lib()))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_fast_decoder_raising_falls_back_to_pillow(fmt, monkeypatch):
    data = _encoded(fmt)
    opt = ImageOptions(image_size=48)
    want = process_image(data, ImageOptions(image_size=48, fast_decode=False))
    _break_fast_decoders(monkeypatch)
    before = imaging.FAST_DECODER_ERRORS.copy()
    got = process_image(data, opt)
    assert (got.width, got.height) == (want.width, want.height)
    assert got.data == want.data  # Pillow's pixels, encoded the same way
    assert sum((imaging.FAST_DECODER_ERRORS - before).values()) == 1
    # bad bytes: the fast decoder raises, Pillow rejects them with the ordinary code
    with pytest.raises(ImageRejected) as ei:
        process_image(data[: len(data) * 2 // 3], opt)
    assert ei.value.code == "decode_error"


def test_download_counts_fast_decoder_fallbacks(tmp_path, monkeypatch):
    _break_fast_decoders(monkeypatch)
    server = LoopServer()
    try:
        png, webp = _encoded("PNG"), _encoded("WEBP")
        urls = [server.image("/a.png", png, ctype="image/png"), server.image("/b.webp", webp, ctype="image/webp"),
                server.image("/c.png", png[: len(png) // 2], ctype="image/png")]
        inp = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": ["a", "b", "c"]}), inp)
        out = tmp_path / "ds"
        assert main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--caption-col", "TEXT",
                     "--allow-host", server.endpoint, "--image-size", "48", "--timeout", "2", "--deadline", "4",
                     "--no-progress", "--workers", "1"]) == 0  # in this process, where the decoders are broken
    finally:
        server.close()
    ds = DatasetDir.at(out)
    led = read_tables(ds.ledger_files()).to_pylist()
    assert [(r["status"], r["error_code"]) for r in led] == [("success", None), ("success", None),
                                                              ("decode_error", "decode_error")]
    stats = read_json(ds.stats("download", "00000000"))
    # the cut PNG fails its chunk check before Wuffs is called: Pillow alone rejects it
    assert stats["fast_decoder_errors"] == {"OSError": 1, "RuntimeError": 1}


def test_phash_failure_is_counted(tmp_path):
    """A real undecodable image in a scored shard (adopted shards keep bytes nobody re-encoded): no hash,
    counted per shard and in the manifest."""
    good = [color_image(i, (64, 64)) for i in range(5)]
    cut = jpeg_bytes(color_image(9, (64, 64)))
    cut = cut[: len(cut) // 3]
    with pytest.raises(Exception):  # noqa: B017, PT011 - the bytes really are undecodable
        Image.open(io.BytesIO(cut)).load()
    ds = make_dataset(tmp_path / "ds", [(im, "c", "success") for im in good] + [(cut, "c", "success")],
                      shard_size=3)
    plant_scores(ds, unit(np.random.default_rng(0).standard_normal((6, D))), shard_size=3)
    assert main(["dedup", str(ds.root), "--phash", "--device", "cpu", "--no-progress"]) == 0
    st = read_json(ds.stats("dedup", "phash.00000001"))
    assert st["hashed"] == 2 and st["phash_failed"] == 1 and st["phash_failed_by"] == {"decode_error": 1}
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    assert counts["phash_hashed"] == 5 and counts["phash_failed"] == 1
