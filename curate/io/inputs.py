"""URL list readers for `curate download`: parquet, csv, tsv, json, jsonl, txt (each optionally .gz).

A local path or an fsspec URL, a single file or a folder of files (read in sorted order). Every
reader returns the same table: `url`, `caption` and the kept columns, all strings, in input order.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
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


def _open_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise InputError(f"INPUT {path}: cannot read ({e})") from None
    if path.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(f"INPUT {path}: not a valid gzip file ({e})") from None
    return data


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


def _as_strings(values: list[Any]) -> pa.Array:
    out = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8", errors="replace"))
        elif isinstance(v, float) and v != v:  # NaN from pandas-written files
            out.append(None)
        else:
            out.append(str(v))
    return pa.array(out, pa.string())


def _tsv_names(path: str, text: str, spec: InputSpec) -> list[str]:
    """Column names of a header-less tsv (presets cc3m/cc12m): the field that starts with http is the URL."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    fields = first.split("\t")
    if len(fields) < 2:
        raise InputError(f"INPUT {path}: expected 2 tab-separated fields (caption, url) per line")
    url_first = fields[0].strip().lower().startswith(("http://", "https://"))
    names = [spec.url_col, spec.caption_col or "caption"] if url_first else [spec.caption_col or "caption", spec.url_col]
    return names + [f"col{i}" for i in range(2, len(fields))]


def _read_rows(path: str, fmt: str, spec: InputSpec) -> tuple[list[str], dict[str, list[Any]]]:
    """(column names, {column: values}) of one file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        data = _open_bytes(path)
        try:
            pf = pq.ParquetFile(io.BytesIO(data))
            names = pf.schema_arrow.names
            _need(path, names, spec)
            cols = [c for c in dict.fromkeys([spec.url_col, spec.caption_col, *spec.keep_cols]) if c]
            table = pf.read(columns=cols)
        except InputError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"INPUT {path}: not a readable parquet file ({e})") from None
        return names, {c: table.column(c).to_pylist() for c in cols}
    text = _open_bytes(path).decode("utf-8", errors="replace")
    if fmt == "txt":
        urls = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        names = ["url"]
        if spec.url_col != "url" or spec.caption_col or spec.keep_cols:
            _need(path, names, spec)
        return names, {spec.url_col: urls}
    if fmt in ("csv", "tsv"):
        delim = "," if fmt == "csv" else "\t"
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim,
                            quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
        rows = list(reader)
        if spec.header:
            if not rows:
                raise InputError(f"INPUT {path}: empty file (no header line)")
            names, rows = [c.strip() for c in rows[0]], rows[1:]
        else:
            names = _tsv_names(path, text, spec)
        _need(path, names, spec)
        idx = {n: i for i, n in enumerate(names)}
        return names, {c: [r[idx[c]] if idx[c] < len(r) else None for r in rows if r] for c in idx}
    # json: a list of objects, or one object per line (jsonl)
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(stripped)
        else:
            records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise InputError(f"INPUT {path}: not valid JSON/JSON lines ({e})") from None
    if not all(isinstance(r, dict) for r in records):
        raise InputError(f"INPUT {path}: expected JSON objects (one per row)")
    names = list(dict.fromkeys(k for r in records[:1000] for k in r))
    _need(path, names if records else [], spec)
    cols = [c for c in dict.fromkeys([spec.url_col, spec.caption_col, *spec.keep_cols]) if c]
    return names, {c: [r.get(c) for r in records] for c in cols}


def check_columns(spec: InputSpec) -> list[tuple[str, int]]:
    """Cheap validation before anything is written: files exist, formats known, columns present."""
    files = list_files(spec)
    for path, _ in files:
        fmt = _file_format(path, spec)
        if fmt == "parquet" and not path.lower().endswith(".gz"):
            import pyarrow.parquet as pq

            fs, p = _fs(path)
            try:
                with fs.open(p, "rb") as fh:
                    names = pq.ParquetFile(fh).schema_arrow.names
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"INPUT {path}: not a readable parquet file ({e})") from None
            _need(path, names, spec)
        elif fmt != "parquet":
            _read_rows(path, fmt, spec)  # text formats are parsed in full; they are small per file
    return files


def read_input(spec: InputSpec) -> pa.Table:
    """The whole URL list as one table: url, caption (string or null), kept columns (strings)."""
    files = list_files(spec)
    parts = []
    for path, _ in files:
        _, cols = _read_rows(path, _file_format(path, spec), spec)
        n = len(cols[spec.url_col])
        data = {
            "url": _as_strings(cols[spec.url_col]),
            "caption": _as_strings(cols[spec.caption_col]) if spec.caption_col else pa.nulls(n, pa.string()),
        }
        for c in spec.keep_cols:
            data[c] = _as_strings(cols[c])
        parts.append(pa.table(data))
    return pa.concat_tables(parts)
