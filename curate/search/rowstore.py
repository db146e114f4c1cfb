"""The index's row store and --where allow-lists: what a hit shows, looked up by index id in O(1).

    index/rows.arrow   Arrow IPC file, id-ordered, record batches of exactly ROW_BATCH rows (the last one
                       shorter): id i is row i % ROW_BATCH of batch i // ROW_BATCH. Memory-mapped, so a hit's
                       caption, url and signals cost one batch lookup, whatever the number of shards. It also
                       holds where each sample's image lies in its tar (image_offset, image_size), so the
                       page's thumbnails read those bytes and never scan a tar's headers per query.
    index/rows.json    written after rows.arrow: its columns, batch size and the digest of the ledger and
                       signal files it was read from (a changed file makes it stale, see is_current)
    index/allow/*.npy  one --where clause evaluated once over the samples view: a bit per index id

`curate index` writes (or refreshes, when stale) the store in finalize with one DuckDB query over the samples
view, streamed in id order under a memory cap. A searcher whose store is stale (a signal rewritten since the
index was built) falls back to querying the samples view and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import InputError, ShardError
from curate.io.atomic import atomic_path, read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.shards import IMAGE_EXTS, index_tar

log = logging.getLogger(__name__)

ROW_BATCH = 4096
# columns of the samples view shown with each hit (those present in the dataset)
HIT_COLUMNS = ("caption", "url", "status", "clip_score", "lang", "is_duplicate", "eval_contaminated")
IMAGE_COLUMNS = ("image_offset", "image_size")  # the image member's data in shards/{shard}.tar
FORMAT = "curate-rows/2"


def _sources(ds: DatasetDir) -> Any:
    from curate.query import Sources

    try:
        return Sources.of(ds)
    except InputError:  # no ledger (a bare scored dataset): the store holds keys only
        return None


def sources_digest(sources: Any) -> str:
    """Size and mtime of every ledger and signal file the samples view reads, and of each ledger shard's
    tar (the stored image offsets point into it): O(files) stat calls."""
    if sources is None:
        return "no-ledger"
    files = []
    for name in sorted(sources.files):
        for p in sorted(sources.files[name]):
            st = os.stat(p)
            files.append([name, str(p), st.st_size, st.st_mtime_ns])
            if name == "ledger":
                tar = Path(p).parents[1] / "shards" / f"{Path(p).stem}.tar"
                st = tar.stat() if tar.exists() else None
                files.append(["tar", str(tar), st and st.st_size, st and st.st_mtime_ns])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _ids_sql(wd: Path) -> str:
    from curate.query import _sql_str

    # file_row_number is the row's position in ids.parquet, i.e. the index id
    return f"read_parquet({_sql_str(str(wd / 'ids.parquet'))}, file_row_number=true)"


def is_current(ds: DatasetDir, wd: Path, digest: str | None = None) -> bool:
    """Is index/rows.arrow complete and read from the dataset's present files (`digest`: theirs, if known)?"""
    meta_path = wd / "rows.json"
    if not (meta_path.exists() and (wd / "rows.arrow").exists()):
        return False
    meta = read_json(meta_path)
    return meta.get("format") == FORMAT and meta.get("sources") == (digest or sources_digest(_sources(ds)))


def write_row_store(ds: DatasetDir, wd: Path, rows: int, memory_limit: str = "1GB") -> dict[str, Any]:
    """Write index/rows.arrow (+ rows.json last) from ids.parquet and the samples view; returns rows.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.query import DuckDBQuery

    sources = _sources(ds)
    digest = sources_digest(sources)
    if sources is None:
        cols: list[str] = []
        reader = pq.ParquetFile(wd / "ids.parquet").iter_batches(ROW_BATCH, columns=["key"])
        db = None
    else:
        present = set(sources.all_columns())
        cols = [c for c in HIT_COLUMNS if c in present]
        db = DuckDBQuery(sources, spill=wd / "spill", memory_limit=memory_limit)
        sel = "".join(f', s."{c}"' for c in cols)
        # LEFT JOIN: every indexed id gets a row, in id order, even one whose ledger row went missing
        sql = (f"SELECT i.key{sel} FROM {_ids_sql(wd)} i LEFT JOIN samples s ON s.key = i.key "
               f"ORDER BY i.file_row_number")
        reader = db.con.sql(sql).to_arrow_reader(ROW_BATCH)
    # a row group of the id table holds one shard's ids: each id's shard from the row groups' bounds, not a
    # column of 10M shard names in memory
    ids_file = pq.ParquetFile(wd / "ids.parquet")
    groups = range(ids_file.num_row_groups)
    bounds = np.cumsum([0] + [ids_file.metadata.row_group(g).num_rows for g in groups])
    shard_names = [ids_file.read_row_group(g, columns=["shard"])["shard"][0].as_py() for g in groups]
    tars: dict[str, dict[str, tuple[int, int]]] = {}
    written = 0
    try:
        with atomic_path(wd / "rows.arrow") as tmp:
            writer = None
            pending: list[Any] = []
            n_pending = 0

            def emit(batch: Any) -> None:
                nonlocal writer, written
                codes = np.searchsorted(bounds, np.arange(written, written + batch.num_rows), side="right") - 1
                batch = with_image_offsets(ds, batch, shard_names, codes, tars)
                if writer is None:
                    writer = pa.ipc.new_file(str(tmp), batch.schema)
                writer.write_batch(batch)
                written += batch.num_rows

            for batch in reader:  # re-batched to exactly ROW_BATCH rows: id -> (batch, offset) by arithmetic
                pending.append(batch)
                n_pending += batch.num_rows
                while n_pending >= ROW_BATCH:
                    t = pa.Table.from_batches(pending).combine_chunks()
                    emit(t.slice(0, ROW_BATCH).to_batches()[0])
                    rest = t.slice(ROW_BATCH)
                    pending, n_pending = rest.to_batches(), rest.num_rows
            if n_pending:
                emit(pa.Table.from_batches(pending).combine_chunks().to_batches()[0])
            if writer is None:
                raise InputError(f"{wd}: no rows to store")
            writer.close()
    finally:
        if db is not None:
            db.close()
            shutil.rmtree(wd / "spill", ignore_errors=True)
    if written != rows:
        raise InputError(f"{wd / 'rows.arrow'}: wrote {written} rows, the id table has {rows} (duplicate keys?)")
    meta = {"format": FORMAT, "rows": written, "batch_rows": ROW_BATCH, "columns": cols, "sources": digest}
    write_json(wd / "rows.json", meta)
    return meta


def tar_images(ds: DatasetDir, shard: str) -> dict[str, tuple[int, int]]:
    """{key: (offset, size)} of each sample's first image member in shards/{shard}.tar ({} without a tar)."""
    path = ds.shard_tar(shard)
    if not path.exists():
        return {}
    try:
        entries = index_tar(str(path))
    except ShardError as e:  # thumbnails are then read the slow way, by a header scan, or not at all
        log.warning("index: %s", e)
        return {}
    out = {}
    for key, members, _start, _end in entries:
        image = next(((off, size) for ext, off, size in members if ext in IMAGE_EXTS), None)
        if image is not None:
            out[key] = image
    return out


def with_image_offsets(ds: DatasetDir, batch: Any, shard_names: list[str], codes: np.ndarray,
                       tars: dict[str, dict[str, tuple[int, int]]]) -> Any:
    """`batch` plus IMAGE_COLUMNS; rows are in id order, so each shard's tar headers are read once (`tars`
    keeps only the shard being written)."""
    import pyarrow as pa

    offsets = np.full(batch.num_rows, -1, np.int64)
    sizes = np.full(batch.num_rows, -1, np.int64)
    keys = batch.column(0).to_pylist()
    for code in np.unique(codes):
        shard = shard_names[int(code)]
        if shard not in tars:
            tars.clear()
            tars[shard] = tar_images(ds, shard)
        found = tars[shard]
        for j in np.flatnonzero(codes == code):
            hit = found.get(keys[j])
            if hit is not None:
                offsets[j], sizes[j] = hit
    valid = offsets >= 0
    return (batch.append_column("image_offset", pa.array(offsets, mask=~valid))
            .append_column("image_size", pa.array(sizes, mask=~valid)))


class RowStore:
    """The memory-mapped rows.arrow: rows(ids) costs one batch lookup per id, no SQL, no shard scan."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        self._file = pa.memory_map(str(path))
        reader = pa.ipc.open_file(self._file)
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]  # zero-copy views
        self.columns = [c for c in reader.schema.names if c != "key" and c not in IMAGE_COLUMNS]
        self.rows_count = sum(b.num_rows for b in self._batches)

    def rows(self, ids: list[int]) -> list[dict[str, Any]]:
        """The stored row (key and HIT_COLUMNS) of each id, in the order given."""
        import pyarrow as pa

        out: list[dict[str, Any]] = [{} for _ in ids]
        by_batch: dict[int, list[int]] = {}
        for pos, i in enumerate(ids):
            by_batch.setdefault(int(i) // ROW_BATCH, []).append(pos)
        for b, positions in by_batch.items():
            offsets = pa.array([int(ids[p]) % ROW_BATCH for p in positions], pa.int64())
            for p, r in zip(positions, self._batches[b].take(offsets).to_pylist(), strict=True):
                out[p] = r
        return out

    def close(self) -> None:
        self._batches = []
        self._file.close()


# --- --where as an allow-list -------------------------------------------------------------------------

_allow_lock = threading.Lock()


def allow_list(db: Any, wd: Path, where: str, rows: int, digest: str) -> np.ndarray:
    """A bool per index id: does its sample pass `where`? Evaluated once over the samples view and cached
    in index/allow/ under the clause and the source files' digest, so later searches (and later
    `curate search --where` runs with the same clause) only read the cached bits."""
    tag = hashlib.sha256(json.dumps([where, digest, rows]).encode()).hexdigest()[:24]
    path = wd / "allow" / f"{tag}.npy"
    with _allow_lock:
        if path.exists():
            try:
                bits = np.load(path, allow_pickle=False)
                if bits.dtype == np.uint8 and len(bits) == (rows + 7) // 8:
                    return np.unpackbits(bits, count=rows, bitorder="little").astype(bool)
            except (OSError, ValueError):
                pass  # a damaged cache file: evaluate again
        sql = (f"SELECT i.file_row_number AS id FROM {_ids_sql(wd)} i WHERE i.key IN "
               f"(SELECT key FROM samples WHERE COALESCE(({where}), FALSE))")
        ids = db.con.execute(sql).fetchnumpy()["id"]
        mask = np.zeros(rows, bool)
        mask[np.asarray(ids, np.int64)] = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.packbits(mask, bitorder="little"), allow_pickle=False)
        except OSError as e:  # a read-only dataset dir: the bits are still used, just not kept
            log.debug("search: allow-list not cached (%s)", e)
    return mask
