"""A loopback web shaped like the real one, for bench/download.py --latency-web (not a test fixture).

One asyncio process listens on many loopback addresses (127.1.0.1, 127.1.0.2, ...; the same port on
each), one address per host. Each URL is planned once (`plan_urls`): its host (a Zipf share: host k
holds a share proportional to 1/k^s), what it answers (an image of the bench's web-like mix, 404, 410,
a redirect chain across hosts) and whether its body trickles over several seconds. Every request waits
a time to first byte drawn from a lognormal distribution (a long tail); a few hosts rate-limit and
answer 429 with Retry-After past their rate or past a few requests at once. `--instant` serves the same plan with no waiting, no
trickle and no rate limits (the same images, the same statuses).

The server samples, every SAMPLE_PERIOD seconds, the requests it is answering and the connections open,
into a text file (time, in flight, open connections, of those in flight: bodies trickling, requests to a
rate-limiting host) that the benchmark reads per run.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from dataclasses import dataclass, field

SAMPLE_PERIOD = 0.25


@dataclass(frozen=True)
class WebShape:
    hosts: int = 64
    zipf_s: float = 1.0           # share of host k ~ 1/k^s
    ttfb_median: float = 0.120    # seconds
    ttfb_sigma: float = 0.9       # lognormal sigma: p99 ~ 1 s, p99.9 ~ 2 s
    slow_share: float = 0.015     # bodies trickled over slow_seconds
    slow_seconds: tuple[float, float] = (2.0, 8.0)
    not_found_share: float = 0.03
    gone_share: float = 0.01
    redirect_share: float = 0.02  # chains of 1-3 hops, each to another host
    limited_ranks: tuple[int, ...] = (8, 16, 32)  # hosts (by Zipf rank, 1 = biggest) answering 429 past...
    limited_rate: float = 8.0     # ... this many requests per second (a token bucket, burst of one second)
    limited_concurrency: int = 2  # ... or this many requests in progress at once (a CDN's per-client limit)
    retry_after: int = 1          # seconds, in the 429's Retry-After
    seed: int = 0


@dataclass
class UrlPlan:
    host: int                 # index into the host addresses
    kind: str                 # "image", "404", "410", "redirect"
    image: int = 0            # index into the images
    hops: list[int] = field(default_factory=list)  # hosts of the redirect chain's later hops
    slow: float = 0.0         # seconds the body trickles over (0: sent at once)


def host_addresses(n: int) -> list[str]:
    return [f"127.1.{k // 250}.{k % 250 + 1}" for k in range(n)]


def plan_urls(n: int, n_images: int, shape: WebShape) -> list[UrlPlan]:
    rng = random.Random(shape.seed)
    weights = [1.0 / (k + 1) ** shape.zipf_s for k in range(shape.hosts)]
    hosts = rng.choices(range(shape.hosts), weights, k=n)
    out = []
    for i in range(n):
        r = rng.random()
        p = UrlPlan(host=hosts[i], kind="image", image=i % n_images)
        if r < shape.not_found_share:
            p.kind = "404"
        elif r < shape.not_found_share + shape.gone_share:
            p.kind = "410"
        elif r < shape.not_found_share + shape.gone_share + shape.redirect_share:
            p.kind = "redirect"
            p.hops = [rng.randrange(shape.hosts) for _ in range(rng.randint(1, 3))]
        if p.kind in ("image", "redirect") and rng.random() < shape.slow_share:
            p.slow = rng.uniform(*shape.slow_seconds)
        out.append(p)
    return out


def zipf_top_share(shape: WebShape) -> float:
    weights = [1.0 / (k + 1) ** shape.zipf_s for k in range(shape.hosts)]
    return weights[0] / sum(weights)


def bind_all(addresses: list[str]) -> tuple[list[socket.socket], int]:
    """Listening sockets on every address with one port number (retried until a port is free on all)."""
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            for a in addresses:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((a, socks[0].getsockname()[1] if socks else 0))
                s.listen(1024)
                s.setblocking(False)
                socks.append(s)
            return socks, socks[0].getsockname()[1]
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no port free on every loopback address")


def serve(images: list[bytes], plans: list[UrlPlan], shape: WebShape, instant: bool, port_q, samples_path: str) -> None:
    """Run the web until killed; puts the port on port_q once every address listens. Long because the
    handlers share the plan, the rate limiters and the counters as closures of one event loop."""
    addresses = host_addresses(shape.hosts)
    addr_index = {a: k for k, a in enumerate(addresses)}
    rng = random.Random(shape.seed + 1)
    mu = math.log(shape.ttfb_median)
    limited = {r - 1 for r in shape.limited_ranks if r - 1 < shape.hosts}
    buckets = {k: [shape.limited_rate, time.monotonic()] for k in limited}
    stats = {"in_flight": 0, "conns": 0, "slow": 0, "limited": 0}
    busy = [0] * shape.hosts  # requests in progress per host (this one included)
    heads = {b: (b"HTTP/1.1 200 OK\r\nServer: latency-web\r\nContent-Type: image/jpeg\r\nContent-Length: "
                 + str(len(img)).encode() + b"\r\n\r\n") for b, img in enumerate(images)}

    def simple(status: bytes, extra: bytes = b"") -> bytes:
        return b"HTTP/1.1 " + status + b"\r\nServer: latency-web\r\nContent-Length: 0\r\n" + extra + b"\r\n"

    def take_token(k: int) -> bool:
        tokens, last = buckets[k]
        now = time.monotonic()
        tokens = min(shape.limited_rate, tokens + (now - last) * shape.limited_rate)
        ok = tokens >= 1.0
        buckets[k] = [tokens - 1.0 if ok else tokens, now]
        return ok

    async def answer(w: asyncio.StreamWriter, host: int, path: bytes) -> None:
        # paths: /{i}.jpg (the listed URL) or /h/{i}/{hop}.jpg (a later hop of URL i's redirect chain)
        parts = path.strip(b"/").split(b"/")
        try:
            if parts[0] == b"h":
                i, hop = int(parts[1]), int(parts[2].split(b".")[0])
            else:
                i, hop = int(parts[0].split(b".")[0]), 0
            p = plans[i]
        except (ValueError, IndexError):
            w.write(simple(b"404 Not Found"))
            return
        if not instant:
            if host in limited and (busy[host] > shape.limited_concurrency or not take_token(host)):
                await asyncio.sleep(0.02)
                w.write(simple(b"429 Too Many Requests", f"Retry-After: {shape.retry_after}\r\n".encode()))
                return
            await asyncio.sleep(rng.lognormvariate(mu, shape.ttfb_sigma))
        if p.kind in ("404", "410"):
            w.write(simple(b"404 Not Found" if p.kind == "404" else b"410 Gone"))
            return
        if p.kind == "redirect" and hop < len(p.hops):
            nxt = addresses[p.hops[hop]]
            port = w.get_extra_info("sockname")[1]
            w.write(simple(b"302 Found", f"Location: http://{nxt}:{port}/h/{i}/{hop + 1}.jpg\r\n".encode()))
            return
        body = images[p.image]
        w.write(heads[p.image])
        if instant or not p.slow:
            w.write(body)
            return
        pieces = 20
        step = -(-len(body) // pieces)
        stats["slow"] += 1
        try:
            for k in range(0, len(body), step):
                w.write(body[k:k + step])
                await w.drain()
                await asyncio.sleep(p.slow / pieces)
        finally:
            stats["slow"] -= 1

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        stats["conns"] += 1
        host = addr_index.get(w.get_extra_info("sockname")[0], 0)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].split(b" ")
                lim = host in limited
                stats["in_flight"] += 1
                stats["limited"] += lim
                busy[host] += 1
                try:
                    await answer(w, host, line[1] if len(line) > 1 else b"/")
                    await w.drain()
                finally:
                    stats["in_flight"] -= 1
                    stats["limited"] -= lim
                    busy[host] -= 1
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            stats["conns"] -= 1
            w.close()

    async def sample() -> None:
        with open(samples_path, "a", buffering=1) as f:
            while True:
                f.write(f"{time.time():.3f} {stats['in_flight']} {stats['conns']} {stats['slow']} {stats['limited']}\n")
                await asyncio.sleep(SAMPLE_PERIOD)

    async def main() -> None:
        socks, port = bind_all(addresses)
        for s in socks:
            await asyncio.start_server(handle, sock=s, backlog=1024)
        port_q.put(port)
        await sample()

    asyncio.run(main())


def _samples(path: str, t0: float, t1: float) -> list[tuple[float, list[int]]]:
    """(seconds since t0, the counts of the line) for each sample within [t0, t1]."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                t, *counts = line.split()
                if t0 <= float(t) <= t1:
                    out.append((float(t) - t0, [int(c) for c in counts]))
    except (OSError, ValueError):
        pass
    return out


def read_samples(path: str, t0: float, t1: float) -> list[tuple[float, int, int]]:
    """(seconds since t0, requests in flight, open connections) sampled by the server within [t0, t1]."""
    return [(t, c[0], c[1]) for t, c in _samples(path, t0, t1)]


def read_kinds(path: str, t0: float, t1: float) -> list[tuple[float, int, int]]:
    """(seconds since t0, bodies trickling, requests to a rate-limiting host) sampled within [t0, t1]."""
    return [(t, c[2], c[3]) for t, c in _samples(path, t0, t1)]
