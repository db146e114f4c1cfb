"""Query a built index: encode text/image/key queries, search, map ids to keys, filter hits with export's SQL.

Text and image queries are encoded with the scorer's own open_clip model, rebuilt from what the score stage
recorded in the manifest (config path, checkpoint path and its SHA-256), so a query lands in the same
embedding space as the indexed vectors. Each query is searched with the nprobe `curate index` tuned for its
kind (text queries need more lists than image and key queries; see build.py). `--where` is bound against
export's `samples` view (curate/query.py), evaluated once into a bit per index id (rowstore.allow_list) that the
index applies while it scans; a hit's caption, url and signals come from the memory-mapped row store by id.
So a query's cost does not grow with the number of shards: no SQL runs per query.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import InputError
from curate.export_info import read_export
from curate.imaging import ImageRejected, safe_decode_rgb
from curate.io import manifest
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir
from curate.models import load_model, resolve_model
from curate.search.build import QUERY_KINDS, index_dir, open_embeddings
from curate.search.rowstore import HIT_COLUMNS, RowStore, allow_list, is_current, sources_digest
from curate.thumbs import load_thumbnails, thumbnail

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 1024  # embedding files kept open for IVF-PQ reranking (at most a quarter of the fd limit)
# threads that read rerank rows (os.pread lets go of the GIL): 4,000 rows of a 10M index in the page cache took
# 25 ms in one thread, 17 ms in two, 31 ms in four on 2 cores (`python bench/search.py --n 10M`'s dataset)
READ_THREADS = 2
MAX_CANDIDATES = 1 << 16  # widening stops here: a --where that keeps almost nothing is reported, not scanned
BOTH = "both"  # --modality both: image and caption hits fused by reciprocal rank
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): score = sum over lists of 1 / (RRF_K + rank)
RRF_DEPTH = 100  # candidates read from each index before fusing (at least; more when --where drops hits)


@dataclass(frozen=True)
class Query:
    kind: str  # "text" | "image" | "key"
    value: str

    def label(self) -> str:
        return f"{self.kind}:{self.value}" if self.kind != "text" else self.value


class Searcher:
    """One opened index plus the dataset's samples view; thread-safe (the server shares one)."""

    def __init__(self, root: str | Path, where: str | None = None, export_dir: str | Path | None = None):
        import faiss
        import pyarrow.parquet as pq

        from curate.query import Clause, DuckDBQuery, Sources, check_clauses

        self.ds = DatasetDir.at(root)
        wd = index_dir(self.ds)
        if not (wd / "index.json").exists():
            raise InputError(f"{wd}: no complete index (index.json missing); run `curate index {self.ds.root}` first")
        self.meta = read_json(wd / "index.json")
        self.scorer = self.meta["scorer"]
        ids = pq.read_table(wd / "ids.parquet")
        self.keys = np.asarray(ids["key"].to_numpy(zero_copy_only=False), dtype=object)
        shards = ids["shard"].combine_chunks().dictionary_encode()  # one str object per shard, not per row
        self.shard_names = shards.dictionary.to_pylist()
        self.shard_codes = shards.indices.to_numpy()  # an id's shard: shard_names[shard_codes[id]]
        self.emb_rows = ids["emb_row"].to_numpy()
        self._key_to_id: dict[str, int] | None = None
        self.indexes: dict[str, Any] = {}
        for m, info in self.meta["modalities"].items():
            self.indexes[m] = faiss.read_index(str(wd / info["file"]))
        self.nlist = int(self.meta["nlist"])
        self.refine = int(self.meta.get("refine", 0))  # IVF-PQ: candidates reranked by exact cosine
        self._files: OrderedDict[tuple[str, str], tuple[int, int, int, np.dtype]] = OrderedDict()
        self._lock_files = threading.Lock()
        self._max_open = _open_file_budget()
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rerank-read")
        self.where = where
        sources = Sources.of(self.ds)
        if where:
            check_clauses(self.ds, sources, [Clause("where", where)])
        self.db = DuckDBQuery(sources)
        self.columns = set(sources.all_columns())
        self.export = None
        if export_dir is not None:
            self.export = read_export(export_dir)
            self.export_views = self.export.register(self.db.con)
        self._lock = threading.Lock()  # DuckDB connection and the torch model are used one request at a time
        self._model: Any = None
        self._open_rows(wd, sources, where)

    def _open_rows(self, wd: Path, sources: Any, where: str | None) -> None:
        """The row store (when current) and --where's allow-list, with the faiss selector that tests it."""
        import faiss

        digest = sources_digest(sources)
        self.store: RowStore | None = None
        if is_current(self.ds, wd, digest=digest):
            self.store = RowStore(wd / "rows.arrow")
        else:
            log.warning("search: %s is missing or older than the dataset's ledger/signal files; hits are read "
                        "from the samples view instead (slower; rerun `curate index %s` to refresh it)",
                        wd / "rows.arrow", self.ds.root)
        self.allowed: np.ndarray | None = None  # a bool per id under --where
        self._selector: Any = None
        if where:
            self.allowed = allow_list(self.db, wd, where, len(self.keys), digest)
            self._allowed_count = int(self.allowed.sum())
            # faiss reads these bits while scanning; the packed array must outlive the selector
            self._allow_bits = np.packbits(self.allowed, bitorder="little")
            self._selector = faiss.IDSelectorBitmap(len(self.keys), faiss.swig_ptr(self._allow_bits))

    def shard_of(self, i: int) -> str:
        return str(self.shard_names[self.shard_codes[i]])

    def refine_depth(self, modality: str, kind: str) -> int:
        """IVF-PQ: how many of the index's candidates are reranked by exact cosine for a `kind` query vector
        (tuned with nprobe; 0: none)."""
        info = self.meta["modalities"][modality]
        return int(info.get("search", {}).get(kind, {}).get("refine", self.refine)) if self.refine else 0

    def nprobe(self, modality: str, kind: str) -> int:
        """The tuned nprobe of `modality`'s index for a query vector from the `kind` encoder (0: exact index)."""
        info = self.meta["modalities"][modality]
        return int(info.get("search", {}).get(kind, {}).get("nprobe", info["nprobe"]))

    # --- query vectors ---------------------------------------------------------------------------

    def model(self) -> Any:
        """The scorer's open_clip model (built once), from the score stage's manifest entry."""
        if self._model is None:
            entry = manifest.load(self.ds)["stages"].get(self.scorer)
            if not entry:
                raise InputError(f"{self.ds.manifest}: no '{self.scorer}' stage; cannot encode text or image queries")
            cfg, recorded = entry.get("config", {}), (entry.get("inputs") or {}).get("model", {})
            model = recorded.get("config_path") or cfg.get("model")
            pretrained = recorded.get("checkpoint") or cfg.get("pretrained")
            checksum = recorded.get("checkpoint_sha256") or cfg.get("checksum")
            if not model or not pretrained:
                raise InputError(f"{self.ds.manifest}: stage '{self.scorer}' records no model/pretrained")
            self._model = load_model(resolve_model(model, pretrained, checksum), "cpu")
        return self._model

    def text_vectors(self, texts: list[str], templates: tuple[str, ...] = ()) -> np.ndarray:
        """One unit vector per text; with `templates` ('a clip art of {c}.'), the renormalised mean of the
        text's prompts, as zero-shot classification builds a class embedding (train-probe's shipped sets)."""
        import torch

        lm = self.model()
        prompts = [t.format(c=x) for x in texts for t in templates] if templates else texts
        with torch.no_grad():
            feats = lm.model.encode_text(lm.tokenizer(prompts).to(lm.device)).float()
        feats = _normalise(feats.cpu().numpy())
        if templates:
            feats = _normalise(feats.reshape(len(texts), len(templates), -1).mean(axis=1))
        return feats

    def modalities(self) -> list[str]:
        """What --modality may name here: the built indexes, and `both` when image and text are built."""
        return [*self.indexes, *([BOTH] if {"image", "text"} <= set(self.indexes) else [])]

    def image_vector(self, path: str | Path) -> np.ndarray:
        import torch

        lm = self.model()
        try:
            # the same allowlist and pixel cap as every stage: a query image is untrusted input too
            x = lm.preprocess(safe_decode_rgb(Path(path).read_bytes())).unsqueeze(0)
        except OSError as e:
            raise InputError(f"--image: {path} cannot be read ({e.strerror or e})") from None
        except ImageRejected as e:
            raise InputError(f"--image: {path} is not a usable image ({e.code}: {e.message})") from None
        with torch.no_grad():
            feats = lm.model.encode_image(x.to(lm.device)).float()
        return _normalise(feats.cpu().numpy())[0]

    def id_of(self, key: str) -> int:
        if self._key_to_id is None:
            self._key_to_id = {k: i for i, k in enumerate(self.keys)}
        try:
            return self._key_to_id[key]
        except KeyError:
            raise InputError(f"--key: '{key}' is not an indexed sample of {self.ds.root}") from None

    def key_vector(self, key: str, modality: str = "image") -> np.ndarray:
        i = self.id_of(key)
        emb = open_embeddings(self.ds, self.scorer, self.shard_of(i), modality)
        return np.asarray(emb[int(self.emb_rows[i])], np.float32)

    def vector(self, q: Query, modality: str = "image", templates: tuple[str, ...] = ()) -> np.ndarray:
        if q.kind == "text":
            return self.text_vectors([q.value], templates)[0]
        if q.kind == "image":
            return self.image_vector(q.value)
        return self.key_vector(q.value, modality)

    # --- search ----------------------------------------------------------------------------------

    def search(self, vec: np.ndarray, k: int = 10, modality: str = "image",
               exclude: str | None = None, kind: str = "image") -> list[dict[str, Any]]:
        """Hits [{rank, key, shard, score, <HIT_COLUMNS>}] passing --where, best first. `kind` is the
        encoder the vector came from (text or image), which picks the index's tuned nprobe."""
        if modality not in self.indexes:
            raise InputError(f"--modality: no {modality} index in {index_dir(self.ds)} "
                             f"(have {', '.join(self.indexes)}); text needs score --save-text-embeddings")
        if k < 1:
            raise InputError("-k: must be at least 1")
        want = k + (exclude is not None)
        found = self.ann(vec, want, modality, kind, filtered=True)
        hits = [(i, s) for i, s in found if self.keys[i] != exclude][:k]
        rows = self.rows_by_id([i for i, _ in hits])
        return [{"rank": rank, "key": str(self.keys[i]), "shard": self.shard_of(i), "score": round(s, 6), **row}
                for rank, ((i, s), row) in enumerate(zip(hits, rows, strict=True), 1)]

    def ann(self, vec: np.ndarray, n: int, modality: str, kind: str = "image",
            filtered: bool = False) -> list[tuple[int, float]]:
        """The index's best `n` (id, cosine), with the nprobe tuned for `kind`; `filtered`: only ids passing
        --where, tested by the index as it scans. When the probed lists hold fewer than n (passing) vectors,
        nprobe is widened (x4) until they do or every list is probed."""
        import faiss

        if kind not in QUERY_KINDS:
            raise ValueError(f"query kind {kind!r} is not one of {QUERY_KINDS}")
        index = self.indexes[modality]
        sel = self._selector if filtered else None
        available = self._allowed_count if filtered and self.allowed is not None else index.ntotal
        n = min(n, available)
        if n <= 0:
            return []
        q = np.ascontiguousarray(vec.reshape(1, -1), np.float32)
        nprobe, refine = self.nprobe(modality, kind), self.refine_depth(modality, kind)
        while True:
            if self.nlist:
                params = faiss.SearchParametersIVF(nprobe=max(1, nprobe), sel=sel)
            else:
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
            sims, ids = index.search(q, max(n, refine), params=params)
            got = ids[0][ids[0] >= 0]
            if len(got) >= n or not self.nlist or nprobe >= self.nlist:
                break
            nprobe = min(self.nlist, max(1, nprobe) * 4)
        if not refine:
            return [(int(i), float(x)) for i, x in zip(ids[0], sims[0], strict=True) if i >= 0][:n]
        exact = self.vectors_of(modality, got) @ q[0]
        order = np.argsort(-exact, kind="stable")[:n]
        return [(int(got[j]), float(exact[j])) for j in order]

    def vectors_of(self, modality: str, ids: np.ndarray) -> np.ndarray:
        """float32 stored vectors of `ids`, read from the score stage's embedding files by one positional read a
        row (the last MAX_OPEN_SHARDS files kept open), in READ_THREADS threads: the 4,000 rerank candidates
        of a query over 1,000 shards cost 4,000 small reads, and no memory map keeps touched pages resident."""
        ids = np.asarray(ids, np.int64)
        dim = int(self.meta["dim"])
        out = np.empty((len(ids), dim), np.float32)
        codes = self.shard_codes[ids]
        order = np.argsort(codes, kind="stable")
        groups, starts = np.unique(codes[order], return_index=True)
        ends = np.r_[starts[1:], len(ids)].astype(np.int64)
        rows = self.emb_rows[ids[order]]
        with self._lock_files:  # an evicted file is closed: reads happen under the lock
            for lo in range(0, len(groups), self._max_open):  # a batch's files all stay open through its reads
                hi = min(len(groups), lo + self._max_open)
                files = [self._file(modality, self.shard_names[c]) for c in groups[lo:hi].tolist()]
                a, b = int(starts[lo]), int(ends[hi - 1])
                if len({(f[2], f[3]) for f in files}) == 1:  # one row width and dtype: the batch read as one
                    out[order[a:b]] = self._read_rows(files, ends[lo:hi] - starts[lo:hi], rows[a:b], dim)
                else:
                    for f, s0, s1 in zip(files, starts[lo:hi].tolist(), ends[lo:hi].tolist(), strict=True):
                        out[order[s0:s1]] = self._read_rows([f], np.array([s1 - s0]), rows[s0:s1], dim)
        return out

    def _read_rows(self, files: list[tuple[int, int, int, np.dtype]], counts: np.ndarray, rows: np.ndarray,
                   dim: int) -> np.ndarray:
        """Rows `rows` of open embedding `files` (counts[i] of them from files[i], in order, every file of the
        same row width and dtype), one positional read a row, split over the read threads."""
        width, dtype = files[0][2], files[0][3]
        fds = np.repeat([f[0] for f in files], counts).tolist()
        offsets = (np.repeat([f[1] for f in files], counts) + rows.astype(np.int64) * width).tolist()

        def read(span: range) -> bytes:
            return b"".join([os.pread(fds[j], width, offsets[j]) for j in span])

        step = -(-len(fds) // READ_THREADS)
        spans = [range(j, min(len(fds), j + step)) for j in range(0, len(fds), max(1, step))]
        data = b"".join(self._readers.map(read, spans) if len(spans) > 1 else map(read, spans))
        if len(data) != len(fds) * width:
            raise InputError(f"{self.ds.root}: a row past the end of its embedding file (rerun `curate index "
                             f"{self.ds.root}`)")
        return np.frombuffer(data, dtype).reshape(len(fds), dim)

    def _file(self, modality: str, shard: str) -> tuple[int, int, int, np.dtype]:
        """(fd, data offset, bytes a row, dtype) of a shard's embedding file, opened once and kept (LRU)."""
        got = self._files.pop((modality, shard), None)
        if got is None:
            emb = open_embeddings(self.ds, self.scorer, shard, modality)  # header checked, then unmapped
            if not emb.flags.c_contiguous:
                raise InputError(f"{emb.filename}: not a row-major (C order) array")
            got = (os.open(emb.filename, os.O_RDONLY), int(emb.offset), emb.shape[1] * emb.dtype.itemsize,
                   emb.dtype)
            del emb
        self._files[(modality, shard)] = got
        while len(self._files) > self._max_open:
            os.close(self._files.popitem(last=False)[1][0])
        return got

    def query(self, q: Query, k: int = 10, modality: str = "image",
              templates: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        exclude = q.value if q.kind == "key" else None
        if modality == BOTH:
            self._check_modality(BOTH)
            # a key query uses the sample's own vector of each modality; text and image queries one vector
            if q.kind == "key":
                vecs = {m: self.vector(q, m, templates) for m in ("image", "text")}
                kinds = {"image": "image", "text": "text"}
            else:
                vecs = dict.fromkeys(("image", "text"), self.vector(q, "image", templates))
                kinds = dict.fromkeys(("image", "text"), q.kind)
            return self.search_fused(vecs, k, exclude=exclude, kinds=kinds)
        return self.search(self.vector(q, modality, templates), k, modality, exclude=exclude,
                           kind=query_kind(q, modality))

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities():
            raise InputError(f"--modality: no {modality} index in {index_dir(self.ds)} "
                             f"(have {', '.join(self.modalities())}); text and both need score --save-text-embeddings")

    def search_fused(self, vecs: dict[str, np.ndarray], k: int = 10, exclude: str | None = None,
                     kinds: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Hits of several indexes fused by reciprocal rank (RRF): each index's top candidates are ranked,
        a sample scores sum(1 / (RRF_K + rank)) over the lists it is in, ties go to the lower id. Ranks,
        not cosines, are fused because image-text and text-text cosines live on different scales. Each
        hit's `scores` holds its cosine in each list (null where it was not a candidate). `kinds` names
        the encoder of each vector (default: image). --where filters the fused list, widening the lists
        until k hits pass or none are left."""
        if k < 1:
            raise InputError("-k: must be at least 1")
        kinds = kinds or {}
        ntotal = min(self.indexes[m].ntotal for m in vecs)
        n_cand = max(RRF_DEPTH, (k + 1) * (4 if self.where else 1))
        while True:
            n_cand = min(n_cand, ntotal, MAX_CANDIDATES)
            fused: dict[int, float] = {}
            cos: dict[int, dict[str, float]] = {}
            for m, vec in vecs.items():
                for rank, (i, sim) in enumerate(self.ann(vec, n_cand, m, kinds.get(m, "image")), 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
                    cos.setdefault(i, {})[m] = round(sim, 6)
            order = sorted((i for i in fused if self.keys[i] != exclude), key=lambda i: (-fused[i], i))
            hits = [i for i in order if self.allowed is None or self.allowed[i]]
            if len(hits) >= k or n_cand >= min(ntotal, MAX_CANDIDATES):
                break
            n_cand *= 4
        hits = hits[:k]
        rows = self.rows_by_id(hits)
        return [{"rank": rank, "key": str(self.keys[i]), "shard": self.shard_of(i), "score": round(fused[i], 6),
                 "scores": {m: cos[i].get(m) for m in vecs}, **row}
                for rank, (i, row) in enumerate(zip(hits, rows, strict=True), 1)]

    def rows_by_id(self, ids: list[int]) -> list[dict[str, Any]]:
        """HIT_COLUMNS of each index id, in order: from the row store (one batch lookup per id), or from
        the samples view when the store is missing or stale."""
        if not ids:
            return []
        if self.store is not None:
            return [_jsonable({c: r.get(c) for c in self.store.columns}) for r in self.store.rows(ids)]
        found = self.rows([self.keys[i] for i in ids])
        return [found.get(str(self.keys[i]), {}) for i in ids]

    def rows(self, keys: list[str], where: str | None = None) -> dict[str, dict[str, Any]]:
        """{key: HIT_COLUMNS} for those of `keys` that pass `where`, by a query over the samples view (every
        shard's files): the fallback of rows_by_id, and what a caller outside the search path may use."""
        if not keys:
            return {}
        cols = ", ".join(c for c in HIT_COLUMNS if c in self.columns)
        cond = f" AND COALESCE(({where}), FALSE)" if where else ""
        sql = f"SELECT key, {cols} FROM samples WHERE key IN (SELECT unnest($keys)){cond}"
        with self._lock:
            records = _records(self.db.con.execute(sql, {"keys": [str(k) for k in keys]}))
        return {r.pop("key"): _jsonable(r) for r in records}

    def sample(self, key: str) -> dict[str, Any]:
        """Everything known about one sample: its samples-view row (ledger + signals) and the export's verdict."""
        with self._lock:
            rows = _records(self.db.con.execute("SELECT * FROM samples WHERE key = $key", {"key": key}))
            if not rows:
                raise InputError(f"key '{key}' is not a sample of {self.ds.root}")
            verdict = self._verdict(key)
        row = _jsonable(rows[0])
        ledger_cols = {f.name for f in _ledger_fields()}
        return {"key": key, "ledger": {k: v for k, v in row.items() if k in ledger_cols},
                "signals": {k: v for k, v in row.items() if k not in ledger_cols}, "export": verdict}

    def _verdict(self, key: str) -> dict[str, Any] | None:
        if self.export is None:
            return None
        out: dict[str, Any] = {"export_dir": str(self.export.root), "decision": "unknown"}
        if "kept" in self.export_views and self.db.con.execute(
                "SELECT 1 FROM kept WHERE key = $key", {"key": key}).fetchone():
            out["decision"] = "kept"
        elif "dropped" in self.export_views:
            r = self.db.con.execute("SELECT reason FROM dropped WHERE key = $key", {"key": key}).fetchone()
            if r:
                out.update(decision="dropped", reason=r[0])
        return out

    def thumbnails(self, hits: list[dict[str, Any]], size: int = 160) -> dict[str, str]:
        """{key: data URI}: each image read at the offset the row store keeps for it (no tar header scan);
        hits without a stored offset go through the report's reader (a header scan of their shard)."""
        out: dict[str, str] = {}
        rest = hits
        if self.store is not None and hits:
            rows = self.store.rows([self.id_of(h["key"]) for h in hits])
            rest = []
            for h, r in zip(hits, rows, strict=True):
                if r.get("image_offset") is None:
                    rest.append(h)
                    continue
                try:
                    with open(self.ds.shard_tar(h["shard"]), "rb") as fh:
                        fh.seek(r["image_offset"])
                        data = fh.read(r["image_size"])
                except OSError:
                    data = b""
                uri = thumbnail(data, size) if len(data) == r["image_size"] else None
                if uri:
                    out[h["key"]] = uri
        if rest:
            out.update(load_thumbnails(self.ds, [(h["key"], h["shard"]) for h in rest], size))
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.db.close()
        with self._lock_files:
            while self._files:
                os.close(self._files.popitem()[1][0])
        self._readers.shutdown()


def _open_file_budget() -> int:
    """How many embedding files a searcher keeps open: MAX_OPEN_SHARDS, at most a quarter of the fd limit."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(MAX_OPEN_SHARDS, soft // 4 if soft > 0 else MAX_OPEN_SHARDS))


def query_kind(q: Query, modality: str) -> str:
    """The encoder behind q's vector: text for a text query (and a key query against captions, which uses
    the sample's caption vector), image for an image file or a key query against images."""
    if q.kind == "key":
        return "text" if modality == "text" else "image"
    return q.kind


def _records(result: Any) -> list[dict[str, Any]]:
    cols = [d[0] for d in result.description]
    return [dict(zip(cols, r, strict=True)) for r in result.fetchall()]


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        elif isinstance(v, bytes):
            v = v.hex()
        out[k] = v
    return out


def _ledger_fields() -> list[Any]:
    from curate.io.ledger import LEDGER_FIELDS

    return LEDGER_FIELDS
