"""`curate demo serve`: run the loopback demo web (curate/demo/web.py) until Ctrl-C."""

from __future__ import annotations

import click


@click.group("demo")
def command() -> None:
    """The embedded demo: a loopback web that serves the shipped openclipart corpus."""


@command.command("serve")
@click.option("--seed", type=int, default=0, show_default=True, help="Decides the faults, duplicates and captions.")
@click.option("--port", type=int, default=0, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-web", show_default=True,
              help="Where urls.parquet and ground_truth.parquet are written.")
@click.option("--n", "n", type=int, default=None, help="Serve only this many pool images (default: all).")
def serve(seed: int, port: int, out_dir: str, n: int | None) -> None:
    """Serve the demo pool and print the URL list and the host to pass to download --allow-host."""
    import threading

    from curate.demo.web import DemoWeb, WebConfig

    if not 0 <= port <= 65535:
        raise click.BadParameter("must be within 0..65535", param_hint="--port")
    with DemoWeb(WebConfig(seed=seed, port=port, n=n), out_dir) as web:
        click.echo(f"url list:     {web.url_list.resolve()}")
        click.echo(f"ground truth: {web.ground_truth.resolve()}")
        click.echo(f"allow host:   {' '.join(web.allow_hosts)}")
        click.echo(f"serving {len(web.rows)} rows on {web.base_url}; Ctrl-C stops", err=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            click.echo(f"stopped; canary hits: {web.canary_hits}", err=True)
