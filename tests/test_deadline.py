"""No server can make a sample outlive --deadline by more than 2 s, whatever phase it stalls in.

Every route here keeps bytes flowing (a byte every 0.1 s, or faster), so no socket timeout ever fires:
only the fetcher's watchdog can end these samples.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from hostile_server import Conn, RawServer

from curate.fetch import Fetcher, FetchFailed, FetchPolicy

DEADLINE = 1.5
MARGIN = 2.0


def fetcher(server: RawServer, **kw) -> Fetcher:
    kw.setdefault("allow_hosts", (server.endpoint,))
    kw.setdefault("timeout", 5.0)  # longer than the deadline: the deadline, not a recv timeout, must end it
    kw.setdefault("deadline", DEADLINE)
    return Fetcher(FetchPolicy(**kw))


def timed_fail(f: Fetcher, url: str) -> tuple[FetchFailed, float]:
    t0 = time.monotonic()
    with pytest.raises(FetchFailed) as ei:
        f.fetch(url)
    return ei.value, time.monotonic() - t0


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"


def status_drip(c: Conn) -> None:
    c.drip(b"HTTP/1.1 200 OK", forever=b" ")


def header_drip(c: Conn) -> None:
    c.send(OK_HEAD)
    c.drip(b"X-Slow: ", forever=b"a")


def many_headers_drip(c: Conn) -> None:
    c.send(OK_HEAD)
    c.drip([f"X-H{i}: {i}\r\n".encode() for i in range(50)], every=0.1, forever=b"")


def endless_continue(c: Conn) -> None:
    c.drip([], every=0.05, forever=b"HTTP/1.1 100 Continue\r\n\r\n")


def chunk_size_drip(c: Conn) -> None:
    c.send(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    c.drip(b"1", forever=b";")  # a chunk-size line (extension) that never ends


def endless_trailer(c: Conn) -> None:
    c.send(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
    c.drip([], every=0.01, forever=b"X-Trailer: 1\r\n")


def gzip_fname_endless(c: Conn) -> None:
    # gzip header with FLG.FNAME: the file name is zero-terminated, and this one never is
    c.send(OK_HEAD + b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n")
    c.send(b"\x1f\x8b\x08\x08" + struct.pack("<I", 0) + b"\x00\x03")
    c.drip([], every=0.001, forever=b"a" * 1024)


def body_drip_no_length(c: Conn) -> None:
    c.send(OK_HEAD + b"Connection: close\r\n\r\n\xff\xd8\xff")
    c.drip([], every=0.1, forever=b"x")


PHASES = {
    "/status": status_drip, "/header": header_drip, "/headers": many_headers_drip,
    "/continue": endless_continue, "/chunk-size": chunk_size_drip, "/trailer": endless_trailer,
    "/gzip-fname": gzip_fname_endless, "/body": body_drip_no_length,
}


@pytest.mark.parametrize("path", sorted(PHASES))
def test_every_phase_ends_by_the_deadline(raw, path):
    raw.routes[path] = PHASES[path]
    e, took = timed_fail(fetcher(raw), raw.url(path))
    assert e.code == "deadline_exceeded", (e.code, e.message)
    assert took < DEADLINE + MARGIN, took
    assert raw.hits[path] == 1  # a deadline is not retried


def test_tls_handshake_drip_ends_by_the_deadline(raw):
    # a TLS record header announcing 16 KB of handshake, then a byte every 0.1 s
    raw.on_connect = lambda c: (c.sock.recv(4096), c.drip(b"\x16\x03\x03\x40\x00", forever=b"\x00"))
    e, took = timed_fail(fetcher(raw), f"https://{raw.endpoint}/a.jpg")
    assert e.code == "deadline_exceeded", (e.code, e.message)
    assert took < DEADLINE + MARGIN


def test_redirect_hops_share_one_deadline(raw):
    # each hop answers quickly but the chain of slow hops as a whole outlives the deadline
    def hop(c: Conn) -> None:
        n = int(c.path.rsplit("/", 1)[1])
        time.sleep(0.4)
        c.send(f"HTTP/1.1 302 Found\r\nLocation: /hop/{n + 1}\r\nContent-Length: 0\r\n\r\n".encode())

    for i in range(20):
        raw.routes[f"/hop/{i}"] = hop
    e, took = timed_fail(fetcher(raw, max_redirects=20), raw.url("/hop/0"))
    assert e.code == "deadline_exceeded" and took < DEADLINE + MARGIN


def test_slow_robots_txt_holds_no_lock_past_the_deadline(raw):
    raw.routes["/robots.txt"] = lambda c: (c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"),
                                           c.drip(b"User-agent: *\n", forever=b"#"))
    raw.routes["/a.jpg"] = lambda c: c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n\xff\xd8\xff")
    f = fetcher(raw, respect_robots=True, per_host=8)
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.monotonic()
        try:
            f.fetch(raw.url("/a.jpg"))
            code = "success"
        except FetchFailed as e:
            code = e.code
        with lock:
            results.append((code, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    for code, took in results:
        assert code == "deadline_exceeded" and took < DEADLINE + MARGIN, results
    # a cut-short robots.txt is never taken for the whole file: nothing was fetched past it
    assert raw.hits["/a.jpg"] == 0


def test_connection_after_a_deadline_is_not_reused(raw):
    # the first answer is cut by the watchdog; the next sample on the same host must get a clean connection
    raw.routes["/slow"] = body_drip_no_length
    raw.routes["/ok"] = lambda c: c.send(OK_HEAD + b"Content-Length: 3\r\n\r\n\xff\xd8\xff")
    f = fetcher(raw)
    e, _ = timed_fail(f, raw.url("/slow"))
    assert e.code == "deadline_exceeded"
    got = f.fetch(raw.url("/ok"))
    assert got.body == b"\xff\xd8\xff"
