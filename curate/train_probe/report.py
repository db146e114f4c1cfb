"""train-probe outputs: results.json (runs, per-subset mean/std, sweep), results.md and PNG plots.

Plots show the mean over seeds with the standard deviation as error bars: metric against samples seen
(the evaluations during training) and, for a sweep, metric against kept fraction (top vs random).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curate.io.atomic import atomic_path, write_bytes, write_json
from curate.train_probe.evaluate import METRICS

PLOTTED = (("zeroshot_balanced", "zero-shot mean per-class acc."), ("zeroshot_top1", "zero-shot top-1"), ("zeroshot_top5", "zero-shot top-5"),
           ("retrieval_r1", "retrieval R@1 (mean of i2t, t2i)"))
RUN_FIELDS = ("subset", "seed", "subset_size", "samples_seen", "steps", "epochs", "train_seconds",
              "samples_per_second", "loss_first", "loss_last", *METRICS)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def with_derived(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    if "i2t_r1" in out and "t2i_r1" in out:
        out["retrieval_r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    return out


def summarize(runs: list[dict[str, Any]], subsets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per subset (in `subsets` order): mean and std over seeds of every metric."""
    out = []
    for sub in subsets:
        rs = [with_derived(r) for r in runs if r["subset"] == sub["name"]]
        if not rs:
            continue
        rec: dict[str, Any] = {"subset": sub["name"], "kind": sub.get("kind", "subset"),
                               "fraction": sub.get("fraction"), "subset_size": rs[0]["subset_size"],
                               "seeds": len(rs), "samples_seen": rs[0]["samples_seen"], "epochs": rs[0]["epochs"]}
        for m in (*METRICS, "retrieval_r1", "loss_last", "train_seconds"):
            mean, std = _mean_std([r[m] for r in rs if m in r])
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
        out.append(rec)
    return out


def comparisons(summary: list[dict[str, Any]], metric: str = "zeroshot_balanced") -> list[dict[str, Any]]:
    """Each subset against the first one: the difference of means and how many seed spreads it is."""
    if len(summary) < 2:
        return []
    base = summary[0]
    out = []
    for rec in summary[1:]:
        diff = rec[f"{metric}_mean"] - base[f"{metric}_mean"]
        spread = max(rec[f"{metric}_std"], base[f"{metric}_std"])
        out.append({"metric": metric, "subset": rec["subset"], "baseline": base["subset"], "difference": diff,
                    "max_seed_std": spread, "difference_in_stds": diff / spread if spread > 0 else None})
    return out


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown(summary: list[dict[str, Any]], chance: dict[str, float] | None, header: str) -> str:
    cols = [("zeroshot_balanced", "zero-shot mean/class"), ("zeroshot_top1", "top-1"), ("zeroshot_top5", "top-5"), ("i2t_r1", "i2t R@1"),
            ("i2t_r5", "i2t R@5"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5")]
    lines = [header, "",
             "| subset | samples | seeds | samples seen | epochs | " + " | ".join(c for _, c in cols) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in summary:
        cells = [_fmt(r[f"{m}_mean"], r[f"{m}_std"], r["seeds"]) for m, _ in cols]
        lines.append(f"| {r['subset']} | {r['subset_size']} | {r['seeds']} | {r['samples_seen']} | "
                     f"{r['epochs']:.2f} | " + " | ".join(cells) + " |")
    if chance:
        lines.append("| (chance) | | | | | " + " | ".join(f"{chance[m]:.3f}" for m, _ in cols) + " |")
    lines += ["", "Values are mean ± standard deviation over seeds (same model, hyperparameters and samples "
              "seen for every subset). Chance is uniform guessing"
              + (f"; always answering the most common class gives top-1 {chance['majority_top1']:.3f}."
                 if chance and "majority_top1" in chance else ".")]
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict[str, Any]], subsets: list[dict[str, Any]], path: Path,
                chance: dict[str, float] | None = None) -> Path:
    """Metric vs samples seen, one line per subset: mean over seeds with std error bars."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8))
    for ax, (metric, title) in zip(axes, PLOTTED, strict=True):
        for sub in subsets:
            curves = [[with_derived(p) for p in r.get("curve", [])] for r in runs if r["subset"] == sub["name"]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            points = min(len(c) for c in curves)
            xs = [curves[0][i]["samples_seen"] for i in range(points)]
            stats = [_mean_std([c[i][metric] for c in curves]) for i in range(points)]
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
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_sweep(summary: list[dict[str, Any]], column: str, path: Path,
               chance: dict[str, float] | None = None) -> Path:
    """Metric vs kept fraction: top-by-column and the random control (the 100% point is shared)."""
    plt = _pyplot()
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
    _save_figure(fig, path)
    plt.close(fig)
    return path


def write_outputs(out: Path, *, config: dict[str, Any], runs: list[dict[str, Any]], subsets: list[dict[str, Any]],
                  chance: dict[str, float] | None, sweep_column: str | None) -> dict[str, Any]:
    """Write results.json, results.md and the plots into `out`; returns the results object."""
    summary = summarize(runs, subsets)
    plain = [s for s in summary if s["kind"] == "subset"]
    sweep = [s for s in summary if s["kind"] != "subset"]
    flat_runs = [{k: r[k] for k in RUN_FIELDS if k in r} for r in runs]
    curves = [{"subset": r["subset"], "seed": r["seed"], **p} for r in runs for p in r.get("curve", [])]
    results: dict[str, Any] = {
        "summary": summary, "comparisons": comparisons(plain), "runs": flat_runs, "curves": curves,
        "subsets": [{"subset": s["name"], "kind": s["kind"], "fraction": s.get("fraction"), "path": s.get("path"),
                     "selected": len(s["keys"]) if s.get("keys") is not None else None,
                     "threshold": s.get("threshold") if s["kind"] == "top" else None} for s in subsets],
        "chance": chance or {}, "config": config,
    }
    if sweep_column:
        results["sweep"] = {"column": sweep_column, "subsets": [s["subset"] for s in sweep]}
    write_json(out / "results.json", results)
    header = f"# train-probe: {config['train']['model']}, {config['train']['samples_seen']} samples seen per run"
    md = markdown(summary, chance, header)
    for c in results["comparisons"]:
        ratio = "n/a" if c["difference_in_stds"] is None else f"{c['difference_in_stds']:.1f}"
        md += (f"\n{c['subset']} vs {c['baseline']}: {c['metric']} {c['difference']:+.3f} "
               f"({ratio} × the larger seed std)\n")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    if runs:
        # with both, the curves plot shows the named subsets; the sweep has its own plot
        named = [s for s in subsets if s["kind"] == "subset"] or subsets
        plot_curves(runs, named, out / "curves.png", chance)
    if sweep_column and sweep:
        plot_sweep(sweep, sweep_column, out / "sweep.png", chance)
    return results
