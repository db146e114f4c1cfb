"""The lock on a filesystem that cannot hold it: flock unsupported (ENOSYS, as on Lustre mounted without
flock) and Lustre's node-local `localflock` are refused with a clear message (exit 2); CURATE_LOCK=none runs
without the lock.

No filesystem without flock can be mounted in a test, so the ENOSYS case makes the OS call itself
(fcntl.flock) fail as such a filesystem does; everything above it is the product's code."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.io.layout import DatasetDir
from curate.io.lock import LockUnsupported, check_cluster_lock, mount_of

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
10.0.0.1@o2ib:/scratch /lus lustre rw,localflock,lazystatfs 0 0
10.0.0.1@o2ib:/proj /lus/proj lustre rw,flock,lazystatfs 0 0
server:/export /nfs nfs4 rw,vers=4.2 0 0
"""


def _download(tmp_path: Path) -> int:
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["ftp://127.0.0.1/a.jpg"], "TEXT": ["a"]}), inp)
    return main(["download", str(inp), "--out", str(tmp_path / "ds"), "--url-col", "URL", "--caption-col", "TEXT",
                 "--no-progress"])


def _no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_filesystem_without_flock_is_refused_clearly(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch)
    assert _download(tmp_path) == 2
    err = capsys.readouterr().err
    assert "does not support flock" in err and "ENOSYS" in err and "CURATE_LOCK=none" in err
    assert not DatasetDir.at(tmp_path / "ds").done_tasks("download")


def test_curate_lock_none_runs_without_the_lock(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    monkeypatch.setenv("CURATE_LOCK", "none")
    assert _download(tmp_path) == 0
    assert DatasetDir.at(tmp_path / "ds").done_tasks("download") == ["00000000"]


def test_node_local_lustre_flock_is_refused():
    assert mount_of(Path("/lus/proj/a"), MOUNTS)[0] == "/lus/proj"  # the longest mount point wins
    check_cluster_lock(Path("/lus/proj/data"), MOUNTS)  # flock: cluster-wide
    check_cluster_lock(Path("/nfs/data"), MOUNTS)
    with pytest.raises(LockUnsupported, match="localflock"):
        check_cluster_lock(Path("/lus/scratch/data"), MOUNTS)
