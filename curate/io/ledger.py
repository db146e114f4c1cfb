"""The ledger: one row per input row, always, with a status and an error code from a fixed vocabulary.

`status` is "success" or the error code itself; `error_code` is null on success. The vocabulary is
documented in docs/download.md ("The ledger and its error codes") and checked here, so a typo cannot invent a new code.
"""

from __future__ import annotations

import pyarrow as pa

ERROR_CODES: dict[str, str] = {
    "invalid_url": "the row has no parseable http(s) URL (empty, null, not a URL, not valid UTF-8)",
    "invalid_text": "the caption or a kept column is not valid UTF-8 (stored repaired with U+FFFD; not fetched)",
    "blocked_scheme": "a scheme other than http/https (file://, ftp://, data:, ...)",
    "blocked_address": "the host resolves to a non-global address (loopback, private, link-local, ...)",
    "disallowed_domain": "the domain is on --deny-domain",
    "dns_error": "the host name does not resolve",
    "connect_error": "the TCP/TLS connection failed or was reset",
    "timeout": "connect or read timeout",
    "deadline_exceeded": "the per-sample deadline passed (a slow or dripping server)",
    "http_4xx": "a 4xx answer (other than 429 after retries)",
    "http_5xx": "a 5xx answer after retries, or 429 after retries",
    "host_throttled": "not asked: its host limits its request rate (429) and the shard's other rows were done",
    "too_many_redirects": "more than --max-redirects hops, or a redirect loop",
    "too_large": "Content-Length or the body exceeds --max-bytes",
    "empty_body": "the answer had no bytes",
    "opted_out": "X-Robots-Tag noai/noimageai (or robots.txt with --respect-robots)",
    "decode_error": "the bytes are not a decodable image (truncated, HTML, corrupt)",
    "format_not_allowed": "an image format outside the allowlist (JPEG, PNG, WebP, GIF, BMP)",
    "decompression_bomb": "the header announces more than --max-pixels pixels",
    "too_small": "smaller than --min-image-size",
    "bad_aspect_ratio": "aspect ratio above --max-aspect-ratio",
    "duplicate_url": "the URL already appeared earlier in this run (see duplicate_of)",
    "internal_error": "an unexpected error in curate itself (a bug: please report it)",
}

TRANSIENT_CODES = frozenset({"dns_error", "connect_error", "timeout", "deadline_exceeded", "http_5xx",
                             "host_throttled"})

LEDGER_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("row", pa.int64()),  # row number in the whole input (0-based, across files)
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("http_status", pa.int32()),
    pa.field("final_url", pa.string()),
    pa.field("bytes", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("mime", pa.string()),
    pa.field("orig_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("elapsed", pa.float64()),
    pa.field("duplicate_of", pa.string()),
    pa.field("superseded_by", pa.string()),  # set by --retry-failed on rows that were re-attempted
]


def check_code(code: str | None) -> str | None:
    if code is not None and code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return code
