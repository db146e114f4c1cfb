"""Benchmark `curate download` against img2dataset on a loopback image server (not a timed test).

    nice .venv/bin/python bench/download.py --n 3000 --img2dataset-python .venv-bench/bin/python

Serves N JPEGs (640x480 made from the demo corpus, or --mix: long side 500-4000 px) from a separate
process on 127.0.0.1, runs both tools with the same resize settings (256, keep_ratio), 2 processes x
16 threads, and prints images/s, peak RSS (summed over the process tree) and the ratios; then the
median PSNR of draft-mode (reduced-scale JPEG decoding) vs full-decode resizes.

    flock /tmp/curate-heavy.lock .venv/bin/python bench/download.py --hostile

--web: #15's web-like mix (long side 500/800/1200/2000/4000 px at 25/30/25/15/5%, 10% PNG, 10% WebP)
served by one process on 4 loopback addresses; curate with its default per-host limit, then (with
--img2dataset-python) img2dataset with matched settings (2 processes x 16 threads, 256 keep_ratio, q95)
and with its own defaults, in the same run (--rounds N: best of N each). Prints images/s, peak RSS, CPU
per image (process tree, and the download tasks at steady state) against the pure image work on the
same images, and each tool's median PSNR, read back from its tars, against a full-decode Lanczos
reference. --profile adds per-phase timers (wall and thread CPU: connect, headers, body, hash, decode,
resize, encode, write, ledger); --py-spy FILE first runs curate once under py-spy and prints its top
frames.

    flock /tmp/curate-heavy.lock .venv/bin/python bench/download.py --web --profile --n 4000 \
        --img2dataset-python .venv-bench/bin/python

--formats: process_image per format (JPEG, PNG, WebP) on the --web images, one thread: Pillow's
decoders and Hamming shrink against Wuffs (PNG) / libwebp (WebP) and the box-then-bilinear shrink.

--hostile: one download task (1 process, 16 threads, per-host limit lifted so all 16 are in flight,
every other setting at its default) against hostile but legal images -- 36 MP PNGs (RGB and
palette-with-transparency), 36 MP JPEGs, a 40 MP RGBA PNG, and extreme aspect ratios (1x100000,
100000x1, 2x10,000,000) -- and prints the peak RSS of the task with the ledger's status counts
(the acceptance of #12: under 1 GB).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]


# #15's web-like mix: long side 500 / 800 / 1200 / 2000 / 4000 px with these weights
WEB_SIDES = ((500, 0.25), (800, 0.30), (1200, 0.25), (2000, 0.15), (4000, 0.05))
WEB_FORMATS = (("JPEG", 0.8), ("PNG", 0.1), ("WEBP", 0.1))
WEB_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


def make_images(n_distinct: int, mix: bool | str, seed: int = 0) -> list[bytes]:
    """Photo-like images: demo corpus images upscaled with texture and noise (or synthetic if absent).

    mix=False: 640x480 JPEGs; True: long side uniform in 500-4000 px; "web": #15's web-like sizes,
    80% JPEG, 10% PNG, 10% WebP.
    """
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    try:
        from curate.demo.corpus import load_split

        sources = [Image.open(io.BytesIO(b)).convert("RGB")
                   for b in load_split("pool", columns=["image"]).column("image").to_pylist()[:n_distinct]]
    except Exception:  # noqa: BLE001 - the corpus is optional for the benchmark
        sources = []
    out = []
    for i in range(n_distinct):
        fmt = "JPEG"
        if mix == "web":
            long = rng.choices([v for v, _ in WEB_SIDES], [w for _, w in WEB_SIDES])[0]
            short = int(long * rng.uniform(0.5, 0.9))
            size = (long, short) if rng.random() < 0.7 else (short, long)
            fmt = rng.choices([v for v, _ in WEB_FORMATS], [w for _, w in WEB_FORMATS])[0]
        elif mix:
            long = rng.randint(500, 4000)
            short = int(long * rng.uniform(0.5, 0.9))
            size = (long, short) if rng.random() < 0.7 else (short, long)
        else:
            size = (640, 480)
        if sources:
            im = sources[i % len(sources)].resize(size, Image.Resampling.BICUBIC)
        else:
            im = Image.linear_gradient("L").resize(size).convert("RGB")
        # web images are mostly smoother than the 12-sigma texture of the older mixes (#15: mean 129 KB)
        noise = nrng.normal(0, 3 if mix == "web" else 12, (size[1], size[0], 3))
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr).filter(ImageFilter.SMOOTH)
        buf = io.BytesIO()
        im.save(buf, fmt, **({"compress_level": 6} if fmt == "PNG" else {"quality": 85 if mix == "web" else 90}))
        out.append(buf.getvalue())
    return out


def serve(images: list[bytes], n: int, port_q: mp.Queue, hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
    """One process serving the images on every address of `hosts` (one listening socket each).

    Puts the port (one host) or the list of (host, port) (several hosts) on `port_q`."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # noqa: ANN002
            pass

        def do_GET(self):  # noqa: N802
            try:
                i = int(self.path.strip("/").split(".")[0])
                body = images[i % len(images)]
            except ValueError:
                body = b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

    import threading

    servers = []
    for host in hosts:
        httpd = ThreadingHTTPServer((host, 0), Handler)
        httpd.daemon_threads = True
        httpd.request_queue_size = 256
        servers.append(httpd)
    port_q.put(servers[0].server_address[1] if len(hosts) == 1
               else [(h, srv.server_address[1]) for h, srv in zip(hosts, servers, strict=True)])
    for srv in servers[1:]:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers[0].serve_forever()


def serve_lean(images: list[bytes], n: int, port_q: mp.Queue, hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
    """serve()'s responses from one asyncio loop with every response prebuilt (same status, headers, bodies).

    The benchmark's server shares the 2 cores with the tool it serves, so its CPU per request is taken
    from the client; a real crawl's servers run elsewhere. Requests are parsed only as far as the path
    and `Connection: close`; keep-alive and pipelining work as with http.server.
    """
    import asyncio

    def response(body: bytes, status: bytes) -> bytes:
        return (b"HTTP/1.1 " + status + b"\r\nServer: bench\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    ready = [response(b, b"200 OK") for b in images]
    missing = response(b"", b"404 Not Found")

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                line = head.split(b"\r\n", 1)[0].split(b" ")
                try:
                    out = ready[int(line[1].strip(b"/").split(b".")[0]) % len(ready)]
                except (IndexError, ValueError):
                    out = missing
                self.t.write(out)
                if b"connection: close" in head.lower() or line[-1] == b"HTTP/1.0":
                    self.t.close()
                    return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Conn, host, 0, backlog=256) for host in hosts]
        ports = [srv.sockets[0].getsockname()[1] for srv in servers]
        port_q.put(ports[0] if len(hosts) == 1 else list(zip(hosts, ports, strict=True)))
        await asyncio.Event().wait()

    asyncio.run(main())


def hostile_images() -> list[tuple[str, bytes]]:
    """(name, bytes) of legal images that are expensive to decode or to resize."""
    from curate.imaging import DEFAULT_MAX_PIXELS

    def encode(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    def pattern(w: int, h: int, seed: int) -> np.ndarray:
        # smooth gradients with a coarse texture: PNGs of a few MB that still take a full decode
        y, x = np.ogrid[:h, :w]
        arr = np.empty((h, w, 3), np.uint8)
        arr[..., 0] = ((x * (3 + seed)) // 7 + y // 5) & 0xFF
        arr[..., 1] = ((y * (2 + seed)) // 9) & 0xFF
        arr[..., 2] = ((x // 3) ^ (y // 3)) & 0xFF
        return arr

    out = []
    for seed in range(3):
        out.append((f"rgb36mp-{seed}.png", encode(Image.fromarray(pattern(6000, 6000, seed)), "PNG", compress_level=1)))
    pal = Image.fromarray(pattern(6000, 6000, 1)).quantize(64)
    out.append(("pal36mp-trns.png", encode(pal, "PNG", transparency=0, compress_level=1)))
    out.append(("rgb36mp.jpg", encode(Image.fromarray(pattern(6000, 6000, 2)), "JPEG", quality=90)))
    side = int(DEFAULT_MAX_PIXELS ** 0.5)
    rgba = Image.fromarray(pattern(side, side, 0)).convert("RGBA")
    out.append(("rgba40mp.png", encode(rgba, "PNG", compress_level=1)))
    for w, h in ((1, 100_000), (100_000, 1), (2, 10_000_000)):
        out.append((f"aspect-{w}x{h}.png", encode(Image.new("RGB", (w, h), (9, 99, 199)), "PNG")))
    return out


def hostile(args: argparse.Namespace) -> None:
    out = Path(args.out) / "hostile"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    named = hostile_images()
    print(f"made {len(named)} hostile images in {time.time() - t0:.1f}s: "
          + ", ".join(f"{n} ({len(b) / 2**20:.1f} MB)" for n, b in named))
    n = args.n if args.n != 3000 else 4 * len(named)
    q: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=([b for _, b in named], n, q), daemon=True)
    server.start()
    port = q.get(timeout=60)
    url_list = out / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(n)]}), url_list)
    cmd = [str(Path(sys.executable).with_name("curate")), "download", str(url_list), "--out", str(out / "ds"),
           "--allow-host", f"127.0.0.1:{port}", "--workers", "1", "--threads", str(args.threads),
           "--per-host", str(args.threads), "--no-progress"]
    secs, rss, rc = run_measured(cmd)
    server.terminate()
    ledger = pq.read_table(out / "ds" / "ledger").to_pylist() if (out / "ds" / "ledger").exists() else []
    counts: dict[str, int] = {}
    for r in ledger:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\n{n} hostile URLs, 1 process x {args.threads} threads (per-host {args.threads}), default limits, "
          f"{os.cpu_count()} CPUs")
    print(f"peak RSS {rss / 2**20:.0f} MB, {secs:.1f} s, rc={rc}; statuses {dict(sorted(counts.items()))}")
    print("acceptance (#12): peak RSS under 1024 MB:", "met" if rss < 2**30 and rc == 0 else "NOT met")


def web(args: argparse.Namespace) -> None:
    """#15's web-like mix from 4 loopback hosts: curate (default per-host limit) against img2dataset with
    matched settings and with its defaults, in the same run; quality against a reference resize.
    Long because it is one flat benchmark script: serve, run each tool, read the tars back, print."""
    out = Path(args.out) / "web"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    distinct = min(args.n, 80)
    t0 = time.time()
    images = make_images(distinct, "web")
    print(f"made {distinct} distinct web-like images (mean {statistics.mean(len(b) for b in images) / 1024:.0f} KB) "
          f"in {time.time() - t0:.1f}s")
    q: mp.Queue = mp.Queue()
    server = mp.Process(target=serve_lean if args.server == "asyncio" else serve, args=(images, args.n, q, WEB_HOSTS),
                        daemon=True)
    server.start()
    endpoints = q.get(timeout=30)
    server_ps = psutil.Process(server.pid)
    server_cpu: dict[str, float] = {}

    def timed_run(name: str, argv: list[str], env: dict | None) -> tuple[float, int, int, float]:
        """run_cpu, and the server's CPU seconds per request during the run (one request per URL)."""
        c0 = sum(server_ps.cpu_times()[:2])
        res = run_cpu(argv, env)
        per_req = (sum(server_ps.cpu_times()[:2]) - c0) / args.n
        server_cpu[name] = min(server_cpu.get(name, per_req), per_req)
        return res
    urls = [f"http://{endpoints[i % len(endpoints)][0]}:{endpoints[i % len(endpoints)][1]}/{i}.jpg"
            for i in range(args.n)]
    url_list = out / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.n)]}), url_list)
    per_shard = -(-args.n // args.processes)
    cmd = [str(Path(sys.executable).with_name("curate")), "download", str(url_list), "--out", str(out / "curate"),
           "--caption-col", "caption", "--image-size", str(args.image_size), "--resize-mode", "keep_ratio",
           "--workers", str(args.processes), "--threads", str(args.threads),
           "--samples-per-shard", str(per_shard), "--no-progress"]
    for host, port in endpoints:
        cmd += ["--allow-host", f"{host}:{port}"]
    env = dict(os.environ, CURATE_PROFILE="1") if args.profile else None
    results: dict[str, tuple[int, float, int, int, float]] = {}
    try:
        if args.py_spy:
            spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--subprocesses", "--nonblocking",
                   "-r", "200", "-f", "raw", "-o", args.py_spy, "--"]
            shutil.rmtree(out / "curate", ignore_errors=True)
            run_measured(spy + cmd, env)
            shutil.rmtree(out / "curate", ignore_errors=True)
            print_py_spy(args.py_spy)
        for rnd in range(args.rounds):
            shutil.rmtree(out / "curate", ignore_errors=True)
            secs, rss, rc, cpu = timed_run("curate", cmd, env)
            stats = [json.loads(Path(p).read_text())
                     for p in glob.glob(str(out / "curate" / "stats" / "download" / "*.json"))]
            ok = sum(st.get("success", 0) for st in stats)
            task_cpu = sum(st.get("cpu_seconds", 0.0) for st in stats)
            print(f"round {rnd + 1}: curate {ok} ok in {secs:.1f} s, peak RSS {rss / 2**20:.0f} MB, rc={rc}")
            if "curate" not in results or ok / secs > results["curate"][0] / results["curate"][1]:
                results["curate"] = (ok, secs, rss, rc, cpu)
                best_stats, best_task_cpu = stats, task_cpu
            if args.img2dataset_python:
                for name, argv in img2dataset_commands(args, url_list, out, per_shard).items():
                    shutil.rmtree(out / _folder(name), ignore_errors=True)
                    secs, rss, rc, cpu = timed_run(name, argv, dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
                    ok = sum(json.loads(Path(p).read_text()).get("successes", 0)
                             for p in glob.glob(str(out / _folder(name) / "*_stats.json")))
                    print(f"round {rnd + 1}: {name} {ok} ok in {secs:.1f} s, peak RSS {rss / 2**20:.0f} MB, rc={rc}")
                    if name not in results or ok / secs > results[name][0] / results[name][1]:
                        results[name] = (ok, secs, rss, rc, cpu)
    finally:
        server.terminate()

    print(f"\n{args.n} URLs from {len(endpoints)} loopback hosts (curate: per-host limit at its default), "
          f"{args.processes} processes x {args.threads} threads, -> {args.image_size} keep_ratio, q95, "
          f"{os.cpu_count()} CPUs; best of {args.rounds} round(s)")
    print(f"server: {args.server} ({'one asyncio loop, prebuilt responses' if args.server == 'asyncio' else 'http.server ThreadingHTTPServer'}); "
          "its CPU per request is the lowest over the rounds of each tool")
    print(f"{'tool':<22} {'ok':>6} {'seconds':>8} {'images/s':>9} {'peak RSS MB':>12} {'CPU ms/img':>11} "
          f"{'server ms/req':>14}")
    for tool, (ok, secs, rss, rc, cpu) in results.items():
        print(f"{tool:<22} {ok:>6} {secs:>8.1f} {ok / secs:>9.1f} {rss / 2**20:>12.0f} "
              f"{1000 * cpu / max(ok, 1):>11.2f} {1000 * server_cpu.get(tool, 0.0):>14.3f}"
              + ("" if rc == 0 else f"  rc={rc}"))
    c = results["curate"]
    for name in ("img2dataset (matched)", "img2dataset (defaults)"):
        if name in results and results[name][0]:
            i = results[name]
            print(f"curate / {name}: images/s x{(c[0] / c[1]) / (i[0] / i[1]):.2f}, peak RSS x{c[2] / max(i[2], 1):.2f}")

    # the pure image work on the same images, one thread: open, draft, convert, resize, encode q95 (#15's
    # definition), weighted by how often each distinct image was served
    pure = pure_image_seconds(images, args.image_size, args.n)
    ok = c[0]
    own = own_image_seconds(images, args.image_size, args.n)
    print(f"\npure image work (Pillow open+draft+convert+bicubic resize+JPEG q95, #15's definition, 1 thread): "
          f"{1000 * pure:.2f} ms per image; curate's own process_image alone (1 thread): {1000 * own:.2f} ms")
    print(f"curate CPU per image, whole process tree incl. startup: {1000 * c[4] / max(ok, 1):.2f} ms "
          f"= {c[4] / max(ok, 1) / pure:.2f}x pure")
    if best_task_cpu:
        print(f"curate CPU per image, download tasks at steady state (process_time of run_shard): "
              f"{1000 * best_task_cpu / max(ok, 1):.2f} ms = {best_task_cpu / max(ok, 1) / pure:.2f}x pure "
              f"(acceptance: <= 1.5x)")
    report_quality(out, images, urls, args.image_size, [n for n in results if n != "img2dataset (defaults)"])
    if args.profile and best_stats:
        print_phases(best_stats, ok)


def latency_web(args: argparse.Namespace) -> None:
    """bench/latency_web.py's web (TTFB long tail, slow bodies, 64 Zipf hosts, 404/410, 429, redirects):
    curate at its defaults, img2dataset at its defaults and with matched settings, then curate at its
    defaults on the same plan served instantly, in one run; images/s, peak RSS, CPU, requests in flight.
    Long because it is one flat benchmark script: plan, serve, run each tool, print."""
    import latency_web as lw  # bench/latency_web.py, beside this script

    out = Path(args.out) / "latency-web"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shape = lw.WebShape()
    t0 = time.time()
    images = make_images(min(args.n, 80), "web")
    plans = lw.plan_urls(args.n, len(images), shape)
    kinds = {k: sum(p.kind == k for p in plans) for k in ("image", "404", "410", "redirect")}
    print(f"made {len(images)} distinct web-like images in {time.time() - t0:.1f}s; {args.n} URLs on {shape.hosts} "
          f"hosts (Zipf s={shape.zipf_s}: the biggest host holds {lw.zipf_top_share(shape):.0%}), {kinds}, "
          f"{sum(p.slow > 0 for p in plans)} slow bodies ({shape.slow_seconds[0]:.0f}-{shape.slow_seconds[1]:.0f} s), "
          f"TTFB lognormal median {1000 * shape.ttfb_median:.0f} ms sigma {shape.ttfb_sigma}, hosts of Zipf rank "
          f"{', '.join(map(str, shape.limited_ranks))} answer 429 (Retry-After {shape.retry_after}) past "
          f"{shape.limited_rate:.0f} req/s or {shape.limited_concurrency} requests at once")
    addresses = lw.host_addresses(shape.hosts)
    results: dict[str, dict] = {}

    def one_web(instant: bool, runs: list[tuple[str, str]]) -> None:
        samples = str(out / f"samples-{'instant' if instant else 'latency'}.txt")
        q: mp.Queue = mp.Queue()
        server = mp.Process(target=lw.serve, args=(images, plans, shape, instant, q, samples), daemon=True)
        server.start()
        port = q.get(timeout=60)
        try:
            urls = [f"http://{addresses[p.host]}:{port}/{i}.jpg" for i, p in enumerate(plans)]
            url_list = out / f"urls-{port}.parquet"
            pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.n)]}), url_list)
            for name, tool in runs:
                dest = out / _folder(name).replace(" ", "-")
                if tool == "curate":
                    argv = [str(Path(sys.executable).with_name("curate")), "download", str(url_list), "--out",
                            str(dest), "--caption-col", "caption", "--no-progress"]
                    for a in addresses:
                        argv += ["--allow-host", f"{a}:{port}"]
                    argv += args.curate_arg
                    env = None
                else:
                    argv = _i2d_latency_command(args, url_list, dest, tool)
                    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
                w0 = time.time()
                secs, rss, rc, cpu = run_cpu(argv, env)
                w1 = time.time()
                if tool == "curate":
                    stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(dest / "stats" / "download" / "*.json"))]
                    ok = sum(st.get("success", 0) for st in stats)
                    status: dict[str, int] = {}
                    for st in stats:
                        for k, v in st.get("status", {}).items():
                            status[k] = status.get(k, 0) + v
                        print(f"  curate task: {st.get('fetch')}")
                else:
                    got = [json.loads(Path(p).read_text()) for p in glob.glob(str(dest / "*_stats.json"))]
                    ok = sum(g.get("successes", 0) for g in got)
                    status = {}
                    for g in got:
                        for k, v in g.get("status_dict", {}).items():
                            status[k[:40]] = status.get(k[:40], 0) + v
                flight = lw.read_samples(samples, w0, w1)
                results[name] = {"ok": ok, "secs": secs, "rss": rss, "rc": rc, "cpu": cpu, "flight": flight,
                                 "status": status, "kinds": lw.read_kinds(samples, w0, w1)}
                if tool == "curate" and status.get("host_throttled"):
                    # the rows left to a later pass, fetched now: what completeness costs
                    r0 = time.time()
                    rc2 = subprocess.run([*argv, "--retry-failed", "--throttled-tail", "1000"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                    got = [json.loads(Path(p).read_text()) for p in glob.glob(str(dest / "stats" / "download" / "*.json"))]
                    results[name]["retry"] = (status["host_throttled"], sum(g.get("success", 0) for g in got) - ok,
                                              time.time() - r0, rc2)
                inflight = [a for _, a, _ in flight]
                print(f"{name}: {ok} ok in {secs:.1f} s = {ok / secs:.1f} images/s, peak RSS {rss / 2**20:.0f} MB, "
                      f"CPU {cpu:.0f} s, in flight mean {statistics.mean(inflight) if inflight else 0:.0f}, rc={rc}")
                print(f"  statuses: {dict(sorted(status.items(), key=lambda kv: -kv[1])[:8])}")
                for tar in [*dest.glob("*.tar"), *dest.glob("shards/*.tar")]:  # the figures are taken: disk back
                    tar.unlink()
        finally:
            server.terminate()
            server.join(5)

    latency_runs = [("curate (defaults)", "curate")]
    if args.img2dataset_python:
        latency_runs += [(f"img2dataset ({kind})", kind) for kind in args.img2dataset_runs.split(",")]
    one_web(False, latency_runs)
    one_web(True, [("curate (defaults, instant web)", "curate")])

    ncpu = os.cpu_count() or 1
    print(f"\n{args.n} URLs, latency web above; {ncpu} CPUs (shared with other work: see load); "
          f"img2dataset matched = {args.processes} processes x {args.threads} threads, 256 keep_ratio q95")
    print(f"{'run':<32} {'ok':>6} {'seconds':>8} {'images/s':>9} {'peak RSS MB':>12} {'CPU %':>6} "
          f"{'in flight p50/p90/max':>22}")
    for name, r in results.items():
        fl = sorted(a for _, a, _ in r["flight"]) or [0]
        pct = 100 * r["cpu"] / max(r["secs"], 1e-9) / ncpu
        print(f"{name:<32} {r['ok']:>6} {r['secs']:>8.1f} {r['ok'] / r['secs']:>9.1f} {r['rss'] / 2**20:>12.0f} "
              f"{pct:>6.0f} {fl[len(fl) // 2]:>8}/{fl[int(len(fl) * 0.9)]}/{fl[-1]}"
              + ("" if r["rc"] == 0 else f"  rc={r['rc']}"))
    print("\nrequests in flight over time (server side, mean per tenth of each run):")
    for name, r in results.items():
        fl = r["flight"]
        if not fl:
            continue
        print(f"  {name:<32} " + " ".join(f"{m:5.0f}" for m in _tenths(fl, 1, r["secs"])))
        for col, what in ((1, "of which bodies trickling"), (2, "of which to rate-limiting hosts")):
            if any(k[col] for k in r["kinds"]):
                print(f"    {what:<30} " + " ".join(f"{m:5.1f}" for m in _tenths(r["kinds"], col, r["secs"])))
    c = results["curate (defaults)"]
    if "retry" in c:
        n_left, n_got, secs, rc2 = c["retry"]
        print(f"\ncurate left {n_left} rows of rate-limited hosts as host_throttled; `--retry-failed` then fetched "
              f"{n_got} of them in {secs:.1f} s (rc={rc2})")
    rate = c["ok"] / c["secs"]
    inst = results["curate (defaults, instant web)"]
    print(f"\ncurate latency / curate instant: x{rate / (inst['ok'] / inst['secs']):.2f} (acceptance: >= 0.75)")
    for name in ("img2dataset (defaults)", "img2dataset (matched)"):
        if name in results and results[name]["ok"]:
            i = results[name]
            print(f"curate (defaults) / {name}: images/s x{rate / (i['ok'] / i['secs']):.2f}, "
                  f"peak RSS x{c['rss'] / max(i['rss'], 1):.2f}"
                  + ("  (acceptance: >= 3x, lower peak RSS)" if "defaults" in name else ""))


def _tenths(samples: list[tuple], col: int, secs: float) -> list[float]:
    """The mean of column `col` of (seconds, ...) samples over each tenth of a run of `secs` seconds."""
    cuts = [[x[col] for x in samples if k * secs / 10 <= x[0] < (k + 1) * secs / 10] for k in range(10)]
    return [statistics.mean(c) if c else 0.0 for c in cuts]


def _i2d_latency_command(args: argparse.Namespace, url_list: Path, dest: Path, kind: str) -> list[str]:
    argv = [args.img2dataset_python, "-m", "img2dataset.main", "--url_list", str(url_list), "--input_format",
            "parquet", "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--enable_wandb", "False", "--output_folder", str(dest)]
    if kind == "matched":
        argv += ["--processes_count", str(args.processes), "--thread_count", str(args.threads), "--image_size",
                 str(args.image_size), "--resize_mode", "keep_ratio", "--distributor", "multiprocessing",
                 "--encode_quality", "95"]
    return argv


def formats(args: argparse.Namespace) -> None:
    """process_image per format on the --web mix's distinct images, one thread, for each combination of
    the optional fast paths (Wuffs/libwebp decoders: the `[fast]`/`[wuffs]` extras; the last step of a
    shrink by OpenCV's bilinear or by Pillow after the same box reduce); weighted as served. Also the
    median PSNR of the 256 px output against a full decode resized once with Lanczos (reference_resize)."""
    import curate.imaging as imaging
    from curate.imaging import ImageOptions, process_image, return_freed_memory_to_os

    return_freed_memory_to_os()  # the allocator limits of a download task
    images = make_images(min(args.n, 80), "web")
    fmts = [Image.open(io.BytesIO(b)).format for b in images]
    have_cv2 = imaging._cv2()
    shrinks: dict[str, Any] = {"Pillow Hamming": False, "Pillow bilinear": "bilinear"}
    if have_cv2 is not None:
        shrinks["OpenCV bilinear"] = have_cv2
    filt = imaging.SHRINK_FILTER
    variants = [(f"{dec} decoders, box + {sname}", fast, cv)
                for dec, fast in (("Pillow", False), ("Wuffs/libwebp", True)) for sname, cv in shrinks.items()]

    def use(cv: Any) -> None:
        imaging._CV2 = False if cv == "bilinear" else cv
        imaging.SHRINK_FILTER = Image.Resampling.BILINEAR if cv == "bilinear" else filt

    per: dict[tuple[str, str], float] = {}
    quality: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    try:
        for fmt in ("JPEG", "PNG", "WEBP"):
            subset = [b for b, f in zip(images, fmts, strict=True) if f == fmt]
            for name, fast, cv in variants:
                use(cv)
                opt = ImageOptions(image_size=args.image_size, fast_decode=fast)
                process_image(subset[0], opt)
                best = float("inf")
                for _ in range(3):
                    t = time.process_time()
                    for b in subset:
                        process_image(b, opt)
                    best = min(best, (time.process_time() - t) / len(subset))
                per[(fmt, name)] = best
                for b in subset:
                    ref = reference_resize(b, args.image_size)
                    out = np.asarray(Image.open(io.BytesIO(process_image(b, opt).data)).convert("RGB"), np.float64)
                    if out.shape == ref.shape:
                        mse = float(np.mean((out - ref) ** 2))
                        quality[name].append(99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
                print(f"{fmt:<5} x{len(subset):<3} {name:<44} {1000 * best:7.2f} ms per image (best of 3)")
    finally:
        imaging._CV2 = None
        imaging.SHRINK_FILTER = filt
    if have_cv2 is None:
        print("OpenCV is not installed: no OpenCV rows")
    for name, _, _ in variants:
        mean = sum(per[(f, name)] for f in fmts) / len(fmts)
        q = quality[name]
        med = f"{float(np.median(q)):.1f} dB over {len(q)}" if q else "-"
        print(f"all {len(fmts)} as served: {name:<44} {1000 * mean:7.2f} ms per image, median PSNR {med}")


def img2dataset_commands(args: argparse.Namespace, url_list: Path, out: Path, per_shard: int) -> dict[str, list[str]]:
    """img2dataset with the settings curate runs with, and with its own defaults (webdataset output)."""
    base = [args.img2dataset_python, "-m", "img2dataset.main", "--url_list", str(url_list),
            "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
            "--output_format", "webdataset", "--enable_wandb", "False"]
    matched = base + ["--output_folder", str(out / _folder("img2dataset (matched)")),
                      "--processes_count", str(args.processes), "--thread_count", str(args.threads),
                      "--image_size", str(args.image_size), "--resize_mode", "keep_ratio",
                      "--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing",
                      "--encode_quality", "95"]
    defaults = base + ["--output_folder", str(out / _folder("img2dataset (defaults)"))]
    return {"img2dataset (matched)": matched, "img2dataset (defaults)": defaults}


def _folder(tool: str) -> str:
    """The output folder of a tool's run: 'img2dataset (matched)' -> 'img2dataset-matched'."""
    return tool.replace(" (", "-").rstrip(")")


def run_cpu(argv: list[str], env: dict | None = None) -> tuple[float, int, int, float]:
    """run_measured plus the CPU seconds (user+sys) of the whole process tree."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    secs, rss, rc = run_measured(argv, env)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tree (waited for); the server still runs
    return secs, rss, rc, (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)


def pure_image_seconds(images: list[bytes], size: int, n: int) -> float:
    """CPU seconds per image of the bare Pillow work, weighted as the n URLs serve the images."""
    weights = [n // len(images) + (1 if i < n % len(images) else 0) for i in range(len(images))]
    costs = []
    for b in images:
        t = time.process_time()
        for _ in range(3):
            im = Image.open(io.BytesIO(b))
            w, h = im.size
            scale = size / min(w, h)
            tw, th = round(w * scale), round(h * scale)
            if im.format == "JPEG":
                im.draft("RGB", (tw, th))
            im = im.convert("RGB").resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0)
            im.save(io.BytesIO(), "JPEG", quality=95)
        costs.append((time.process_time() - t) / 3)
    return sum(c * w for c, w in zip(costs, weights, strict=True)) / sum(weights)


def own_image_seconds(images: list[bytes], size: int, n: int) -> float:
    """CPU seconds per image of curate.imaging.process_image alone (the code under test), same weights."""
    from curate.imaging import ImageOptions, process_image

    opt = ImageOptions(image_size=size, resize_mode="keep_ratio")
    weights = [n // len(images) + (1 if i < n % len(images) else 0) for i in range(len(images))]
    costs = []
    for b in images:
        t = time.process_time()
        for _ in range(3):
            process_image(b, opt)
        costs.append((time.process_time() - t) / 3)
    return sum(c * w for c, w in zip(costs, weights, strict=True)) / sum(weights)


def reference_resize(b: bytes, size: int) -> np.ndarray:
    """The quality reference: a full decode (no draft) and one Lanczos resize in float, never re-encoded."""
    im = Image.open(io.BytesIO(b)).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float64)


def report_quality(out: Path, images: list[bytes], urls: list[str], size: int, tools: list[str],
                   limit: int = 300) -> None:
    """Median PSNR of what each tool wrote (read back from its tars) against reference_resize of the source."""
    from curate.io.shards import iter_raw

    index = {u: i % len(images) for i, u in enumerate(urls)}
    refs: dict[int, np.ndarray] = {}
    for tool in tools:
        vals = []
        for tar in sorted(glob.glob(str(out / _folder(tool) / "**" / "*.tar"), recursive=True)):
            for _key, members in iter_raw(tar):
                meta = json.loads(members.get("json", b"{}"))
                img = next((members[e] for e in ("jpg", "png", "webp") if e in members), None)
                src = index.get(meta.get("url"))
                if img is None or src is None:
                    continue
                if src not in refs:
                    refs[src] = reference_resize(images[src], size)
                got = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"), dtype=np.float64)
                ref = refs[src]
                if got.shape != ref.shape:
                    continue  # a different rounding of the output size: not comparable pixel for pixel
                mse = float(np.mean((got - ref) ** 2))
                vals.append(99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
                if len(vals) >= limit:
                    break
            if len(vals) >= limit:
                break
        if vals:
            print(f"quality {tool}: median PSNR {statistics.median(vals):.1f} dB, min {min(vals):.1f} dB over "
                  f"{len(vals)} outputs vs a full-decode Lanczos reference (acceptance: median >= 35 dB)")


def print_phases(stats: list[dict], ok: int) -> None:
    phases: dict[str, list[float]] = {}
    for st in stats:
        for name, v in st.get("phases", {}).items():
            acc = phases.setdefault(name, [0.0, 0.0, 0])
            acc[0] += v["seconds"]
            acc[1] += v.get("cpu", 0.0)
            acc[2] += v["count"]
    if "headers" in phases and "connect" in phases:
        phases["headers"][0] -= phases["connect"][0]  # headers was timed around connect too
        phases["headers"][1] -= phases["connect"][1]
    task_cpu = sum(st.get("cpu_seconds", 0.0) for st in stats)
    print("\nper phase, summed over threads, ms per successful image (wall: network phases mostly wait; "
          "CPU: thread CPU time):")
    timed = 0.0
    for name in ("connect", "headers", "body", "hash", "decode", "resize", "encode", "write", "ledger"):
        if name in phases:
            sec, cpu, cnt = phases[name]
            timed += cpu
            print(f"  {name + (' (excl. connect)' if name == 'headers' else ''):<26} wall {1000 * sec / max(ok, 1):8.2f}"
                  f"  CPU {1000 * cpu / max(ok, 1):6.2f}  ({cnt} timed)")
    if task_cpu:
        print(f"  {'task CPU (process_time)':<26} {'':13}  CPU {1000 * task_cpu / max(ok, 1):6.2f}")
        print(f"  {'untimed (threads, GIL, ...)':<26} {'':13}  CPU {1000 * (task_cpu - timed) / max(ok, 1):6.2f}")


def print_py_spy(path: str, top: int = 25) -> None:
    """The functions py-spy saw on CPU most often (self samples of the innermost Python frame)."""
    self_n: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        self_n[leaf] = self_n.get(leaf, 0) + int(count)
        total += int(count)
    print(f"\npy-spy (--nonblocking, 200 Hz, all processes): {total} on-CPU samples; top {top} innermost frames:")
    for name, cnt in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * cnt / max(total, 1):5.1f}%  {name[:110]}")


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(seconds, peak RSS of the process tree in bytes, return code)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return time.time() - t0, peak, proc.returncode


def psnr(a: bytes, b: bytes) -> float:
    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--mix", action="store_true", help="web-like sizes (long side 500-4000 px)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--img2dataset-python", default=None, help="python of a venv with img2dataset")
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "download"))
    ap.add_argument("--hostile", action="store_true", help="peak RSS of one task against hostile images")
    ap.add_argument("--web", action="store_true", help="#15's web-like mix from 4 loopback hosts")
    ap.add_argument("--profile", action="store_true", help="with --web: per-phase timers (CURATE_PROFILE=1)")
    ap.add_argument("--rounds", type=int, default=1, help="with --web: rounds of each tool, best one reported")
    ap.add_argument("--server", choices=("asyncio", "threading"), default="asyncio",
                    help="with --web: the loopback server (asyncio: prebuilt responses in one loop; threading: "
                         "http.server, the server of the earlier figures)")
    ap.add_argument("--img2dataset-runs", default="defaults,matched",
                    help="with --latency-web: img2dataset's runs, 'defaults', 'matched' or both")
    ap.add_argument("--curate-arg", action="append", default=[],
                    help="with --latency-web: one more argument for curate's runs (repeatable), e.g. "
                         "--curate-arg=--samples-per-shard=5000")
    ap.add_argument("--latency-web", action="store_true",
                    help="bench/latency_web.py's real-web simulator: curate and img2dataset at their defaults, "
                         "img2dataset matched, curate on the same plan served instantly")
    ap.add_argument("--py-spy", default=None, metavar="FILE",
                    help="with --web: first one curate run under py-spy (raw stacks to FILE, summary printed)")
    ap.add_argument("--formats", action="store_true",
                    help="process_image per format on the --web images (Pillow's decoders vs Wuffs/libwebp)")
    args = ap.parse_args()
    if args.formats:
        formats(args)
        return
    if args.hostile:
        hostile(args)
        return
    if args.latency_web:
        latency_web(args)
        return
    if args.web or args.profile:
        web(args)
        return

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    distinct = min(args.n, 40 if args.mix else 100)
    t0 = time.time()
    images = make_images(distinct, args.mix)
    print(f"made {distinct} distinct {'mixed-size' if args.mix else '640x480'} JPEGs "
          f"(median {statistics.median(len(b) for b in images) / 1024:.0f} KB) in {time.time() - t0:.1f}s")

    q: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=(images, args.n, q), daemon=True)
    server.start()
    port = q.get(timeout=30)
    urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.n)]
    url_list = out / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.n)]}), url_list)
    per_shard = -(-args.n // args.processes)
    results = {}

    curate_out = out / "curate"
    curate = [str(Path(sys.executable).with_name("curate")), "download", str(url_list), "--out", str(curate_out),
              "--caption-col", "caption", "--allow-host", f"127.0.0.1:{port}", "--image-size", str(args.image_size),
              "--resize-mode", "keep_ratio", "--workers", str(args.processes), "--threads", str(args.threads),
              "--per-host", str(args.threads), "--samples-per-shard", str(per_shard), "--no-progress"]
    secs, rss, rc = run_measured(curate)
    ok = sum(json.loads(Path(p).read_text()).get("success", 0)
             for p in glob.glob(str(curate_out / "stats" / "download" / "*.json")))
    results["curate"] = (ok, secs, rss, rc)

    if args.img2dataset_python:
        os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset imports albumentations: no update check
        i2d_out = out / "img2dataset"
        i2d = [args.img2dataset_python, "-m", "img2dataset.main", "--url_list", str(url_list),
               "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
               "--output_folder", str(i2d_out), "--output_format", "webdataset",
               "--processes_count", str(args.processes), "--thread_count", str(args.threads),
               "--image_size", str(args.image_size), "--resize_mode", "keep_ratio",
               "--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing",
               "--enable_wandb", "False", "--encode_quality", "95"]
        secs, rss, rc = run_measured(i2d)
        ok = sum(json.loads(Path(p).read_text()).get("successes", 0) for p in glob.glob(str(i2d_out / "*_stats.json")))
        results["img2dataset"] = (ok, secs, rss, rc)
    server.terminate()

    print(f"\n{args.n} URLs, {'mixed sizes' if args.mix else '640x480'} -> {args.image_size} keep_ratio, "
          f"{args.processes} processes x {args.threads} threads, {os.cpu_count()} CPUs")
    print(f"{'tool':<12} {'ok':>6} {'seconds':>8} {'images/s':>9} {'peak RSS MB':>12}")
    for tool, (ok, secs, rss, rc) in results.items():
        print(f"{tool:<12} {ok:>6} {secs:>8.1f} {ok / secs:>9.1f} {rss / 2**20:>12.0f}" + ("" if rc == 0 else f"  rc={rc}"))
    if "img2dataset" in results and results["img2dataset"][0]:
        c, i = results["curate"], results["img2dataset"]
        print(f"ratio curate/img2dataset: images/s x{(c[0] / c[1]) / (i[0] / i[1]):.2f}, "
              f"peak RSS x{c[2] / max(i[2], 1):.2f}")

    from curate.imaging import ImageOptions, process_image

    full = ImageOptions(image_size=args.image_size, resize_mode="keep_ratio", draft=False)
    draft = ImageOptions(image_size=args.image_size, resize_mode="keep_ratio", draft=True)
    sample = make_images(30, mix=True, seed=1)
    vals, t_full, t_draft = [], 0.0, 0.0
    for b in sample:
        t = time.perf_counter()
        a = process_image(b, full).data
        t_full += time.perf_counter() - t
        t = time.perf_counter()
        d = process_image(b, draft).data
        t_draft += time.perf_counter() - t
        vals.append(psnr(a, d))
    print(f"draft vs full decode on {len(sample)} mixed-size JPEGs: median PSNR {statistics.median(vals):.1f} dB, "
          f"time per image {1000 * t_draft / len(sample):.1f} ms vs {1000 * t_full / len(sample):.1f} ms")


if __name__ == "__main__":
    main()
