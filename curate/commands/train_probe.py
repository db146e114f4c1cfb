"""`curate train-probe`: train small CLIP models on dataset subsets at equal samples seen and compare them."""

from __future__ import annotations

import click

from curate.train_probe.train import TrainConfig

_D = TrainConfig()


@click.command("train-probe")
@click.option("--subset", "subsets", multiple=True, metavar="NAME=DIR",
              help="A dataset dir to train on, under a name (repeatable), e.g. raw=pool curated=export.")
@click.option("--eval", "eval_dir", required=True, type=click.Path(file_okay=False),
              help="Evaluation dataset dir whose ledger has a label column (zero-shot and retrieval).")
@click.option("--label-column", default="label", show_default=True, help="The eval ledger's class column.")
@click.option("--samples-seen", type=int, default=_D.samples_seen, show_default=True,
              help="Training samples seen per run, equal for every subset (smaller subsets repeat more epochs).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: results.json, results.md, curves.png, sweep.png, runs/.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Runs per subset (seeds 0..K-1).")
@click.option("--sweep", default=None, metavar="COLUMN=F1,F2,...",
              help="Also train on the top fraction F by COLUMN of --sweep-source, and random subsets of the "
                   "same sizes, e.g. clip_score=0.1,0.3,0.5,1.0.")
@click.option("--sweep-seeds", type=int, default=None,
              help="Seeds per sweep subset (default: --seeds, so sweep points are compared paired by seed too).")
@click.option("--budgets", default=None, metavar="N1,N2,...",
              help="Quality-vs-quantity study: also train each --sweep top fraction (and 100%) at these samples-seen "
                   "budgets, fit the repetition-decay law (Goyal et al. 2024) and recommend a kept fraction per budget.")
@click.option("--templates", default="auto", show_default=True, metavar="NAME|FILE",
              help="Zero-shot prompts: a shipped set (photo, clipart, icon, generic), a file with one prompt per line "
                   "using {c}, or auto (the eval manifest's zero_shot_templates, else generic).")
@click.option("--sweep-source", type=click.Path(file_okay=False), default=None,
              help="A scored dataset dir (signals/score) the sweep selects from (default: the first --subset).")
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True)
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Peak AdamW learning rate.")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True)
@click.option("--warmup", type=float, default=_D.warmup, show_default=True,
              help="Share of the steps with linear warmup (cosine decay after).")
@click.option("--augment/--no-augment", default=_D.augment, show_default=True, help="Random horizontal flips.")
@click.option("--crop", type=float, default=_D.crop, show_default=True,
              help="Random square crops of (1 - CROP)..100% of the image area (0: off; --save-model uses 0.3 when 0).")
@click.option("--curve-points", type=int, default=_D.curve_points, show_default=True,
              help="Evaluations per run (for the quality-vs-samples-seen plot); the last is the result.")
@click.option("--model", default=_D.model, show_default=True,
              help="open_clip architecture name or model config .json (random init).")
@click.option("--image-size", type=int, default=_D.image_size, show_default=True)
@click.option("--save-model", type=click.Path(), default=None,
              help="Write the trained model (seed 0 of the single --subset): X.safetensors + X.json, or for a "
                   "directory X/model.safetensors + X/model_config.json; `curate score --model CONFIG.json "
                   "--pretrained WEIGHTS.safetensors` loads them. Holds out --holdout of the pairs, stops early on "
                   "their retrieval and records it against chance in the checkpoint's metadata.")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="--save-model: share of the trusted pairs held out (0: no check, no early stopping).")
@click.option("--patience", type=int, default=3, show_default=True,
              help="--save-model: evaluation points without a better held-out retrieval before stopping.")
@click.option("--device", default=_D.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=_D.threads, show_default=True,
              help="torch intra-op threads (0 = torch's default, all cores).")
@click.option("--workers", type=int, default=2, show_default=True, help="Image decoding threads.")
@click.option("--redo", is_flag=True, help="Discard earlier runs in --out (needed when the config changed).")
def command(subsets: tuple[str, ...], eval_dir: str, label_column: str, samples_seen: int, out: str, seeds: int,
            sweep: str | None, sweep_seeds: int | None, budgets: str | None, templates: str, sweep_source: str | None,
            batch_size: int, lr: float, weight_decay: float, warmup: float, augment: bool, crop: float,
            curve_points: int, model: str, image_size: int, save_model: str | None, holdout: float, patience: int,
            device: str, threads: int, workers: int, redo: bool) -> None:
    """Train the same small open_clip model on each subset at equal samples seen; report zero-shot accuracy
    and retrieval recall on --eval, with seed spread (resumable: finished runs in --out are kept)."""
    import os

    from curate.commands.common import echo_err
    from curate.train_probe.run import ProbeConfig, parse_budgets, parse_subset, run_probe

    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    if model.endswith(".json") or os.sep in model:
        model = os.path.abspath(model)
    parsed = tuple(parse_subset(s) for s in subsets)
    budget_list = parse_budgets(budgets) if budgets else ()
    if templates != "auto" and os.path.exists(templates):
        templates = os.path.abspath(templates)
    if sweep and not sweep_source and parsed:
        sweep_source = parsed[0][1]
    cfg = ProbeConfig(
        subsets=parsed, eval_dir=os.path.abspath(eval_dir),
        label_column=label_column, seeds=seeds, sweep=sweep, sweep_seeds=sweep_seeds, budgets=budget_list,
        templates=templates, holdout=holdout, patience=patience,
        sweep_source=os.path.abspath(sweep_source) if sweep_source else None,
        save_model=os.path.abspath(save_model) if save_model else None, workers=workers,
    )
    train = TrainConfig(model=model, image_size=image_size, samples_seen=samples_seen, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, warmup=warmup, augment=augment, crop=crop, curve_points=curve_points,
                        device=device, threads=threads)
    results = run_probe(cfg, train, out, redo=redo)
    c = results["counts"]
    md = os.path.join(os.path.abspath(out), "results.md")
    with open(md, encoding="utf-8") as fh:
        click.echo(fh.read())
    echo_err(f"train-probe: {c['runs']} run(s), {c['trained']} trained, {c['resumed']} already done; "
             f"eval {c['eval_samples']} samples / {c['eval_classes']} classes -> {os.path.abspath(out)}")
