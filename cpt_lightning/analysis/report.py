"""Writing per-layer results: CSV (long format), JSON, a PNG plot and TensorBoard scalars.

Every metric is a set of named series with one value per layer; layer −1 is the embeddings output
and layers 0..L−1 are the encoder layers, as in ``model.layers.{i}``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# metric → (y-axis label, y scale); the plot has one panel per metric listed here that has series
PANELS = {
    "cka": ("linear CKA", "linear"),
    "drift": ("‖W − W_base‖ / ‖W_base‖", "linear"),
    "noise_ratio": ("divergence / seed noise", "log"),  # ratios span orders of magnitude (1× to 100×)
}


@dataclass
class LayerMetrics:
    layers: list[int]
    metrics: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def rows(self):
        """(metric, series, layer, value) for every number."""
        for metric, series in self.metrics.items():
            for name, values in series.items():
                for layer, value in zip(self.layers, values):
                    yield metric, name, layer, value


def write_csv(result: LayerMetrics, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "series", "layer", "value"])
        writer.writerows(result.rows())


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf: an undefined number (e.g. zero seed noise) becomes null."""
    return value if math.isfinite(value) else None


def write_json(result: LayerMetrics, path: Path) -> None:
    metrics = {
        metric: {name: [_finite_or_none(v) for v in values] for name, values in series.items()}
        for metric, series in result.metrics.items()
    }
    payload = {**result.meta, "layers": result.layers, "metrics": metrics}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def make_figure(result: LayerMetrics) -> plt.Figure:
    """One panel per metric in PANELS, layers on x, one line per series."""
    panels = [metric for metric in PANELS if result.metrics.get(metric)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], panels):
        for name, values in result.metrics[metric].items():
            ax.plot(result.layers, values, marker="o", markersize=3, label=name)
        label, scale = PANELS[metric]
        ax.set_ylabel(label)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xticks(result.layers, ["emb" if layer < 0 else str(layer) for layer in result.layers])
    axes[-1, 0].set_xlabel("layer")
    figure.tight_layout()
    return figure


def save_plot(result: LayerMetrics, path: Path) -> None:
    figure = make_figure(result)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_tensorboard(result: LayerMetrics, directory: Path) -> None:
    """Scalars ``{metric}/{series}`` with step = layer index (−1 = embeddings), in a new folder."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for metric, name, layer, value in result.rows():
        writer.add_scalar(f"{metric}/{name}", value, global_step=layer)
    writer.close()


OUTPUTS = ("layers.csv", "layers.json", "layers.png", "tensorboard")


def write_all(result: LayerMetrics, out: Path) -> None:
    """layers.csv, layers.json, layers.png and tensorboard/ under ``out`` (its other files left alone), each
    replacing an earlier analysis's once all four are written. Written in place, a failed write (a full disk) left an
    empty layers.json beside a new layers.csv and the earlier plot; and TensorBoard merged the earlier events with
    the new ones, showing series that layers.json no longer has."""
    from cpt_lightning.atomic import disk_errors_refused, replace_folder, staging_beside

    earlier = any((out / name).exists() for name in OUTPUTS)
    kept = "the earlier analysis there is intact" if earlier else "nothing of it is left"
    with staging_beside(out / "layers") as staging:
        with disk_errors_refused(f"the analysis in {out}", kept):
            write_csv(result, staging / "layers.csv")
            write_json(result, staging / "layers.json")
            save_plot(result, staging / "layers.png")
            write_tensorboard(result, staging / "tensorboard")
        for name in OUTPUTS:  # renames: no room needed
            if (staging / name).is_dir():
                replace_folder(staging / name, out / name)
            else:
                os.replace(staging / name, out / name)
