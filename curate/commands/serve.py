"""`curate serve DIR`: a read-only loopback search page over DIR's index (see curate/search/server.py)."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default keeps the page on this machine.")
@click.option("--port", type=int, default=8765, show_default=True, help="Port (0: any free port).")
@click.option("--where", default=None,
              help="SQL predicate over the samples view applied to every hit (a server-side setting; "
                   "nothing the page sends is ever run as SQL).")
@click.option("--export-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="An export of DATASET: the sample panel says whether it was kept or why it was dropped.")
def command(dataset: str, host: str, port: int, where: str | None, export_dir: str | None) -> None:
    """Serve a search page for DATASET: type a query, see a grid, click a sample for its neighbours and rows."""
    from curate.search.searcher import Searcher
    from curate.search.server import make_server

    searcher = Searcher(dataset, where=where, export_dir=export_dir)
    httpd = make_server(searcher, host, port)
    h, p = httpd.server_address[:2]
    click.echo(f"serve: http://{h}:{p}/  (Ctrl-C stops)", err=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        searcher.close()
