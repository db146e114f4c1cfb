"""The shard contract's building blocks: atomic writes, deterministic tars, safe reading, fingerprints."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest

from curate.config import fingerprint, runtime
from curate.errors import ConfigMismatchError, ShardError
from curate.io import manifest
from curate.io.atomic import atomic_path, clean_tmp
from curate.io.layout import DatasetDir
from curate.io.shards import ShardWriter, iter_samples


def _write(path, n=3):
    with ShardWriter(path) as w:
        for i in range(n):
            w.write(f"{i:010d}", b"\xff\xd8fakejpeg" + bytes([i]), "jpg", f"caption {i}", {"i": i})


def test_shard_writer_is_deterministic_and_roundtrips(tmp_path):
    _write(tmp_path / "a.tar")
    _write(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    samples = list(iter_samples(tmp_path / "a.tar"))
    assert [s["key"] for s in samples] == ["0000000000", "0000000001", "0000000002"]
    assert samples[1]["caption"] == "caption 1" and samples[1]["meta"] == {"i": 1} and samples[1]["ext"] == "jpg"
    # img2dataset member naming
    names = tarfile.open(tmp_path / "a.tar").getnames()
    assert names[:3] == ["0000000000.jpg", "0000000000.txt", "0000000000.json"]


def test_writer_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x.tar") as w:
        w.write("0000000000", b"x", "jpg", "c", {})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_truncated_tar_is_a_shard_error(tmp_path):
    _write(tmp_path / "a.tar", n=20)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="truncated"):
        list(iter_samples(tmp_path / "t.tar"))


@pytest.mark.parametrize("kind", ["symlink", "dotdot", "absolute"])
def test_unsafe_members_are_refused(tmp_path, kind):
    p = tmp_path / "bad.tar"
    with tarfile.open(p, "w") as tar:
        if kind == "symlink":
            info = tarfile.TarInfo("0000000000.jpg")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            name = "../0000000000.jpg" if kind == "dotdot" else "/tmp/0000000000.jpg"
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ShardError):
        list(iter_samples(p))


def test_atomic_path_cleans_up_and_clean_tmp(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / ".tmp-abc-f.bin").write_bytes(b"left by a killed writer")
    assert clean_tmp(tmp_path) == 0  # may belong to a live concurrent writer
    assert clean_tmp(tmp_path, older_than_s=0) == 1


@dataclasses.dataclass(frozen=True)
class _Cfg:
    size: int = 256
    workers: int = runtime(1)


def test_fingerprint_ignores_runtime_fields_and_mismatch_is_refused(tmp_path):
    assert fingerprint(_Cfg(256, 1)) == fingerprint(_Cfg(256, 8))
    assert fingerprint(_Cfg(256)) != fingerprint(_Cfg(128))
    ds = DatasetDir.at(tmp_path)
    fp = fingerprint(_Cfg())
    manifest.record_stage(ds, "download", config={"size": 256}, fingerprint=fp)
    assert manifest.check_fingerprint(ds, "download", fp, redo=False) is False
    with pytest.raises(ConfigMismatchError, match="--redo"):
        manifest.check_fingerprint(ds, "download", fingerprint(_Cfg(128)), redo=False)
    assert manifest.check_fingerprint(ds, "download", fingerprint(_Cfg(128)), redo=True) is True
