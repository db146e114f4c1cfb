"""`curate inspect`: exact counts on the dataset the real stages made (conftest.py), recounted here from its tables."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import copy_dataset
from pipeline_data import N_ROWS, rows

from curate.cli import main
from curate.errors import InputError
from curate.inspect import summarize
from curate.io.atomic import read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.tables import write_table


@pytest.fixture(scope="module")
def dataset(pipeline_dataset):
    """Downloaded, scored and deduplicated by the real stages; read-only."""
    return pipeline_dataset


def counts(values) -> dict:
    return dict(Counter(v for v in values if v is not None))


def _inspect_json(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_exact_counts(dataset, capsys):
    s = _inspect_json(capsys, dataset)
    truth = rows(dataset)
    man = read_json(dataset / "manifest.json")["stages"]
    assert list(s["stages"]) == ["download", "score", "dedup"]
    for name, st in s["stages"].items():  # dedup's pair and assign task markers are not shards
        assert st["shards"] == {"done": 3, "failed": [], "planned": 3, "pending": 0, "pending_shards": []}, name
        assert st["config"] == man[name]["config"] and st["fingerprint"] == man[name]["fingerprint"]

    led = s["ledger"]
    status = counts(t["status"] for t in truth)
    assert led["rows"] == N_ROWS and led["superseded"] == 0 and led["files"] == 3
    assert led["success"] == status["success"] and led["status"] == status
    assert led["error_code"] == counts(t["error_code"] for t in truth)
    assert len(status) >= 3  # the input's faults end as more than one error code

    sc = s["score"]
    scored = [t for t in truth if t["scored"]]
    assert sc["rows"] == N_ROWS and sc["scored"] == len(scored) == status["success"]
    assert sc["skip_reason"] == counts(t["skip_reason"] for t in truth)
    scores = [t["clip_score"] for t in scored]
    for name, q in (("min", 0), ("p25", 0.25), ("p50", 0.5), ("p95", 0.95), ("max", 1)):
        assert sc["clip_score"][name] == pytest.approx(np.quantile(scores, q), abs=1e-4)
    assert sc["clip_score"]["mean"] == pytest.approx(np.mean(scores), abs=1e-4)
    langs = counts(t["lang"] for t in scored)
    assert sc["lang"] == {k: {"count": n, "share": round(n / len(scored), 4)} for k, n in langs.items()}
    assert list(sc["lang"]) == sorted(langs, key=lambda k: (-langs[k], k)) and len(langs) >= 3
    assert sc["boilerplate"] == sum(bool(t["caption_boilerplate"]) for t in truth)

    dd = [t for t in truth if t["dup_group"] is not None]
    groups = Counter(t["dup_group"] for t in dd if t["dup_group"] >= 0)
    dups = sum(t["is_duplicate"] for t in dd)
    assert s["dedup"] == {"files": 3, "rows": len(scored), "duplicates": dups,
                          "duplicate_share": round(dups / len(scored), 4),
                          "exact_dup": sum(t["exact_dup"] for t in dd), "groups": len(groups),
                          "largest_group": max(groups.values()),
                          "eval_contaminated": sum(t["eval_contaminated"] for t in dd)}
    assert dups and s["dedup"]["eval_contaminated"]  # the input's copies and evaluation image were found


def test_inspect_text(dataset, capsys):
    s = _inspect_json(capsys, dataset)
    assert main(["inspect", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "download" in out and "3 done, 0 pending" in out and "pending:" not in out
    assert f"{N_ROWS} rows in 3 shard(s), {s['ledger']['success']} success" in out
    dd = s["dedup"]
    assert f"{dd['duplicates']} duplicates ({100 * dd['duplicate_share']:.1f}%)" in out
    assert f"en {100 * s['score']['lang']['en']['share']:.1f}%" in out


def test_inspect_counts_only_done_shards_and_current_rows(dataset, tmp_path, capsys):
    """A ledger without a marker is not counted; rows superseded by --retry-failed are counted once."""
    root = copy_dataset(dataset, tmp_path / "ds")
    ds = DatasetDir.at(root)
    # shard 00000002 lost its marker (a crash before the marker): not done, its ledger not counted
    ds.marker("download", "00000002").unlink()
    in_two = pq.read_table(ds.ledger("00000002")).num_rows
    # a retry shard 00000003 re-attempted shard 00000000's first failed row successfully: the old row is
    # marked superseded (what --retry-failed writes; a loopback 404 or ftp:// URL never succeeds on retry)
    old = pq.read_table(ds.ledger("00000000"))
    failed = next(r for r in old.to_pylist() if r["status"] != "success")
    retry_key = "0000000300000"
    marked = [retry_key if k == failed["key"] else v
              for k, v in zip(old["key"].to_pylist(), old["superseded_by"].to_pylist(), strict=True)]
    i = old.schema.get_field_index("superseded_by")
    write_table(ds.ledger("00000000"), old.set_column(i, old.schema.field(i), pa.array(marked, pa.string())))
    retry = dict(failed, key=retry_key, shard="00000003", status="success", error_code=None, error_message=None)
    write_table(ds.ledger("00000003"), pa.Table.from_pylist([retry], schema=old.schema))
    write_json(ds.marker("download", "00000003"), {"task": "00000003", "stats": {}})
    s = _inspect_json(capsys, root)
    want = Counter(t["status"] for t in rows(dataset) if t["shard"] != "00000002")
    want[failed["status"]] -= 1
    want["success"] += 1
    assert s["ledger"]["rows"] == N_ROWS - in_two and s["ledger"]["superseded"] == 1
    assert s["ledger"]["status"] == {k: n for k, n in want.items() if n}
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


def test_inspect_and_report_say_where_the_failures_went(server, canary, tmp_path, capsys):
    """Failures by cause and by host, from a real download of a loopback web that fails in known ways."""
    import socket
    import time
    from html import unescape

    from loopback import jpeg

    from curate.report.report import render_report

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    server.routes["/gone"] = lambda h, n: h.send(410, b"", "text/plain")
    server.routes["/busy"] = lambda h, n: h.send(429, b"", "text/plain", {"Retry-After": "1"})
    server.routes["/oops"] = lambda h, n: h.send(500, b"", "text/plain")
    server.routes["/slow"] = lambda h, n: (time.sleep(2.5), h.send(200, jpeg()))
    canary.routes["/html.jpg"] = lambda h, n: h.send(200, b"<html>not an image</html>", "text/html")
    urls = ([server.image(f"/ok{i}.jpg") for i in range(3)] + [server.url(f"/missing{i}.jpg") for i in range(3)]
            + [server.url("/gone"), server.url("/busy"), server.url("/oops"), server.url("/slow")]
            + [canary.url("/html.jpg"), canary.url("/nothing.jpg"), f"http://127.0.0.1:{refused_port}/a.jpg"])
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    out = tmp_path / "ds"
    assert main(["download", str(inp), "--out", str(out), "--no-progress", "--allow-private", "--retries", "0",
                 "--timeout", "1", "--image-size", "16"]) == 0
    led = summarize(out)["ledger"]
    assert led["causes"] == {"http 404": 4, "decode": 1, "http 410": 1, "http 5xx": 1, "refused": 1,
                             "timeout": 1, "429 rate limited": 1}
    assert list(led["hosts"]) == ["127.0.0.1", "127.0.0.2"]
    assert led["hosts"]["127.0.0.1"] == {
        "rows": 11, "failed": 8, "failure_share": round(8 / 11, 4),
        "causes": {"http 404": 3, "429 rate limited": 1, "http 410": 1, "http 5xx": 1, "refused": 1, "timeout": 1}}
    assert led["hosts"]["127.0.0.2"]["causes"] == {"decode": 1, "http 404": 1}
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "failures by cause: http 404 4, " in text and "429 rate limited 1" in text
    assert "127.0.0.2" in text and "decode 1, http 404 1" in text
    html = unescape(render_report(out))
    assert "Failures by cause" in html and "429 rate limited" in html and "decode 1, http 404 1" in html
