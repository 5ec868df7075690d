"""Per-seed F1 → the model cards' table: per-task mean ± std, per-family and overall averages.

Averages are taken per seed first (mean over the tasks of a family, or all tasks), then their
mean ± std across seeds, so every ± in the table is a spread over seeds. The std is the sample
standard deviation (n − 1); one seed shows no ±.
"""

from __future__ import annotations

import statistics
from collections import defaultdict


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def families(results: dict) -> dict[str, list[str]]:
    """Family → its tasks, in the order the tasks were given."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for name, meta in results["tasks"].items():
        grouped[meta["family"]].append(name)
    return dict(grouped)


def summarize(results: dict) -> dict[str, dict]:
    """Per model: context, task → (mean, std), family → (mean, std) and average (None where runs are missing)."""
    scores: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in results["runs"]:
        scores[run["model"]][run["task"]][run["seed"]] = run["test_f1"]
    seeds, grouped = results["seeds"], families(results)
    summary = {}
    for model, meta in results["models"].items():
        by_task = scores.get(model, {})
        complete = all(set(by_task.get(t, {})) >= set(seeds) for t in results["tasks"])
        summary[model] = {
            "context": meta["context"],
            "tasks": {t: _mean_std(list(by_task[t].values())) if by_task.get(t) else None for t in results["tasks"]},
            "families": {f: _seed_average(by_task, ts, seeds) if complete else None for f, ts in grouped.items()},
            "average": _seed_average(by_task, list(results["tasks"]), seeds) if complete else None,
        }
    return summary


def _seed_average(by_task: dict[str, dict[int, float]], tasks: list[str], seeds: list[int]) -> tuple[float, float | None]:
    """Mean ± std over seeds of each seed's average over ``tasks``."""
    return _mean_std([statistics.fmean(by_task[t][s] for t in tasks) for s in seeds])


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def table_row(cells: list[str]) -> str:
    """One Markdown table row; a ``|`` in a cell (a task named "PubType | v2") is escaped, as it split the cell."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table(results: dict) -> str:
    """Rows: models; columns: context, tasks grouped by family, family averages, overall average."""
    grouped = families(results)
    tasks = [t for ts in grouped.values() for t in ts]
    header = ["Model", "Context", *tasks, *(f"{f} avg" for f in grouped), "Avg"]
    lines = [table_row(header), "|" + "---|" + "---:|" * (len(header) - 1)]
    for model, row in summarize(results).items():
        cells = [f"`{model}`", str(row["context"]), *(_cell(row["tasks"][t]) for t in tasks)]
        cells += [_cell(row["families"][f]) for f in grouped] + [_cell(row["average"])]
        lines.append(table_row(cells))
    return "\n".join(lines)


def legend(results: dict) -> str:
    """What the numbers are: metric per task, seeds, context."""
    seeds = results["seeds"]
    parts = [
        f"F1 × 100 on the test split, mean ± std over {len(seeds)} fine-tuning seed{'s' * (len(seeds) > 1)} "
        f"({', '.join(map(str, seeds))}); with a dev split, each seed's test score comes from its best dev epoch. "
        "Averages are per seed, then mean ± std. Context: the length inputs were cut at (tokens), the longest over the "
        "model's tasks: its context, unless every task's max_length is lower; a task's own max_length is said below."
    ]
    if poolings := classifier_poolings(results):
        parts.append(mixed_pooling_note(results) or f"Classification heads pool the encoder's output by "
                     f"{next(iter(poolings.values()))} (`classifier_pooling`).")
    for name, meta in results["tasks"].items():
        metric = {"entity_f1": "entity-level micro F1 (BIO)", "macro_f1": "macro F1", "micro_f1": "micro F1"}[meta["metric"]]
        if meta.get("negative_labels"):
            metric += f" over the labels other than {', '.join(map(repr, meta['negative_labels']))}"
        if meta.get("max_length"):
            metric += f", inputs cut at max_length {meta['max_length']:,} (or a shorter model context)"
        parts.append(f"- **{name}** ({meta['family']}): {meta['type']}, {metric}")
    return "\n".join(parts)


def classifier_poolings(results: dict) -> dict[str, str]:
    """Model → how its sequence-classification head pooled (mean or cls), for the models whose family has the
    setting (ModernBERT's ``classifier_pooling``)."""
    return {m: meta["classifier_pooling"] for m, meta in results.get("models", {}).items()
            if meta.get("classifier_pooling")}


def mixed_pooling_note(results: dict) -> str | None:
    """Said when the models' classification heads pooled differently: a model built from a ``model_config`` pools
    by cls (transformers' default), a hub ModernBERT by mean, and their classification scores then differ by the
    head as well as by the encoder."""
    poolings = classifier_poolings(results)
    if len(set(poolings.values())) < 2:
        return None
    said = ", ".join(f"`{m}` {p}" for m, p in poolings.items())
    return (f"The classification heads pooled differently ({said}): those columns compare heads as well as "
            "encoders; `cpt evaluate --classifier-pooling mean` (or cls) gives every model the same.")
