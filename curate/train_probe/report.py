"""train-probe outputs: results.json (runs, per-subset mean/std, paired comparisons with CIs, sweep, study),
results.md and PNG plots.

Plots show the mean over seeds with the standard deviation as error bars: metric against samples seen
(the evaluations during training), for a sweep metric against kept fraction (top vs random), and for
--budgets metric against kept fraction with one line per budget and the repetition-decay fit (study.png).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curate.io.atomic import atomic_path, write_json
from curate.train_probe.evaluate import METRICS, with_derived
from curate.train_probe.figures import plot_curves, plot_study, plot_sweep
from curate.train_probe.stats import HEADLINE, HEADLINE_WHY, compare, mean_std
from curate.train_probe.study import quality_quantity, study_lines

RUN_FIELDS = ("subset", "seed", "subset_size", "samples_seen", "steps", "epochs", "train_seconds",
              "samples_per_second", "loss_first", "loss_last", *METRICS)


def summarize(runs: list[dict[str, Any]], subsets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per subset (in `subsets` order): mean and std over seeds of every metric."""
    out = []
    for sub in subsets:
        rs = [with_derived(r) for r in runs if r["subset"] == sub["name"]]
        if not rs:
            continue
        rec: dict[str, Any] = {"subset": sub["name"], "kind": sub.get("kind", "subset"),
                               "fraction": sub.get("fraction"), "budget": sub.get("budget"),
                               "subset_size": rs[0]["subset_size"],
                               "seeds": len(rs), "samples_seen": rs[0]["samples_seen"], "epochs": rs[0]["epochs"]}
        for m in (*METRICS, "retrieval_r1", "retrieval_r5", "loss_last", "train_seconds"):
            mean, std = mean_std([r[m] for r in rs if m in r])
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
        out.append(rec)
    return out


def comparison_pairs(summary: list[dict[str, Any]], main_budget: int | None = None) -> list[tuple[str, str]]:
    """(subset, baseline) pairs to compare: each named subset against the first one; in a sweep (at the
    main budget) each top fraction against its random control and against all the data."""
    named = [r["subset"] for r in summary if r["kind"] == "subset"]
    pairs = [(n, named[0]) for n in named[1:]]
    sweep = [r for r in summary if r["kind"] in ("top", "random", "all") and r.get("budget") in (None, main_budget)]
    everything = next((r["subset"] for r in sweep if r["kind"] == "all"), None)
    for r in sweep:
        if r["kind"] != "top":
            continue
        control = next((c["subset"] for c in sweep if c["kind"] == "random" and c["fraction"] == r["fraction"]), None)
        pairs += [(r["subset"], b) for b in (control, everything) if b]
    return pairs


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown(summary: list[dict[str, Any]], chance: dict[str, float] | None, header: str) -> str:
    cols = [("retrieval_r5", "retrieval R@5 (headline)"), ("zeroshot_balanced", "zero-shot mean/class"),
            ("zeroshot_top1", "top-1"), ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("t2i_r1", "t2i R@1"),
            ("t2i_r5", "t2i R@5")]
    if chance and "i2t_r5" in chance:
        chance = {**chance, "retrieval_r5": (chance["i2t_r5"] + chance["t2i_r5"]) / 2}
    lines = [header, "",
             "| subset | samples | seeds | samples seen | epochs | " + " | ".join(c for _, c in cols) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in summary:
        cells = [_fmt(r.get(f"{m}_mean", math.nan), r.get(f"{m}_std", math.nan), r["seeds"]) for m, _ in cols]
        lines.append(f"| {r['subset']} | {r['subset_size']} | {r['seeds']} | {r['samples_seen']} | "
                     f"{r['epochs']:.2f} | " + " | ".join(cells) + " |")
    if chance:
        lines.append("| (chance) | | | | | " + " | ".join(f"{chance[m]:.3f}" if m in chance else "" for m, _ in cols)
                     + " |")
    lines += ["", "Values are mean ± standard deviation over seeds (same model, hyperparameters and samples "
              "seen for every subset). Chance is uniform guessing"
              + (f"; always answering the most common class gives top-1 {chance['majority_top1']:.3f}."
                 if chance and "majority_top1" in chance else ".")]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, *, config: dict[str, Any], runs: list[dict[str, Any]], subsets: list[dict[str, Any]],
                  chance: dict[str, float] | None, sweep_column: str | None,
                  labels: list[int] | None = None) -> dict[str, Any]:
    """Write results.json, results.md and the plots into `out`; returns the results object.

    `labels` are the eval items' class indices (for the bootstrap of mean per-class accuracy).
    """
    summary = summarize(runs, subsets)
    main_budget = config["train"]["samples_seen"]
    sweep = [s for s in summary if s["kind"] != "subset" and s.get("budget") in (None, main_budget)]
    flat_runs = [{k: r[k] for k in (*RUN_FIELDS, "budget") if k in r} for r in runs]
    curves = [{"subset": r["subset"], "seed": r["seed"], **p} for r in runs for p in r.get("curve", [])]
    by_subset: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_subset.setdefault(r["subset"], []).append(r)
    comparisons = compare(comparison_pairs(summary, main_budget), by_subset, labels)
    study = quality_quantity(summary, HEADLINE) if any(s.get("budget") not in (None, main_budget) for s in summary) \
        else None
    results: dict[str, Any] = {
        "headline": {"metric": HEADLINE, "why": HEADLINE_WHY},
        "summary": summary, "comparisons": comparisons, "runs": flat_runs, "curves": curves,
        "subsets": [{"subset": s["name"], "kind": s["kind"], "fraction": s.get("fraction"), "budget": s.get("budget"),
                     "path": s.get("path"), "selected": len(s["keys"]) if s.get("keys") is not None else None,
                     "threshold": s.get("threshold") if s["kind"] == "top" else None} for s in subsets],
        "chance": chance or {}, "config": config,
    }
    quality = [r["filter_quality"] for r in runs if r.get("filter_quality")]
    if quality:
        results["filter_quality"] = quality[0]
    if sweep_column:
        results["sweep"] = {"column": sweep_column, "subsets": [s["subset"] for s in sweep]}
    if study is not None:
        results["study"] = study
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results), encoding="utf-8")
    if runs:
        # with both, the curves plot shows the named subsets; the sweep has its own plot
        named = [s for s in subsets if s["kind"] == "subset"] or subsets
        plot_curves(runs, named, out / "curves.png", chance)
    if sweep_column and sweep:
        plot_sweep(sweep, sweep_column, out / "sweep.png", chance)
    if study is not None:
        plot_study(summary, study, out / "study.png")
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the results object (what results.json holds) as markdown, rendered from the data alone."""

    train = results["config"]["train"]
    header = f"# train-probe: {train['model']}, {train['samples_seen']} samples seen per run"
    md = markdown(results["summary"], results.get("chance") or None, header)
    headline = results.get("headline") or {}
    md += f"\nHeadline metric: {headline.get('metric')}, {headline.get('why')}.\n"
    if results.get("comparisons"):
        md += "\n## Paired comparisons (same seeds; 95% bootstrap CI over seeds and eval items)\n\n"
        md += "".join(f"- {c['verdict']}\n" for c in results["comparisons"])
    quality = results.get("filter_quality")
    if quality:
        md += f"\n## Filter model check\n\n{quality['verdict']} ({quality['heldout_pairs']} held-out pairs)\n"
    if results.get("study") is not None:
        md += "\n" + "\n".join(study_lines(results["study"])) + "\n"
    return md


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The per-subset table and the paired verdicts as plain-text lines, from a results.json object;
    [] for an object that is not a train-probe result (no per-subset summary)."""
    if not isinstance(results.get("summary"), list) or not isinstance(results.get("config"), dict):
        return []
    md = results_markdown(results)
    return [ln for ln in md.splitlines() if ln.startswith(("#", "|"))] + \
        [c["verdict"] for c in results.get("comparisons") or [] if c.get("verdict")]
