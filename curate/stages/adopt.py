"""Adopt: turn an img2dataset output folder (or a plain folder of webdataset tars) into a curate dataset dir.

Per source shard, one task: the tar is hard-linked into shards/ (copied when the filesystem refuses a
link, or when the source is img2dataset's files or parquet output format, which has no tar to link),
then ledger/{shard}.parquet gets one row per source row: img2dataset's statuses mapped to curate's
error codes (an unrecognised status or message is kept verbatim as the code), the sha256, size and
format of the bytes as stored, and img2dataset's extra columns. Keys are the source's, so member names
stay as they are and a link is possible. Source shard ids become curate shard ids: a numeric id N
(img2dataset's) becomes shard_name(N); any other name gets the next free id. The assignment is kept in
_work/adopt/shards.json, so a rerun over a grown source folder keeps every earlier shard's id, and each
ledger row names its source shard in `source_shard`. The marker (_done/adopt/) goes last.

A bad shard (a tar without its parquet, a truncated tar, a key twice, a row marked success whose image
is missing) fails alone with a message naming the file; the other shards are adopted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import InputError, ShardError
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import MAX_SHARDS, DatasetDir, shard_index, shard_name
from curate.io.ledger import LEDGER_FIELDS
from curate.io.shards import IMAGE_EXTS, ShardWriter, iter_raw
from curate.io.tables import write_table
from curate.options import option
from curate.stages.base import Stage, sum_stats

NAME = "adopt"
LINK_MODES = ("auto", "hardlink", "copy")
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# img2dataset columns that become ledger fields (renamed where curate's name differs)
_MAPPED = {"url": "url", "caption": "caption", "key": "key", "status": "status", "error_message": "error_message",
           "width": "width", "height": "height", "original_width": "orig_width", "original_height": "orig_height"}
_LEDGER_NAMES = {f.name for f in LEDGER_FIELDS}


@dataclass(frozen=True)
class AdoptConfig:
    source: str
    link: str = option("auto", choices=LINK_MODES,
                       help="auto: hard-link each tar (no image bytes copied), copying only where the filesystem "
                            "refuses; hardlink: fail a shard rather than copy; copy: always copy.")


# ------------------------------------------------------------------------------------- status mapping

_DOWNLOAD_MESSAGES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"X-Robots-Tag", re.I), "opted_out"),
    (re.compile(r"unknown url type|no host given|invalid url", re.I), "invalid_url"),
    (re.compile(r"timed? ?out|timeout", re.I), "timeout"),
    (re.compile(r"name or service not known|nodename nor servname|getaddrinfo|name resolution|"
                r"no address associated", re.I), "dns_error"),
    (re.compile(r"redirect", re.I), "too_many_redirects"),
    (re.compile(r"connection (refused|reset|aborted)|remote ?disconnected|ssl|eof occurred|"
                r"network is unreachable|no route to host", re.I), "connect_error"),
]
_RESIZE_MESSAGES: dict[str, str] = {"image too small": "too_small", "aspect ratio too large": "bad_aspect_ratio",
                                    "image area too large": "decompression_bomb",
                                    "image decoding error": "decode_error"}
_HTTP = re.compile(r"HTTP Error (\d{3})")


def map_status(status: str | None, message: str | None) -> tuple[str, str | None, int | None]:
    """(curate status, error code, http status) for an img2dataset status and error message.

    A message or status curate has no code for is kept verbatim: status and code both become
    img2dataset's status word (e.g. "failed_to_download"), and error_message keeps the text.
    """
    status = status or "unknown"
    if status == "success":
        return "success", None, None
    msg = message or ""
    if status == "failed_to_download":
        m = _HTTP.search(msg)
        if m:
            code = int(m.group(1))
            return ("http_4xx" if code < 500 else "http_5xx"), ("http_4xx" if code < 500 else "http_5xx"), code
        for pattern, code_name in _DOWNLOAD_MESSAGES:
            if pattern.search(msg):
                return code_name, code_name, None
    elif status == "failed_to_resize":
        code_name = _RESIZE_MESSAGES.get(msg.strip().lower())
        if code_name:
            return code_name, code_name, None
    return status, status, None


# ------------------------------------------------------------------------------------------- sources

def source_root(cfg: AdoptConfig) -> Path:
    root = Path(cfg.source).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"SRC {cfg.source}: no such folder")
    return root


def source_kind(root: Path) -> str:
    """'img2dataset' (parquet or stats files present) or 'webdataset' (tars only)."""
    names = [p.name for p in root.iterdir()]
    if any(n.endswith((".parquet", "_stats.json")) for n in names):
        return "img2dataset"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    raise InputError(f"SRC {root}: neither an img2dataset output folder ({{shard}}.tar/.parquet/_stats.json) "
                     f"nor a folder of webdataset .tar files")


def source_shards(root: Path) -> list[str]:
    """Shard ids: the stems of the tars, parquets and stats files (and files-format folders)."""
    ids: set[str] = set()
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.endswith("_stats.json"):
            ids.add(p.name[: -len("_stats.json")])
        elif p.is_file() and p.suffix in (".tar", ".parquet"):
            ids.add(p.stem)
        elif p.is_dir() and (root / f"{p.name}.parquet").exists():
            ids.add(p.name)
    bad = sorted(i for i in ids if not _SHARD_ID.fullmatch(i))
    if bad:
        raise InputError(f"SRC {root}: shard file name(s) with unusual characters: {', '.join(bad[:5])}")
    return sorted(ids)


def source_fingerprint(root: Path) -> str:
    """sha256 over the names and sizes of the source's files: another folder, or shards added, change it."""
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
        elif p.is_dir():
            h.update(f"{p.name}/\0{sum(1 for _ in p.iterdir())}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- one shard

@dataclass
class StoredImage:
    ext: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    caption: str | None = None  # the {key}.txt member
    url: str | None = None  # from the {key}.json member


def _describe(data: bytes, ext: str) -> StoredImage:
    from curate.imaging import safe_open

    w = h = None
    try:
        with safe_open(data) as im:  # the header only, and only of an allowlisted format
            w, h = im.size
    except Exception:  # noqa: BLE001 - an undecodable image keeps unknown dimensions; score reports it
        pass
    return StoredImage(ext, len(data), hashlib.sha256(data).hexdigest(), w, h)


def _scan_tar(tar: Path) -> dict[str, StoredImage]:
    """Describe every sample's image in a tar (streamed, bytes not kept); a key twice is a shard error."""
    out: dict[str, StoredImage] = {}
    for key, members in iter_raw(tar):
        if key in out:
            raise ShardError(f"{tar}: key {key} appears twice in the tar")
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise ShardError(f"{tar}: sample {key} has no image member (one of {', '.join(IMAGE_EXTS)})")
        img = _describe(members[ext], ext)
        if "txt" in members:
            img.caption = members["txt"].decode("utf-8", errors="replace")
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                img.url = meta.get("url") if isinstance(meta, dict) else None
            except ValueError:
                pass  # a sidecar that is not JSON: the url stays unknown
        out[key] = img
    return out


def _place_tar(src: Path, dst: Path, mode: str) -> bool:
    """Hard-link `src` to `dst` (True), or copy it (False) when links are refused and `mode` allows."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode != "copy":
        tmp = dst.with_name(f".tmp-link-{os.getpid()}-{dst.name}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return True
        except OSError as e:  # EXDEV (another filesystem), EPERM, EMLINK: the filesystem says no
            tmp.unlink(missing_ok=True)
            if mode == "hardlink":
                raise ShardError(f"{src}: cannot hard-link into {dst.parent} ({e}); use --link auto or copy") from e
    with atomic_path(dst) as tmp_copy:
        shutil.copyfile(src, tmp_copy)
    return False


def _write_tar_from(dst: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with ShardWriter(dst) as w:
        for key, members in samples:
            w.write_raw(key, members)


def _files_samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    """img2dataset's files output format: {key}.jpg/.txt/.json files in the shard's folder."""
    by_key: dict[str, dict[str, bytes]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and "." in p.name:
            key, ext = p.name.split(".", 1)
            by_key.setdefault(key, {})[ext.lower()] = p.read_bytes()
    return sorted(by_key.items())


def _parquet_samples(table: pa.Table, path: Path) -> tuple[list[tuple[str, dict[str, bytes]]], pa.Table]:
    """img2dataset's parquet output format: the image is a binary column named after its format."""
    ext = next((e for e in IMAGE_EXTS if e in table.column_names), None)
    if ext is None:
        raise ShardError(f"{path}: no tar beside it and no image column ({', '.join(IMAGE_EXTS)}) in it")
    samples = []
    for key, img, txt in zip(table["key"].to_pylist(), table[ext].to_pylist(),
                             (table["txt"].to_pylist() if "txt" in table.column_names else [None] * table.num_rows),
                             strict=True):
        if img is not None:
            members = {ext: img}
            if txt is not None:
                members["txt"] = txt.encode("utf-8")
            samples.append((key, members))
    drop = [c for c in (ext, "txt") if c in table.column_names]
    return sorted(samples), table.drop_columns(drop)


def _read_rows(parquet: Path) -> pa.Table:
    try:
        t = pq.read_table(parquet)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ShardError(f"{parquet}: unreadable parquet ({e})") from e
    if "key" not in t.column_names:
        raise ShardError(f"{parquet}: no 'key' column (an img2dataset shard parquet has key, status, url, ...)")
    keys = t["key"].cast(pa.string())
    t = t.set_column(t.column_names.index("key"), "key", keys)
    t = t.sort_by("key")
    k = t["key"].to_pylist()
    for a, b in zip(k, k[1:], strict=False):
        if a == b:
            raise ShardError(f"{parquet}: key {a} appears twice")
    if any(x is None for x in k):
        raise ShardError(f"{parquet}: a row has no key")
    return t


def assign_shards(ds: DatasetDir, sources: list[str]) -> dict[str, str]:
    """source shard id -> curate shard id, stable across reruns (see the module docstring)."""
    path = ds.work(NAME) / "shards.json"
    mapping: dict[str, str] = read_json(path) if path.exists() else {}
    taken = {shard_index(s) for s in mapping.values()}
    for src in sources:
        if src in mapping:
            continue
        index = int(src) if src.isdigit() and int(src) < MAX_SHARDS else None
        if index is None or index in taken:
            index = max(taken, default=-1) + 1
        while index in taken:
            index += 1
        taken.add(index)
        mapping[src] = shard_name(index)
    write_json(path, mapping)
    return mapping


def adopt_shard(cfg: AdoptConfig, ds: DatasetDir, shard: str, source: str) -> dict[str, Any]:
    """Adopt source shard `source` as curate shard `shard`: place its tar, then write its ledger."""
    root = source_root(cfg)
    tar, parquet, folder = root / f"{source}.tar", root / f"{source}.parquet", root / source
    kind = source_kind(root)
    rows: pa.Table | None = None
    if kind == "img2dataset":
        if not parquet.exists():
            raise ShardError(f"{tar if tar.exists() else folder}: no {parquet.name} beside it; img2dataset writes "
                             f"one per shard (with _stats.json last), so this shard is partial")
        rows = _read_rows(parquet)
    dst = ds.shard_tar(shard)
    if tar.exists():
        images = _scan_tar(tar)
        linked = _place_tar(tar, dst, cfg.link)
        copied = 0 if linked else tar.stat().st_size
    else:
        if kind != "img2dataset":
            raise ShardError(f"{root}: shard {source} has no tar")
        if folder.is_dir():
            samples = _files_samples(folder)
        else:
            samples, rows = _parquet_samples(rows, parquet)
        _write_tar_from(dst, samples)
        images = _scan_tar(dst)
        linked, copied = False, dst.stat().st_size
    table = _ledger(shard, source, rows, images, tar if tar.exists() else parquet)
    write_table(ds.ledger(shard), table)
    status = table["status"].to_pylist()
    return {"rows": table.num_rows, "success": status.count("success"), "linked": int(linked),
            "copied_bytes": copied, "stored_bytes": sum(i.size for i in images.values())}


def _ledger(shard: str, source: str, rows: pa.Table | None, images: dict[str, StoredImage], where: Path) -> pa.Table:
    """One ledger row per source row (per tar sample for a plain webdataset folder), in key order."""
    if rows is None:  # plain webdataset: the tar is the only record; its json member may hold the url
        rows = pa.table({"key": pa.array(sorted(images), pa.string()),
                         "status": pa.array(["success"] * len(images), pa.string())})
    keys = rows["key"].to_pylist()
    src = {name: rows[name].to_pylist() if name in rows.column_names else [None] * len(keys) for name in _MAPPED}
    out: dict[str, list[Any]] = {f.name: [] for f in LEDGER_FIELDS}
    for i, key in enumerate(keys):
        status, code, http = map_status(src["status"][i], src["error_message"][i])
        img = images.get(key)
        if status == "success" and img is None:
            raise ShardError(f"{where}: row {key} is marked success but its image is missing from the shard")
        if status != "success" and img is not None:
            status, code = "success", None  # the bytes are there: a sample, whatever the parquet says
        ok = status == "success"
        url = src["url"][i] if src["url"][i] is not None else (img.url if img else None)
        caption = src["caption"][i] if src["caption"][i] is not None else (img.caption if img else None)
        rec = {"key": key, "shard": shard, "row": i, "url": url, "caption": caption,
               "status": status, "error_code": code, "error_message": None if ok else src["error_message"][i],
               "attempts": None, "http_status": http if not ok else None, "final_url": None,
               "bytes": img.size if img else None, "sha256": img.sha256 if img else None,
               "mime": _MIME.get(img.ext) if img else None,
               "orig_width": src["original_width"][i] if ok else None,
               "orig_height": src["original_height"][i] if ok else None,
               "width": img.width if img else None, "height": img.height if img else None,
               "elapsed": None, "duplicate_of": None, "superseded_by": None}
        if ok and rec["orig_width"] is None:
            rec["orig_width"], rec["orig_height"] = rec["width"], rec["height"]
        for name, values in out.items():
            values.append(rec[name])
    extra = set(images) - set(keys)
    if extra:
        raise ShardError(f"{where}: {len(extra)} sample(s) in the tar have no row in the parquet "
                         f"(first: {sorted(extra)[0]})")
    table = pa.table({f.name: pa.array(out[f.name], f.type) for f in LEDGER_FIELDS})
    table = table.append_column("source_shard", pa.array([source] * table.num_rows, pa.string()))
    for name in rows.column_names:  # img2dataset's other columns ride along (LAION's similarity, ...)
        if name in _MAPPED:
            continue
        target = name
        while target in _LEDGER_NAMES or target in table.column_names:
            target = f"source_{target}"
        table = table.append_column(target, rows[name])
    return table


# -------------------------------------------------------------------------------------------- stage

class AdoptStage(Stage):
    name = NAME
    config_cls = AdoptConfig

    def plan(self, cfg: AdoptConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        if cfg.link not in LINK_MODES:
            raise InputError(f"--link {cfg.link}: must be one of {', '.join(LINK_MODES)}")
        root = source_root(cfg)
        if root == ds.root or ds.root in root.parents:
            raise InputError(f"--out {ds.root}: must lie outside the source folder {root}")
        source_kind(root)
        mapping = assign_shards(ds, source_shards(root))
        return [{"shard": shard, "source": src} for src, shard in sorted(mapping.items(), key=lambda kv: kv[1])
                if (root / f"{src}.tar").exists() or (root / f"{src}.parquet").exists() or (root / src).is_dir()]

    def run_shard(self, cfg: AdoptConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        return adopt_shard(cfg, ds, task["shard"], task["source"])

    def inputs(self, cfg: AdoptConfig) -> dict[str, Any]:
        root = source_root(cfg)
        return {"source": str(root), "kind": source_kind(root), "source_fingerprint": source_fingerprint(root)}

    def finalize(self, cfg: AdoptConfig, ds: DatasetDir) -> dict[str, Any]:
        counts = sum_stats(ds, NAME)
        counts["duplicate_keys"] = duplicate_keys(ds)
        return counts



def duplicate_keys(ds: DatasetDir) -> list[str]:
    """Keys found in more than one adopted shard (a plain webdataset folder may reuse keys across tars):
    up to five, found by one DuckDB GROUP BY over the ledgers, never by loading them."""
    import duckdb

    files = [str(p) for p in ds.ledger_files()]
    if not files:
        return []
    con = duckdb.connect()
    try:
        con.execute("SET preserve_insertion_order = false")
        rows = con.execute("SELECT key, string_agg(DISTINCT source_shard, ',' ORDER BY source_shard) "
                           "FROM read_parquet(?, union_by_name = true) GROUP BY key "
                           "HAVING COUNT(*) > 1 ORDER BY key LIMIT 5", [files]).fetchall()
    finally:
        con.close()
    return [f"{k} (shards {s})" for k, s in rows]


STAGE = AdoptStage()
