"""HTTPS as users meet it: a loopback TLS server with a test CA (trustme), SNI and verification against the
name, and hosts with several addresses (the next checked address on a connect failure).

The fetcher's resolver hook maps the test names to loopback addresses; everything it returns still goes
through the address guard.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
import trustme
from loopback import LoopServer

from curate.fetch import Fetcher, FetchFailed, FetchPolicy

BODY = b"\xff\xd8\xff" + b"tls-body"


def tls_server(ca: trustme.CA, names: list[str]) -> LoopServer:
    """HTTPS on 127.0.0.1 with a certificate for `names`, serving BODY at /a.jpg (records SNI and Host)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    server = LoopServer(ssl_context=ctx)
    server.image("/a.jpg", BODY)
    return server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def tls(ca):
    s = tls_server(ca, ["img.test"])
    yield s
    s.close()


def closed_port_on(host: str) -> int:
    """A port on `host` with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fetcher(port: int, ca_file: str | None, resolve: dict[str, list[str]], **kw: Any) -> Fetcher:
    kw.setdefault("allow_hosts", tuple(f"{name}:{port}" for name in resolve))
    kw.setdefault("timeout", 3.0)
    kw.setdefault("deadline", 6.0)
    kw.setdefault("retries", 0)
    return Fetcher(FetchPolicy(ca_certs=ca_file, **kw), resolver=lambda host, p: resolve[host])


def test_https_connects_to_the_checked_address_with_sni_and_verification(tls, ca_file):
    f = fetcher(tls.port, ca_file, {"img.test": ["127.0.0.1"]})
    got = f.fetch(f"https://img.test:{tls.port}/a.jpg")
    assert got.body == BODY and got.http_status == 200
    assert tls.sni == ["img.test"]
    assert tls.hosts == [f"img.test:{tls.port}"]


def test_certificate_for_another_name_is_refused(ca, ca_file):
    other = tls_server(ca, ["other.test"])
    try:
        f = fetcher(other.port, ca_file, {"img.test": ["127.0.0.1"]})
        with pytest.raises(FetchFailed) as ei:
            f.fetch(f"https://img.test:{other.port}/a.jpg")
    finally:
        other.close()
    assert ei.value.code == "connect_error"
    assert "certificate" in ei.value.message.lower() or "hostname" in ei.value.message.lower()
    assert other.hosts == []  # no request went out over the unverified connection


def test_untrusted_ca_is_refused(tls):
    f = fetcher(tls.port, None, {"img.test": ["127.0.0.1"]})  # the system CAs do not know the test CA
    with pytest.raises(FetchFailed) as ei:
        f.fetch(f"https://img.test:{tls.port}/a.jpg")
    assert ei.value.code == "connect_error" and "certificate" in ei.value.message.lower()
    assert tls.hosts == []


def test_next_checked_address_after_a_connect_failure(tls, ca_file):
    # 127.0.0.3 has nothing on this port: refused, then the second address answers
    f = fetcher(tls.port, ca_file, {"img.test": ["127.0.0.3", "127.0.0.1"]})
    got = f.fetch(f"https://img.test:{tls.port}/a.jpg")
    assert got.body == BODY and tls.sni == ["img.test"]


def test_all_addresses_failing_is_connect_error(ca_file):
    port = closed_port_on("127.0.0.1")
    f = fetcher(port, ca_file, {"img.test": ["127.0.0.3", "127.0.0.1"]})
    with pytest.raises(FetchFailed) as ei:
        f.fetch(f"http://img.test:{port}/a.jpg")
    assert ei.value.code == "connect_error"


def test_every_address_is_checked_before_any_connect(tls, ca_file):
    # the name is not let through by --allow-host: one non-global address blocks the host, even when
    # another address would have answered
    f = fetcher(tls.port, ca_file, {"img.test": ["127.0.0.3", "127.0.0.1"]}, allow_hosts=())
    with pytest.raises(FetchFailed) as ei:
        f.fetch(f"https://img.test:{tls.port}/a.jpg")
    assert ei.value.code == "blocked_address"
    assert tls.sni == [] and tls.hosts == []


def test_redirect_from_https_to_a_name_with_another_address_is_checked_again(ca, ca_file):
    srv = tls_server(ca, ["first.test", "second.test"])
    srv.routes["/a.jpg"] = lambda h, n: h.send(302, b"", "text/plain",
                                               {"Location": f"https://second.test:{srv.port}/b.jpg"})
    try:
        # second.test resolves to an address the guard refuses: the hop is blocked before connecting
        f = fetcher(srv.port, ca_file, {"first.test": ["127.0.0.1"], "second.test": ["127.0.0.1"]},
                    allow_hosts=(f"first.test:{srv.port}",))
        with pytest.raises(FetchFailed) as ei:
            f.fetch(f"https://first.test:{srv.port}/a.jpg")
    finally:
        srv.close()
    assert ei.value.code == "blocked_address"
    assert srv.sni == ["first.test"]
