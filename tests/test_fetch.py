"""The fetcher against a loopback server: address guard, redirects, byte cap, deadline, retries, opt-out."""

from __future__ import annotations

import functools
import gzip
import ipaddress
import time
from typing import Any

import pytest
from helpers import Concurrency, run_threads
from loopback import LoopServer, jpeg

from curate.fetch import Fetcher, FetchFailed, FetchPolicy, HostLimiter, is_public_address, optout_directive


def fetcher(server: LoopServer, **kw: Any) -> Fetcher:
    kw.setdefault("allow_hosts", (server.endpoint,))
    kw.setdefault("timeout", 2.0)
    kw.setdefault("deadline", 5.0)
    kw.setdefault("backoff", 0.05)
    return Fetcher(FetchPolicy(**kw))


def fail(f: Fetcher, url: str) -> FetchFailed:
    with pytest.raises(FetchFailed) as ei:
        f.fetch(url)
    return ei.value


def test_success_sends_curate_user_agent(server):
    seen = {}

    def route(h, n):
        seen["ua"] = h.headers.get("User-Agent")
        seen["host"] = h.headers.get("Host")
        h.send(200, jpeg())

    server.routes["/a.jpg"] = route
    got = fetcher(server).fetch(server.url("/a.jpg"))
    assert got.body == jpeg() and got.http_status == 200 and got.attempts == 1
    assert "curate/" in seen["ua"] and "token=curatebot" in seen["ua"]
    assert seen["host"] == server.endpoint


@pytest.mark.parametrize("ip,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False),
    ("fc00::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False), ("2002:0a00:1::", False), ("64:ff9b::7f00:1", False), ("ff02::1", False),
])
def test_public_address_rules(ip, public):
    assert is_public_address(ipaddress.ip_address(ip)) is public


def test_loopback_blocked_without_allow_host(server):
    server.image("/a.jpg")
    e = fail(Fetcher(FetchPolicy(timeout=1, deadline=2)), server.url("/a.jpg"))
    assert e.code == "blocked_address"
    assert server.hits["/a.jpg"] == 0


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "127.1", "0x7f.1", "0x7f000001", "127.0.0.2",
                                  "localhost", "[::ffff:127.0.0.1]"])
def test_numeric_and_other_loopback_forms_blocked(server, host):
    server.image("/a.jpg")
    e = fail(fetcher(server), f"http://{host}:{server.port}/a.jpg")
    assert e.code in ("blocked_address", "dns_error"), e.message
    assert server.hits["/a.jpg"] == 0


def test_allow_host_is_exact_endpoint(server):
    server.image("/a.jpg")
    other_port = fetcher(server, allow_hosts=(f"127.0.0.1:{server.port + 1}",))
    assert fail(other_port, server.url("/a.jpg")).code == "blocked_address"
    any_port = fetcher(server, allow_hosts=("127.0.0.1",))
    assert any_port.fetch(server.url("/a.jpg")).http_status == 200


def test_redirect_into_other_private_address_blocked(server, canary):
    server.routes["/r"] = lambda h, n: h.send(302, b"", "text/plain", {"Location": canary.url("/secret")})
    server.routes["/r-numeric"] = lambda h, n: h.send(
        302, b"", "text/plain", {"Location": f"http://2130706434:{canary.port}/secret"})
    f = fetcher(server)
    assert fail(f, server.url("/r")).code == "blocked_address"
    assert fail(f, server.url("/r-numeric")).code == "blocked_address"
    assert canary.hits["/secret"] == 0


def test_redirect_chain_loop_and_limit(server):
    server.image("/end.jpg")
    server.routes["/c0"] = lambda h, n: h.send(301, b"", "text/plain", {"Location": "/c1"})
    server.routes["/c1"] = lambda h, n: h.send(307, b"", "text/plain", {"Location": server.url("/end.jpg")})
    server.routes["/loop"] = lambda h, n: h.send(302, b"", "text/plain", {"Location": "/loop2"})
    server.routes["/loop2"] = lambda h, n: h.send(302, b"", "text/plain", {"Location": "/loop"})
    f = fetcher(server, max_redirects=2)
    got = f.fetch(server.url("/c0"))
    assert got.final_url == server.url("/end.jpg")
    assert fail(f, server.url("/loop")).code == "too_many_redirects"
    assert fail(fetcher(server, max_redirects=1), server.url("/c0")).code == "too_many_redirects"
    server.routes["/to-file"] = lambda h, n: h.send(302, b"", "text/plain", {"Location": "file:///etc/passwd"})
    assert fail(f, server.url("/to-file")).code == "blocked_scheme"


@pytest.mark.parametrize("url,code", [
    ("file:///etc/passwd", "blocked_scheme"), ("ftp://example.com/a.jpg", "blocked_scheme"),
    ("data:image/png;base64,AAAA", "blocked_scheme"), ("not a url", "invalid_url"), ("", "invalid_url"),
    ("http://", "invalid_url"), ("http://exa mple.com/x", "invalid_url"), ("http://h:99999/x", "invalid_url"),
])
def test_bad_urls(url, code):
    assert fail(Fetcher(FetchPolicy()), url).code == code


def test_deny_domain_blocks_subdomains(server):
    f = Fetcher(FetchPolicy(deny_domains=("example.com",)))
    assert fail(f, "http://img.cdn.example.com/a.jpg").code == "disallowed_domain"
    assert fail(f, "http://example.com/a.jpg").code == "disallowed_domain"


def test_huge_content_length_refused_without_reading(server):
    def huge(h, n):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(3_000_000_000))
        h.end_headers()
        block = b"\0" * 65536
        try:
            while not server.stop.is_set() and server.sent["/huge"] < 200 * 2**20:
                h.wfile.write(block)
                server.sent["/huge"] += len(block)
        except OSError:
            pass

    server.routes["/huge"] = huge
    t0 = time.monotonic()
    e = fail(fetcher(server, max_bytes=10 * 2**20), server.url("/huge"))
    assert e.code == "too_large" and "Content-Length" in e.message
    assert time.monotonic() - t0 < 2
    time.sleep(0.3)
    # what the server got out before the close is what fits in the socket buffers, not the body
    assert server.sent["/huge"] < 16 * 2**20


def test_body_cap_counts_decoded_bytes(server):
    big = gzip.compress(b"\0" * (5 * 2**20))  # ~5 KB on the wire, 5 MB decoded
    server.routes["/gz"] = lambda h, n: h.send(200, big, "image/jpeg", {"Content-Encoding": "gzip"})

    def chunked(h, n):  # no Content-Length: the cap is enforced while reading
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(40):
            h.wfile.write(b"10000\r\n" + b"\1" * 65536 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    server.routes["/chunked"] = chunked
    f = fetcher(server, max_bytes=2**20)
    e = fail(f, server.url("/gz"))
    assert e.code == "too_large" and "decoded" in e.message
    assert fail(f, server.url("/chunked")).code == "too_large"


def test_drip_is_stopped_by_the_deadline(server):
    def drip(h, n):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        try:
            while not server.stop.wait(0.1):
                h.wfile.write(b"x")
                h.wfile.flush()
        except OSError:
            pass

    server.routes["/drip"] = drip
    t0 = time.monotonic()
    e = fail(fetcher(server, timeout=1.0, deadline=1.5), server.url("/drip"))
    took = time.monotonic() - t0
    assert e.code == "deadline_exceeded"
    assert took < 2.5
    assert server.hits["/drip"] == 1  # a deadline is not retried


def test_slow_headers_time_out(server):
    server.routes["/slow"] = lambda h, n: (server.stop.wait(10), h.send(200, jpeg()))
    e = fail(fetcher(server, timeout=0.5, deadline=1.2, retries=0), server.url("/slow"))
    assert e.code == "timeout"


def test_503_then_200_is_retried_and_404_is_not(server):
    server.routes["/flaky"] = lambda h, n: h.send(503, b"busy", "text/plain") if n == 1 else h.send(200, jpeg())
    f = fetcher(server)
    got = f.fetch(server.url("/flaky"))
    assert got.attempts == 2 and server.hits["/flaky"] == 2
    e = fail(f, server.url("/missing"))
    assert e.code == "http_4xx" and e.http_status == 404 and e.attempts == 1
    assert server.hits["/missing"] == 1


def test_500_gives_up_after_retries_and_retry_after_past_deadline_fails_fast(server):
    server.routes["/down"] = lambda h, n: h.send(500, b"down", "text/plain")
    server.routes["/later"] = lambda h, n: h.send(429, b"later", "text/plain", {"Retry-After": "60"})
    f = fetcher(server, retries=2)
    e = fail(f, server.url("/down"))
    assert e.code == "http_5xx" and e.attempts == 3 and server.hits["/down"] == 3
    t0 = time.monotonic()
    e = fail(f, server.url("/later"))
    assert e.code == "http_5xx" and e.http_status == 429 and server.hits["/later"] == 1
    assert time.monotonic() - t0 < 1


def test_retry_after_is_honoured(server):
    server.routes["/429"] = lambda h, n: (h.send(429, b"", "text/plain", {"Retry-After": "1"}) if n == 1
                                          else h.send(200, jpeg()))
    t0 = time.monotonic()
    got = fetcher(server, deadline=5).fetch(server.url("/429"))
    assert got.attempts == 2 and time.monotonic() - t0 >= 0.95


def test_noai_header_read_before_body(server):
    server.image("/noai.jpg", headers={"X-Robots-Tag": "noai"})
    server.image("/scoped.jpg", headers={"X-Robots-Tag": "curatebot: noimageai"})
    server.image("/other-bot.jpg", headers={"X-Robots-Tag": "otherbot: noai"})
    f = fetcher(server)
    assert fail(f, server.url("/noai.jpg")).code == "opted_out"
    assert fail(f, server.url("/scoped.jpg")).code == "opted_out"
    assert f.fetch(server.url("/other-bot.jpg")).http_status == 200
    assert fetcher(server, respect_optout=False).fetch(server.url("/noai.jpg")).http_status == 200


@pytest.mark.parametrize("values,hit", [
    (["noai"], True), (["noindex, NoImageAI"], True), (["curatebot: noai"], True), (["curate: noai"], True),
    (["googlebot: noai"], False), (["noindex"], False), (["max-snippet: 20, noai"], True), ([], False),
])
def test_optout_directive_parsing(values, hit):
    assert (optout_directive(values, "curatebot") is not None) is hit


def test_robots_txt_read_once_per_host(server):
    server.routes["/robots.txt"] = lambda h, n: h.send(
        200, b"User-agent: curatebot\nDisallow: /private/\n", "text/plain")
    server.image("/private/a.jpg")
    server.image("/public/a.jpg")
    f = fetcher(server, respect_robots=True)
    assert fail(f, server.url("/private/a.jpg")).code == "opted_out"
    assert f.fetch(server.url("/public/a.jpg")).http_status == 200
    assert server.hits["/private/a.jpg"] == 0 and server.hits["/robots.txt"] == 1


def test_per_host_limit(server):
    active = Concurrency()

    def route(h, n):
        with active.hold(0.1):
            pass
        h.send(200, jpeg())

    for i in range(12):
        server.routes[f"/p{i}"] = route
    f = fetcher(server, per_host=2)
    run_threads([functools.partial(f.fetch, server.url(f"/p{i}")) for i in range(12)])
    assert active.max == 2


def test_dns_answers_cached_for_their_ttl_one_lookup_per_name_names_in_parallel(server):
    calls: list[str] = []
    lookups = Concurrency()

    def resolver(host: str, port: int):
        calls.append(host)
        with lookups.hold(0.5):  # a slow resolver
            pass
        return ["127.0.0.1"], (0.0 if host.startswith("short") else 300.0)

    server.image("/a.jpg")
    f = Fetcher(FetchPolicy(allow_private=True, timeout=2.0, deadline=5.0, per_host=16), resolver=resolver)
    names = [f"cdn{k}.test" for k in range(4)]
    run_threads([functools.partial(f.fetch, f"http://{names[i % 4]}:{server.port}/a.jpg") for i in range(24)])
    # 24 fetches of 4 names: one lookup per name, the four at once (not one after another)
    assert sorted(calls) == names and lookups.max == 4
    f.fetch(f"http://{names[0]}:{server.port}/a.jpg")
    assert len(calls) == 4  # still cached
    f.fetch(f"http://short.test:{server.port}/a.jpg")
    f.fetch(f"http://short.test:{server.port}/a.jpg")
    assert calls.count("short.test") == 2  # a TTL of 0: asked again


def test_a_429_pauses_its_host_for_the_retry_after_and_halves_its_share(server):
    arrivals: list[float] = []

    def route(h, n):
        arrivals.append(time.monotonic())
        if n == 1:
            h.send(429, b"", "text/plain", {"Retry-After": "1"})
        else:
            h.send(200, jpeg())

    for i in range(3):
        server.routes[f"/r{i}"] = route
    f = fetcher(server, per_host=8)
    first = f.fetch(server.url("/r0"))  # 429, waits the Retry-After, then 200
    assert first.attempts == 2 and arrivals[1] - arrivals[0] >= 0.95
    assert f.limiter.limit(server.host) == 2  # 4 at the start, halved once
    arrivals.clear()
    t0 = time.monotonic()
    f.limiter.throttled(server.host, 1.0)  # as another row's 429 would
    f.limiter.throttled(server.host, 1.0)  # ... and a third in the same burst: halved once, not twice
    assert f.limiter.limit(server.host) == 1 and f.limiter.paused_for(server.host) > 0.9
    run_threads([functools.partial(f.fetch, server.url(f"/r{i}")) for i in range(1, 3)])
    assert min(arrivals) - t0 >= 0.95  # nobody asked the host during the pause


def test_a_host_that_limits_its_rate_gets_its_requests_spaced():
    """Two 429s take a host from 4 requests at once to 1; a third one, at one request at a time, says the
    host limits its rate: its requests are spaced to 0.9 of the rate it answered, then 10% slower again."""
    lim = HostLimiter(8)
    host = "rate.test"
    for _ in range(2):  # 4 -> 2 (halved) -> 1; Retry-After 0: each 429 is a pause of its own
        slot = lim.try_acquire(host)
        lim.throttled(host, 0.0)
        lim.release(slot)
    assert lim.limit(host) == 1 and lim.paused_for(host) == 0
    assert lim.rate_limited(host)  # one at a time after 429s: its queued rows may be left for a retry
    lim.throttled("busy.test", 0.0, too_many=False)  # a 503 only: not held against the host
    assert lim.limit("busy.test") == 2 and not lim.rate_limited("busy.test")  # halved from 4
    first = lim.try_acquire(host)
    assert first is not None and lim.try_acquire(host) is None  # one at a time, not spaced yet
    lim.release(first)
    slot = lim.try_acquire(host)
    assert slot is not None  # ... so the next one starts at once
    lim.release(slot)
    t0 = time.monotonic()
    for _ in range(5):
        lim.succeeded(host)
    time.sleep(0.5)
    slot = lim.try_acquire(host)
    lim.throttled(host, 0.0)  # 5 answers in ~0.5 s: spaced 1 / (0.9 * ~10/s), about 0.11 s
    lim.release(slot)
    interval = 1 / (0.9 * 5 / (time.monotonic() - t0))
    slot = lim.try_acquire(host)
    assert slot is not None
    lim.release(slot)
    assert lim.try_acquire(host) is None and 0.5 * interval < lim.paused_for(host) <= interval * 1.01
    time.sleep(lim.paused_for(host) + 0.01)
    slot = lim.try_acquire(host)
    assert slot is not None
    lim.throttled(host, 0.0)  # a further 429: 10% slower
    lim.release(slot)
    time.sleep(lim.paused_for(host) + 0.01)
    slot = lim.try_acquire(host)
    assert slot is not None
    lim.release(slot)
    assert lim.paused_for(host) > interval * 1.05


def test_a_429_drawn_by_many_at_once_cuts_the_share_and_one_drawn_by_few_spaces_them():
    """More than RATE_FLOOR requests at once drew it: one fewer at once, not spaced. RATE_FLOOR at once
    drew it, after enough answers: the host limits its rate; RATE_FLOOR at once stay, spaced."""
    lim = HostLimiter(8, start=8)
    host = "cdn.test"
    slots = [lim.try_acquire(host) for _ in range(5)]
    assert all(slots)
    lim.throttled(host, 0.0)  # 5 at once drew it
    for s in slots:
        lim.release(s)
    assert lim.limit(host) == 4 and lim.paused_for(host) == 0  # no spacing: 4 start at once
    four = [lim.try_acquire(host) for _ in range(5)]
    assert all(four[:4]) and four[4] is None
    for s in four[:4]:
        lim.release(s)
    for _ in range(2):  # 4 -> 3 -> 2 (each drawn by more than RATE_FLOOR at once)
        held = [lim.try_acquire(host) for _ in range(lim.limit(host))]
        lim.throttled(host, 0.0)
        for s in held:
            lim.release(s)
    assert lim.limit(host) == 2 and lim.paused_for(host) == 0
    t0 = time.monotonic()
    for _ in range(8):
        lim.succeeded(host)
    time.sleep(0.4)
    held = [lim.try_acquire(host) for _ in range(2)]
    lim.throttled(host, 0.0)  # 2 at once drew it: a rate limit, ~8 answers in 0.4 s
    for s in held:
        lim.release(s)
    interval = (time.monotonic() - t0) / (0.9 * 8)
    assert lim.limit(host) == 2  # not cut to one at a time
    first = lim.try_acquire(host)
    assert first is not None and lim.try_acquire(host) is None  # the second waits its spacing ...
    assert 0.5 * interval < lim.paused_for(host) <= interval * 1.01
    time.sleep(lim.paused_for(host) + 0.005)
    second = lim.try_acquire(host)  # ... and then runs beside the first
    assert second is not None and lim.active(host) == 2
