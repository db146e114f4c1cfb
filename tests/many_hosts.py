"""A loopback web of many hosts for the download concurrency tests: one process, one asyncio loop,
listening on N loopback addresses (127.3.x.y, one port for all), one address per host.

Every request waits `delay` seconds before its answer (a small JPEG). Per address it counts the
requests being answered and the connections open, and keeps the most of each seen at any moment; it
also keeps the most requests in flight over all addresses. Hosts in `limited` answer 429 with
`Retry-After: retry_after` to the first request of every path, and record when they sent each 429
and when every request arrived, so a test can check that nobody came back before the Retry-After.
Hosts in `rated` allow that many requests per second (a token bucket with a second's burst) and answer
429 with `Retry-After: 1` past it, as a CDN's rate limit does.

    web = ManyHosts(200, delay=1.0, limited={0: 2})
    urls = web.url(host, path)
    ...
    report = web.close()   # {"max_active": {addr: n}, "max_conns": {...}, "max_in_flight": n, ...}
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing as mp
import socket
import time
from typing import Any

from PIL import Image


def addresses(n: int) -> list[str]:
    return [f"127.3.{k // 250}.{k % 250 + 1}" for k in range(n)]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 120, 220)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _bind(addrs: list[str]) -> tuple[list[socket.socket], int]:
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            for a in addrs:
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
    raise RuntimeError("no port free on every address")


def _serve(n: int, delay: float, limited: dict[int, int], rated: dict[int, float], conn: Any) -> None:
    addrs = addresses(n)
    index = {a: k for k, a in enumerate(addrs)}
    body = _jpeg()
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(body)).encode()
          + b"\r\n\r\n" + body)
    active = [0] * n
    conns = [0] * n
    max_active = [0] * n
    max_conns = [0] * n
    rep: dict[str, Any] = {"in_flight": 0, "max_in_flight": 0, "requests": 0}
    throttled: dict[int, list[float]] = {k: [] for k in limited}  # when each 429 was sent
    arrivals: dict[int, list[float]] = {k: [] for k in limited}
    seen: set[tuple[int, bytes]] = set()
    buckets = {k: [rate, time.monotonic()] for k, rate in rated.items()}

    def take_token(k: int) -> bool:
        tokens, last = buckets[k]
        now = time.monotonic()
        tokens = min(rated[k], tokens + (now - last) * rated[k])
        buckets[k] = [tokens - 1 if tokens >= 1 else tokens, now]
        return tokens >= 1

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        k = index[w.get_extra_info("sockname")[0]]
        conns[k] += 1
        max_conns[k] = max(max_conns[k], conns[k])
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                rep["requests"] += 1
                active[k] += 1
                rep["in_flight"] += 1
                max_active[k] = max(max_active[k], active[k])
                rep["max_in_flight"] = max(rep["max_in_flight"], rep["in_flight"])
                try:
                    if k in buckets and not take_token(k):
                        w.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
                        await w.drain()
                        continue
                    if k in limited:
                        arrivals[k].append(time.monotonic())
                        if (k, path) not in seen:
                            seen.add((k, path))
                            w.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %d\r\nContent-Length: 0\r\n\r\n"
                                    % limited[k])
                            await w.drain()
                            throttled[k].append(time.monotonic())
                            continue
                    await asyncio.sleep(delay)
                    w.write(ok)
                    await w.drain()
                finally:
                    active[k] -= 1
                    rep["in_flight"] -= 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            conns[k] -= 1
            w.close()

    async def main() -> None:
        socks, port = _bind(addrs)
        for s in socks:
            await asyncio.start_server(handle, sock=s, backlog=1024)
        conn.send(port)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # the stop message
        conn.send({"max_active": dict(enumerate(max_active)), "max_conns": dict(enumerate(max_conns)),
                   "max_in_flight": rep["max_in_flight"], "requests": rep["requests"],
                   "throttled": throttled, "arrivals": arrivals})

    asyncio.run(main())


class ManyHosts:
    def __init__(self, n: int, delay: float, limited: dict[int, int] | None = None,
                 rated: dict[int, float] | None = None):
        self.n = n
        self.addrs = addresses(n)
        self._conn, child = mp.get_context("fork").Pipe()
        self._proc = mp.get_context("fork").Process(target=_serve, args=(n, delay, limited or {}, rated or {}, child),
                                                    daemon=True)
        self._proc.start()
        self.port = self._conn.recv()

    def url(self, host: int, path: str) -> str:
        return f"http://{self.addrs[host]}:{self.port}{path}"

    def close(self) -> dict[str, Any]:
        self._conn.send("stop")
        report = self._conn.recv()
        self._proc.join(10)
        return report
