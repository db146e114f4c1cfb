"""The demo web: a loopback HTTP server that serves the demo pool with faults, duplicates and noisy
captions mixed in, and writes the URL list plus the ground truth of what each row should become.

    with DemoWeb(WebConfig(seed=0), out_dir) as web:
        web.url_list, web.ground_truth, web.allow_hosts, web.canary_hits

Routes (SAMPLE_ID is the row's id; every fault URL is /f/<route>/<SAMPLE_ID>.jpg):

    | route            | what the server does                                        | expected ledger code |
    |------------------|-------------------------------------------------------------|----------------------|
    | /i/<id>.jpg      | 200 image/jpeg                                              | success              |
    | 404              | 404 Not Found                                               | http_4xx             |
    | 410              | 410 Gone                                                    | http_4xx             |
    | 500              | 500 on every request                                        | http_5xx             |
    | 503_then_200     | first request to the path 503, later ones the image         | success (retried)    |
    | 429_retry_after  | first request 429 + Retry-After: 1, later ones the image    | success (retried)    |
    | slow             | sleeps `slow_seconds` (60) before sending anything          | timeout              |
    | drip             | headers with Content-Length 200 kB, then 1 byte per second  | deadline_exceeded    |
    | truncated        | the first 60% of the JPEG (Content-Length says so)          | decode_error         |
    | html             | an HTML page served as image/jpeg                           | decode_error         |
    | empty            | 200 with an empty body                                      | empty_body           |
    | redirect_chain   | 3 redirects (302), then the image                           | success              |
    | redirect_loop    | redirects between two paths forever                         | too_many_redirects   |
    | redirect_canary  | 302 to the canary server on 127.0.0.2 (not in allow_hosts)  | blocked_address      |
    | noai             | the image with X-Robots-Tag: noai                           | opted_out            |
    | bomb             | a 30000x30000 1-bit PNG of ~100 KB                          | decompression_bomb   |
    | too_large        | "Content-Length: 3000000000" then the connection closes     | too_large            |
    | tiff             | the image as TIFF (image/tiff)                              | format_not_allowed   |

`slow` expects `timeout`: a read timeout fires before the first byte, well before any per-sample
deadline; `drip` expects `deadline_exceeded` because each byte resets a read timeout.

Other rows: duplicates (dup_kind exact / reencode / resize / crop, served by /i/, dup_of names the
original, which always comes earlier in the list), captions that are misaligned (another category's
caption), boilerplate or non-English (a real openclipart title), malformed URLs ("not a url",
file://, ftp://, "", null: invalid_url or blocked_scheme) and one exact repeat of an earlier URL
(duplicate_url). For a seed and port, urls.parquet and ground_truth.parquet are identical byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.config import from_dict
from curate.demo.build_corpus import unit_hash
from curate.demo.corpus import load_split
from curate.errors import InputError
from curate.io.tables import write_table

log = logging.getLogger(__name__)

# route -> expected ledger error code (None: the downloader should end with success)
FAULT_ROUTES: dict[str, str | None] = {
    "404": "http_4xx",
    "410": "http_4xx",
    "500": "http_5xx",
    "503_then_200": None,
    "429_retry_after": None,
    "slow": "timeout",
    "drip": "deadline_exceeded",
    "truncated": "decode_error",
    "html": "decode_error",
    "empty": "empty_body",
    "redirect_chain": None,
    "redirect_loop": "too_many_redirects",
    "redirect_canary": "blocked_address",
    "noai": "opted_out",
    "bomb": "decompression_bomb",
    "too_large": "too_large",
    "tiff": "format_not_allowed",
}
DUP_KINDS = ("exact", "reencode", "resize", "crop")
CAPTION_KINDS = ("clean", "misaligned", "boilerplate", "non_english")
# Titles that the corpus marks non-English (lang_hint: the uploader's language) although the text is English,
# a word English shares, or a bare name: found by reading every non-English title the default web serves
# (bench/langid.py printed them). With `audited_titles` such a title is never served as a non-English caption,
# so the ground truth's "non_english" means the caption text is not English, which is what a caption
# language filter can be judged on; the unaudited mix is kept for comparison with earlier figures.
ENGLISH_TITLES = ("Various Cliparts", "Part of the Flat Icon Collection", "Papers", "Cup", "Puzzle",
                  "Lemon SVG theme", "Armadillo", "Dino", "domo kun", "pantyhose", "Cd", "Dossier", "Aerobics",
                  "Female", "Floppy", "Hotel Icon", "Liberty", "Mobile", "Ballerina", "Bobi", "Yoga",
                  "C Rollandin Francesco")
BOILERPLATE = ("IMG_{n}.JPG", "click here", "", "image", "DSC{n:05d}.jpg", "Click to enlarge", "thumbnail")
# (URL, expected code): rows a URL list picks up from scraping mistakes
MALFORMED: tuple[tuple[str | None, str], ...] = (
    ("not a url", "invalid_url"),
    ("file:///etc/passwd", "blocked_scheme"),
    ("ftp://example.org/x.jpg", "blocked_scheme"),
    ("", "invalid_url"),
    (None, "invalid_url"),
)
REDIRECT_HOPS = 3
# large enough never to finish at one byte a second, small enough to pass any sane --max-bytes
DRIP_LENGTH = 200_000
HUGE_LENGTH = 3_000_000_000
BOMB_SIDE = 30_000

URL_SCHEMA = pa.schema([pa.field("URL", pa.string()), pa.field("TEXT", pa.string()),
                        pa.field("SAMPLE_ID", pa.string())])
TRUTH_SCHEMA = pa.schema([
    pa.field("SAMPLE_ID", pa.string()), pa.field("URL", pa.string()), pa.field("TEXT", pa.string()),
    pa.field("image_id", pa.string()), pa.field("category", pa.string()), pa.field("fault", pa.string()),
    pa.field("expected_error_code", pa.string()), pa.field("dup_of", pa.string()),
    pa.field("dup_kind", pa.string()), pa.field("caption_kind", pa.string()),
    pa.field("clean_caption", pa.string()),
])


@dataclass(frozen=True)
class WebConfig:
    """What the demo web serves. Rates are shares of the pool images used (n; None: all of them)."""

    seed: int = 0
    n: int | None = None
    fault_rate: float = 0.08
    dup_rate: float = 0.10
    misaligned_rate: float = 0.10
    boilerplate_rate: float = 0.05
    non_english_rate: float = 0.03  # capped by how many pool images have a non-English title
    audited_titles: bool = True  # never serve an ENGLISH_TITLES title as a non-English caption
    malformed_rows: bool = True  # the MALFORMED rows and one repeated URL
    faults: tuple[str, ...] = tuple(FAULT_ROUTES)  # which fault routes are drawn from
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port
    canary_host: str = "127.0.0.2"
    slow_seconds: float = 60.0
    drip_interval: float = 1.0

    def check(self) -> None:
        for name in ("fault_rate", "dup_rate", "misaligned_rate", "boilerplate_rate", "non_english_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"demo web: {name} must be within [0, 1], got {v}")
        if self.misaligned_rate + self.boilerplate_rate + self.non_english_rate > 1.0:
            raise InputError("demo web: misaligned_rate + boilerplate_rate + non_english_rate exceed 1")
        unknown = [f for f in self.faults if f not in FAULT_ROUTES]
        if unknown:
            raise InputError(f"demo web: unknown fault route(s) {', '.join(unknown)}; known: {', '.join(FAULT_ROUTES)}")
        if self.n is not None and self.n < 1:
            raise InputError(f"demo web: n must be at least 1 (or None for the whole pool), got {self.n}")


@dataclass
class Row:
    """One URL-list row and its ground truth; `body` is what /i/ serves for it (None: a fault)."""

    sample_id: str
    url: str | None
    text: str | None
    image_id: str | None = None
    category: str | None = None
    fault: str | None = None
    expected_error_code: str | None = None
    dup_of: str | None = None
    dup_kind: str | None = None
    caption_kind: str | None = None
    clean_caption: str | None = None
    body: bytes | None = None


# --- payloads ------------------------------------------------------------------------------------

def _jpeg(im: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def dup_bytes(original: bytes, kind: str) -> bytes:
    """The served bytes of a duplicate of `original` (JPEG) of the given kind."""
    from PIL import Image

    from curate.imaging import safe_decode_rgb

    if kind == "exact":
        return original
    im = safe_decode_rgb(original)
    if kind == "reencode":
        return _jpeg(im, 60)
    if kind == "resize":
        w, h = im.size
        return _jpeg(im.resize((max(1, round(w * 0.75)), max(1, round(h * 0.75))), Image.Resampling.LANCZOS), 85)
    if kind == "crop":
        w, h = im.size
        dx, dy = round(w * 0.08), round(h * 0.08)
        return _jpeg(im.crop((dx, dy, w - dx, h - dy)), 85)
    raise ValueError(f"unknown duplicate kind {kind!r}")


def tiff_bytes(jpeg: bytes) -> bytes:
    from curate.imaging import safe_decode_rgb

    buf = io.BytesIO()
    safe_decode_rgb(jpeg).save(buf, format="TIFF")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A side x side single-colour 1-bit greyscale PNG, written chunk by chunk with zlib so that no
    image library ever holds it decoded (side=30000: 900 Mpx in ~110 KB)."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte "none", then white pixels
    comp = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 20) // len(row))
    parts, left = [], side
    while left:
        k = min(rows_per_block, left)
        parts.append(comp.compress(row * k))
        left -= k
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


HTML_PAGE = (b"<!doctype html><html><head><title>Photo</title></head><body>"
             b"<p>This image is no longer available.</p></body></html>\n")


# --- the plan: which row gets what ---------------------------------------------------------------

def _pick(weights: list[tuple[str, float]], u: float) -> str | None:
    acc = 0.0
    for name, w in weights:
        acc += w
        if u < acc:
            return name
    return None


def plan_rows(cfg: WebConfig, base_url: str) -> list[Row]:
    """Every row of the URL list in order, with its ground truth, from the pool and the seed alone.

    Long because every draw (order, faults, captions, duplicates, repeated URLs) reads the same seeded
    `draw` and the rows built before it; split up, each part would need the whole state passed along.
    """
    cfg.check()
    pool = load_split("pool", columns=["image_id", "category", "title", "caption", "lang_hint", "image"]).to_pylist()
    s = cfg.seed

    def draw(what: str, key: str) -> float:
        return unit_hash(f"demo-web:{s}:{what}:{key}")

    pool.sort(key=lambda r: draw("order", r["image_id"]))
    # openclipart files the same drawing under several folders (about 830 byte-identical extras in the
    # pool): serve one of each, so that every duplicate the demo web serves is one its ground truth names
    seen: set[str] = set()
    unique = []
    for r in pool:
        digest = hashlib.sha256(r["image"]).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(r)
    pool = unique
    if cfg.n is not None:
        pool = pool[:cfg.n]
    n = len(pool)
    # non-English captions are real titles, so only images with such a title can carry one
    non_en = [r["image_id"] for r in pool if r["lang_hint"] != "en"
              and not (cfg.audited_titles and (r["title"] or "").startswith(ENGLISH_TITLES))]
    non_en_ids = set(non_en[:round(cfg.non_english_rate * n)])

    originals: list[Row] = []
    for r in pool:
        iid = r["image_id"]
        row = Row(sample_id="", url=None, text=None, image_id=iid, category=r["category"],
                  clean_caption=r["caption"], body=r["image"])
        faults = list(cfg.faults)
        if faults and draw("fault", iid) < cfg.fault_rate:
            row.fault = faults[int(draw("fault-kind", iid) * len(faults))]
            row.expected_error_code = FAULT_ROUTES[row.fault]
        u = draw("caption", iid)
        if iid in non_en_ids:
            row.caption_kind, row.text = "non_english", r["title"]
        else:
            kind = _pick([("misaligned", cfg.misaligned_rate), ("boilerplate", cfg.boilerplate_rate)], u) or "clean"
            row.caption_kind = kind
            if kind == "clean":
                row.text = r["caption"]
            elif kind == "boilerplate":
                b = BOILERPLATE[int(draw("boilerplate", iid) * len(BOILERPLATE))]
                row.text = b.format(n=1000 + int(draw("boilerplate-n", iid) * 9000))
            else:  # another category's caption: misaligned for sure, not merely a near-synonym
                j = int(draw("misaligned", iid) * n)
                j = next((j + k for k in range(n) if pool[(j + k) % n]["category"] != r["category"]), j)
                row.text = pool[j % n]["caption"]
        originals.append(row)

    # duplicates copy an original that should download fine and sort after it (a "keep the first"
    # rule then keeps the original, as the ground truth says)
    ordered: list[tuple[float, int, Row]] = [(float(i), 0, row) for i, row in enumerate(originals)]
    for i, row in enumerate(originals):
        if row.fault is not None or draw("dup", row.image_id) >= cfg.dup_rate:
            continue
        kind = DUP_KINDS[int(draw("dup-kind", row.image_id) * len(DUP_KINDS))]
        copy = Row(sample_id="", url=None, text=row.clean_caption if row.caption_kind == "clean" else row.text,
                   image_id=row.image_id, category=row.category, dup_kind=kind, caption_kind=row.caption_kind,
                   clean_caption=row.clean_caption, body=dup_bytes(row.body, kind))
        ordered.append((i + 0.5 + draw("dup-pos", row.image_id) * (n - i), 1, copy))
        copy.dup_of = row  # resolved to a SAMPLE_ID once ids are given
    if cfg.malformed_rows:
        for k, (url, code) in enumerate(MALFORMED):
            ordered.append((draw("malformed", str(k)) * n, 2,
                            Row("", url, "malformed URL", fault="malformed_url", expected_error_code=code)))
    ordered.sort(key=lambda t: (t[0], t[1]))
    rows = [t[2] for t in ordered]
    for i, row in enumerate(rows):
        row.sample_id = f"{i:07d}"
    for row in rows:
        if isinstance(row.dup_of, Row):
            row.dup_of = row.dup_of.sample_id
        if row.image_id is not None:
            route = f"f/{row.fault}" if row.fault else "i"
            row.url = f"{base_url}/{route}/{row.sample_id}.jpg"
    if cfg.malformed_rows:
        # an exact repeat of an earlier URL that should succeed
        first = next((r for r in rows if r.image_id and r.fault is None and r.dup_of is None), None)
        if first is not None:
            rows.append(Row(f"{len(rows):07d}", first.url, first.text, image_id=first.image_id,
                            category=first.category, fault="repeated_url", expected_error_code="duplicate_url",
                            caption_kind=first.caption_kind, clean_caption=first.clean_caption))
    return rows


def write_lists(rows: list[Row], out_dir: Path) -> tuple[Path, Path]:
    url_list, truth = out_dir / "urls.parquet", out_dir / "ground_truth.parquet"
    write_table(url_list, pa.Table.from_pylist(
        [{"URL": r.url, "TEXT": r.text, "SAMPLE_ID": r.sample_id} for r in rows], schema=URL_SCHEMA))
    write_table(truth, pa.Table.from_pylist(
        [{"SAMPLE_ID": r.sample_id, "URL": r.url, "TEXT": r.text, "image_id": r.image_id, "category": r.category,
          "fault": r.fault, "expected_error_code": r.expected_error_code, "dup_of": r.dup_of,
          "dup_kind": r.dup_kind, "caption_kind": r.caption_kind, "clean_caption": r.clean_caption}
         for r in rows], schema=TRUTH_SCHEMA))
    return url_list, truth


# --- the servers ---------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # slow and drip handlers must not hold up shutdown

    def __init__(self, addr: tuple[str, int], handler: type, web: DemoWeb):
        self.web = web
        super().__init__(addr, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # a client that gave up on a slow or dripping answer is the point of those routes, not an error
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        web = self.server.web
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if parts[0] == "i" and len(parts) == 2:
            row = web.row(parts[1])
            if row is None or row.body is None:
                return self._send(404, b"not found", "text/plain")
            return self._send(200, row.body)
        if parts[0] == "f" and len(parts) >= 3:
            row = web.row(parts[2])
            if row is None or row.fault != parts[1]:
                return self._send(404, b"not found", "text/plain")
            return self._fault(row, parts[3:])
        return self._send(404, b"not found", "text/plain")

    def _fault(self, row: Row, rest: list[str]) -> None:
        web, route, body = self.server.web, row.fault, row.body or b""
        base = f"/f/{route}/{row.sample_id}.jpg"
        if route in ("404", "410", "500"):
            return self._send(int(route), f"{route}\n".encode(), "text/plain")
        if route in ("503_then_200", "429_retry_after"):
            if web.first_request(base):
                status, headers = (503, {}) if route == "503_then_200" else (429, {"Retry-After": "1"})
                return self._send(status, b"try again later\n", "text/plain", headers)
            return self._send(200, body)
        if route == "slow":
            web.stopping.wait(web.config.slow_seconds)
            return self._send(200, body)
        if route == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(DRIP_LENGTH))
            self.end_headers()
            self.close_connection = True
            # one byte per interval until the client gives up (the write then fails) or we stop
            for k in range(DRIP_LENGTH):
                try:
                    self.wfile.write(body[k:k + 1] or b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                if web.stopping.wait(web.config.drip_interval):
                    return
            return
        if route == "truncated":
            return self._send(200, body[:len(body) * 6 // 10])
        if route == "html":
            return self._send(200, HTML_PAGE)
        if route == "empty":
            return self._send(200, b"")
        if route == "redirect_chain":
            hop = int(rest[0]) if rest and rest[0].isdigit() else 0
            if hop < REDIRECT_HOPS:
                return self._redirect(f"{base}/{hop + 1}")
            return self._send(200, body)
        if route == "redirect_loop":
            return self._redirect(base if rest else f"{base}/again")
        if route == "redirect_canary":
            return self._redirect(f"{web.canary_base}/canary/{row.sample_id}.jpg")
        if route == "noai":
            return self._send(200, body, headers={"X-Robots-Tag": "noai"})
        if route == "bomb":
            return self._send(200, bomb_png(), "image/png")
        if route == "too_large":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(HUGE_LENGTH))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return None
        if route == "tiff":
            return self._send(200, tiff_bytes(body), "image/tiff")
        return self._send(404, b"not found", "text/plain")


class _CanaryHandler(BaseHTTPRequestHandler):
    """Counts every request: a hit means a redirect to another address was followed."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("canary %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self.server.web.count_canary_hit()
        body = b"canary: this request should have been blocked\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


class DemoWeb:
    """Serve the demo pool on cfg.host and write out_dir/urls.parquet and out_dir/ground_truth.parquet.

    Use as a context manager; `allow_hosts` lists only the main server (the canary must stay blocked).
    """

    def __init__(self, config: WebConfig | None = None, out_dir: str | os.PathLike = "demo-web"):
        self.config = config or WebConfig()
        self.config.check()
        self.out_dir = Path(out_dir)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._seen_paths: set[str] = set()
        self._canary_hits = 0
        self._rows: dict[str, Row] = {}
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.rows: list[Row] = []
        self.url_list = self.out_dir / "urls.parquet"
        self.ground_truth = self.out_dir / "ground_truth.parquet"

    # state the handlers share
    def row(self, name: str) -> Row | None:
        return self._rows.get(name.rsplit(".", 1)[0])

    def first_request(self, path: str) -> bool:
        with self._lock:
            if path in self._seen_paths:
                return False
            self._seen_paths.add(path)
            return True

    def count_canary_hit(self) -> None:
        with self._lock:
            self._canary_hits += 1

    @property
    def canary_hits(self) -> int:
        with self._lock:
            return self._canary_hits

    @property
    def base_url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def canary_base(self) -> str:
        host, port = self._servers[1].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def allow_hosts(self) -> list[str]:
        host, port = self._servers[0].server_address[:2]
        return [f"{host}:{port}"]

    def _serve(self, host: str, port: int, handler: type) -> None:
        try:
            server = _Server((host, port), handler, self)
        except OSError as e:
            raise InputError(f"demo web: cannot listen on {host}:{port} ({e})") from e
        self._servers.append(server)
        t = threading.Thread(target=server.serve_forever, name=f"demo-web-{host}", daemon=True)
        t.start()
        self._threads.append(t)

    def start(self) -> DemoWeb:
        cfg = self.config
        self._serve(cfg.host, cfg.port, _Handler)
        try:
            self._serve(cfg.canary_host, 0, _CanaryHandler)
            self.rows = plan_rows(cfg, self.base_url)
            self._rows = {r.sample_id: r for r in self.rows if r.image_id is not None and r.fault != "repeated_url"}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_lists(self.rows, self.out_dir)
        except BaseException:
            self.stop()
            raise
        log.info("demo web on %s: %d rows -> %s", self.base_url, len(self.rows), self.url_list)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> DemoWeb:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def pipeline_service(settings: dict[str, Any], state_dir: Path) -> Iterator[dict[str, Any]]:
    """The `demo-web` service kind of pipelines (curate.services): settings are WebConfig fields; the URL
    list and ground truth are written under `state_dir`."""
    with DemoWeb(from_dict(WebConfig, dict(settings)), state_dir) as web:
        yield {"url_list": str(web.url_list), "ground_truth": str(web.ground_truth),
               "allow_hosts": list(web.allow_hosts), "base_url": web.base_url}
