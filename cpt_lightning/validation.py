"""Validation figures over all held-out sources and for each one.

A domain mix is judged per domain (did the detour help clinical notes more than PubMed abstracts?), so each
``val_sources`` entry is read by a loader of its own and every figure is logged over all of them,
``val/<objective>_<metric>``, and, with two sources or more, for each: ``val/<source>/<objective>_<metric>``.
Both are per predicted position, as the training curves are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

METRICS = ("loss", "accuracy")
# The checkpoint record of the step from which TokenValidation validated after each phase's last step (0: the whole
# run; absent: never, as in runs before 2026-12-04), for the model card
PHASE_ENDS_RECORD = "phase_ends_validated_since_step"
# The step the run's last validation followed (None: none yet): a checkpoint saved at a step before the validation
# due there (TokenCheckpoint's) has that step validated first by the run resumed from it
VALIDATED_STEP_RECORD = "validated_step"


def validation_key(objective: str, metric: str, source: str | None = None) -> str:
    return f"val/{objective}_{metric}" if source is None else f"val/{source}/{objective}_{metric}"


def sources_layout(objectives: list[str]) -> dict:
    """TensorBoard's custom scalars: a chart per figure drawing its curve over all sources and each source's
    together (the scalars page draws every tag apart). TensorBoard keeps the first layout a run writes, so the
    charts are the objectives given (``val_objectives``), or, without any, one per metric over every objective
    (a phase's objective validates until the next phase's takes over)."""
    charts = {}
    for metric in METRICS:
        for objective in objectives or [None]:
            figure = f"{re.escape(objective)}_{metric}" if objective else f"[^/]+_{metric}"
            charts[f"{objective}_{metric}" if objective else metric] = ["Multiline", [rf"^val/([^/]+/)?{figure}$"]]
    return {"validation: all sources and each": charts}


class ValidationSums:
    """Summed loss × predicted positions, correct predictions and predicted positions, per objective and source.

    Added on the device (no host sync per micro-batch) and read once when the evaluation ends. A micro-batch
    with nothing to predict adds nothing; a NaN loss stays NaN, so a diverged model cannot look fine."""

    def __init__(self, objectives: list[str], sources: list[str], device: torch.device):
        self.objectives, self.sources = list(objectives), list(sources)
        self.sums = torch.zeros(len(self.objectives), len(self.sources), 3, device=device)

    def add(self, objective: str, source: int, loss: torch.Tensor, predictions: torch.Tensor,
            targets: torch.Tensor) -> None:
        sums = self.sums[self.objectives.index(objective), source]
        predicted = targets.numel()
        if predicted:
            sums[0] += loss.detach().float() * predicted
            sums[1] += (predictions == targets).sum()
            sums[2] += predicted

    def figures(self) -> Iterator[tuple[str, float, int]]:
        """``(key, mean, the positions it covers)`` of the sums (every rank's, once they are reduced); none where an
        objective predicted no position (its 0.0 read as a perfect model)."""
        sums = self.sums.tolist()
        for objective, by_source in zip(self.objectives, sums):
            groups = [(None, [sum(column) for column in zip(*by_source)])]
            if len(self.sources) > 1:
                groups += zip(self.sources, by_source)
            for source, (loss, correct, predicted) in groups:
                for metric, total in zip(METRICS, (loss, correct) if predicted else ()):
                    yield validation_key(objective, metric, source), total / predicted, int(predicted)


def scored_weights(ckpt_path, step: int | None, model: str | None) -> str:
    """The line above ``cpt validate``'s table naming what it scored: a saved table of figures, or one of several
    checkpoints', says which weights and step they are of (Lightning names the checkpoint on stderr, not its step)."""
    if ckpt_path is None:
        return f"validated {model} as it is (no checkpoint)"
    return f"validated {ckpt_path}" + (f" (step {step:,})" if step is not None else "")


def validation_table(figures: dict[str, float], sources: list[str]) -> str:
    """``cpt validate``'s printout: a row per objective and metric, a column over all sources and one per source
    (Lightning's table has a column per loader, each repeating every figure)."""
    columns = ["all", *sources] if len(sources) > 1 else ["all"]
    headers = sources if len(sources) == 1 else columns  # one source: its name heads the figures over "all"
    rows: dict[str, dict[str, float]] = {}
    for key, value in figures.items():
        if key.startswith("val/"):
            source, _, name = key[len("val/"):].rpartition("/")
            rows.setdefault(name, {})[source or "all"] = float(value)
    if not rows:
        return ""
    width = max(len(name) for name in [*rows, "validation"])
    cells = [max(len(header), 10) for header in headers]
    lines = ["  ".join(["validation".ljust(width), *(h.rjust(w) for h, w in zip(headers, cells))])]
    for name in sorted(rows):
        values = (f"{rows[name][c]:.4f}" if c in rows[name] else "" for c in columns)
        lines.append("  ".join([name.ljust(width), *(v.rjust(w) for v, w in zip(values, cells))]))
    return "\n".join(lines)
