"""The read-only search back end of `curate serve`: stdlib http.server, one page plus a small JSON API.

    GET /                       the page (page.html, app.js, app.css: package data, no external assets)
    GET /api/info               index kind, rows, modalities, the server-side --where
    GET /api/search?q=TEXT&k=N  text query -> hits (with thumbnails as data: URIs)
    GET /api/neighbours?key=K   nearest samples to K
    GET /api/sample?key=K       K's ledger row, its signals and the export's verdict

Query strings are only ever encoded by the model or looked up as keys (bound parameters); the only SQL
text is the --where the operator gave on the command line. A strict Content-Security-Policy allows
scripts from this origin only, so a caption holding markup could not run even if it were rendered as HTML.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from curate.errors import CurateError
from curate.search.searcher import Query, Searcher

log = logging.getLogger(__name__)

MAX_K = 100
MAX_QUERY_CHARS = 500
STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("curate.search").joinpath(name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server_version = "curate-serve"
    searcher: Searcher  # set on the subclass make_server builds

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        if url.path in STATIC:
            name, ctype = STATIC[url.path]
            return self._send(200, _static(name), ctype)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = self._api(url.path, params)
        except ApiError as e:
            return self._json(e.status, {"error": str(e)})
        except CurateError as e:  # a bad key or query: the user's error, said plainly
            return self._json(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("serve: %s failed", self.path)
            return self._json(500, {"error": f"internal error: {type(e).__name__}"})
        return self._json(200, body)

    def do_POST(self) -> None:  # noqa: N802
        self._json(405, {"error": "read-only: only GET"})

    do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

    def _api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        s = self.searcher
        if path == "/api/info":
            return {"dataset": s.ds.root.name, "rows": s.meta["rows"], "kind": s.meta["kind"],
                    "factory": s.meta["factory"], "modalities": s.modalities(), "where": s.where}
        if path == "/api/sample":
            return s.sample(_required(params, "key"))
        k = _int(params.get("k", "24"), 1, MAX_K)
        modality = params.get("modality", "image")
        if modality not in s.modalities():
            raise ApiError(400, f"modality must be one of {', '.join(s.modalities())}")
        if path == "/api/search":
            q = _required(params, "q")
            if len(q) > MAX_QUERY_CHARS:
                raise ApiError(400, f"query longer than {MAX_QUERY_CHARS} characters")
            return self._hits(Query("text", q), k, modality)
        if path == "/api/neighbours":
            return self._hits(Query("key", _required(params, "key")), k, modality)
        raise ApiError(404, "no such endpoint")

    def _hits(self, q: Query, k: int, modality: str) -> dict[str, Any]:
        hits = self.searcher.query(q, k, modality)
        thumbs = self.searcher.thumbnails(hits)
        for h in hits:
            h["thumb"] = thumbs.get(h["key"])
        return {"query": q.value, "kind": q.kind, "hits": hits}

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("serve: " + format, *args)


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise ApiError(400, f"missing parameter '{name}'")
    return value


def _int(text: str, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(text)))
    except ValueError:
        raise ApiError(400, f"'{text}' is not an integer") from None


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to (host, port) answering with `searcher`; the caller runs serve_forever()."""
    handler = type("BoundHandler", (Handler,), {"searcher": searcher})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd
