"""Download at scale on a loopback web of many hosts: hundreds (and, in a slow test, thousands) of requests
in flight at once, never more than --per-host on any one host, and a host's Retry-After honoured by every
row of that host."""

from __future__ import annotations

import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from many_hosts import ManyHosts

from curate.cli import main
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables

# hosts (by index, small ones: every row of theirs is paused once) that answer 429 with this Retry-After (s) to the first request of every path
LIMITED = {150: 2, 190: 2}
GRACE = 0.5  # a request its thread sent before the 429 reached the client may still arrive this late


def crawl(tmp_path, n_hosts: int, n_rows: int, delay: float, threads: int, big_every: int = 40) -> dict:
    """A crawl of n_rows over n_hosts (--per-host 4) with two hosts that 429 every path once; checks that
    every row succeeded, that no host ever had more requests or connections than its limit, and that
    every 429's Retry-After was honoured. The server's report, for the in-flight figure."""
    per_host = 4
    web = ManyHosts(n_hosts, delay=delay, limited=LIMITED)
    rng = random.Random(0)
    # one big host (1 row in big_every: its rows queue behind its limit), two rate-limited hosts of 4 rows
    # each, the rest spread over the other hosts
    small = [k for k in range(2, n_hosts) if k not in LIMITED]
    hosts = [1 if i % big_every == 0 else rng.choice(small) for i in range(n_rows - 4 * len(LIMITED))]
    for j, k in enumerate(LIMITED):  # rows about a second apart: the later ones come while the host is paused
        for m in range(4):
            hosts.insert(n_rows // 4 + (n_rows * 3 // 8) * j + (n_rows // 24) * m, k)
    urls = [web.url(h, f"/{i}.jpg") for i, h in enumerate(hosts)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    t0 = time.monotonic()
    try:
        rc = main(["download", str(inp), "--out", str(tmp_path / "ds"), "--no-progress", "--image-size", "16",
                   "--allow-private", "--per-host", str(per_host), "--threads", str(threads), "--deadline", "20",
                   "--workers", "1", "--samples-per-shard", str(n_rows),
                   "--throttled-tail", "1000"])  # every row of a 429'd host waits its turn here
    finally:
        report = web.close()
    report["took"] = time.monotonic() - t0
    assert rc == 0
    rows = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
    assert len(rows) == len(urls) and {r["status"] for r in rows} == {"success"}, \
        {r["status"] for r in rows}
    # never more than the limit on one host: requests being answered, and connections open
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
    return report


def test_hundreds_in_flight_never_past_the_per_host_limit_and_retry_after_honoured(tmp_path):
    report = crawl(tmp_path, n_hosts=200, n_rows=2400, delay=1.0, threads=800)
    assert report["max_in_flight"] >= 300, (report["max_in_flight"], report["took"])


@pytest.mark.slow
def test_thousands_in_flight_never_past_the_per_host_limit_and_retry_after_honoured(tmp_path):
    """2,500 fetch threads in one task over 1,200 hosts answering in 4 s: over 2,000 requests in flight
    at once, and the same per-host and Retry-After checks. The big host holds 1 row in 200, so its 38
    rows (4 at a time, 4 s each) end with the others."""
    report = crawl(tmp_path, n_hosts=1200, n_rows=7500, delay=4.0, threads=2500, big_every=200)
    assert report["max_in_flight"] >= 2000, (report["max_in_flight"], report["took"])


def test_rows_behind_a_rate_limited_host_do_not_hold_the_shard_and_retry_failed_fetches_them(tmp_path):
    """A host that allows 6 requests/s (its requests get spaced) holds 80 of the shard's 1,200 rows; the
    others are done in a few seconds. The rows still queued behind it 5 s later (fewer than a tenth of the
    shard) end as host_throttled (every row has its status), and --retry-failed, made to wait for all,
    fetches them."""
    web = ManyHosts(20, delay=0.05, rated={0: 6.0})
    hosts = [0 if i % 15 == 0 else 1 + i % 19 for i in range(1200)]
    urls = [web.url(h, f"/{i}.jpg") for i, h in enumerate(hosts)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    args = ["--out", str(tmp_path / "ds"), "--no-progress", "--image-size", "16", "--allow-private",
            "--workers", "1"]
    try:
        assert main(["download", str(inp), *args]) == 0
        first = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
        assert main(["download", str(inp), *args, "--retry-failed", "--throttled-tail", "1000"]) == 0
    finally:
        web.close()
    assert len(first) == 1200
    status = {r["row"]: r["status"] for r in first}
    assert {status[i] for i, h in enumerate(hosts) if h != 0} == {"success"}
    limited = [status[i] for i, h in enumerate(hosts) if h == 0]
    # 80 rows at no more than 6/s would take 13 s or more; the shard went on without the last of them
    assert 0 < limited.count("host_throttled") < 80 and set(limited) <= {"success", "host_throttled"}
    after = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
    final = {r["row"]: r["status"] for r in after if r["superseded_by"] is None}
    assert len(final) == 1200 and set(final.values()) == {"success"}, sorted(set(final.values()))


def test_a_shard_that_is_mostly_a_rate_limited_hosts_rows_waits_for_them(tmp_path):
    """The same host's rows as three quarters of a shard: there is little else to do, so none is left."""
    web = ManyHosts(4, delay=0.05, rated={0: 6.0})  # 60 rows: 10 s, past the 5 s tail
    hosts = [1 + i % 3 if i % 4 == 0 else 0 for i in range(80)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [web.url(h, f"/{i}.jpg") for i, h in enumerate(hosts)]}), inp)
    try:
        assert main(["download", str(inp), "--out", str(tmp_path / "ds"), "--no-progress", "--image-size", "16",
                     "--allow-private", "--workers", "1"]) == 0
    finally:
        web.close()
    rows = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
    assert len(rows) == 80 and {r["status"] for r in rows} == {"success"}


class _Resetter:
    """A host that takes every connection and resets it before any answer (a dead backend behind a live
    address), on one loopback address; counts the connections it took."""

    def __init__(self, addr: str):
        import socket
        import struct
        import threading

        self.accepted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((addr, 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        linger = struct.pack("ii", 1, 0)  # close = RST

        def loop() -> None:
            while True:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                self.accepted += 1
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                c.close()

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def test_a_host_that_never_answers_is_asked_a_few_times_not_once_per_row_and_attempt(tmp_path):
    """300 rows of a host that resets every connection, with 2 retries each, beside a live host: once
    HOST_DOWN_AFTER requests in a row got no answer, its other rows end at once as connect_error without a
    request (a crawl of a dead domain behind 10^4 URLs would otherwise take hours), every row has its one
    ledger entry, and the live host's rows are untouched."""
    from curate.fetch import HOST_DOWN_AFTER

    dead = _Resetter("127.3.9.1")
    web = ManyHosts(2, delay=0.0)
    urls = [f"http://127.3.9.1:{dead.port}/{i}.jpg" if i % 7 else web.url(1, f"/{i}.jpg") for i in range(350)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    try:
        assert main(["download", str(inp), "--out", str(tmp_path / "ds"), "--no-progress", "--image-size", "16",
                     "--allow-private", "--workers", "1", "--retries", "2"]) == 0
    finally:
        web.close()
        dead.close()
    rows = read_tables(DatasetDir.at(tmp_path / "ds").ledger_files()).to_pylist()
    assert len(rows) == 350
    on_dead = [r for r in rows if "127.3.9.1" in r["url"]]
    assert {r["status"] for r in rows if r not in on_dead} == {"success"}
    assert {r["status"] for r in on_dead} == {"connect_error"}
    skipped = [r for r in on_dead if r["error_message"].startswith("not asked: the host is down")]
    assert len(skipped) > 250 and all(r["attempts"] in (0, None) for r in skipped), len(skipped)
    # 300 rows x 3 attempts would be 900 connections; the requests already out when it went down, the
    # rows that were backing off for a retry, and nothing else
    assert HOST_DOWN_AFTER <= dead.accepted <= 3 * HOST_DOWN_AFTER, dead.accepted


def test_a_host_is_down_after_requests_in_a_row_without_an_answer_and_up_on_an_answer():
    from curate.fetch import HOST_DOWN_AFTER, HostLimiter

    lim = HostLimiter(16)
    for _ in range(HOST_DOWN_AFTER - 1):
        assert not lim.not_answered("a", "timeout", "connect timeout")
    lim.answered("a")  # an answer in between: the count starts again
    for _ in range(HOST_DOWN_AFTER - 1):
        assert not lim.not_answered("a", "timeout", "connect timeout")
    assert lim.down("a") is None
    assert lim.not_answered("a", "timeout", "connect timeout")
    code, why = lim.down("a")
    assert code == "timeout" and f"{HOST_DOWN_AFTER} requests to a in a row" in why
    assert lim.down("b") is None
    lim.answered("a")
    assert lim.down("a") is None
