"""Nearest neighbours of a few samples by key, straight from a built index (no ledger, no model, no SQL):
what the HTML report shows under each grid tile when the dataset has an index.
"""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import quote

import numpy as np

from curate.io.atomic import read_json
from curate.io.layout import DatasetDir
from curate.search.build import index_dir, open_embeddings

log = logging.getLogger(__name__)

SERVE_URL = "http://127.0.0.1:8765/"  # `curate serve DIR`'s default address


def has_index(ds: DatasetDir) -> bool:
    return (index_dir(ds) / "index.json").exists()


def neighbour_map(ds: DatasetDir, keys: list[str], k: int = 4) -> dict[str, list[tuple[str, float]]]:
    """{key: [(neighbour key, cosine), ...]} for the indexed ones of `keys`; {} without an index."""
    import faiss
    import pyarrow.parquet as pq

    if not keys or not has_index(ds):
        return {}
    wd = index_dir(ds)
    meta = read_json(wd / "index.json")
    info = meta["modalities"]["image"]
    ids = pq.read_table(wd / "ids.parquet")
    all_keys = np.asarray(ids["key"].to_numpy(zero_copy_only=False), dtype=object)
    pos = {key: i for i, key in enumerate(all_keys) if key in set(keys)}
    if not pos:
        return {}
    shards = np.asarray(ids["shard"].to_numpy(zero_copy_only=False), dtype=object)
    emb_row = ids["emb_row"].to_numpy()
    index = faiss.read_index(str(wd / info["file"]))
    if meta["nlist"]:
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
    wanted = list(pos)
    q = np.stack([np.asarray(open_embeddings(ds, meta["scorer"], str(shards[pos[key]]), "image")[emb_row[pos[key]]],
                             np.float32) for key in wanted])
    sims, found = index.search(q, k + 1)
    out = {}
    for key, srow, irow in zip(wanted, sims, found, strict=True):
        out[key] = [(str(all_keys[i]), float(s)) for i, s in zip(irow, srow, strict=True)
                    if i >= 0 and all_keys[i] != key][:k]
    return out


def neighbours_html(key: str, nbrs: list[tuple[str, float]] | None) -> str:
    """A tile's neighbour line: keys with cosines, and a link into `curate serve` for the full view."""
    if not nbrs:
        return ""
    items = ", ".join(f"{html.escape(n)} ({s:.3f})" for n, s in nbrs)
    href = html.escape(f"{SERVE_URL}#key={quote(key, safe='')}", quote=True)
    return (f'<details class="nbrs"><summary>neighbours</summary>{items} · '
            f'<a href="{href}" title="needs `curate serve DIR` running">open in curate serve</a></details>')


def report_neighbours(ds: Any, keys: list[str]) -> dict[str, str]:
    """{key: neighbour line HTML} for the report's grids; a broken index is logged, never fatal to the report."""
    try:
        found = neighbour_map(ds, keys)
    except Exception as e:  # noqa: BLE001 - the report stays useful without neighbours
        log.warning("report: neighbours from the index skipped (%s)", e)
        return {}
    return {key: neighbours_html(key, nbrs) for key, nbrs in found.items()}
