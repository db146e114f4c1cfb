"""The one loopback HTTP(S) server of the tests: routes are functions, every request is counted.

    server.image("/a.jpg")                                   # 200 with a JPEG, returns the URL
    server.routes["/x"] = lambda h, n: h.send(503 if n == 1 else 200, jpeg())   # n: nth hit of the path

`conftest.py` hands it out as the `server` fixture (and `canary` on 127.0.0.2); pass `ssl_context` for
HTTPS. Byte-level misbehaviour (a dripped status line, a never-ending chunk) needs raw sockets: see
hostile_server.py.
"""

from __future__ import annotations

import io
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

Route = Callable[[Any, int], None]


def jpeg(w: int = 64, h: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv: LoopServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.hits[path] += 1
            srv.hosts.append(self.headers.get("Host"))
            n = srv.hits[path]
        route = srv.routes.get(path)
        try:
            if route is None:
                self.send(404, b"nope", "text/plain")
            else:
                route(self, n)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        # headers in one dict, so a caller's header can replace a default one
        self.send_response(status)
        for name, value in {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class LoopServer:
    """A loopback HTTP server whose routes are functions (handler, nth hit of the path).

    `hits` counts requests per path and `hosts` records each request's Host header (with TLS: only
    requests that passed the handshake); `sni` records the names TLS clients asked for.
    """

    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str | None] = []
        self.sni: list[str | None] = []
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()  # bytes written by streaming routes
        self.stop = threading.Event()
        self.scheme = "https" if ssl_context is not None else "http"
        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.owner = self  # type: ignore[attr-defined]
        if ssl_context is not None:
            ssl_context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.endpoint}{path}"

    def image(self, path: str, body: bytes | None = None, headers: dict | None = None,
              ctype: str = "image/jpeg") -> str:
        data = body if body is not None else jpeg()
        self.routes[path] = lambda h, n: h.send(200, data, ctype, headers)
        return self.url(path)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
