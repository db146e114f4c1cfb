"""A raw-socket loopback server for hostile-server tests: each route is a function that owns the socket.

http.server cannot misbehave at the byte level (drip a status line, never end a chunk-size line), so the
routes here write whatever bytes they like, as slowly as they like, until the client goes away or the
server stops.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

Route = Callable[["Conn"], None]


class Conn:
    """One accepted connection: the request's path and helpers that stop when the client hangs up."""

    def __init__(self, sock: socket.socket, path: str, stop: threading.Event):
        self.sock = sock
        self.path = path
        self.stop = stop

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def drip(self, pieces: bytes | list[bytes], every: float = 0.1, forever: bytes | None = None) -> None:
        """Send `pieces` (a byte at a time for bytes) every `every` s, then `forever` repeatedly."""
        seq = [bytes([b]) for b in pieces] if isinstance(pieces, bytes) else list(pieces)
        for p in seq:
            if self.stop.is_set() or not self.send(p):
                return
            time.sleep(every)
        while forever is not None and not self.stop.is_set():
            if not self.send(forever):
                return
            time.sleep(every)


class RawServer:
    """Accepts on 127.0.0.1 (or `host`), reads the request head, and hands the connection to a route."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, Route] = {}
        self.on_connect: Route | None = None  # set: gets every connection before any byte is read (TLS)
        self.hits: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.lsock.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.endpoint}{path}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.lsock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        try:
            if self.on_connect is not None:
                self.on_connect(Conn(sock, "", self.stop))
                return
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                got = sock.recv(4096)
                if not got:
                    return
                head += got
            path = head.split(b" ", 2)[1].decode("latin-1").split("?", 1)[0]
            self.hits[path] += 1
            route = self.routes.get(path)
            if route is None:
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                route(Conn(sock, path, self.stop))
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.stop.set()
        self.lsock.close()
