"""`curate search DIR QUERY...`: nearest samples to text, image or key queries, as a table, JSON or HTML grid."""

from __future__ import annotations

import click

from curate.errors import InputError
from curate.io.atomic import write_bytes
from curate.search import render
from curate.train_probe.templates import load_templates


@click.command("search")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An image file as a query (repeatable).")
@click.option("--key", "keys", multiple=True, help="A sample key as a query: its neighbours (repeatable).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Hits per query.")
@click.option("--where", default=None, help="SQL predicate over the samples view (as in export) the hits must pass.")
@click.option("--modality", type=click.Choice(["image", "text", "both"]), default="image", show_default=True,
              help="Search image embeddings, caption (text) embeddings when they were indexed, or both fused by "
                   "reciprocal rank.")
@click.option("--templates", default=None, metavar="NAME|FILE",
              help="Text queries as prompt ensembles: the mean embedding of the query in each prompt of a shipped "
                   "set (photo, clipart, icon, generic; as train-probe's zero-shot) or a file of prompts with {c}.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained HTML grid (thumbnails, captions, scores, keys) to this file.")
def command(dataset: str, queries: tuple[str, ...], images: tuple[str, ...], keys: tuple[str, ...], k: int,
            where: str | None, modality: str, templates: str | None, as_json: bool, html_out: str | None) -> None:
    """Search the index of DATASET; each QUERY is text, encoded with the scorer's own open_clip model."""
    from curate.search.searcher import Query, Searcher

    qs = [Query("text", q) for q in queries] + [Query("image", p) for p in images] + [Query("key", x) for x in keys]
    if not qs:
        raise InputError("give at least one QUERY, --image FILE or --key KEY")
    if k < 1:
        raise InputError("-k: must be at least 1")
    prompts = ()
    if templates:
        prompts = load_templates(templates)
    s = Searcher(dataset, where=where)
    try:
        results = [(q.label(), s.query(q, k, modality, prompts)) for q in qs]
        if html_out:
            thumbs = s.thumbnails([h for _, hits in results for h in hits])
            write_bytes(html_out, render.as_html(results, thumbs, f"curate search: {s.ds.root.name}").encode())
            click.echo(f"search: wrote {html_out}", err=True)
        if as_json:
            click.echo(render.as_json(results, k, modality, where, templates))
        elif not html_out:
            click.echo(render.as_table(results))
    finally:
        s.close()
