"""Download at scale on a loopback web of many hosts: hundreds of requests in flight at once, never more
than --per-host on any one host, and a host's Retry-After honoured by every row of that host."""

from __future__ import annotations

import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
from many_hosts import ManyHosts

from curate.cli import main
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables

# hosts (by index, small ones: every row of theirs is paused once) that answer 429 with this Retry-After (s) to the first request of every path
LIMITED = {150: 2, 190: 2}
GRACE = 0.5  # a request its thread sent before the 429 reached the client may still arrive this late


def test_hundreds_in_flight_never_past_the_per_host_limit_and_retry_after_honoured(tmp_path):
    n_hosts, per_host = 200, 4
    web = ManyHosts(n_hosts, delay=1.0, limited=LIMITED)
    rng = random.Random(0)
    # one big host (1 row in 40: its rows queue behind its limit), two rate-limited hosts of 4 rows each,
    # the rest spread over the other hosts
    small = [k for k in range(2, n_hosts) if k not in LIMITED]
    hosts = [1 if i % 40 == 0 else rng.choice(small) for i in range(2400 - 3 * len(LIMITED))]
    for j, k in enumerate(LIMITED):  # rows about a second apart: the later ones come while the host is paused
        for m in range(4):
            hosts.insert(600 + 900 * j + 100 * m, k)
    urls = [web.url(h, f"/{i}.jpg") for i, h in enumerate(hosts)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    t0 = time.monotonic()
    try:
        rc = main(["download", str(inp), "--out", str(tmp_path / "ds"), "--no-progress", "--image-size", "16",
                   "--allow-private", "--per-host", str(per_host), "--threads", "800", "--deadline", "20"])
    finally:
        report = web.close()
    took = time.monotonic() - t0
    assert rc == 0
    rows = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
    assert len(rows) == len(urls) and {r["status"] for r in rows} == {"success"}, \
        {r["status"] for r in rows}
    # many hundreds at once: the server saw them
    assert report["max_in_flight"] >= 300, (report["max_in_flight"], took)
    # ... and never more than the limit on one host: requests being answered, and connections open
    assert max(report["max_active"].values()) <= per_host, report["max_active"]
    assert max(report["max_conns"].values()) <= per_host, report["max_conns"]
    assert report["max_active"][1] == per_host  # a big host did use its whole share
    # Retry-After: after a 429, that host heard nothing until the pause was over (but for requests
    # already on their way), and every 429'd row was asked again and succeeded
    for k, after in LIMITED.items():
        sent = report["throttled"][k]
        assert sent, k
        for t in sent:
            early = [a for a in report["arrivals"][k] if t + GRACE < a < t + after - 0.05]
            assert not early, (k, t, [round(a - t, 3) for a in early])
    limited_rows = [r for r, h in zip(rows, hosts, strict=True) if h in LIMITED]
    assert limited_rows and all(r["attempts"] == 2 for r in limited_rows)
