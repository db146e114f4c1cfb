"""Property tests: the URL classifier and header parsing never raise on arbitrary input, and a bounded fuzz
run of the safe decoder on mutated image bytes under an address-space limit (both a few seconds)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.fetch import (
    Fetcher,
    FetchFailed,
    FetchPolicy,
    _retry_after,
    content_length,
    is_public_address,
    optout_directive,
    parse_endpoint,
    redirect_target,
)
from curate.io.ledger import ERROR_CODES

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
latin1 = st.text(alphabet=st.characters(max_codepoint=255))  # what header values decode to
url_parts = st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "//", "http:", "", "data:", "file:///"])
hosts = st.one_of(st.text(max_size=30), st.sampled_from(
    ["example.com", "[::1]", "[", "]", "127.1", "0x7f.1", "xn--", "ex%41mple.com", "a@b", "h:99999", "h:-1",
     "[::ffff:127.0.0.1]:80", "exa mple.com", "münchen.de", "\u0130.com", "a..b", "." * 70]))
urls = st.one_of(st.text(), st.builds(lambda a, b, c: a + b + c, url_parts, hosts, st.text(max_size=30)))
F = Fetcher(FetchPolicy())


@FAST
@given(urls)
def test_url_classifier_only_raises_its_own_error(url):
    try:
        t = F._parse(url)
    except FetchFailed as e:
        assert e.code in ERROR_CODES
        return
    assert t.scheme in ("http", "https") and t.host and 0 <= t.port <= 65535
    # what goes on the request line is printable ASCII, so no header injection and no encoder error
    assert t.path.isascii() and all(0x20 < ord(c) < 0x7F for c in t.path), t.path


@FAST
@given(st.sampled_from(["http://a.example/x/y.jpg", "https://b.example:8443/"]), st.one_of(latin1, urls))
def test_redirect_location_only_raises_its_own_error(base, location):
    try:
        nxt = redirect_target(base, location)
    except FetchFailed as e:
        assert e.code == "invalid_url"
        return
    try:
        F._parse(nxt)
    except FetchFailed as e:
        assert e.code in ERROR_CODES


@FAST
@given(st.lists(latin1, max_size=4), st.text(min_size=1, max_size=20))
def test_optout_parsing_never_raises(values, token):
    hit = optout_directive(values, token)
    assert hit is None or isinstance(hit, str)


@FAST
@given(st.one_of(st.none(), latin1, st.from_regex(r"\s*\d{1,40}\s*", fullmatch=True),
                 st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Mon, 01 Jan 0000 00:00:00 GMT",
                                  "Fri, 31 Dec 9999 23:59:59 GMT", "Tue, 99 Foo 2020 99:99:99 +9999"])))
def test_header_numbers_never_raise(value):
    ra = _retry_after(value)
    assert ra is None or ra >= 0
    cl = content_length(value)
    assert cl is None or cl >= 0


@FAST
@given(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                 st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_address_guard_never_raises(ip):
    assert is_public_address(ip) in (True, False)


@FAST
@given(st.text(max_size=40))
def test_endpoint_parsing_raises_only_value_error(spec):
    try:
        host, port = parse_endpoint(spec)
    except ValueError:
        return
    assert isinstance(host, str) and (port is None or port >= 0)


FUZZ = """
import io, random, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
from PIL import Image
from curate.imaging import ImageOptions, ImageRejected, process_image, safe_decode_rgb

rng = random.Random(12)
seeds = []
for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB")):
    buf = io.BytesIO()
    im = Image.linear_gradient("L").resize((48, 40)).convert(mode)
    im.save(buf, fmt)
    seeds.append(buf.getvalue())

def mutate(data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(b)) if b else 0
        if op < 0.5 and b:
            b[pos] = rng.randrange(256)
        elif op < 0.7:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op < 0.85:
            del b[pos:pos + rng.randint(1, 64)]
        else:
            # big numbers in header fields are the interesting mutations for dimensions
            b[pos:pos + 4] = rng.choice([b"\\xff\\xff\\xff\\xff", b"\\x7f\\xff\\xff\\xff", b"\\x00\\x00\\x00\\x00"])
    return bytes(b)

codes = {}
t0 = time.monotonic()
n = 0
while n < __N__ and time.monotonic() - t0 < __BUDGET_S__:
    data = mutate(rng.choice(seeds))
    for call in (lambda: safe_decode_rgb(data, max_pixels=4_000_000),
                 lambda: process_image(data, ImageOptions(image_size=32, max_pixels=4_000_000))):
        try:
            call()
            codes["ok"] = codes.get("ok", 0) + 1
        except ImageRejected as e:
            codes[e.code] = codes.get(e.code, 0) + 1
    n += 1
print(n, sorted(codes.items()))
"""


def test_fuzz_safe_decoder_under_an_address_space_limit():
    code = (textwrap.dedent(FUZZ).replace("__LIMIT__", str(1536 * 2**20)).replace("__BUDGET_S__", "5")
            .replace("__N__", "3000"))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    # any exception other than ImageRejected (or a crash, or MemoryError escaping) fails the run
    assert r.returncode == 0, r.stderr[-3000:]
    n = int(r.stdout.split()[0])
    assert n >= 100, r.stdout
    assert "decode_error" in r.stdout and "ok" in r.stdout  # the mutations did reach both outcomes
