"""The demo web over real loopback HTTP: every route as documented, the lists deterministic per seed."""

from __future__ import annotations

import http.client
import io
import socket
import struct
import time
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.cli import main
from curate.demo.corpus import load_split
from curate.demo.web import DRIP_LENGTH, DUP_KINDS, FAULT_ROUTES, MALFORMED, DemoWeb, WebConfig
from curate.errors import InputError
from curate.io.ledger import ERROR_CODES

# enough rows that every fault route and duplicate kind turns up at least twice
CFG = WebConfig(seed=0, n=400, fault_rate=0.5, dup_rate=0.3, drip_interval=0.2)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    with DemoWeb(CFG, tmp_path_factory.mktemp("web")) as w:
        yield w


@pytest.fixture(scope="module")
def truth(web) -> list[dict]:
    return pq.read_table(web.ground_truth).to_pylist()


def rows_of(truth: list[dict], fault: str) -> list[dict]:
    return [r for r in truth if r["fault"] == fault]


def get(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request(method, u.path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def image_of(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


def pool_image(image_id: str) -> bytes:
    t = load_split("pool", columns=["image_id", "image"])
    return t["image"][t["image_id"].to_pylist().index(image_id)].as_py()


def test_lists_have_the_documented_columns(web, truth):
    urls = pq.read_table(web.url_list)
    assert urls.column_names == ["URL", "TEXT", "SAMPLE_ID"]
    assert urls.num_rows == len(truth)
    assert len({r["SAMPLE_ID"] for r in truth}) == len(truth)
    assert web.allow_hosts == [f"127.0.0.1:{urlsplit(web.base_url).port}"]
    for r in truth:
        assert r["expected_error_code"] is None or r["expected_error_code"] in ERROR_CODES
        assert r["caption_kind"] in (None, "clean", "misaligned", "boilerplate", "non_english")
    assert {r["fault"] for r in truth} >= set(FAULT_ROUTES)
    assert {r["dup_kind"] for r in truth} >= set(DUP_KINDS)


def test_plain_image_route(web, truth):
    r = next(r for r in truth if r["fault"] is None and r["dup_of"] is None and r["URL"])
    resp, body = get(r["URL"])
    assert resp.status == 200 and resp.getheader("Content-Type") == "image/jpeg"
    assert body == pool_image(r["image_id"])
    assert get(f"{web.base_url}/i/9999999.jpg")[0].status == 404


@pytest.mark.parametrize("route,status", [("404", 404), ("410", 410), ("500", 500)])
def test_error_status_routes(truth, route, status):
    for r in rows_of(truth, route)[:2]:
        assert get(r["URL"])[0].status == status
        assert get(r["URL"])[0].status == status  # not only the first time


@pytest.mark.parametrize("route,status,retry_after", [("503_then_200", 503, None), ("429_retry_after", 429, "1")])
def test_fail_once_then_succeed(truth, route, status, retry_after):
    r = rows_of(truth, route)[0]
    assert r["expected_error_code"] is None
    first, _ = get(r["URL"])
    assert first.status == status and first.getheader("Retry-After") == retry_after
    second, body = get(r["URL"])
    assert second.status == 200 and image_of(body).format == "JPEG"


def test_slow_sends_nothing_before_a_sane_timeout(truth):
    r = rows_of(truth, "slow")[0]
    assert r["expected_error_code"] == "timeout"
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        get(r["URL"], timeout=0.5)
    assert time.monotonic() - t0 < 3


def test_drip_sends_headers_then_a_byte_per_interval(truth):
    r = rows_of(truth, "drip")[0]
    assert r["expected_error_code"] == "deadline_exceeded"
    u = urlsplit(r["URL"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", u.path)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == DRIP_LENGTH
    t0 = time.monotonic()
    got = resp.read(4)
    elapsed = time.monotonic() - t0
    conn.close()
    assert len(got) == 4
    assert elapsed >= 3 * CFG.drip_interval * 0.8  # 4 bytes took about 3 intervals: it drips


def test_truncated_html_and_empty_bodies(truth):
    r = rows_of(truth, "truncated")[0]
    resp, body = get(r["URL"])
    full = pool_image(r["image_id"])
    assert resp.status == 200 and 0 < len(body) < len(full) and full.startswith(body)
    with pytest.raises(OSError):
        image_of(body)
    resp, body = get(rows_of(truth, "html")[0]["URL"])
    assert resp.getheader("Content-Type") == "image/jpeg" and body.lower().startswith(b"<!doctype html")
    resp, body = get(rows_of(truth, "empty")[0]["URL"])
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == "0"
    assert {r["expected_error_code"] for f in ("truncated", "html") for r in rows_of(truth, f)} == {"decode_error"}


def test_redirect_chain_is_three_hops(web, truth):
    r = rows_of(truth, "redirect_chain")[0]
    url, hops = r["URL"], 0
    while True:
        resp, body = get(url)
        if resp.status != 302:
            break
        url = web.base_url + resp.getheader("Location")
        hops += 1
    assert hops == 3 and resp.status == 200
    assert body == pool_image(r["image_id"])


def test_redirect_loop_never_ends(web, truth):
    r = rows_of(truth, "redirect_loop")[0]
    url, seen = r["URL"], []
    for _ in range(6):
        resp, _ = get(url)
        assert resp.status == 302
        url = web.base_url + resp.getheader("Location")
        seen.append(url)
    assert len(set(seen)) == 2 and r["URL"] in seen


def test_redirect_to_canary_leaves_the_allowed_host(web, truth):
    r = rows_of(truth, "redirect_canary")[0]
    assert r["expected_error_code"] == "blocked_address"
    resp, _ = get(r["URL"])
    target = urlsplit(resp.getheader("Location"))
    assert resp.status == 302 and target.hostname == "127.0.0.2"
    assert f"{target.hostname}:{target.port}" not in web.allow_hosts
    before = web.canary_hits
    assert get(resp.getheader("Location"))[0].status == 200
    get(resp.getheader("Location"))
    assert web.canary_hits == before + 2


def test_noai_bomb_too_large_and_tiff(truth):
    resp, body = get(rows_of(truth, "noai")[0]["URL"])
    assert resp.getheader("X-Robots-Tag") == "noai" and image_of(body).format == "JPEG"

    resp, body = get(rows_of(truth, "bomb")[0]["URL"])
    assert resp.getheader("Content-Type") == "image/png" and len(body) < 500_000
    assert body[12:16] == b"IHDR" and struct.unpack(">II", body[16:24]) == (30000, 30000)
    with pytest.raises(Image.DecompressionBombError):  # Pillow refuses it from the header alone
        Image.open(io.BytesIO(body))

    r = rows_of(truth, "too_large")[0]
    u = urlsplit(r["URL"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", u.path)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "3000000000"
    with pytest.raises(http.client.IncompleteRead):  # the server closes without a body
        resp.read()
    conn.close()

    resp, body = get(rows_of(truth, "tiff")[0]["URL"])
    assert resp.getheader("Content-Type") == "image/tiff" and image_of(body).format == "TIFF"


def test_duplicates_are_derived_from_an_earlier_success(truth):
    by_id = {r["SAMPLE_ID"]: r for r in truth}
    dups = [r for r in truth if r["dup_of"]]
    assert dups
    for r in dups:
        orig = by_id[r["dup_of"]]
        assert orig["SAMPLE_ID"] < r["SAMPLE_ID"] and orig["image_id"] == r["image_id"]
        assert orig["expected_error_code"] is None and r["expected_error_code"] is None and orig["fault"] is None
    for kind in DUP_KINDS:
        r = next(r for r in dups if r["dup_kind"] == kind)
        a, b = get(by_id[r["dup_of"]]["URL"])[1], get(r["URL"])[1]
        ia, ib = image_of(a), image_of(b)
        if kind == "exact":
            assert a == b
        elif kind == "reencode":
            assert a != b and ia.size == ib.size
        elif kind == "resize":
            assert ib.size == (round(ia.width * 0.75), round(ia.height * 0.75))
        else:
            assert ib.width == ia.width - 2 * round(ia.width * 0.08)


def test_caption_noise(truth):
    pool = load_split("pool", columns=["image_id", "title", "caption", "lang_hint", "category"]).to_pylist()
    by_image = {r["image_id"]: r for r in pool}
    kinds = {r["caption_kind"] for r in truth}
    assert {"clean", "misaligned", "boilerplate", "non_english"} <= kinds
    for r in truth:
        if r["image_id"] is None or r["dup_of"] or r["fault"] == "repeated_url":
            continue
        src = by_image[r["image_id"]]
        assert r["clean_caption"] == src["caption"]
        if r["caption_kind"] == "clean":
            assert r["TEXT"] == src["caption"]
        elif r["caption_kind"] == "non_english":
            assert r["TEXT"] == src["title"] and src["lang_hint"] != "en"
        elif r["caption_kind"] == "misaligned":
            served = {t["image_id"] for t in truth}
            other = [p for p in pool if p["caption"] == r["TEXT"] and p["image_id"] in served]
            assert other and all(p["category"] != src["category"] for p in other if p["image_id"] != r["image_id"])
        else:
            assert r["TEXT"] != src["caption"] and len(r["TEXT"]) < 20


def test_malformed_and_repeated_rows(truth):
    malformed = rows_of(truth, "malformed_url")
    assert [(r["URL"], r["expected_error_code"]) for r in sorted(malformed, key=lambda r: r["URL"] or "")] == \
        sorted(MALFORMED, key=lambda m: m[0] or "")
    (rep,) = rows_of(truth, "repeated_url")
    firsts = [r for r in truth if r["URL"] == rep["URL"] and r is not rep]
    assert rep["expected_error_code"] == "duplicate_url" and firsts and firsts[0]["SAMPLE_ID"] < rep["SAMPLE_ID"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lists_are_byte_deterministic_per_seed(tmp_path):
    port = free_port()
    out = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        with DemoWeb(WebConfig(seed=seed, n=120, port=port), tmp_path / name) as w:
            out[name] = (w.url_list.read_bytes(), w.ground_truth.read_bytes())
    assert out["a"] == out["b"]
    assert out["a"][0] != out["c"][0] and out["a"][1] != out["c"][1]


def test_default_mix_is_realistic(tmp_path):
    with DemoWeb(WebConfig(seed=0), tmp_path) as w:
        truth = pq.read_table(w.ground_truth).to_pylist()
    images = [r for r in truth if r["image_id"] and r["fault"] != "repeated_url"]
    originals = [r for r in images if not r["dup_of"]]
    share = lambda rows, pred: sum(map(pred, rows)) / len(rows)  # noqa: E731
    assert 0.06 < share(originals, lambda r: r["fault"] is not None) < 0.10
    assert 0.06 < share(images, lambda r: r["dup_of"] is not None) < 0.12
    assert 0.07 < share(originals, lambda r: r["caption_kind"] == "misaligned") < 0.12
    assert 0.03 < share(originals, lambda r: r["caption_kind"] == "boilerplate") < 0.07
    assert share(originals, lambda r: r["caption_kind"] == "non_english") > 0.01
    # one original per distinct image: byte-identical clip art filed under several folders is served once
    import hashlib
    distinct = {hashlib.sha256(b).hexdigest() for b in load_split("pool", columns=["image"]).column("image").to_pylist()}
    assert len(originals) == len(distinct) < load_split("pool", columns=["image_id"]).num_rows


def test_bad_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="fault_rate"):
        DemoWeb(WebConfig(fault_rate=1.5), tmp_path)
    with pytest.raises(InputError, match="nope"):
        DemoWeb(WebConfig(faults=("nope",)), tmp_path)


def test_stop_does_not_wait_for_slow_handlers(tmp_path):
    with DemoWeb(WebConfig(seed=0, n=300, fault_rate=1.0, faults=("slow",)), tmp_path) as w:
        url = pq.read_table(w.url_list)["URL"][0].as_py()
        with pytest.raises((socket.timeout, TimeoutError)):
            get(url, timeout=0.3)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3


def test_cli_serve_help_is_registered(capsys):
    assert main(["demo", "serve", "--help"]) == 0
    assert "--seed" in capsys.readouterr().out



def test_english_titles_are_never_served_as_non_english_captions():
    """The corpus marks titles by their uploader's language; "Various Cliparts" is English text all the same,
    so the audited web (the default) never serves an ENGLISH_TITLES title as a non-English caption."""
    from curate.demo.web import ENGLISH_TITLES, plan_rows

    def non_english(audited: bool) -> list[str]:
        rows = plan_rows(WebConfig(seed=0, audited_titles=audited), "http://127.0.0.1:1")
        return [r.text for r in rows if r.caption_kind == "non_english" and r.dup_kind is None]  # originals

    before, audited = non_english(False), non_english(True)
    assert any(t.startswith(ENGLISH_TITLES) for t in before)  # the audit has something to do on this web
    assert audited and not any(t.startswith(ENGLISH_TITLES) for t in audited)
    assert len(audited) == len(before)  # the same share of non-English captions, from other real titles
