"""Comparison of two or more models: per-task mean-F1 differences and a sign test over tasks.

For every model after the first, ``diff[task] = mean F1 (model) − mean F1 (first model)`` over the
seeds, and an exact two-sided binomial (sign) test on the signs of those differences, ties
dropped: under "neither model is better", each non-tied task is a fair coin. Reported like the
seed models' cards: ``9/10 tasks better, p=0.021``.
"""

from __future__ import annotations

import statistics
from math import comb

from cpt_lightning.evaluate.report import families, table_row


def sign_test(wins: int, n: int) -> float:
    """Exact two-sided binomial test of ``wins`` out of ``n`` at p=0.5: min(1, 2·min(P[X≤k], P[X≥k]))."""
    if not 0 <= wins <= n:
        raise ValueError(f"wins={wins} must lie in 0..n={n}")
    if n == 0:
        return 1.0
    low = sum(comb(n, i) for i in range(wins + 1)) / 2**n
    high = sum(comb(n, i) for i in range(wins, n + 1)) / 2**n
    return min(1.0, 2 * min(low, high))


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


# Equal means of F1s stored as floats differ by float rounding (2/3 and 1/3 against 1/2 twice: 7e-15); a real Δ of
# mean F1 (× 100) over a test set and its seeds is orders of magnitude above this.
ROUNDING = 1e-9


def _task_means(results: dict, model: str) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for run in results["runs"]:
        if run["model"] == model:
            scores.setdefault(run["task"], []).append(run["test_f1"])
    return {t: statistics.fmean(v) for t, v in scores.items()}


def compare(results: dict) -> list[dict]:
    """One entry per model after the first: differences per task (None when either lacks runs) and the sign test."""
    models = list(results["models"])
    base = _task_means(results, models[0])
    comparisons = []
    for model in models[1:]:
        means = _task_means(results, model)
        diffs = {t: _difference(means[t], base[t]) if t in means and t in base else None for t in results["tasks"]}
        signs = [d for d in diffs.values() if d is not None and d != 0]
        wins, n = sum(d > 0 for d in signs), len(signs)
        comparisons.append({
            "model": model, "baseline": models[0], "diff": diffs,
            "wins": wins, "losses": n - wins, "ties": sum(d == 0 for d in diffs.values() if d is not None),
            "p": sign_test(wins, n),
        })
    return comparisons


def _difference(mean: float, base: float) -> float:
    """mean − base, 0 for equal means that the floats' rounding left a few ulps apart (a tie, not a win or a loss)."""
    diff = mean - base
    return 0.0 if abs(diff) < ROUNDING else diff


def _delta(diff: float) -> str:
    """A difference to 0.1 F1, or to its first digit when that would read +0.0 or -0.0: the sign test counts it as a
    win or a loss (only a tie is dropped), so the table must show which."""
    return f"{diff:+.1f}" if diff == 0 or abs(diff) >= 0.05 else f"{diff:+.1g}"


def comparison_table(results: dict) -> str:
    """Markdown: one row per model vs the first; per-task Δ mean F1, wins/losses/ties, sign-test p."""
    tasks = [t for ts in families(results).values() for t in ts]
    header = ["Model", "vs", *(f"Δ {t}" for t in tasks), "better / worse / tied", "sign test"]
    lines = [table_row(header), "|---|---|" + "---:|" * (len(header) - 2)]
    for c in compare(results):
        cells = [f"`{c['model']}`", f"`{c['baseline']}`"]
        cells += ["—" if c["diff"][t] is None else _delta(c["diff"][t]) for t in tasks]
        cells += [f"{c['wins']} / {c['losses']} / {c['ties']}", format_p(c["p"])]
        lines.append(table_row(cells))
    legend = ("Δ: mean test F1 over seeds of the row's model minus that of the first model (× 100). Sign test: "
              "exact two-sided binomial test (p = 0.5) on the number of tasks where the model is better, ties dropped.")
    return "\n".join(lines) + "\n\n" + legend
