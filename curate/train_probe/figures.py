"""train-probe's figures (PNG): metric vs samples seen per subset, metric vs kept fraction for a sweep, and
the quality-vs-quantity study (one line per budget with the repetition-decay fit). matplotlib is imported
when a figure is drawn."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curate.io.atomic import write_bytes
from curate.train_probe.evaluate import with_derived
from curate.train_probe.stats import mean_std
from curate.train_probe.study import ci95

PLOTTED = (("zeroshot_balanced", "zero-shot mean per-class acc."), ("zeroshot_top1", "zero-shot top-1"),
           ("retrieval_r5", "retrieval R@5 (mean of i2t, t2i; headline)"),
           ("retrieval_r1", "retrieval R@1 (mean of i2t, t2i)"))


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def plot_curves(runs: list[dict[str, Any]], subsets: list[dict[str, Any]], path: Path,
                chance: dict[str, float] | None = None) -> Path:
    """Metric vs samples seen, one line per subset: mean over seeds with std error bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    for ax, (metric, title) in zip(axes, PLOTTED, strict=True):
        for sub in subsets:
            curves = [[with_derived(p) for p in r.get("curve", [])] for r in runs if r["subset"] == sub["name"]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            points = min(len(c) for c in curves)
            xs = [curves[0][i]["samples_seen"] for i in range(points)]
            stats = [mean_std([c[i][metric] for c in curves]) for i in range(points)]
            size = next(r["subset_size"] for r in runs if r["subset"] == sub["name"])
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=f"{sub['name']} ({size} samples)")
        if chance and metric in chance:
            ax.axhline(chance[metric], color="grey", linestyle=":", linewidth=1, label="chance")
        elif chance and metric == "retrieval_r1":
            ax.axhline(chance["i2t_r1"], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(title)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("train-probe: quality vs samples seen (mean ± std over seeds)")
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_sweep(summary: list[dict[str, Any]], column: str, path: Path,
               chance: dict[str, float] | None = None) -> Path:
    """Metric vs kept fraction: top-by-column and the random control (the 100% point is shared)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    full = [r for r in summary if r["kind"] == "all"]
    for ax, (metric, title) in zip(axes, PLOTTED, strict=True):
        for kind, label in (("top", f"top by {column}"), ("random", "random (control)")):
            recs = sorted([r for r in summary if r["kind"] == kind] + full, key=lambda r: r["fraction"])
            if not recs:
                continue
            ax.errorbar([r["fraction"] for r in recs], [r[f"{metric}_mean"] for r in recs],
                        yerr=[r[f"{metric}_std"] for r in recs], marker="o", capsize=3, label=label)
        if chance:
            ax.axhline(chance.get(metric, chance["i2t_r1"]), color="grey", linestyle=":", linewidth=1,
                       label="chance")
        ax.set_title(title)
        ax.set_xlabel("kept fraction")
        ax.set_xscale("log")
        ax.set_xticks([r["fraction"] for r in summary if r["fraction"]])
        ax.set_xticklabels([f"{r['fraction']:g}" for r in summary if r["fraction"]], fontsize=8)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"train-probe sweep: quality vs kept fraction by {column} (equal samples seen)")
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_study(summary: Sequence[dict[str, Any]], study: dict[str, Any], path: Any) -> Any:
    """Metric vs kept fraction, one line per budget: measured mean with its 95% CI over seeds (Student's t;
    none for a single seed) and the fitted model (dashed), the recommended fraction starred."""
    plt = pyplot()
    metric = study["metric"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, b in enumerate(study["per_budget"]):
        color = f"C{i}"
        recs = sorted([r for r in summary if r.get("budget") == b["budget"] and r["kind"] in ("top", "all")],
                      key=lambda r: r["fraction"])
        ax.errorbar([r["fraction"] for r in recs], [r[f"{metric}_mean"] for r in recs],
                    yerr=[0.0 if math.isnan(h) else h for h in (ci95(r[f"{metric}_std"], r["seeds"]) for r in recs)],
                    marker="o", capsize=3, color=color, linestyle="none",
                    label=f"{b['budget']} samples seen (best: {b['recommended_fraction']:g})")
        fs = study["fractions"]
        ax.plot(fs, [b["predicted"][f] for f in fs], color=color, linestyle="--", linewidth=1)
        ax.scatter([b["recommended_fraction"]], [b["predicted"][b["recommended_fraction"]]], marker="*", s=140,
                   color=color, zorder=5)
    ax.set_xscale("log")
    ax.set_xticks(study["fractions"])
    ax.set_xticklabels([f"{f:g}" for f in study["fractions"]])
    ax.minorticks_off()
    ax.set_xlabel("kept fraction (top by score)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    seeds = sorted({r["seeds"] for r in summary if r.get("budget") is not None and r["kind"] in ("top", "all")})
    ax.set_title(f"quality vs quantity: measured mean, 95% CI over {'/'.join(map(str, seeds))} seeds (points), "
                 "repetition-decay fit (dashed), recommended (star)", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path
