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
    per_host: int = 16             # most concurrent requests per host name (see HostLimiter)
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


# ---- per-host limits ----------------------------------------------------------------------------

# a host's limit starts here (or at the ceiling when that is lower) and grows by about one per round of
# successes up to the ceiling (--per-host). A 429 or 503 pauses the host (Retry-After) and says one of two
# things. Drawn by more than RATE_FLOOR requests at once, it says the host limits the requests at once: the
# limit goes one below the requests in flight that drew it, for a minute. Drawn by RATE_FLOOR or fewer, it
# says the host limits the request rate (a CDN's token bucket), and fewer requests at once would only make
# each wait its own latency: the requests are spaced instead, to RATE_BACKOFF of the rate the host answered
# since its last pause ended (10% slower again at each further one), for a minute, RATE_FLOOR at once.
# Too few answers since the last pause to tell a rate: the limit halves. Rows that a 429 paused retry in
# turns at that spacing.
HOST_START = 4
# answers that say the host is overloaded (a 500 is more often one broken URL than a busy host)
OVERLOAD_STATUS = frozenset({429, 503})
# how long a host's share stays below the share that drew its last 429/503 (seconds)
HOST_CAP_SECONDS = 60.0
# the pause after a 429/503 without Retry-After (seconds); a Retry-After longer than this is honoured as given
HOST_PAUSE = 1.0
RATE_BACKOFF = 0.9
RATE_FLOOR = 2  # requests at once at or below which a 429/503 is read as a rate limit
RATE_MIN_ANSWERS = 4  # successes since the last 429/503 needed to estimate the rate the host allows
RATE_MAX_INTERVAL = 5.0  # seconds: the slowest spacing
# a host that did not answer this many requests in a row (refused, unreachable, connect or first-byte
# timeout, reset before any answer) is down: its rows fail at once, without a request, for HOST_DOWN_SECONDS;
# then it is asked again (one more request without an answer makes it down again)
HOST_DOWN_AFTER = 8
HOST_DOWN_SECONDS = 60.0


@dataclass
class _HostState:
    active: int = 0
    limit: float = 1.0
    paused_until: float = 0.0
    cap: float = float("inf")  # below the share at the last 429/503, until cap_until
    cap_until: float = 0.0
    waiting: int = 0  # threads waiting in acquire/move for a slot: served before try_acquire
    interval: float = 0.0  # seconds between request starts while capped (0: not rate limited)
    next_start: float = 0.0
    since: float = 0.0  # the end of the last 429/503's pause (or the first request), and the successes after it
    ok_since: int = 0
    said_429: bool = False  # a 429 (not only 503s) came since the cap began
    no_answer: int = 0  # requests in a row that got no answer (see HOST_DOWN_AFTER)
    down_until: float = 0.0
    down_why: tuple[str, str] = ("", "")  # (error code, why), set when it went down
    # threads waiting for this host (a slot or a turn) wait here, on the limiter's lock: a release
    # wakes the host's own waiters, not every waiting thread of the task (made on the first wait)
    cond: threading.Condition | None = field(default=None, repr=False)


class HostSlot:
    """One held request slot of a host; `release` is idempotent (a shard that gives up on a stuck row
    releases its slot, and the stuck thread's own release later does nothing)."""

    __slots__ = ("held", "host")

    def __init__(self, host: str):
        self.host = host
        self.held = True


class HostLimiter:
    """Concurrent requests per host name, with a limit that adapts (AIMD) between 1 and `ceiling`.

    A scheduler that queues a busy host's work calls `try_acquire` (never waits); a direct caller of
    `Fetcher.fetch` waits in `acquire`. Every slot is released once; `on_release(host)` is called after
    each release (outside the limiter's lock) so a scheduler can hand the slot to a queued row.
    """

    def __init__(self, ceiling: int, start: int = HOST_START,
                 on_release: Callable[[str], None] | None = None):
        self.ceiling = max(1, int(ceiling))
        self.start = float(min(self.ceiling, max(1, start)))
        self.on_release = on_release
        self._hosts: dict[str, _HostState] = {}
        self._lock = threading.Lock()
        self.throttles = 0  # 429/503 answers seen (pauses and halvings), for the task's stats

    def _state(self, host: str) -> _HostState:
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = _HostState(limit=self.start, since=time.monotonic())
        return st

    def _wait(self, st: _HostState, timeout: float) -> None:
        """(holding the lock) wait for a change of this host, at most `timeout` seconds."""
        if st.cond is None:
            st.cond = threading.Condition(self._lock)
        st.cond.wait(timeout=timeout)

    @staticmethod
    def _wake(st: _HostState) -> None:
        """(holding the lock) a slot of this host was freed or its limit grew: its waiters look again."""
        if st.cond is not None:
            st.cond.notify_all()

    @staticmethod
    def _ready_at(st: _HostState, now: float) -> float:
        """When the host may be asked next (paused by a Retry-After, or its requests spaced)."""
        if st.interval and now >= st.cap_until:
            st.interval = 0.0
        return max(st.paused_until, st.next_start if st.interval else 0.0)

    def _free(self, st: _HostState, now: float) -> bool:
        return now >= self._ready_at(st, now) and st.active < max(1, int(st.limit))

    @staticmethod
    def _start(st: _HostState, now: float) -> None:
        """A request to the host starts now: the next one waits its spacing (when the host is spaced)."""
        if st.interval:
            st.next_start = now + st.interval

    def _take(self, st: _HostState, now: float) -> None:
        st.active += 1
        self._start(st, now)

    def try_acquire(self, host: str) -> HostSlot | None:
        with self._lock:
            st = self._state(host)
            # a thread already waiting (a redirect's next hop, a direct caller) goes first: a scheduler
            # that keeps the host busy with new rows would otherwise starve it until its deadline
            now = time.monotonic()
            if st.waiting or not self._free(st, now):
                return None
            self._take(st, now)
            return HostSlot(host)

    def _wait_free(self, host: str, until: float | None, slot: HostSlot | None = None) -> bool:
        """(holding the lock) wait until `host` has a free slot and take it; False when `until` passed
        first, or when `slot` (being moved) was released meanwhile."""
        st = self._state(host)
        st.waiting += 1
        try:
            while True:
                if slot is not None and not slot.held:
                    return False
                now = time.monotonic()
                if self._free(st, now):
                    self._take(st, now)
                    return True
                if until is not None and now >= until:
                    return False
                ready = self._ready_at(st, now)
                wake = ready - now if ready > now else 1.0
                if until is not None:
                    wake = min(wake, until - now)
                self._wait(st, max(0.001, wake))
        finally:
            st.waiting -= 1

    def acquire(self, host: str, until: float | None = None) -> HostSlot | None:
        """Wait for a slot of `host` (until the monotonic time `until`, or for ever); None when it passed."""
        with self._lock:
            return HostSlot(host) if self._wait_free(host, until) else None

    def move(self, slot: HostSlot, host: str, until: float | None) -> bool:
        """Give up `slot`'s host and wait for one of `host` in the same slot (a redirect to another host)."""
        if not slot.held or slot.host == host:
            return slot.held
        with self._lock:
            old = self._state(slot.host)
            old.active = max(0, old.active - 1)
            self._wake(old)
            freed, slot.host = slot.host, host
            got = self._wait_free(host, until, slot)
            if not got and slot.held:
                slot.held = False  # nothing is held any more: the slot is spent
        if self.on_release is not None:
            self.on_release(freed)
        return got

    def release(self, slot: HostSlot) -> None:
        with self._lock:
            if not slot.held:
                return
            slot.held = False
            st = self._state(slot.host)
            st.active = max(0, st.active - 1)
            self._wake(st)
        if self.on_release is not None:
            self.on_release(slot.host)

    def active(self, host: str) -> int:
        with self._lock:
            st = self._hosts.get(host)
            return st.active if st else 0

    def succeeded(self, host: str) -> None:
        with self._lock:
            st = self._state(host)
            cap = st.cap if time.monotonic() < st.cap_until else float(self.ceiling)
            st.limit = min(float(self.ceiling), cap, st.limit + 1.0 / max(1.0, st.limit))
            st.ok_since += 1
            self._wake(st)

    def throttled(self, host: str, retry_after: float | None, too_many: bool = True) -> None:
        """A 429 (`too_many`) or 503 from `host`: fewer requests at once, or its requests spaced (see
        RATE_FLOOR), for HOST_CAP_SECONDS; and a pause for Retry-After (or HOST_PAUSE)."""
        with self._lock:
            st = self._state(host)
            now = time.monotonic()
            st.said_429 = too_many or (st.said_429 and now < st.cap_until)
            pause = HOST_PAUSE if retry_after is None else retry_after
            if now >= st.paused_until:  # once per pause: the other answers of a burst say the same thing
                if st.active > RATE_FLOOR:
                    # the share that drew the answer is too much: stay below it for a while
                    # (HOST_CAP_SECONDS), or the host is asked past its limit again a few answers later
                    st.cap = st.limit = float(st.active - 1)
                elif st.interval:
                    st.interval = min(st.interval / RATE_BACKOFF, RATE_MAX_INTERVAL)
                elif st.ok_since >= RATE_MIN_ANSWERS:  # 1 / (RATE_BACKOFF x the rate it answered)
                    st.interval = min(max(now - st.since, 1e-3) / (RATE_BACKOFF * st.ok_since), RATE_MAX_INTERVAL)
                    st.cap = st.limit = float(min(self.ceiling, RATE_FLOOR))
                else:  # too few answers to tell a rate: half the share, as for a busy host
                    st.cap = st.limit = max(1.0, st.limit / 2)
                st.cap_until = now + HOST_CAP_SECONDS
                st.since, st.ok_since = now + pause, 0  # the rate is measured while the host may be asked
            st.paused_until = max(st.paused_until, now + pause)
            self.throttles += 1

    def answered(self, host: str) -> None:
        """`host` answered a request (any HTTP status): it is up."""
        st = self._hosts.get(host)
        if st is None or not st.no_answer:  # the common case, without the lock
            return
        with self._lock:
            st.no_answer, st.down_until = 0, 0.0

    def not_answered(self, host: str, code: str, message: str) -> bool:
        """A request to `host` got no answer (error `code`, `message`); True when the host is now down
        (HOST_DOWN_AFTER)."""
        with self._lock:
            st = self._state(host)
            st.no_answer += 1
            if st.no_answer >= HOST_DOWN_AFTER:
                st.down_until = time.monotonic() + HOST_DOWN_SECONDS
                st.down_why = (code, f"{st.no_answer} requests to {host} in a row got no answer (last: {message})")
            return st.down_until > time.monotonic()

    def down(self, host: str) -> tuple[str, str] | None:
        """(error code, why) while `host` is down (see HOST_DOWN_AFTER); None when it may be asked."""
        st = self._hosts.get(host)
        if st is None or not st.down_until or time.monotonic() >= st.down_until:
            return None
        return st.down_why

    def wait_turn(self, host: str, until: float) -> bool:
        """For a thread that holds a slot of `host` and asks it again (a retry after a 429/503): wait
        until the host may be asked (its pause over, its spacing respected) and take that turn; False
        when `until` passed first."""
        with self._lock:
            st = self._state(host)
            while True:
                now = time.monotonic()
                ready = self._ready_at(st, now)
                if now >= ready:
                    self._start(st, now)
                    return True
                if now >= until:
                    return False
                self._wait(st, max(0.001, min(ready, until) - now))

    def paused_for(self, host: str) -> float:
        """Seconds until `host` may be asked again (0 when not paused)."""
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                return 0.0
            now = time.monotonic()
            return max(0.0, self._ready_at(st, now) - now)

    def rate_limited(self, host: str) -> bool:
        """True while `host` holds us back hard after it said so with a 429 (a 503 is more often a server in
        trouble for a moment): its requests spaced because it limits its request rate, or at most
        RATE_FLOOR of them at once (a 429 that came before enough answers to tell a rate halves the share
        instead: a host cut to one request at a time drains its queue as slowly)."""
        with self._lock:
            st = self._hosts.get(host)
            return (st is not None and st.said_429 and time.monotonic() < st.cap_until
                    and (bool(st.interval) or st.cap <= RATE_FLOOR))

    def limit(self, host: str) -> int:
        with self._lock:
            return max(1, int(self._state(host).limit))


# ---- DNS --------------------------------------------------------------------------------------

# getaddrinfo does not say how long an answer may be kept: answers are kept DNS_TTL seconds (a resolver
# hook may return its own TTL), failures DNS_NEGATIVE_TTL seconds
DNS_TTL = 300.0
DNS_NEGATIVE_TTL = 30.0


class _DnsEntry:
    __slots__ = ("done", "expires", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: list[str] | str = "not resolved"
        self.expires = 0.0


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

    `resolver(host, port) -> [address, ...]` (or `([address, ...], ttl_seconds)`) replaces getaddrinfo
    (tests give a name several loopback addresses); whatever it returns goes through the same address
    guard. Answers are cached for their TTL, and one thread resolves a name while the others asking
    for it wait (within their deadlines); different names resolve concurrently.

    `limiter` holds the per-host slots: a scheduler that took a host's slot itself runs the fetch in
    `with fetcher.holding(host):`; otherwise `fetch` waits for one.
    """

    def __init__(self, policy: FetchPolicy, max_pools: int = 256,
                 resolver: Callable[[str, int], Any] | None = None, limiter: HostLimiter | None = None):
        self.policy = policy
        self._resolver = resolver
        self.user_agent = user_agent(policy.ua_token)
        self._allow = [parse_endpoint(s) for s in policy.allow_hosts]
        self._deny = tuple(d.lower().strip(".") for d in policy.deny_domains if d.strip("."))
        self._dns: dict[tuple[str, int], _DnsEntry] = {}
        self._dns_lock = threading.Lock()
        self._pools: collections.OrderedDict[tuple, urllib3.HTTPConnectionPool] = collections.OrderedDict()
        self._pool_lock = threading.Lock()
        self._max_pools = max_pools
        self.limiter = limiter or HostLimiter(policy.per_host)
        self._robots: dict[tuple[str, str, int], _Robots] = {}
        self._robots_lock = threading.Lock()

    # ---- public -------------------------------------------------------------------------------

    def host_of(self, url: str) -> str | None:
        """The host name whose slot a fetch of `url` takes first; None when the URL fails before any request."""
        try:
            return self._parse(url).host
        except FetchFailed:
            return None

    @contextlib.contextmanager
    def holding(self, slot: HostSlot) -> Iterator[None]:
        """Run fetches in this thread under a slot the caller took with `limiter.try_acquire`; released
        at the end (whatever host a redirect moved it to)."""
        prev = getattr(_local, "slot", None)
        _local.slot = slot
        try:
            yield
        finally:
            _local.slot = prev
            self.limiter.release(slot)

    def fetch(self, url: str) -> Fetched:
        """Fetch one URL: guards, per-host limit, retries with backoff, all within the sample deadline.

        Raises FetchFailed (with .attempts) on any failure.
        """
        target = self._parse(url)  # invalid_url / blocked_scheme before any waiting
        self._check_skip(target)
        slot = getattr(_local, "slot", None)
        own = slot is None
        if own:
            slot = _local.slot = self.limiter.acquire(target.host)
        try:
            deadline = time.monotonic() + self.policy.deadline
            with _watchdog().watch(deadline) as guard:
                return self._attempts(url, deadline, guard)
        finally:
            if own:
                _local.slot = None
                self.limiter.release(slot)

    def too_long_paused(self, host: str) -> bool:
        """True when `host` asked (Retry-After) for a pause that a new fetch could not wait out."""
        pause = self.limiter.paused_for(host)
        return pause > 0 and pause + min(self.policy.timeout, self.policy.deadline) > self.policy.deadline

    def skips(self, host: str) -> bool:
        """True when a fetch from `host` would fail at once, without a request: the host asked for a pause
        past the deadline, or it is down (HOST_DOWN_AFTER requests in a row got no answer)."""
        return self.limiter.down(host) is not None or self.too_long_paused(host)

    def _check_skip(self, t: _Target) -> None:
        down = self.limiter.down(t.host)
        if down is not None:
            err = FetchFailed(down[0], f"not asked: the host is down for now; {down[1]}", final_url=t.url)
        elif self.too_long_paused(t.host):
            err = FetchFailed("http_5xx", f"{t.host} asked for a pause of {self.limiter.paused_for(t.host):.0f}s "
                              f"(Retry-After), past the deadline: not asked again in it", final_url=t.url)
        else:
            return
        err.attempts = 0  # no request was made
        raise err

    def _move_slot(self, host: str, deadline: float, url: str) -> None:
        """Hold a slot of `host` instead of the one held now (a redirect or a retry changed hosts)."""
        slot = getattr(_local, "slot", None)
        if slot is None or slot.host == host:
            return
        if not self.limiter.move(slot, host, until=deadline):
            raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed waiting for a "
                              f"connection slot of {host}", final_url=url)

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
                held = getattr(_local, "slot", None)
                if held is not None:
                    self.limiter.succeeded(held.host)
                return got
            except FetchFailed as e:
                e.attempts = attempt
                held = getattr(_local, "slot", None)
                if e.http_status in OVERLOAD_STATUS and held is not None:
                    # the host that answered (see _move_slot)
                    self.limiter.throttled(held.host, e.retry_after, too_many=e.http_status == 429)
                if getattr(e, "_no_answer", False) and held is not None and held.held:
                    # the host that did not answer (see _move_slot); once it is down, no retry
                    if self.limiter.not_answered(held.host, e.code, e.message):
                        raise
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
                if held is not None and self.limiter.down(held.host) is not None:
                    raise  # other rows found it down meanwhile
                if e.http_status in OVERLOAD_STATUS and held is not None and held.held:
                    # the other rows this 429 paused retry too: take turns, spaced as the host now wants
                    self.limiter.wait_turn(held.host, deadline - self.policy.timeout)

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

    def _check(self, t: _Target, deadline: float | None = None) -> _Target:
        """Deny-list, DNS, address guard; sets t.ip (the address we will connect to)."""
        for d in self._deny:
            if t.host == d or t.host.endswith("." + d):
                raise FetchFailed("disallowed_domain", f"{t.host} is under denied domain {d}", final_url=t.url)
        addrs = self._resolve(t.host, t.port, deadline)
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

    def _resolve(self, host: str, port: int, deadline: float | None = None) -> list[str]:
        key = (host, port)
        while True:
            with self._dns_lock:
                entry = self._dns.get(key)
                mine = entry is None or (entry.done.is_set() and time.monotonic() >= entry.expires)
                if mine:
                    entry = self._dns[key] = _DnsEntry()
            if mine:
                self._lookup(entry, host, port)
            else:
                left = None if deadline is None else deadline - time.monotonic()
                if not entry.done.wait(timeout=None if left is None else max(0.0, left)):
                    raise FetchFailed("deadline_exceeded", f"deadline {self.policy.deadline}s passed waiting "
                                      f"for the DNS answer of {host}")
            hit = entry.value
            if isinstance(hit, str):
                raise FetchFailed("dns_error", f"{host}: {hit}")
            return hit

    def _lookup(self, entry: _DnsEntry, host: str, port: int) -> None:
        """Resolve into `entry` (the other threads asking for this name wait on entry.done)."""
        ttl = DNS_TTL
        try:
            if self._resolver is not None:
                got = self._resolver(host, port)
                if isinstance(got, tuple) and len(got) == 2 and not isinstance(got[0], str):
                    got, ttl = got[0], float(got[1])
                hit: list[str] | str = list(dict.fromkeys(str(ipaddress.ip_address(a)) for a in got))
            else:
                # getaddrinfo applies inet_aton rules, so 2130706433, 0177.0.0.1, 127.1 and 0x7f.1
                # all come back as 127.0.0.1 and are judged as such
                infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
                hit = list(dict.fromkeys(info[4][0] for info in infos))
            hit = hit or "no addresses"
        except (socket.gaierror, UnicodeError, OSError, ValueError, TypeError) as e:
            hit = str(e) or type(e).__name__
        except BaseException:
            entry.value, entry.expires = "resolver failed", 0.0
            entry.done.set()
            raise
        entry.value = hit
        entry.expires = time.monotonic() + (DNS_NEGATIVE_TTL if isinstance(hit, str) else max(0.0, ttl))
        entry.done.set()

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
            t = self._parse(url)
            self._move_slot(t.host, deadline, url)  # every hop within its own host's limit
            t = self._check(t, deadline)
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
            resp = self._request_raw(t, headers, timeout, cut)
        except FetchFailed as e:
            if e.code in ("connect_error", "timeout"):  # nothing came back from the host: no status line
                e._no_answer = True  # type: ignore[attr-defined]
            raise
        self.limiter.answered(t.host)
        return resp

    def _request_raw(self, t: _Target, headers: dict[str, str], timeout: urllib3.Timeout, cut: bool) -> Any:
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
