"""LayerFreeze: keep chosen encoder layers fixed while one objective trains (the freeze interventions).

The recipe's ablations freeze layers 0–7 (or 8–14) during the CLM detour only, to test where the
benefit lives. Gradients still flow *through* frozen layers to the embeddings below, but their own
weights stop requiring a gradient while the objective trains: backward skips their weight
gradients (a third of the layer's matrix FLOPs) and FSDP2 their reduce-scatter, and AdamW neither
updates them nor touches their moments or weight decay. At the phase switch they train again.
Several LayerFreeze callbacks may name the same layer: it trains only while none of them holds it.
LayerFreeze comes after ObjectiveSchedule in ``trainer.callbacks``, which sets each batch's objective.

Under DDP, which fixes at wrapping time which parameters it waits for, they keep requiring a
gradient and their gradients are dropped after each backward instead (same updates, no saving): before any
callback's ``on_before_optimizer_step``, whatever the callbacks' order, so NonFiniteGuard's norm, its check and
the clipping see the same gradients.

The parameters are looked up each time, never kept: FSDP2 (``configure_model``, which runs after
the callbacks' ``setup``) replaces each parameter with a sharded one.

The frozen layers get their optimizer state when training starts, as AdamW would make it on their
first step (zero moments, step 0), so a checkpoint saved while they are frozen holds state for every
parameter: FSDP2 resumes by loading into a fresh optimizer's state, which has an entry for each
trainable parameter, and refused a checkpoint without theirs.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.errors import UserError
from cpt_lightning.parallel import FSDP2


def parse_layers(spec: str | list[int]) -> list[int]:
    """``"0-7"``, ``"0-3,10"`` or ``[0, 1, 2]`` → sorted layer indices."""
    if isinstance(spec, list):
        if not spec:
            raise UserError("LayerFreeze.layers=[] names no layer: list the layers to freeze, e.g. [0, 1] or '0-7'")
        if not all(type(i) is int for i in spec):  # True is an int to Python; '1' failed sorting with a TypeError
            raise UserError(f"LayerFreeze.layers={spec!r}: a list holds layer numbers only, e.g. [0, 1]")
        return sorted(set(spec))
    layers: set[int] = set()
    for part in str(spec).split(","):
        first, dash, last = part.strip().partition("-")
        try:
            first, last = int(first), int(last if dash else first)  # '8-' froze layer 8 alone, not 8 to the end
        except ValueError:
            raise UserError(f"LayerFreeze.layers={spec!r}: write ranges like '0-7' or '0-3,10'") from None
        if last < first:  # range() would name no layer: '0-3,7-5' froze 0-3 only
            raise UserError(f"LayerFreeze.layers={spec!r}: {part.strip()!r} names no layer: write ranges low to high, "
                            "like '0-7'")
        layers.update(range(first, last + 1))
    return sorted(layers)


def layer_spans(layers: list[int]) -> str:
    """Sorted layer numbers as runs, e.g. "0–7, 14"."""
    spans = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(f"{a}–{b}" if b > a else str(a) for a, b in spans)


def freeze_text(layers: list[int], during: str) -> str:
    """E.g. "encoder layers 0–7, 14 frozen during CLM": what the log and the model card say."""
    return f"encoder layers {layer_spans(layers)} frozen during {during.upper()}"


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
                f"LayerFreeze.layers {layer_spans(out_of_range)} do not exist: the model has layers "
                f"0–{len(encoder_layers) - 1}"
            )
        objectives = run_objective_names(trainer, pl_module)
        if self.during not in objectives:
            raise UserError(
                f"LayerFreeze.during={self.during!r} matches no objective of this run ({', '.join(objectives)}): "
                "the layers would never be frozen"
            )
        schedule = find_objective_schedule(trainer)
        if stage == "fit" and schedule is not None and trainer.callbacks.index(schedule) > trainer.callbacks.index(self):
            raise UserError(
                "trainer.callbacks: list LayerFreeze after ObjectiveSchedule; it freezes by the objective the "
                "schedule sets at each batch's start, and before it would see the previous batch's"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        """Said once: nothing else in a freeze run's log shows it (the model summary counts every weight trainable)."""
        for optimizer in trainer.optimizers:
            add_first_step_state(optimizer, self._parameters(pl_module))
        held = sum(param.numel() for param in self._parameters(pl_module))
        rank_zero_info(f"[LayerFreeze] {freeze_text(self.layers, self.during)}: {held:,} parameters not updated while "
                       "it trains (gradients still flow through them)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if skips_weight_gradients(trainer.strategy):
            held = held_layers(trainer, pl_module.objective.name)
            self._require_grad(trainer, pl_module, {i: i not in held for i in self.layers})

    def on_after_backward(self, trainer, pl_module) -> None:
        """Not in ``on_before_optimizer_step``: a NonFiniteGuard listed before it logged and checked a norm that
        still held the frozen layers' gradients (not the step's, which clipping used), and a NaN in them alone
        skipped the step."""
        if pl_module.objective.name == self.during and not skips_weight_gradients(trainer.strategy):
            for param in self._parameters(pl_module):
                param.grad = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """The module leaves training with every layer trainable, as it came (the layers it has: after a range
        refused at setup, an IndexError here took the refusal's place and left the run's folder behind)."""
        if skips_weight_gradients(trainer.strategy):
            existing = range(len(pl_module.model.model.layers))
            self._require_grad(trainer, pl_module, {i: True for i in self.layers if i in existing})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Lightning skips the callbacks' teardown when fit raises: a module kept after a failed or interrupted run
        (a notebook) would train on with these layers frozen."""
        self.teardown(trainer, pl_module, "fit")

    def _require_grad(self, trainer, pl_module, wanted: dict[int, bool]) -> None:
        """Make layer i's weights require a gradient or not, as ``wanted[i]`` says; under FSDP2 a layer that
        trains again gets its gradient dtypes back."""
        layers = pl_module.model.model.layers
        for i, requires_grad in wanted.items():
            if all(param.requires_grad == requires_grad for param in layers[i].parameters()):
                continue
            layers[i].requires_grad_(requires_grad)
            if requires_grad and isinstance(trainer.strategy, FSDP2):
                trainer.strategy.refresh_gradient_dtypes(layers[i])

    def _parameters(self, pl_module) -> list[torch.nn.Parameter]:
        layers = pl_module.model.model.layers
        return [param for i in self.layers for param in layers[i].parameters()]


def held_layers(trainer, objective: str) -> set[int]:
    """The layers that the run's LayerFreeze callbacks hold while ``objective`` trains."""
    return {i for c in trainer.callbacks if isinstance(c, LayerFreeze) and c.during == objective for i in c.layers}


def skips_weight_gradients(strategy) -> bool:
    """Whether frozen weights can stop requiring a gradient mid-run: not under DDP, whose reducer would
    wait for their gradients."""
    return isinstance(strategy, (SingleDeviceStrategy, FSDP2))


def add_first_step_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Give ``params`` that have no optimizer state the state their first step makes, before that step.

    One step at learning rate 0 on zero gradients, for these parameters only, makes it (moments of
    zero; weight decay scaled by the learning rate does nothing); the step count is then put back to
    0, so their first real step is exactly the one they would have had. A resumed run already has it.
    """
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for p in params if id(p) in ids and p not in optimizer.state]
    if not params:
        return
    if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError("add_first_step_state must run before any gradient exists")
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for param in params:
        param.grad = torch.zeros_like(param)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, learning_rates):
            group["lr"] = lr
        for param in params:
            param.grad = None
    for param in params:
        state = optimizer.state[param]
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0


def run_objective_names(trainer, pl_module) -> list[str]:
    """The objectives a run trains: its ObjectiveSchedule's phases, else the module's one objective."""
    schedule = find_objective_schedule(trainer)
    if schedule is not None:
        return list(dict.fromkeys(phase.objective.name for phase in schedule.phases))
    return [pl_module.objective.name]
