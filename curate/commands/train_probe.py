"""`curate train-probe`: train small CLIP models on dataset subsets at equal samples seen and compare them."""

from __future__ import annotations

import click

from curate.commands.common import echo_err
from curate.options import Options, options_from


@options_from(("curate.train_probe.run:ProbeConfig", "curate.train_probe.train:TrainConfig"), "train-probe",
              after="out")
@click.option("--eval", "eval_dir", required=True, type=click.Path(file_okay=False),
              help="Evaluation dataset dir whose ledger has a label column (zero-shot and retrieval).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: results.json, results.md, curves.png, sweep.png, runs/.")
@click.option("--redo", is_flag=True, help="Discard earlier runs in --out (needed when the config changed).")
def command(eval_dir: str, out: str, redo: bool, options: Options) -> None:
    """Train the same small open_clip model on each subset at equal samples seen; report zero-shot accuracy
    and retrieval recall on --eval, with seed spread (resumable: finished runs in --out are kept)."""
    import os

    from curate.train_probe.run import ProbeConfig, run_probe
    from curate.train_probe.train import TrainConfig

    if options["workers"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    # paths are made absolute: the runs' records name them
    model, templates, subsets = options["model"], options["templates"], options["subsets"]
    if model.endswith(".json") or os.sep in model:
        model = os.path.abspath(model)
    if templates != "auto" and os.path.exists(templates):
        templates = os.path.abspath(templates)
    sweep_source = options["sweep_source"]
    if options["sweep"] and not sweep_source and subsets:
        sweep_source = subsets[0][1]
    cfg = options.build(ProbeConfig, eval_dir=os.path.abspath(eval_dir), templates=templates,
                        sweep_source=os.path.abspath(sweep_source) if sweep_source else None)
    train = options.build(TrainConfig, model=model)
    results = run_probe(cfg, train, out, redo=redo)
    c = results["counts"]
    md = os.path.join(os.path.abspath(out), "results.md")
    with open(md, encoding="utf-8") as fh:
        click.echo(fh.read())
    echo_err(f"train-probe: {c['runs']} run(s), {c['trained']} trained, {c['resumed']} already done; "
             f"eval {c['eval_samples']} samples / {c['eval_classes']} classes -> {os.path.abspath(out)}")
