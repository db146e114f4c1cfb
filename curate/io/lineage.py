"""Lineage: each task's marker names the upstream task runs it read, so a rerun upstream is never joined
with stale downstream output.

A marker's *identity* is the SHA-256 of its bytes. Every completed task writes a fresh marker (it holds a
random run id), so an upstream shard that ran again has another identity even when its outputs happen to be
byte-equal. A stage that reads another stage's per-task output declares `reads(cfg, ds, task)` -> a list of
(upstream stage, upstream task); `execute_task` records their identities in the marker before the task
reads anything, and the runner treats a done task whose recorded identities differ from the current ones
as not done (it runs again; the log names it). Reading an identity is one small file per upstream task, so
a per-shard task touches O(1) upstream paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from curate.errors import InputError
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir, task_id

ABSENT = "absent"  # the identity of an upstream task that has no marker


def marker_identity(ds: DatasetDir, stage: str, task: str) -> str:
    """The identity of `stage`'s run of `task`: SHA-256 (16 hex digits) of its marker, or ABSENT."""
    try:
        with open(ds.marker(stage, task), "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:16]
    except FileNotFoundError:
        return ABSENT


def read_identities(ds: DatasetDir, reads: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{"stage/task": identity} for each upstream (stage, task)."""
    return {f"{stage}/{task}": marker_identity(ds, stage, task) for stage, task in reads}


def stale_reads(ds: DatasetDir, marker: dict[str, Any]) -> list[str]:
    """The upstream "stage/task" names whose identity changed since the task recorded in `marker` ran."""
    recorded = marker.get("reads") or {}
    out = []
    for name, ident in recorded.items():
        stage, _, task = name.rpartition("/")
        if marker_identity(ds, stage, task) != ident:
            out.append(name)
    return out


def stale_tasks(reads: Callable[[dict[str, Any]], Iterable[tuple[str, str]]] | None, ds: DatasetDir, key: str,
                tasks: list[dict[str, Any]], done: set[str]) -> dict[str, list[str]]:
    """{task id: changed upstream names} for the done tasks among `tasks` whose inputs changed since they ran.

    `reads(task)` gives the upstream (stage, task) runs a task reads; None (a stage that declares none): no
    lineage to check. A marker written before markers recorded their reads
    (no "reads" field) is checked against the current upstream identities it would have read: it is stale
    only if some upstream is absent now, so existing datasets resume as they did.
    """
    if reads is None:
        return {}
    out: dict[str, list[str]] = {}
    for t in tasks:
        tid = task_id(t)
        if tid not in done:
            continue
        try:
            marker = read_json(ds.marker(key, tid))
        except (OSError, ValueError):
            out[tid] = ["(unreadable marker)"]
            continue
        if "reads" in marker:
            changed = stale_reads(ds, marker)
        else:
            changed = [f"{s}/{u}" for s, u in reads(t)
                       if marker_identity(ds, s, u) == ABSENT]
        if changed:
            out[tid] = changed
    return out


def stage_state(ds: DatasetDir, stage: str) -> dict[str, str]:
    """{task: identity} of every done task of `stage`: the state a reader of the whole stage saw."""
    return {t: marker_identity(ds, stage, t) for t in ds.done_tasks(stage)}


def stale_done(ds: DatasetDir, stage: str) -> dict[str, list[str]]:
    """{task: changed upstream names} over every done task of `stage` whose marker records its reads."""
    out: dict[str, list[str]] = {}
    for tid in ds.done_tasks(stage):
        try:
            marker = read_json(ds.marker(stage, tid))
        except (OSError, ValueError):
            continue
        changed = stale_reads(ds, marker)
        if changed:
            out[tid] = changed
    return out


def require_current(ds: DatasetDir, stage: str, reader: str) -> None:
    """Refuse (exit 2) to let `reader` read `stage`'s output while some of it was computed from upstream
    output that has changed since (e.g. a shard downloaded again and not scored again)."""
    stale = stale_done(ds, stage)
    if stale:
        names = sorted(stale)
        cmd = stage if stage in ("score", "dedup", "balance", "target", "index") else f"score --name {stage}"
        raise InputError(
            f"{ds.root}: {reader} reads {stage}, but {len(names)} of its shard(s) were computed from upstream "
            f"output that has changed since ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}: "
            f"{', '.join(stale[names[0]])}). Run `curate {cmd}` on this directory first; it recomputes "
            f"exactly those shards.")
