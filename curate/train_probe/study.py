"""Quality vs quantity: fit Goyal et al.'s repetition-decay scaling law to a kept-fraction x budget grid.

Goyal, Maini, Lipton, Raghunathan, Kolter, "Scaling Laws for Data Filtering -- Data Curation cannot be
Compute Agnostic", CVPR 2024 (https://arxiv.org/abs/2404.07177), "effective utility" form: a pool (here,
the top fraction F of the data by a score, S_F samples) has a utility b_F (the scaling exponent of the
error, b < 0); its k-th repetition (k = 0 for the first pass) has utility b_F * 0.5 ** (k / tau), i.e. the
utility halves every tau epochs. With n_k = min(S_F * (k + 1), n) samples seen by the end of pass k:

    error(n) = ((a * n_0) ** b_F + d) * prod_{k >= 1} (n_k / n_{k-1}) ** (b_F * 0.5 ** (k / tau))

a and d are shared by all pools, tau too (the paper fits a half-life per pool; a probe's grid is too small
for that, so one half-life is shared). The error is 1 - the metric. The fit gives, per budget, the kept
fraction with the best predicted metric -- the best fraction shrinks as compute grows when small, high
utility pools lose their value with repetition -- and the fit's error (RMSE, parameter standard errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HALF = 0.5


@dataclass(frozen=True)
class DecayParams:
    a: float
    b: tuple[float, ...]  # one utility per pool
    tau: float  # half-life of a sample's utility, in epochs
    d: float


def predicted_error(n: float, pool_size: float, a: float, b: float, tau: float, d: float) -> float:
    """The model's error after n samples seen from a pool of pool_size samples (see the module docstring)."""
    n0 = min(pool_size, n)
    err = (a * n0) ** b + d
    k = 1
    prev = n0
    while prev < n:
        cur = min(pool_size * (k + 1), n)
        err *= (cur / prev) ** (b * HALF ** (k / tau))
        prev = cur
        k += 1
    return err


def _unpack(theta: np.ndarray, pools: int) -> DecayParams:
    return DecayParams(a=math.exp(theta[0]), b=tuple(float(x) for x in theta[1:1 + pools]),
                       tau=math.exp(theta[1 + pools]), d=float(theta[2 + pools]))


def fit_decay(points: Sequence[tuple[int, float, float]], pool_sizes: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of the model to (pool index, samples seen, error) points.

    Multi-start (the paper used a grid search because local optimisers are unstable on this form);
    returns the parameters, their standard errors (from the Jacobian, when there are spare points), the
    RMSE and the residuals.
    """
    from scipy.optimize import least_squares

    pools = len(pool_sizes)
    idx = np.array([p for p, _, _ in points])
    ns = np.array([n for _, n, _ in points], float)
    ys = np.array([y for _, _, y in points], float)

    def residuals(theta: np.ndarray) -> np.ndarray:
        p = _unpack(theta, pools)
        pred = [predicted_error(n, pool_sizes[i], p.a, p.b[i], p.tau, p.d) for i, n in zip(idx, ns, strict=True)]
        return np.array(pred) - ys

    d_max = max(0.0, float(ys.min()) * 0.999)
    lower = [-40.0] + [-3.0] * pools + [math.log(0.05), 0.0]
    upper = [10.0] + [-1e-6] * pools + [math.log(1000.0), max(d_max, 1e-9)]
    best = None
    for log_a in (math.log(1e-4), math.log(1e-2), 0.0):
        for tau in (0.5, 3.0, 20.0):
            for d0 in (0.0, 0.5 * d_max):
                x0 = np.array([log_a] + [-0.2] * pools + [math.log(tau), d0])
                try:
                    r = least_squares(residuals, x0, bounds=(lower, upper), x_scale="jac", max_nfev=4000)
                except (ValueError, FloatingPointError, OverflowError):
                    continue
                if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
                    best = r
    if best is None:
        raise ValueError("the repetition-decay fit failed from every starting point")
    params = _unpack(best.x, pools)
    res = best.fun
    dof = len(ys) - len(best.x)
    stderr: list[float | None] = [None] * len(best.x)
    if dof > 0:
        try:
            cov = np.linalg.pinv(best.jac.T @ best.jac) * float(res @ res) / dof
            stderr = [float(math.sqrt(v)) if v >= 0 else None for v in np.diag(cov)]
        except np.linalg.LinAlgError:
            pass
    return {"params": params, "rmse": float(math.sqrt(float(np.mean(res ** 2)))), "residuals": res.tolist(),
            "dof": dof, "stderr": {"log_a": stderr[0], "b": stderr[1:1 + pools], "log_tau": stderr[1 + pools],
                                   "d": stderr[2 + pools]}}


def quality_quantity(summary: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Fit the model to the sweep grid (mean over seeds per kept fraction and budget) and recommend, per
    budget, the kept fraction with the best predicted metric. None when the grid is too small to fit."""
    grid = [r for r in summary if r.get("budget") is not None and r["kind"] in ("top", "all")
            and r.get(f"{metric}_mean") is not None and not math.isnan(r[f"{metric}_mean"])]
    fractions = sorted({r["fraction"] for r in grid})
    budgets = sorted({r["budget"] for r in grid})
    if len(fractions) < 2 or len(budgets) < 2:
        return None
    size_of = {r["fraction"]: r["subset_size"] for r in grid}
    pool_sizes = [float(size_of[f]) for f in fractions]
    points = [(fractions.index(r["fraction"]), float(r["budget"]), 1 - r[f"{metric}_mean"]) for r in grid]
    if len(points) <= len(fractions) + 3:
        return None
    fit = fit_decay(points, pool_sizes)
    p: DecayParams = fit["params"]
    per_budget = []
    for n in budgets:
        pred = {f: 1 - predicted_error(n, pool_sizes[i], p.a, p.b[i], p.tau, p.d) for i, f in enumerate(fractions)}
        measured = {r["fraction"]: r[f"{metric}_mean"] for r in grid if r["budget"] == n}
        ci = {r["fraction"]: ci95(r.get(f"{metric}_std", math.nan), r.get("seeds", 1)) for r in grid if r["budget"] == n}
        ranked = sorted(pred, key=lambda f: -pred[f])
        margin = pred[ranked[0]] - pred[ranked[1]]
        per_budget.append({
            "budget": n, "recommended_fraction": ranked[0], "predicted": pred, "measured": measured,
            "measured_ci95": ci, "seeds": min((r.get("seeds", 1) for r in grid if r["budget"] == n), default=0),
            "measured_best_fraction": max(measured, key=measured.__getitem__) if measured else None,
            "margin_over_runner_up": margin, "within_fit_error": bool(margin < fit["rmse"]),
        })
    return {
        "metric": metric, "model": "Goyal et al. 2024 effective utility, utility halves every tau epochs",
        "fractions": fractions, "budgets": budgets, "pool_sizes": pool_sizes,
        "params": {"a": p.a, "b": dict(zip([str(f) for f in fractions], p.b, strict=True)), "tau_epochs": p.tau,
                   "d": p.d},
        "stderr": fit["stderr"], "rmse": fit["rmse"], "dof": fit["dof"], "per_budget": per_budget,
    }


def recommend(study: dict[str, Any], budget: int) -> dict[str, Any]:
    """The kept fraction a fitted study (the `study` object of a results.json) recommends at `budget` samples
    seen: the fraction with the best predicted metric under the fit, at any budget (a budget outside the
    studied range is an extrapolation, flagged). The margin over the runner-up is compared with the fit's
    RMSE, as per studied budget."""
    p = study["params"]
    fractions = [float(f) for f in study["fractions"]]
    pred = {f: 1 - predicted_error(float(budget), float(size), p["a"], p["b"][str(f)], p["tau_epochs"], p["d"])
            for f, size in zip(fractions, study["pool_sizes"], strict=True)}
    ranked = sorted(pred, key=lambda f: (-pred[f], f))
    margin = pred[ranked[0]] - pred[ranked[1]] if len(ranked) > 1 else math.inf
    budgets = study["budgets"]
    return {"budget": int(budget), "fraction": ranked[0], "predicted": {str(f): v for f, v in pred.items()},
            "margin_over_runner_up": margin, "runner_up": ranked[1] if len(ranked) > 1 else None,
            "within_fit_error": bool(margin < study["rmse"]),
            "extrapolated": not min(budgets) <= budget <= max(budgets),
            "fit": {"metric": study["metric"], "model": study["model"], "params": p, "rmse": study["rmse"],
                    "dof": study["dof"], "fractions": fractions, "budgets": budgets,
                    "pool_sizes": study["pool_sizes"]}}


def ci95(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean over n seeds (Student's t); nan for one seed."""
    from scipy.stats import t

    if n < 2 or std is None or math.isnan(std):
        return math.nan
    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def _at(values: dict[Any, Any], fraction: float) -> Any:
    """A per-fraction value, keyed by the float (in memory) or by its text (read back from results.json)."""
    return values[fraction] if fraction in values else values.get(str(float(fraction)), values.get(str(fraction)))


def study_lines(study: dict[str, Any]) -> list[str]:
    """results.md lines: the recommendation per budget with the fit's error."""
    out = [f"## Quality vs quantity ({study['metric']}; {study['model']})", "",
           f"fit: half-life tau = {study['params']['tau_epochs']:.2f} epochs, RMSE {study['rmse']:.4f} "
           f"(metric units, {study['dof']} spare points); utility b per kept fraction: "
           + ", ".join(f"{f}: {b:+.3f}" for f, b in study["params"]["b"].items()), "",
           "| budget (samples seen) | recommended kept fraction | predicted | measured best | margin vs runner-up |",
           "|---:|---:|---:|---:|---|"]
    for b in study["per_budget"]:
        f = b["recommended_fraction"]
        note = "within the fit's error" if b["within_fit_error"] else "larger than the fit's RMSE"
        out.append(f"| {b['budget']} | {f:g} | {_at(b['predicted'], f):.4f} | {b['measured_best_fraction']:g} | "
                   f"{b['margin_over_runner_up']:.4f} ({note}) |")
    fractions = study["fractions"]
    out += ["", "Measured, mean ± 95% CI half-width over seeds (Student's t):", "",
            "| budget | seeds | " + " | ".join(f"{f:g}" for f in fractions) + " |",
            "|---:|---:|" + "---:|" * len(fractions)]
    for b in study["per_budget"]:
        ci = b.get("measured_ci95") or {}
        cells = []
        for f in fractions:
            m, h = _at(b["measured"], f), _at(ci, f)
            cells.append("-" if m is None else f"{m:.4f}" + ("" if h is None or math.isnan(h) else f" ± {h:.4f}"))
        out.append(f"| {b['budget']} | {b.get('seeds', '')} | " + " | ".join(cells) + " |")
    return out


