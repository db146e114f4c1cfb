"""Safe HTTP fetching for `curate download`: address guard, manual redirects, byte cap, deadline, retries.

Every request resolves the host itself, checks each resolved address, and connects to a checked
address (the name goes in the Host header and in TLS SNI/verification), so nothing can change between
the check and the connection; when a host has several addresses the next checked one is tried on a
connect failure. Redirects are followed by hand and every hop is checked again.

The per-sample deadline is enforced from outside the read path: a watchdog thread shuts down the
sockets of any sample past its deadline, so a blocked recv returns whatever phase the server is
stalling (status line, headers, `100 Continue` stream, chunk framing, trailers, gzip header).
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import ipaddress
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.robotparser
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from curate import __version__
from curate.phases import PHASES

log = logging.getLogger(__name__)

UA_TOKEN = "curatebot"
CHUNK = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# codes retried inside one run; the rest (4xx, opt-out, guards, decode) would fail the same way again
RETRYABLE = frozenset({"connect_error", "timeout", "http_5xx"})
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# X-Robots-Tag directives that take a value ("max-snippet: 20") rather than naming a bot
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_OPTOUT = frozenset({"noai", "noimageai"})


def user_agent(token: str = UA_TOKEN) -> str:
    return f"curate/{__version__} (+https://github.com/curate/curate; token={token})"


class FetchFailed(Exception):
    """A failed fetch; `code` is a ledger error code."""

    def __init__(self, code: str, message: str, *, http_status: int | None = None,
                 final_url: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.final_url = final_url
        self.retry_after = retry_after
        self.attempts = 1


@dataclass
class Fetched:
    body: bytes
    http_status: int
    final_url: str
    content_type: str | None
    attempts: int = 1


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0          # connect timeout and read timeout (each)
    deadline: float = 30.0         # whole sample: every attempt, hop and byte
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2               # extra attempts after the first, transient failures only
    backoff: float = 0.5           # first backoff in seconds; doubles per attempt, with jitter
    per_host: int = 4              # concurrent requests per host name
    allow_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    deny_domains: tuple[str, ...] = ()
    respect_optout: bool = True
    respect_robots: bool = False
    ua_token: str = UA_TOKEN
    ca_certs: str | None = None    # a CA bundle instead of the system's (tests use a trustme CA)


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses (embedded IPv4 forms are judged by their IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None:
            return False
        if ip in NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    bad = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
           or ip.is_unspecified or not ip.is_global)
    return not bad


def parse_endpoint(spec: str) -> tuple[str, int | None]:
    """'HOST[:PORT]' or '[v6]:PORT' -> (lowercased host, port or None)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    else:
        host, port = spec, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"'{spec}' is not HOST[:PORT]")
    return host.lower().rstrip("."), int(port) if port else None


def optout_directive(values: list[str], token: str) -> str | None:
    """The X-Robots-Tag directive that opts this fetch out (noai/noimageai, global or for our token)."""
    ours = {token.lower(), "curate"}
    for value in values:
        m = re.match(r"^\s*([A-Za-z0-9_\-]+)\s*:\s*(.*)$", value)
        bot = None
        if m and m.group(1).lower() not in _VALUED_DIRECTIVES:
            bot, value = m.group(1).lower(), m.group(2)
        if bot is not None and bot not in ours:
            continue
        for directive in value.split(","):
            d = directive.strip().lower()
            if d in _OPTOUT:
                return f"{bot}: {d}" if bot else d
    return None


def _ascii_digits(value: str) -> bool:
    # str.isdigit() is also true for "²" or "٣", which int() refuses: header values are latin-1 text
    return value.isascii() and value.isdigit()


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or an HTTP date); None when unusable."""
    if not value:
        return None
    value = value.strip()
    if _ascii_digits(value):
        return min(float(value), 1e9)
    # a hostile date can fail in many ways (year 0, out-of-range fields, overflow); none is an error
    with contextlib.suppress(TypeError, ValueError, OverflowError, IndexError, OSError):
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - time.time())
    return None


def content_length(value: str | None) -> int | None:
    """The Content-Length header as a number, or None when absent or not plain digits."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if _ascii_digits(value) else None


def redirect_target(base: str, location: str) -> str:
    """The absolute URL a Location header points to; FetchFailed(invalid_url) when it cannot be joined."""
    try:
        return urljoin(base, location.strip())
    except (ValueError, UnicodeError) as e:
        raise FetchFailed("invalid_url", f"unusable redirect Location ({e})"[:300], final_url=base) from None


# ---- the deadline watchdog --------------------------------------------------------------------

WATCH_PERIOD = 0.1  # seconds between watchdog scans: the deadline's overshoot is about this plus unwinding


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Guard:
    """One sample's deadline and duplicates of the sockets it uses.

    shutdown(2) acts on the socket, not the descriptor, so shutting down a dup() wakes a recv blocked on
    the original (plain or TLS) from another thread; owning the dup means a reused descriptor number
    can never point the watchdog at somebody else's socket.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except (OSError, ValueError):
            return
        with self._lock:
            if self._closed:
                dup.close()
                return
            self._socks.append(dup)
            if self.expired:
                _shut(dup)

    def expire(self) -> None:
        with self._lock:
            if self.expired or self._closed:
                return
            self.expired = True
            for s in self._socks:
                _shut(s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
            self._socks.clear()


_local = threading.local()  # .guard: the guard of the sample this thread is fetching


class _Watchdog:
    """One thread per process that expires overdue guards; idle (blocked on an Event) when none is active."""

    def __init__(self) -> None:
        self._guards: set[_Guard] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="curate-fetch-watchdog")
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, deadline: float) -> Iterator[_Guard]:
        guard = _Guard(deadline)
        prev = getattr(_local, "guard", None)
        _local.guard = guard
        with self._lock:
            self._guards.add(guard)
        self._wake.set()
        try:
            yield guard
        finally:
            with self._lock:
                self._guards.discard(guard)
            _local.guard = prev
            guard.close()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                guards = list(self._guards)
            if not guards:
                self._wake.wait()
                continue
            now = time.monotonic()
            for g in guards:
                if now >= g.deadline:
                    g.expire()
            time.sleep(WATCH_PERIOD)


_watchdogs: dict[int, _Watchdog] = {}
_watchdogs_lock = threading.Lock()


def _watchdog() -> _Watchdog:
    """This process's watchdog (a forked worker does not inherit the parent's thread, so one per pid)."""
    pid = os.getpid()
    with _watchdogs_lock:
        wd = _watchdogs.get(pid)
        if wd is None:
            wd = _watchdogs[pid] = _Watchdog()
        return wd


def _attach_current(sock: socket.socket | None) -> None:
    guard = getattr(_local, "guard", None)
    if guard is not None:
        guard.attach(sock)


class _GuardedHTTPConnection(HTTPConnection):
    """Hands every socket it opens or reuses to the current sample's guard."""

    def connect(self) -> None:
        with PHASES.timed("connect"):
            super().connect()

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach_current(sock)  # before the request (and, for TLS, before the handshake)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _attach_current(self.sock)  # a kept-alive connection reused by a new sample
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        with PHASES.timed("connect"):  # TCP and the TLS handshake
            super().connect()

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach_current(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _attach_current(self.sock)
        super().request(*args, **kwargs)


@dataclass
class _Target:
    url: str
    scheme: str
    host: str            # lowercased name as written (IDNA-encoded)
    port: int
    path: str            # path + query, what goes on the request line
    ip: str = ""
    host_header: str = ""
    ips: tuple[str, ...] = ()  # every resolved address, all checked; tried in order on connect failure


@dataclass
class _Robots:
    lock: threading.Lock = field(default_factory=threading.Lock)
    parser: urllib.robotparser.RobotFileParser | None = None
    loaded: bool = False


class Fetcher:
    """Fetch URLs under a FetchPolicy. Thread-safe; one per shard worker (pools and caches inside).

    `resolver(host, port) -> [address, ...]` replaces getaddrinfo (tests give a name several loopback
    addresses); whatever it returns goes through the same address guard.
    """

    def __init__(self, policy: FetchPolicy, max_pools: int = 256,
                 resolver: Callable[[str, int], list[str]] | None = None):
        self.policy = policy
        self._resolver = resolver
        self.user_agent = user_agent(policy.ua_token)
        self._allow = [parse_endpoint(s) for s in policy.allow_hosts]
        self._deny = tuple(d.lower().strip(".") for d in policy.deny_domains if d.strip("."))
        self._dns: dict[tuple[str, int], list[str] | str] = {}
        self._dns_lock = threading.Lock()
        self._pools: collections.OrderedDict[tuple, urllib3.HTTPConnectionPool] = collections.OrderedDict()
        self._pool_lock = threading.Lock()
        self._max_pools = max_pools
        self._host_sems: dict[str, threading.BoundedSemaphore] = {}
        self._sem_lock = threading.Lock()
        self._robots: dict[tuple[str, str, int], _Robots] = {}
        self._robots_lock = threading.Lock()

    # ---- public -------------------------------------------------------------------------------

    def fetch(self, url: str) -> Fetched:
        """Fetch one URL: guards, per-host limit, retries with backoff, all within the sample deadline.

        Raises FetchFailed (with .attempts) on any failure.
        """
        target = self._parse(url)  # invalid_url / blocked_scheme before any waiting
        with self._host_slot(target.host):
            deadline = time.monotonic() + self.policy.deadline
            with _watchdog().watch(deadline) as guard:
                return self._attempts(url, deadline, guard)

    def _attempts(self, url: str, deadline: float, guard: _Guard) -> Fetched:
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    got = self._fetch_once(url, deadline, guard)
                except Exception as e:  # noqa: BLE001 - whatever a shut-down socket raised, it was the deadline
                    if not guard.expired:
                        raise
                    code = getattr(e, "code", "")
                    raise FetchFailed("deadline_exceeded",
                                      f"deadline {self.policy.deadline}s passed (watchdog closed the connection"
                                      f"{'; ' + code if code else ''})",
                                      http_status=getattr(e, "http_status", None),
                                      final_url=getattr(e, "final_url", None) or url) from None
                got.attempts = attempt
                return got
            except FetchFailed as e:
                e.attempts = attempt
                if e.code not in RETRYABLE or attempt > self.policy.retries:
                    raise
                wait = e.retry_after
                if wait is None:
                    wait = self.policy.backoff * (2 ** (attempt - 1)) * (1.0 + random.random())
                # a new attempt needs a full timeout before the deadline, or its failure would
                # only say "deadline" and hide what the server did
                if time.monotonic() + wait + self.policy.timeout > deadline:
                    if e.retry_after is not None:
                        e.message += f" (Retry-After {e.retry_after:.0f}s is past the deadline)"
                    raise
                time.sleep(wait)

    def close(self) -> None:
        with self._pool_lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    # ---- guards -------------------------------------------------------------------------------

    def _parse(self, url: str) -> _Target:
        if not isinstance(url, str) or not url.strip():
            raise FetchFailed("invalid_url", "empty URL")
        url = url.strip()
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme and scheme not in ("http", "https"):
                raise FetchFailed("blocked_scheme", f"scheme '{scheme}' is not http/https")
            if not scheme or not parts.hostname:
                raise FetchFailed("invalid_url", f"not an absolute http(s) URL: {url[:200]!r}")
            port = parts.port or (443 if scheme == "https" else 80)
            host = parts.hostname.rstrip(".")
            if not host.isascii():
                host = host.encode("idna").decode("ascii")
        except FetchFailed:
            raise
        except (ValueError, UnicodeError) as e:
            raise FetchFailed("invalid_url", f"unparseable URL ({e})") from None
        if not host or any(c in host for c in " \t\r\n/\\%@"):
            raise FetchFailed("invalid_url", f"bad host {host!r}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if not all(0x20 < ord(c) < 0x7F for c in path):
            # what a browser does: spaces, control and non-ASCII characters go out percent-encoded
            # (UTF-8), so the request line is printable ASCII and no header can be injected
            path = "".join(c if 0x20 < ord(c) < 0x7F else quote(c.encode("utf-8", "surrogatepass"), safe="")
                           for c in path)
        return _Target(url=url, scheme=scheme, host=host.lower(), port=port, path=path)

    def _allowed_endpoint(self, t: _Target) -> bool:
        return any(h == t.host and (p is None or p == t.port) for h, p in self._allow)

    def _check(self, t: _Target) -> _Target:
        """Deny-list, DNS, address guard; sets t.ip (the address we will connect to)."""
        for d in self._deny:
            if t.host == d or t.host.endswith("." + d):
                raise FetchFailed("disallowed_domain", f"{t.host} is under denied domain {d}", final_url=t.url)
        addrs = self._resolve(t.host, t.port)
        if not (self.policy.allow_private or self._allowed_endpoint(t)):
            for a in addrs:
                if not is_public_address(ipaddress.ip_address(a)):
                    raise FetchFailed("blocked_address", f"{t.host} resolves to non-global address {a}",
                                      final_url=t.url)
        t.ips = tuple(addrs)
        t.ip = addrs[0]
        default = 443 if t.scheme == "https" else 80
        name = f"[{t.host}]" if ":" in t.host else t.host
        t.host_header = name if t.port == default else f"{name}:{t.port}"
        return t

    def _resolve(self, host: str, port: int) -> list[str]:
        key = (host, port)
        with self._dns_lock:
            hit = self._dns.get(key)
        if hit is None and self._resolver is not None:
            try:
                hit = list(dict.fromkeys(str(ipaddress.ip_address(a)) for a in self._resolver(host, port)))
                hit = hit or "no addresses"
            except (OSError, ValueError) as e:
                hit = str(e)
        if hit is None:
            try:
                # getaddrinfo applies inet_aton rules, so 2130706433, 0177.0.0.1, 127.1 and 0x7f.1
                # all come back as 127.0.0.1 and are judged as such
                infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
                hit = list(dict.fromkeys(info[4][0] for info in infos)) or "no addresses"
            except (socket.gaierror, UnicodeError, OSError) as e:
                hit = str(e)
            with self._dns_lock:
                self._dns[key] = hit
        if isinstance(hit, str):
            raise FetchFailed("dns_error", f"{host}: {hit}")
        return hit

    @contextlib.contextmanager
    def _host_slot(self, host: str) -> Iterator[None]:
        with self._sem_lock:
            sem = self._host_sems.get(host)
            if sem is None:
                sem = self._host_sems[host] = threading.BoundedSemaphore(max(1, self.policy.per_host))
        with sem:
            yield

    # ---- one attempt ------------------------------------------------------------------------

    def _pool(self, t: _Target) -> urllib3.HTTPConnectionPool:
        key = (t.scheme, t.ip, t.port, t.host)
        with self._pool_lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            size = max(1, self.policy.per_host)
            if t.scheme == "https":
                # connect to the checked address; the name is what TLS sends (SNI) and verifies
                pool = urllib3.HTTPSConnectionPool(
                    t.ip, t.port, maxsize=size, block=False, retries=False,
                    server_hostname=t.host, assert_hostname=t.host, cert_reqs="CERT_REQUIRED",
                    ca_certs=self.policy.ca_certs)
                pool.ConnectionCls = _GuardedHTTPSConnection
            else:
                pool = urllib3.HTTPConnectionPool(t.ip, t.port, maxsize=size, block=False, retries=False)
                pool.ConnectionCls = _GuardedHTTPConnection
            self._pools[key] = pool
            while len(self._pools) > self._max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def _fetch_once(self, url: str, deadline: float, guard: _Guard) -> Fetched:
        seen: set[str] = set()
        hops = 0
        while True:
            t = self._check(self._parse(url))
            if self.policy.respect_robots and not self._robots_allows(t, deadline):
                raise FetchFailed("opted_out", f"robots.txt of {t.host} disallows {self.policy.ua_token}",
                                  final_url=url)
            seen.add(url)
            resp = self._request(t, deadline)
            try:
                status = resp.status
                if self.policy.respect_optout:
                    hit = optout_directive(resp.headers.getlist("X-Robots-Tag"), self.policy.ua_token)
                    if hit:
                        raise FetchFailed("opted_out", f"X-Robots-Tag {hit}", http_status=status, final_url=url)
                if status in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchFailed("http_4xx", f"HTTP {status} without Location", http_status=status,
                                          final_url=url)
                    nxt = redirect_target(url, location)
                    hops += 1
                    if nxt in seen:
                        raise FetchFailed("too_many_redirects", f"redirect loop back to {nxt[:200]}",
                                          http_status=status, final_url=url)
                    if hops > self.policy.max_redirects:
                        raise FetchFailed("too_many_redirects", f"more than {self.policy.max_redirects} redirects",
                                          http_status=status, final_url=url)
                    url = nxt
                    continue
                if status == 429 or status >= 500:
                    raise FetchFailed("http_5xx", f"HTTP {status}", http_status=status, final_url=url,
                                      retry_after=_retry_after(resp.headers.get("Retry-After")))
                if not 200 <= status < 300:
                    raise FetchFailed("http_4xx", f"HTTP {status}", http_status=status, final_url=url)
                with PHASES.timed("body"):
                    body = self._read_body(resp, deadline, url)
                if guard.expired:  # the watchdog's shutdown reads as end-of-body: the body may be cut short
                    raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed",
                                      http_status=status, final_url=url)
                self._finish(resp, complete=True)
                if not body:
                    raise FetchFailed("empty_body", "the answer had no bytes", http_status=status, final_url=url)
                return Fetched(body, status, url, resp.headers.get("Content-Type"))
            finally:
                self._finish(resp)

    def _request(self, t: _Target, deadline: float) -> Any:
        """Send the GET to the first checked address that accepts a connection (never an unchecked one)."""
        addrs = t.ips or (t.ip,)
        for i, ip in enumerate(addrs):
            t.ip = ip
            try:
                return self._request_one(t, deadline)
            except FetchFailed as e:
                # only a failure to connect moves on: once a request went out, another address could
                # answer it a second time
                if not getattr(e, "_connect_phase", False) or i == len(addrs) - 1:
                    raise
                log.debug("%s: %s failed (%s), trying %s", t.host, ip, e.message, addrs[i + 1])
        raise AssertionError("unreachable")

    def _request_one(self, t: _Target, deadline: float) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed", final_url=t.url)
        cut = left < self.policy.timeout  # the deadline, not the timeout, bounds this wait
        timeout = urllib3.Timeout(connect=min(self.policy.timeout, left), read=min(self.policy.timeout, left))
        headers = {
            "Host": t.host_header,
            "User-Agent": self.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
            "Accept-Encoding": "gzip, deflate",
        }
        try:
            with PHASES.timed("headers"):  # includes "connect" when a new connection is made
                return self._pool(t).urlopen(
                    "GET", t.path, headers=headers, retries=False, redirect=False, timeout=timeout,
                    preload_content=False, decode_content=True, assert_same_host=False, release_conn=False)
        except ReadTimeoutError as e:
            code = "deadline_exceeded" if cut else "timeout"
            raise FetchFailed(code, f"read timeout ({e})", final_url=t.url) from None
        except NewConnectionError as e:  # (a subclass of ConnectTimeoutError: refused, unreachable)
            err = FetchFailed("connect_error", f"{type(e).__name__}: {e}"[:300], final_url=t.url)
            err._connect_phase = True  # type: ignore[attr-defined]
            raise err from None
        except ConnectTimeoutError as e:
            code = "deadline_exceeded" if cut else "timeout"
            err = FetchFailed(code, f"connect timeout ({e})", final_url=t.url)
            err._connect_phase = True  # type: ignore[attr-defined]
            raise err from None
        except (ProtocolError, SSLError) as e:
            raise FetchFailed("connect_error", f"{type(e).__name__}: {e}"[:300], final_url=t.url) from None
        except LocationParseError as e:
            raise FetchFailed("invalid_url", str(e), final_url=t.url) from None
        except (HTTPError, OSError) as e:
            raise FetchFailed("connect_error", f"{type(e).__name__}: {e}"[:300], final_url=t.url) from None

    def _read_body(self, resp: Any, deadline: float, url: str) -> bytes:
        cap = self.policy.max_bytes
        length = content_length(resp.headers.get("Content-Length"))
        if length is not None and length > cap:
            raise FetchFailed("too_large", f"Content-Length {length} > --max-bytes {cap}",
                              http_status=resp.status, final_url=url)
        buf = bytearray()
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        cut = False
        try:
            while True:
                left = deadline - time.monotonic()
                cut = left < self.policy.timeout
                if left <= 0:
                    raise FetchFailed("deadline_exceeded",
                                      f"deadline {self.policy.deadline}s passed after {len(buf)} bytes",
                                      http_status=resp.status, final_url=url)
                if sock is not None:
                    # one recv may not outlive the sample's deadline
                    with contextlib.suppress(OSError):
                        sock.settimeout(min(self.policy.timeout, left))
                # read1: returns what one recv gave, so a dripping server is seen at every byte
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > cap:
                    raise FetchFailed("too_large", f"body exceeds --max-bytes {cap} (decoded)",
                                      http_status=resp.status, final_url=url)
        except ReadTimeoutError:
            code = "deadline_exceeded" if cut else "timeout"
            raise FetchFailed(code, f"read timeout after {len(buf)} bytes", http_status=resp.status,
                              final_url=url) from None
        except DecodeError as e:
            raise FetchFailed("decode_error", f"Content-Encoding decode failed ({e})"[:300],
                              http_status=resp.status, final_url=url) from None
        except (ProtocolError, OSError, HTTPError) as e:
            raise FetchFailed("connect_error", f"body read failed: {type(e).__name__}: {e}"[:300],
                              http_status=resp.status, final_url=url) from None
        return bytes(buf)

    @staticmethod
    def _finish(resp: Any, complete: bool = False) -> None:
        """Reuse the connection only when its body was read to the end; otherwise close it unread."""
        if getattr(resp, "_curate_finished", False):
            return
        resp._curate_finished = True
        if not complete:
            with contextlib.suppress(Exception):
                resp.close()
        with contextlib.suppress(Exception):
            resp.release_conn()

    # ---- robots.txt ---------------------------------------------------------------------------

    def _robots_allows(self, t: _Target, deadline: float) -> bool:
        key = (t.scheme, t.host, t.port)
        with self._robots_lock:
            entry = self._robots.setdefault(key, _Robots())
        # one fetch per host; the other threads wait for it, but never past their own deadline (the
        # fetching thread is itself bounded by its deadline through the watchdog)
        if not entry.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed waiting for "
                              f"robots.txt of {t.host}", final_url=t.url)
        try:
            if not entry.loaded:
                entry.parser = self._load_robots(t, deadline)
                entry.loaded = True
        finally:
            entry.lock.release()
        return entry.parser is None or entry.parser.can_fetch(self.policy.ua_token, t.url)

    def _load_robots(self, t: _Target, deadline: float) -> urllib.robotparser.RobotFileParser | None:
        """robots.txt of the host, or None (allow all) when it is missing or unreachable.

        Running out of the sample's deadline is not "unreachable": it raises deadline_exceeded and
        caches nothing, so a robots.txt cut short by the watchdog is never parsed as the whole file.
        """
        guard: _Guard | None = getattr(_local, "guard", None)
        rt = _Target(url=f"{t.scheme}://{t.host_header}/robots.txt", scheme=t.scheme, host=t.host, port=t.port,
                     path="/robots.txt", ip=t.ip, host_header=t.host_header, ips=t.ips)

        def overdue() -> bool:
            return (guard is not None and guard.expired) or time.monotonic() >= deadline

        body = b""
        resp = None
        try:
            resp = self._request(rt, deadline)
            if resp.status == 200:
                body = self._read_body(resp, deadline, rt.url)[: 512 * 1024]
                self._finish(resp, complete=not overdue())
        except FetchFailed:
            if not overdue():
                return None
        except Exception:  # noqa: BLE001 - a socket shut down by the watchdog fails in many ways
            if not overdue():
                raise
        finally:
            if resp is not None:
                self._finish(resp)
        if overdue():
            raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed reading "
                              f"robots.txt of {t.host}", final_url=t.url)
        if resp is None or resp.status != 200:
            return None
        parser = urllib.robotparser.RobotFileParser()
        parser.parse(body.decode("utf-8", errors="replace").splitlines())
        return parser
