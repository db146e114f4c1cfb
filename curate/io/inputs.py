"""URL list readers for `curate download`: parquet, csv, tsv, json, jsonl, txt (each optionally .gz).

A local path or an fsspec URL, a single file or a folder of files (read in sorted order). Every
reader streams the same record batches: `url`, `caption` and the kept columns, all strings, in input
order, plus `input_error` / `input_error_message` for rows whose text had to be repaired. Memory is
bounded by the batch size, whatever the size of the list; the one exception is a JSON *array* file,
which is parsed whole (use JSON lines for big lists).

Text that is not valid UTF-8 (a parquet string column holding other bytes, a csv in another
encoding) or JSON holding lone surrogates (\ud800) is repaired per value with U+FFFD and the row
gets an error code instead of being fetched: `invalid_url` when it is the URL, `invalid_text` when it
is the caption or a kept column. Nothing raises on such bytes.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate.errors import InputError

FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "txt")


@dataclass(frozen=True)
class Preset:
    url_col: str
    caption_col: str | None
    keep_cols: tuple[str, ...] = ()
    input_format: str = "auto"
    header: bool = True


# CC3M's tsv is (caption, url) and CC12M's is (url, caption), both without a header; for these the
# column order is taken from the first line (whichever field starts with http is the URL)
PRESETS: dict[str, Preset] = {
    "laion": Preset("URL", "TEXT"),
    "cc3m": Preset("url", "caption", input_format="tsv", header=False),
    "cc12m": Preset("url", "caption", input_format="tsv", header=False),
    "datacomp": Preset("url", "text", ("uid",)),
}


@dataclass(frozen=True)
class InputSpec:
    path: str
    input_format: str = "auto"
    url_col: str = "url"
    caption_col: str | None = None
    keep_cols: tuple[str, ...] = ()
    header: bool = True


def _fs(path: str) -> tuple[Any, str]:
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(path)
    except (ValueError, ImportError) as e:
        raise InputError(f"INPUT {path}: cannot open ({e})") from None


def _format_of(name: str) -> str | None:
    base = name[:-3] if name.lower().endswith(".gz") else name
    ext = base.rsplit(".", 1)[-1].lower() if "." in base.rsplit("/", 1)[-1] else ""
    return ext if ext in FORMATS else None


def list_files(spec: InputSpec) -> list[tuple[str, int]]:
    """(path, size) of every input file, sorted; a folder gives the files of known formats in it."""
    fs, root = _fs(spec.path)
    try:
        if not fs.exists(root):
            raise InputError(f"INPUT {spec.path}: no such file or folder")
        if fs.isdir(root):
            found = []
            for p in sorted(fs.find(root)):
                name = p.rsplit("/", 1)[-1]
                if name.startswith((".", "_")):
                    continue
                fmt = _format_of(name)
                if fmt and (spec.input_format == "auto" or fmt == spec.input_format
                            or {fmt, spec.input_format} <= {"json", "jsonl"}):
                    found.append(p)
            if not found:
                raise InputError(f"INPUT {spec.path}: folder holds no {spec.input_format if spec.input_format != 'auto' else '/'.join(FORMATS)} files")
        else:
            found = [root]
        out = []
        for p in found:
            info = fs.info(p)
            out.append((fs.unstrip_protocol(p) if "://" in spec.path else p, int(info.get("size") or 0)))
        return out
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"INPUT {spec.path}: cannot read ({e})") from None


@contextlib.contextmanager
def _open_stream(path: str) -> Iterator[Any]:
    """A binary stream of one input file, gunzipped on the fly for .gz (never read whole)."""
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as raw:
            if path.lower().endswith(".gz"):
                with gzip.GzipFile(fileobj=raw) as gz:
                    yield gz
            else:
                yield raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"INPUT {path}: cannot read ({e})") from None


def _text_stream(raw: Any) -> io.TextIOWrapper:
    # surrogateescape: bytes that are not UTF-8 become lone surrogates, found and repaired per value
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _file_format(path: str, spec: InputSpec) -> str:
    if spec.input_format != "auto":
        return spec.input_format
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(f"INPUT {path}: cannot tell the format from the name; use --input-format")
    return fmt


def _need(path: str, columns: list[str], spec: InputSpec) -> None:
    wanted = [(spec.url_col, "--url-col")]
    if spec.caption_col:
        wanted.append((spec.caption_col, "--caption-col"))
    wanted += [(c, "--keep-col") for c in spec.keep_cols]
    for col, flag in wanted:
        if col not in columns:
            raise InputError(f"INPUT {path}: column '{col}' ({flag}) not found; columns: {', '.join(map(str, columns)) or '(none)'}")


def _wanted(spec: InputSpec) -> list[str]:
    return [c for c in dict.fromkeys([spec.url_col, spec.caption_col, *spec.keep_cols]) if c]


def _repair(value: Any) -> tuple[str | None, bool]:
    """(the value as text, whether it had to be repaired): bytes or surrogates that are not UTF-8."""
    if value is None:
        return None, False
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return None, False
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), False
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), True
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        return text, False
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        # lone surrogates: JSON escapes such as \ud800, or invalid bytes kept by surrogateescape
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text), True


def _strings(values: list[Any]) -> tuple[pa.Array, list[bool] | None]:
    """Python values -> a string array; the repaired rows' mask, or None when none needed repair."""
    try:
        if all(v is None or isinstance(v, str) for v in values):
            return pa.array(values, pa.string()), None  # fast path: pyarrow refuses surrogates itself
    except (UnicodeEncodeError, pa.ArrowException):
        pass
    out, bad = [], []
    for v in values:
        text, repaired = _repair(v)
        out.append(text)
        bad.append(repaired)
    return pa.array(out, pa.string()), (bad if any(bad) else None)


def _arrow_strings(arr: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, list[bool] | None]:
    """An arrow column -> a valid string array (parquet string columns may hold any bytes)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            arr.validate(full=True)  # checks UTF-8
            return arr.cast(pa.string()), None
        except pa.ArrowException:
            return _strings(arr.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()).to_pylist())
    if pa.types.is_integer(t):
        return arr.cast(pa.string()), None
    return _strings(arr.to_pylist())


class _Batcher:
    """Collects per-column values and yields batches of `size` rows with the error columns filled in."""

    def __init__(self, path: str, spec: InputSpec):
        self.path, self.spec = path, spec

    def batch(self, cols: dict[str, Any], n: int) -> pa.Table:
        spec = self.spec
        out: dict[str, pa.Array] = {}
        errors: list[str | None] = [None] * n
        messages: list[str | None] = [None] * n
        names = [("url", spec.url_col), ("caption", spec.caption_col), *((c, c) for c in spec.keep_cols)]
        for name, col in names:
            if not col:
                out[name] = pa.nulls(n, pa.string())
                continue
            values = cols[col]
            arr, bad = _arrow_strings(values) if isinstance(values, (pa.Array, pa.ChunkedArray)) else _strings(values)
            out[name] = arr
            if bad:
                code = "invalid_url" if name == "url" else "invalid_text"
                for i, b in enumerate(bad):
                    if b and errors[i] is None:
                        errors[i] = code
                        messages[i] = (f"INPUT {self.path}: column '{col}' is not valid UTF-8 text "
                                       f"(stored repaired with U+FFFD)")
        out["input_error"] = pa.array(errors, pa.string())
        out["input_error_message"] = pa.array(messages, pa.string())
        return pa.table(out)


def _parquet_batches(path: str, spec: InputSpec, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    b = _Batcher(path, spec)
    with _open_stream(path) as fh:
        try:
            pf = pq.ParquetFile(fh)
            _need(path, pf.schema_arrow.names, spec)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=_wanted(spec)):
                yield b.batch({c: rb.column(c) for c in _wanted(spec)}, rb.num_rows)
        except InputError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"INPUT {path}: not a readable parquet file ({e})") from None


def _row_batches(path: str, spec: InputSpec, names: list[str], rows: Iterator[list[Any]],
                 batch_rows: int) -> Iterator[pa.Table]:
    """Batches from rows given as lists aligned with `names` (csv/tsv/txt)."""
    b = _Batcher(path, spec)
    idx = {n: i for i, n in enumerate(names)}
    want = {c: idx[c] for c in _wanted(spec)}
    buf: list[list[Any]] = []

    def flush() -> pa.Table:
        cols = {c: [r[i] if i < len(r) else None for r in buf] for c, i in want.items()}
        return b.batch(cols, len(buf))

    for r in rows:
        buf.append(r)
        if len(buf) >= batch_rows:
            yield flush()
            buf = []
    if buf:
        yield flush()


def _csv_rows(path: str, fmt: str, spec: InputSpec, text: io.TextIOWrapper) -> tuple[list[str], Iterator[list[str]]]:
    delim = "," if fmt == "csv" else "\t"
    reader = csv.reader(text, delimiter=delim, quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
    rows = (r for r in reader if r)
    try:
        first = next(rows)
    except StopIteration:
        if spec.header:
            raise InputError(f"INPUT {path}: empty file (no header line)") from None
        return [spec.url_col], iter(())
    except csv.Error as e:
        raise InputError(f"INPUT {path}: not valid {fmt} ({e})") from None
    if spec.header:
        names = [c.strip() for c in first]
        _need(path, names, spec)
        return names, _checked(path, fmt, rows)
    names = _tsv_names(path, first, spec)
    _need(path, names, spec)
    return names, _checked(path, fmt, _chain([first], rows))


def _chain(first: list[list[str]], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield from first
    yield from rest


def _checked(path: str, fmt: str, rows: Iterator[list[str]]) -> Iterator[list[str]]:
    try:
        yield from rows
    except csv.Error as e:
        raise InputError(f"INPUT {path}: not valid {fmt} ({e})") from None


def _tsv_names(path: str, fields: list[str], spec: InputSpec) -> list[str]:
    """Column names of a header-less tsv (presets cc3m/cc12m): the field that starts with http is the URL."""
    if len(fields) < 2:
        raise InputError(f"INPUT {path}: expected 2 tab-separated fields (caption, url) per line")
    url_first = fields[0].strip().lower().startswith(("http://", "https://"))
    names = [spec.url_col, spec.caption_col or "caption"] if url_first else [spec.caption_col or "caption", spec.url_col]
    return names + [f"col{i}" for i in range(2, len(fields))]


def _txt_rows(text: io.TextIOWrapper) -> Iterator[list[str]]:
    for ln in text:
        s = ln.strip()
        if s and not s.startswith("#"):
            yield [s]


def _json_records(path: str, text: io.TextIOWrapper) -> Iterator[dict[str, Any]]:
    """JSON lines streamed one record at a time; a JSON array file is parsed whole."""
    first = ""
    while True:
        ch = text.read(1)
        if not ch or not ch.isspace():
            first = ch
            break
    try:
        if first == "[":
            records = json.loads("[" + text.read())
            lines: Any = ((i, r) for i, r in enumerate(records, 1))
        else:
            lines = _json_lines(first, text)
        for lineno, rec in lines:
            if not isinstance(rec, dict):
                raise InputError(f"INPUT {path}: expected JSON objects (one per row), got {type(rec).__name__} "
                                 f"(record {lineno})")
            yield rec
    except json.JSONDecodeError as e:
        raise InputError(f"INPUT {path}: not valid JSON/JSON lines ({e})") from None


def _json_lines(first: str, text: io.TextIOWrapper) -> Iterator[tuple[int, Any]]:
    for lineno, ln in enumerate(_chain([first + text.readline()], text) if first else text, 1):
        if ln.strip():
            try:
                yield lineno, json.loads(ln)
            except json.JSONDecodeError as e:
                raise json.JSONDecodeError(f"line {lineno}: {e.msg}", e.doc, e.pos) from None


def _json_batches(path: str, spec: InputSpec, text: io.TextIOWrapper, batch_rows: int,
                  check_only: bool = False) -> Iterator[pa.Table]:
    b = _Batcher(path, spec)
    cols = _wanted(spec)
    buf: list[dict[str, Any]] = []
    first = True
    for rec in _json_records(path, text):
        if first:  # the first record names the columns (later ones may leave some out: null)
            first = False
            _need(path, list(rec), spec)
            if check_only:
                return
        buf.append(rec)
        if len(buf) >= batch_rows:
            yield b.batch({c: [r.get(c) for r in buf] for c in cols}, len(buf))
            buf = []
    if first:
        _need(path, [], spec)
    if buf:
        yield b.batch({c: [r.get(c) for r in buf] for c in cols}, len(buf))


def iter_file(path: str, spec: InputSpec, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """Record batches of one input file (url, caption, kept columns, input_error, input_error_message)."""
    fmt = _file_format(path, spec)
    if fmt == "parquet":
        yield from _parquet_batches(path, spec, batch_rows)
        return
    with _open_stream(path) as raw:
        text = _text_stream(raw)
        try:
            if fmt == "txt":
                if spec.url_col != "url" or spec.caption_col or spec.keep_cols:
                    _need(path, ["url"], spec)
                yield from _row_batches(path, spec, [spec.url_col], _txt_rows(text), batch_rows)
            elif fmt in ("csv", "tsv"):
                names, rows = _csv_rows(path, fmt, spec, text)
                yield from _row_batches(path, spec, names, rows, batch_rows)
            else:
                yield from _json_batches(path, spec, text, batch_rows)
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise InputError(f"INPUT {path}: cannot read ({e})") from None


def iter_input(spec: InputSpec, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """Record batches of the whole URL list, file after file in sorted order."""
    for path, _ in list_files(spec):
        yield from iter_file(path, spec, batch_rows)


def check_columns(spec: InputSpec) -> list[tuple[str, int]]:
    """Cheap validation before anything is written: files exist, formats known, columns present.

    Reads each file's schema or header (or first JSON record), never the whole file.
    """
    files = list_files(spec)
    for path, _ in files:
        fmt = _file_format(path, spec)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with _open_stream(path) as fh:
                try:
                    names = pq.ParquetFile(fh).schema_arrow.names
                except (pa.ArrowException, OSError) as e:
                    raise InputError(f"INPUT {path}: not a readable parquet file ({e})") from None
            _need(path, names, spec)
            continue
        with _open_stream(path) as raw:
            text = _text_stream(raw)
            try:
                if fmt in ("csv", "tsv"):
                    _csv_rows(path, fmt, spec, text)
                elif fmt in ("json", "jsonl"):
                    for _ in _json_batches(path, spec, text, 1, check_only=True):
                        pass
                elif spec.url_col != "url" or spec.caption_col or spec.keep_cols:
                    _need(path, ["url"], spec)
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                raise InputError(f"INPUT {path}: cannot read ({e})") from None
    return files
