"""LayerFreeze: keep chosen encoder layers fixed while one objective trains (the freeze interventions).

The recipe's ablations freeze layers 0–7 (or 8–14) during the CLM detour only, to test where the
benefit lives. Gradients still flow *through* frozen layers; their own gradients are dropped
right before each optimizer step, so AdamW neither updates them nor touches their moments or
weight decay. When the objective changes (the phase switch) the layers train again.

The parameters are looked up at every step, never kept: FSDP2 (``configure_model``, which runs
after the callbacks' ``setup``) replaces each parameter with a sharded one, and dropping the
gradients of the originals would leave every "frozen" layer training.
"""

from __future__ import annotations

import lightning as L

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.errors import UserError


def parse_layers(spec: str | list[int]) -> list[int]:
    """``"0-7"``, ``"0-3,10"`` or ``[0, 1, 2]`` → sorted layer indices."""
    if isinstance(spec, list):
        return sorted(set(spec))
    layers: set[int] = set()
    try:
        for part in str(spec).split(","):
            first, _, last = part.strip().partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserError(f"LayerFreeze.layers={spec!r}: write ranges like '0-7' or '0-3,10'") from None
    if not layers:
        raise UserError(f"LayerFreeze.layers={spec!r} names no layer: write ranges low to high, like '0-7'")
    return sorted(layers)


class LayerFreeze(L.Callback):
    """Freeze encoder ``layers`` while the module's objective is named ``during`` (e.g. ``clm``)."""

    def __init__(self, layers: str | list[int], during: str = "clm"):
        self.layers = parse_layers(layers)
        self.during = during

    def setup(self, trainer, pl_module, stage: str) -> None:
        encoder_layers = pl_module.model.model.layers
        out_of_range = [i for i in self.layers if not 0 <= i < len(encoder_layers)]
        if out_of_range:
            raise UserError(
                f"LayerFreeze.layers {out_of_range} do not exist: the model has layers 0–{len(encoder_layers) - 1}"
            )
        objectives = run_objective_names(trainer, pl_module)
        if self.during not in objectives:
            raise UserError(
                f"LayerFreeze.during={self.during!r} matches no objective of this run ({', '.join(objectives)}): "
                "the layers would never be frozen"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.objective.name == self.during:
            layers = pl_module.model.model.layers
            for i in self.layers:
                for param in layers[i].parameters():
                    param.grad = None


def run_objective_names(trainer, pl_module) -> list[str]:
    """The objectives a run trains: its ObjectiveSchedule's phases, else the module's one objective."""
    schedule = find_objective_schedule(trainer)
    if schedule is not None:
        return list(dict.fromkeys(phase.objective.name for phase in schedule.phases))
    return [pl_module.objective.name]
