"""`curate download INPUT --out DIR`: URL list -> webdataset shards + per-row ledger (safe, resumable)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import click

from curate.commands.common import echo_err, engine_options, finish, resolve_shard_index
from curate.errors import InputError


def _deny_domains(values: tuple[str, ...]) -> tuple[str, ...]:
    """--deny-domain values; '@FILE' reads one domain a line (# comments allowed)."""
    out: list[str] = []
    for v in values:
        if v.startswith("@"):
            path = Path(v[1:])
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise InputError(f"--deny-domain {v}: cannot read {path} ({e.strerror})") from None
            out += [ln.split("#", 1)[0].strip() for ln in lines]
        else:
            out.append(v)
    return tuple(sorted({d.lower().strip(".") for d in out if d.strip(".")}))


class _Monitor:
    """Rows/s and success rate while shards run, from the per-shard progress and stats files."""

    def __init__(self, ds: Any, enabled: bool):
        self.ds = ds
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._bar = None
        self._finished: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> _Monitor:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._poll()
            self._bar.close()

    def _poll(self) -> None:
        from curate.io.atomic import read_json
        from curate.stages.download import plan_path, progress_path

        pp = plan_path(self.ds)
        if not pp.exists():
            return
        try:
            sizes = read_json(pp)["shards"]
        except (OSError, ValueError, KeyError):
            return
        done = success = 0
        finished = self._finished  # shards whose final stats were read once: never read again
        for shard in sizes:
            if shard in finished:
                d, ok = finished[shard]
                done, success = done + d, success + ok
                continue
            final = self.ds.marker("download", shard).exists()
            p = self.ds.stats("download", shard) if final else progress_path(self.ds, shard)
            try:
                st = read_json(p)
            except (OSError, ValueError):
                continue
            d, ok = int(st.get("rows", st.get("done", 0))), int(st.get("success", 0))
            if final:
                finished[shard] = (d, ok)
            done += d
            success += ok
        if self._bar is None:
            import sys

            from tqdm import tqdm

            self._bar = tqdm(total=sum(sizes.values()), initial=done, desc="download", unit="img",
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            self._start = done
        else:
            self._bar.update(max(0, done - self._bar.n))
        self._bar.set_postfix({"ok": f"{success / done:.1%}" if done else "-"}, refresh=False)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - progress display must never break the run
                pass


@click.command("download")
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output dataset directory.")
@click.option("--input-format", type=click.Choice(["auto", "parquet", "csv", "tsv", "json", "jsonl", "txt"]),
              default="auto", show_default=True, help="Format of INPUT (auto: from the file name; .gz allowed).")
@click.option("--preset", type=click.Choice(["laion", "cc3m", "cc12m", "datacomp"]), default=None,
              help="Column names of a known URL list (explicit --url-col etc. win).")
@click.option("--url-col", default=None, help="URL column [default: url].")
@click.option("--caption-col", default=None, help="Caption column [default: none].")
@click.option("--keep-col", multiple=True, help="Column carried into the ledger and the sample json (repeatable).")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--resize-mode", type=click.Choice(["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]),
              default="keep_ratio", show_default=True, help="As img2dataset's resize modes.")
@click.option("--encode-format", type=click.Choice(["jpg", "png", "webp"]), default="jpg", show_default=True)
@click.option("--encode-quality", type=int, default=95, show_default=True,
              help="jpg/webp quality; png compression level 0-9.")
@click.option("--min-image-size", type=int, default=0, show_default=True, help="Smaller side below this: too_small.")
@click.option("--max-aspect-ratio", type=float, default=0.0, show_default=True,
              help="max/min side above this: bad_aspect_ratio (0: no limit).")
@click.option("--max-pixels", type=int, default=40_000_000, show_default=True,
              help="Header pixel count above this: decompression_bomb (checked before decoding).")
@click.option("--max-bytes", type=int, default=32 * 1024 * 1024, show_default=True,
              help="Body size cap (decoded bytes): too_large.")
@click.option("--max-redirects", type=int, default=5, show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Connect and read timeout (s).")
@click.option("--deadline", type=float, default=30.0, show_default=True,
              help="Whole-sample time limit (s): all attempts, redirects and body bytes.")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Extra attempts for transient failures (connect, timeout, 429, 5xx).")
@click.option("--threads", type=int, default=16, show_default=True, help="Fetch threads per shard task.")
@click.option("--per-host", type=int, default=4, show_default=True, help="Concurrent requests per host, per task.")
@click.option("--allow-host", multiple=True, help="HOST[:PORT] let through the address guard (repeatable).")
@click.option("--allow-private", is_flag=True, help="Turn the address guard off (loopback/private allowed).")
@click.option("--deny-domain", multiple=True, help="Domain (and subdomains) never fetched; @FILE: one a line.")
@click.option("--ignore-optout", is_flag=True, help="Fetch even when X-Robots-Tag says noai/noimageai.")
@click.option("--respect-robots", is_flag=True, help="Honour robots.txt (read once per host) for our UA token.")
@click.option("--samples-per-shard", type=int, default=10_000, show_default=True)
@click.option("--retry-failed", is_flag=True,
              help="Re-attempt the transient failures of completed shards as new shards.")
@click.option("--shard-index", type=int, default=None,
              help="This task's slice: shards[INDEX::NUM] (default: $SLURM_ARRAY_TASK_ID with --num-shards).")
@click.option("--num-shards", type=int, default=1, show_default=True, help="How many slices there are.")
@click.option("--plan-only", is_flag=True,
              help="Read the list and write the plan (input slices, duplicates), then stop: run this once "
                   "before a Slurm array, whose tasks never plan.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(input_path: str, out: str, input_format: str, preset: str | None, url_col: str | None,
            caption_col: str | None, keep_col: tuple[str, ...], image_size: int, resize_mode: str,
            encode_format: str, encode_quality: int, min_image_size: int, max_aspect_ratio: float,
            max_pixels: int, max_bytes: int, max_redirects: int, timeout: float, deadline: float,
            retries: int, threads: int, per_host: int, allow_host: tuple[str, ...], allow_private: bool,
            deny_domain: tuple[str, ...], ignore_optout: bool, respect_robots: bool, samples_per_shard: int,
            retry_failed: bool, shard_index: int | None, num_shards: int, plan_only: bool, progress: bool,
            engine_spec: Any, redo: bool) -> None:
    """Download the images of the URL list INPUT into OUT (resumable per shard)."""
    from curate.io.inputs import PRESETS, check_columns
    from curate.io.layout import DatasetDir
    from curate.runner import run_stage
    from curate.stages.download import DownloadConfig, check_config

    p = PRESETS.get(preset) if preset else None
    if "://" not in input_path:
        input_path = os.path.abspath(input_path)  # tasks may run in other processes or machines
    shard_index = resolve_shard_index(shard_index, num_shards)
    cfg = DownloadConfig(
        input=input_path,
        input_format=input_format if input_format != "auto" or p is None else p.input_format,
        url_col=url_col or (p.url_col if p else "url"),
        caption_col=caption_col or (p.caption_col if p else None),
        keep_cols=tuple(dict.fromkeys(keep_col or (p.keep_cols if p else ()))),
        header=p.header if p else True,
        image_size=image_size, resize_mode=resize_mode, encode_format=encode_format,
        encode_quality=encode_quality, min_image_size=min_image_size, max_aspect_ratio=max_aspect_ratio,
        max_pixels=max_pixels, max_bytes=max_bytes, max_redirects=max_redirects, timeout=timeout,
        deadline=deadline, retries=retries, threads=threads, per_host=per_host,
        allow_hosts=tuple(allow_host), allow_private=allow_private, deny_domains=_deny_domains(deny_domain),
        ignore_optout=ignore_optout, respect_robots=respect_robots, samples_per_shard=samples_per_shard,
        retry_failed=retry_failed, shard_index=shard_index, num_shards=num_shards,
    )
    check_config(cfg)
    files = check_columns(cfg.input_spec())  # exit 2 naming file and column before anything is written
    if allow_private:
        echo_err("curate download: WARNING --allow-private: the address guard is off; URLs may reach "
                 "loopback, private and link-local addresses (cloud metadata included)")
    extra = {"inputs": [[os.path.basename(f), size] for f, size in files]}
    ds = DatasetDir.at(out)
    with _Monitor(ds, progress and not plan_only):
        summary = run_stage("download", cfg, out, engine_spec, redo=redo, fingerprint_extra=extra,
                            progress=False, plan_only=plan_only)
    if plan_only:
        from curate.stages.download import load_plan

        info = load_plan(ds) or {}
        echo_err(f"download: planned {info.get('rows', 0):,} rows in {summary.shards_total:,} shard(s) "
                 f"({info.get('duplicates', 0):,} repeated URLs), {summary.seconds:.1f}s -> {ds.root}")
        return
    c = summary.counts
    rows, ok = c.get("rows", 0), c.get("success", 0)
    lines = [f"  rows {rows:,}, success {ok:,} ({ok / rows:.1%})" if rows else "  rows 0",
             f"  {ok / summary.seconds:.1f} images/s this run" if summary.seconds > 0 and summary.shards_done else ""]
    for st, n in sorted((c.get("status") or {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {st:<22} {n:>9,}")
    if c.get("superseded"):
        lines.append(f"  ({c['superseded']:,} earlier rows superseded by --retry-failed)")
    finish(summary, [ln for ln in lines if ln])
