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
            w.write(f"{i:013d}", b"\xff\xd8fakejpeg" + bytes([i]), "jpg", f"caption {i}", {"i": i})


def test_shard_writer_is_deterministic_and_roundtrips(tmp_path):
    _write(tmp_path / "a.tar")
    _write(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    samples = list(iter_samples(tmp_path / "a.tar"))
    assert [s["key"] for s in samples] == ["0000000000000", "0000000000001", "0000000000002"]
    assert samples[1]["caption"] == "caption 1" and samples[1]["meta"] == {"i": 1} and samples[1]["ext"] == "jpg"
    # img2dataset member naming
    names = tarfile.open(tmp_path / "a.tar").getnames()
    assert names[:3] == ["0000000000000.jpg", "0000000000000.txt", "0000000000000.json"]


def test_writer_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x.tar") as w:
        w.write("0000000000000", b"x", "jpg", "c", {})
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
            info = tarfile.TarInfo("0000000000000.jpg")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            name = "../0000000000000.jpg" if kind == "dotdot" else "/tmp/0000000000000.jpg"
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


def test_shard_ids_and_keys_sort_and_parse_past_99999_shards_and_1e9_rows():
    from curate.io.layout import (
        KEY_LENGTH,
        MAX_ROWS_PER_SHARD,
        row_of_key,
        sample_key,
        shard_index,
        shard_name,
        shard_of_key,
        task_id,
    )

    idx = [0, 1, 9, 99_998, 99_999, 100_000, 100_001, 123_456, 999_999, 1_000_000, 12_345_678, 99_999_999]
    names = [shard_name(i) for i in idx]
    assert sorted(names) == names and len(set(names)) == len(names)  # fixed width: text order = number order
    assert [shard_index(n) for n in names] == idx
    # 10k rows per shard: row 10^9 lives in shard 100,000, past the old 5-digit limit
    rows = [0, 9_999, 10_000, 999_999_999, 1_000_000_000, 1_000_000_001, 5_000_000_123, 99_999_999_999]
    keys = [sample_key(shard_name(r // 10_000), r % 10_000) for r in rows]
    assert sorted(keys) == keys and len(set(keys)) == len(keys)
    assert all(len(k) == KEY_LENGTH for k in keys)
    assert [shard_index(shard_of_key(k)) * 10_000 + row_of_key(k) for k in keys] == rows
    # the largest rows per shard still give keys that sort by (shard, row)
    a, b = sample_key(shard_name(100_000), MAX_ROWS_PER_SHARD - 1), sample_key(shard_name(100_001), 0)
    assert a < b and shard_of_key(a) == "00100000" and shard_of_key(b) == "00100001"
    for bad in ("12345", "0000000000", "abcdefghijklm", "00000000000000"):
        with pytest.raises(ValueError):
            shard_of_key(bad)
    with pytest.raises(ValueError):
        shard_index("00001")  # a 5-digit id of the old layout is not a shard id
    with pytest.raises(ValueError):
        sample_key(shard_name(0), MAX_ROWS_PER_SHARD)
    with pytest.raises(ValueError):
        shard_name(10**8)
    assert task_id({"shard": "00000007"}) == "00000007" and task_id({"task": "pairs-3", "shard": "x"}) == "pairs-3"


def test_done_shards_leave_out_tasks_that_are_not_shards(tmp_path):
    from curate.io.atomic import write_json
    from curate.io.layout import shard_name

    ds = DatasetDir.at(tmp_path)
    for t in (shard_name(100_000), shard_name(99_999), "c00001"):
        write_json(ds.marker("dedup", t), {})
    assert ds.done_tasks("dedup") == ["00099999", "00100000", "c00001"]
    assert ds.done_shards("dedup") == ["00099999", "00100000"]


def test_discard_removes_only_the_stage_outputs(tmp_path):
    ds = DatasetDir.at(tmp_path)
    keep = [ds.marker("score", "00000000"), ds.signals("score", "00000000"), ds.shard_tar("00000000")]
    gone = [ds.marker("download", "00000000"), ds.input_slice("00000000"), ds.plan_file,
            ds.stats("download", "00000000"), ds.ledger("00000000"), ds.work("download") / "x.parquet"]
    for p in keep[:2] + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    ds.discard("download")
    assert all(p.exists() for p in keep[:2]) and not any(p.exists() for p in gone)
    assert not (tmp_path / "shards").exists() and not (tmp_path / "_inputs").exists()
