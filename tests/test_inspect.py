"""`curate inspect`: exact counts on a small dataset whose every figure is known (tests/report_fixtures.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import report_fixtures as F

from curate.cli import main
from curate.errors import InputError
from curate.inspect import summarize
from curate.io.layout import DatasetDir
from curate.io.tables import write_table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return F.make_report_dataset(tmp_path_factory.mktemp("inspect") / "ds")


def _inspect_json(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_exact_counts(dataset, capsys):
    s = _inspect_json(capsys, dataset)
    assert list(s["stages"]) == ["download", "score", "dedup"]
    dl = s["stages"]["download"]
    assert dl["shards"] == {"done": 2, "failed": [], "planned": 3, "pending": 1, "pending_shards": ["00000002"]}
    assert dl["config"] == {"image_size": 48, "url_col": "URL"} and dl["fingerprint"] == "d0wn10ad"
    assert s["stages"]["score"]["shards"]["pending"] == 0

    led = s["ledger"]
    assert led["rows"] == 24 and led["success"] == 19 and led["superseded"] == 0
    assert led["status"] == {"success": 19, "http_4xx": 2, "blocked_scheme": 1, "decode_error": 1, "timeout": 1}
    assert led["error_code"] == {"http_4xx": 2, "blocked_scheme": 1, "decode_error": 1, "timeout": 1}

    sc = s["score"]
    assert sc["rows"] == 24 and sc["scored"] == 18
    # 5 download failures carry their status, plus the one per-sample decode error of row 21
    assert sc["skip_reason"] == {"decode_error": 2, "http_4xx": 2, "blocked_scheme": 1, "timeout": 1}
    scores = [F.clip_score(r) for r in range(F.N_ROWS) if r not in F.FAILURES and r not in F.NOT_SCORED]
    for name, q in (("min", 0), ("p25", 0.25), ("p50", 0.5), ("p95", 0.95), ("max", 1)):
        assert sc["clip_score"][name] == pytest.approx(np.quantile(scores, q), abs=1e-4)
    assert sc["clip_score"]["mean"] == pytest.approx(np.mean(scores), abs=1e-4)
    assert sc["lang"] == {"en": {"count": 15, "share": 0.8333}, "it": {"count": 2, "share": 0.1111},
                          "de": {"count": 1, "share": 0.0556}}
    assert sc["boilerplate"] == 2

    assert s["dedup"] == {"files": 2, "rows": 18, "duplicates": 3, "duplicate_share": 0.1667, "exact_dup": 2,
                          "groups": 2, "largest_group": 3, "eval_contaminated": 1}


def test_inspect_text(dataset, capsys):
    capsys.readouterr()
    assert main(["inspect", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "download" in out and "2 done, 1 pending" in out and "pending: 00000002" in out
    assert "24 rows in 2 shard(s), 19 success" in out
    assert "3 duplicates (16.7%)" in out and "en 83.3%" in out


def test_inspect_counts_only_done_shards_and_current_rows(tmp_path, capsys):
    """A ledger without a marker is not counted; rows superseded by --retry-failed are counted once."""
    root = F.make_report_dataset(tmp_path / "ds")
    ds = DatasetDir.at(root)
    # shard 00000002 has a ledger file but no marker (a crash before the marker): not done, not counted
    write_table(ds.ledger("00000002"), F._ledger_table([0, 1]))
    # a retry shard 00000003 re-attempted row 10 (timeout) successfully; the old row is marked superseded
    old = pa.Table.from_pylist([dict(F._ledger_row(r), superseded_by="0000000300000" if r == 10 else None)
                                for r in range(12)], schema=F._ledger_table([0]).schema)
    write_table(ds.ledger("00000000"), old)
    retry = dict(F._ledger_row(10), key="0000000300000", shard="00000003", status="success", error_code=None)
    write_table(ds.ledger("00000003"), pa.Table.from_pylist([retry], schema=old.schema))
    F._mark(ds, "download", "00000003")
    s = _inspect_json(capsys, root)
    assert s["ledger"]["rows"] == 24 and s["ledger"]["superseded"] == 1
    assert s["ledger"]["success"] == 20 and "timeout" not in s["ledger"]["status"]
    assert s["stages"]["download"]["shards"]["pending_shards"] == ["00000002"]


def test_inspect_empty_and_bad_dirs(tmp_path, capsys):
    with pytest.raises(InputError, match="missing is not a directory") as e:
        summarize(tmp_path / "missing")
    assert e.value.exit_code == 2
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    (tmp_path / "plain").mkdir()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "plain")]) == 2
    assert "not a curate dataset directory" in capsys.readouterr().err
    # a dataset where only download was planned: everything pending, no tables yet
    ds = DatasetDir.at(tmp_path / "fresh")
    write_table(ds.root / "_inputs" / "00000000.parquet", pa.table({"url": ["http://a/x.jpg"]}))
    (ds.root / "_done").mkdir()
    s = _inspect_json(capsys, ds.root)
    assert s["ledger"] is None and s["score"] is None and s["dedup"] is None and s["stages"] == {}
