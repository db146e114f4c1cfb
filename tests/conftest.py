"""Shared fixtures: the loopback server, the tiny open_clip config and tiny datasets made by the real stages.

- `server` / `canary`: a fresh LoopServer (tests/loopback.py) on 127.0.0.1 / 127.0.0.2 per test;
  `raw`: a RawServer (tests/hostile_server.py) for byte-level misbehaviour.
- `tiny_model`: the tiny open_clip config (random init, 32 px) as a file, once per session.
- `pipeline_dataset`: a dataset dir made once per session by `curate download` from a loopback web,
  `curate score` with the tiny config and `curate dedup` (see tests/pipeline_data.py for what it holds).
  Session data is shared: a test that writes into it must work on `helpers.copy_dataset(...)` instead
  (checked when the session ends).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_server import RawServer
from loopback import LoopServer


@pytest.fixture
def server() -> Iterator[LoopServer]:
    s = LoopServer()
    yield s
    s.close()


@pytest.fixture
def canary() -> Iterator[LoopServer]:
    """A second server on another loopback address, with a secret that no redirect may reach."""
    s = LoopServer("127.0.0.2")
    s.routes["/secret"] = lambda h, n: h.send(200, b"secret", "text/plain")
    yield s
    s.close()


@pytest.fixture
def raw() -> Iterator[RawServer]:
    """A raw-socket loopback server for byte-level misbehaviour (tests/hostile_server.py)."""
    s = RawServer()
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline_data import write_tiny_config

    return write_tiny_config(tmp_path_factory.mktemp("model"))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def pipeline_dataset(tmp_path_factory, tiny_model) -> Iterator[Path]:
    """Read-only: downloaded, scored and deduplicated by the real stages (copy it before writing).

    Checked at the end of the session: a test that wrote into it (even a lock or work file) fails there."""
    from pipeline_data import build_pipeline_dataset

    root = build_pipeline_dataset(tmp_path_factory.mktemp("pipeline"), tiny_model)
    before = _snapshot(root)
    yield root
    changed = set(before.items()) ^ set(_snapshot(root).items())
    assert not changed, f"a test changed the shared pipeline_dataset (use helpers.copy_dataset): {sorted(changed)[:5]}"
