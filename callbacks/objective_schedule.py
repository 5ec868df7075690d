"""ObjectiveSchedule: run objectives one after another, each for a token budget.

The phase is a pure function of the token clock (optimizer steps × tokens per step), which the
checkpoint restores, so a resumed run lands in the right phase and never re-enters an earlier one.
At a switch only the objective and the learning-rate shape change; weights and optimizer state
carry over untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cpt_lightning.devices import host_scalar
from cpt_lightning.objectives import Objective, bind_checked, check_objective, objective_settings
from cpt_lightning.schedules import LRShape, PhaseLR, TokenSchedule, steps_for
from cpt_lightning.errors import UserError


@dataclass
class Phase:
    """One phase: an objective trained for ``tokens`` tokens under its own learning-rate shape.

    ``lr``: ``constant`` (after ``warmup_tokens`` of linear warmup), ``sqrt_decay`` (after the warmup, 1−sqrt from
    peak to ``final_lr_ratio`` × peak over the rest of the phase) or ``linear_decay``. A decay whose warmup fills
    the phase is warned of: it never decays (a run training on after it holds ``final_lr_ratio``).
    """

    objective: Objective
    tokens: int
    lr: LRShape = "constant"
    warmup_tokens: int = 0
    final_lr_ratio: float = PhaseLR.final_ratio


def check_objectives(phases: list[Phase]) -> None:
    """Each objective well formed, and one name per objective: phases may share a name only as the same
    class with the same attention (the MLM baseline's 30% then 15%), since curves, LayerFreeze's
    ``during`` and export folders are keyed on it."""
    first_with_name: dict[str, int] = {}
    for i, phase in enumerate(phases):
        objective = phase.objective
        check_objective(objective)
        j = first_with_name.setdefault(objective.name, i)
        other = phases[j].objective
        if not _same_kind(objective, other):
            raise UserError(
                f"ObjectiveSchedule.phases[{i}] ({type(objective).__name__}) and phases[{j}] ({type(other).__name__}) "
                f"are both named {objective.name!r}: give different objectives different names"
            )


def check_val_objective_keys(val_objectives: dict, phases: list[Phase]) -> None:
    """A ``val_objectives`` key that is a phase's name names that objective: ``val/span_loss`` of a CausalLM beside
    ``train/span_loss`` of a span-masking phase read as one objective's curves, in TensorBoard and the card."""
    for key, objective in val_objectives.items():
        for i, phase in enumerate(phases):
            if phase.objective.name == key and not _same_kind(objective, phase.objective):
                raise UserError(
                    f"model.init_args.val_objectives key {key!r} ({type(objective).__name__}) is the name of "
                    f"ObjectiveSchedule.phases[{i}] ({type(phase.objective).__name__}): its val/{key}_loss would read "
                    f"as that phase's objective; give it a key of its own")


def _same_kind(objective, other) -> bool:
    """Two objectives that may share a name: the same class with the same attention (settings may differ)."""
    return (type(objective), objective.attention) == (type(other), other.attention)


FROZEN = "LayerFreeze.layers"


def frozen_layers(trainer, objectives: list[str]) -> dict[str, list[int]]:
    """The layers the run's LayerFreeze callbacks hold while each objective trains."""
    from callbacks.layer_freeze import held_layers  # it imports this module

    return {name: sorted(held_layers(trainer, name)) for name in objectives}


def find_objective_schedule(trainer) -> ObjectiveSchedule | None:
    """The run's ObjectiveSchedule among the trainer's callbacks, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, ObjectiveSchedule)), None)


class ObjectiveSchedule(L.Callback):
    """Switch the module's objective at exact token counts and stop after the last phase.

    Args:
        phases: the run's phases in order, each an objective (by ``class_path``), its token budget,
            and its learning-rate shape (``lr``, ``warmup_tokens``, ``final_lr_ratio``).
        stop_after_last_phase: end the run when the last phase's tokens are trained; false trains on
            with the last objective at the last phase's final learning rate until ``trainer.max_steps``
            or ``trainer.max_time`` (not ``max_epochs``: the training mix is one endless epoch).
    """

    def __init__(self, phases: list[Phase], stop_after_last_phase: bool = True):
        if not phases:
            raise UserError("ObjectiveSchedule.phases is empty: give at least one phase (objective + tokens)")
        for i, phase in enumerate(phases):
            if not isinstance(phase.tokens, int) or phase.tokens <= 0:
                raise UserError(f"ObjectiveSchedule.phases[{i}].tokens must be a positive integer, got {phase.tokens!r}")
            if not 0 <= phase.warmup_tokens <= phase.tokens:
                raise UserError(
                    f"ObjectiveSchedule.phases[{i}].warmup_tokens must be within [0, tokens], got {phase.warmup_tokens}"
                )
            if not 0 <= phase.final_lr_ratio <= 1:  # > 1 grew the rate through a "decay"; < 0 ended it negative (ascent)
                raise UserError(
                    f"ObjectiveSchedule.phases[{i}].final_lr_ratio must be within [0, 1] (the decay's end as a fraction "
                    f"of the peak learning rate), got {phase.final_lr_ratio}"
                )
        check_objectives(phases)
        self.phases = phases
        self.stop_after_last_phase = stop_after_last_phase
        self.schedule = TokenSchedule(
            [PhaseLR(p.tokens, p.lr, p.warmup_tokens, p.final_lr_ratio) for p in phases]
        )
        self.current: int | None = None
        self._on_steps: TokenSchedule | None = None  # the phases as they switch: on optimizer-step boundaries
        self._saved_history: list[list] | None = None  # from a checkpoint: [[name, start tokens, settings], ...]
        self._frozen: dict[str, list[int]] = {}  # objective name → the layers LayerFreeze holds while it trains

    def state_dict(self) -> dict:
        """The phases as this run trains them, so a run resumed or branched from its checkpoint can check
        that its own config gives the tokens already trained the same objectives."""
        return {} if self._on_steps is None else {"phases": self._history()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_history = state_dict.get("phases")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Every phase's objective is bound now (checked at construction), not at its switch (after the phases
        before it trained). The module's own objective or warmup given beside the phases is refused: nothing used it
        (a --model.init_args.objective on a recipe trained the recipe's phases without a word)."""
        if replaced := getattr(pl_module, "replaced_by_phases", None):  # a --model.init_args.objective did nothing
            raise UserError(f"model.init_args.{replaced[0]} does nothing beside an ObjectiveSchedule, whose phases set "
                            f"each step's objective and warmup: set it in the phases (trainer.callbacks → "
                            f"ObjectiveSchedule), or remove it")
        for phase in self.phases[1:]:
            bind_checked(phase.objective, pl_module.tokens)
        check_val_objective_keys(pl_module.val_objectives, self.phases)
        pl_module.lr_schedule = self.schedule
        pl_module.phase_objectives = [phase.objective for phase in self.phases]
        pl_module.set_objective(self.phases[0].objective)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """A resumed fit checks ``max_steps`` against the phases here: one whose max_steps the checkpoint's step
        has reached trains no batch (Lightning skips the loop), so the first batch's check never came and it
        exited 0 with "max_steps=N reached". ``cpt validate`` restores the weights but not the step: judge the
        checkpoint by the objective of the phase its last step trained in, as the run's own validation did, not by
        phase 0's (``val_objectives``, when the module has them, are what it validates with instead)."""
        if trainer.state.fn == TrainerFn.FITTING and checkpoint.get("tokens_per_step"):
            self._check_max_steps(trainer, checkpoint["tokens_per_step"])
            if 0 < trainer.max_steps <= checkpoint["global_step"]:  # Lightning skips the loop: no on_train_start
                self.load_state_dict(checkpoint.get("callbacks", {}).get(self.state_key) or {})  # Lightning's comes later
                self._check_resumed_at_the_end(trainer, checkpoint["global_step"], checkpoint["tokens_per_step"])
        if trainer.state.fn != TrainerFn.VALIDATING or getattr(pl_module, "val_objectives", None):
            return
        index = self.phase_of_step(checkpoint["global_step"], checkpoint.get("tokens_per_step") or 0)
        pl_module.set_objective(self.phases[index].objective)
        rank_zero_info(f"[ObjectiveSchedule] validating with phase {index}'s objective "
                       f"({self.phases[index].objective.name}): the checkpoint's step {checkpoint['global_step']} is in it")

    def on_train_start(self, trainer, pl_module) -> None:
        """A run resumed after its last phase (a requeued job rerunning ``--ckpt_path last``) trains nothing. What the
        checkpoint trained is checked first, as at a first batch: a branch off a checkpoint past the branch config's
        phases (a step of the parent's decay) was "already done", exit 0, instead of refused."""
        self.check_resumed_history(trainer, pl_module)
        if not self._finished(pl_module):
            return
        if pl_module.tokens_per_step:  # restored from the checkpoint
            self._check_not_past_the_end(pl_module.global_step, pl_module.tokens_per_step)
        rank_zero_info(
            f"[ObjectiveSchedule] every phase is already done ({pl_module.tokens_seen:,} tokens seen at step "
            f"{pl_module.global_step}): nothing left to train"
        )
        trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.current is None:
            tokens_per_step = pl_module.measure_tokens_per_step(batch)
            self._set_step_grid(trainer, tokens_per_step)
            self._check_budgets(trainer, tokens_per_step, self._on_steps)
            self._check_history(pl_module.tokens_seen)
            self._say_the_mix_plan(trainer, pl_module)
            pl_module.follow_lr_schedule(self._on_steps)
            pl_module.check_objectives_on_every_rank({id(p.objective): p.objective for p in self.phases}.values(),
                                                     batch, "first batch")
        index = self.schedule.phase_index(pl_module.tokens_seen)
        if index != self.current:
            self._enter(pl_module, index, resumed=self.current is None and pl_module.tokens_seen > 0)
        pl_module.log("train/phase", host_scalar(index), rank_zero_only=True)

    def _say_the_mix_plan(self, trainer, pl_module) -> None:
        """How often the tokens left read each source (``PackedDataModule.mix_plan``), said once a resume has restored
        the tokens seen (before, a branch's new mix was forecast for the whole run) and the step is measured: the
        phases train in whole steps, so 8,000 tokens at 512 a step are 8,192, which the plan said were 8,000."""
        if (mix_plan := getattr(trainer.datamodule, "mix_plan", None)) is not None:
            rank_zero_info(mix_plan(self._on_steps.total_tokens, pl_module.tokens_seen))

    def phase_of_step(self, step: int, tokens_per_step: int) -> int:
        """The phase optimizer step ``step`` (counted from 1) trained in: the one its first token is in, as the
        schedule switches at a step's start."""
        return self.schedule.phase_index(max(step - 1, 0) * tokens_per_step)

    def ends_a_phase(self, tokens_before: int, tokens_per_step: int) -> bool:
        """Whether the step from ``tokens_before`` is a phase's last, the last phase's included (a run that trains on
        past it, ``stop_after_last_phase: false``, has its model of the phases' end too)."""
        return any(tokens_before < end <= tokens_before + tokens_per_step for end in self.schedule.starts[1:])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._finished(pl_module):
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        """A run that something else stopped before its last phase ended (``max_time``, a ``StepTimer``) says where
        (not a ``fast_dev_run``, which saves nothing to continue from)."""
        if self.current is None or not self.stop_after_last_phase or self._finished(pl_module) or trainer.fast_dev_run:
            return
        remaining = [c.time_remaining() for c in trainer.callbacks if isinstance(c, Timer)]  # None: no budget
        spent = any(left is not None and left <= 0 for left in remaining)  # the time counts every resume of the run
        rank_zero_info(
            f"[ObjectiveSchedule] stopped in phase {self.current} ({self.phases[self.current].objective.name}) at "
            f"{pl_module.tokens_seen:,} of {self._on_steps.total_tokens:,} tokens (step {pl_module.global_step}): "
            f"--ckpt_path last{' with a larger --trainer.max_time' if spent else ''} continues the run"
        )

    def tokens_left(self, tokens_seen: int) -> int | None:
        """Tokens until the last phase ends, on the step grid; None before the first batch or when the run trains on."""
        if self._on_steps is None or not self.stop_after_last_phase:
            return None
        return max(self._on_steps.total_tokens - tokens_seen, 0)

    def total_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps until the last phase ends (every switch falls on a step boundary)."""
        return steps_for(self.schedule.total_tokens, tokens_per_step)

    def _set_step_grid(self, trainer, tokens_per_step: int) -> None:
        """The phases on optimizer-step boundaries (where they switch) and the layers each one freezes: what the
        check of a checkpoint's history compares and the saved history records."""
        self._on_steps = self.schedule.on_step_grid(tokens_per_step)
        self._frozen = frozen_layers(trainer, [phase.objective.name for phase in self.phases])

    def _finished(self, pl_module) -> bool:
        return self.stop_after_last_phase and pl_module.tokens_seen >= self.schedule.total_tokens

    def _enter(self, pl_module, index: int, resumed: bool) -> None:
        phase = self.phases[index]
        pl_module.set_objective(phase.objective)
        verb = "resuming in" if resumed else "entering"
        rank_zero_info(
            f"[ObjectiveSchedule] {verb} phase {index} ({phase.objective.name}, {phase.tokens:,} tokens, "
            f"lr {phase.lr}) at {pl_module.tokens_seen:,} tokens seen (step {pl_module.global_step})"
        )
        self.current = index

    def _history(self) -> list[list]:
        """[objective name, first token on the step grid, settings] of each phase: the objective's, and the
        layers LayerFreeze holds while it trains."""
        return [[phase.objective.name, start,
                 {**objective_settings(phase.objective), FROZEN: self._frozen.get(phase.objective.name, [])}]
                for phase, start in zip(self.phases, self._on_steps.starts)]

    def _check_history(self, tokens_seen: int) -> None:
        """Refuse a config whose phases give the checkpoint's trained tokens other objectives, settings or frozen layers.

        A branch off a checkpoint (an MLM decay after 10B of a 50B CLM run) or an extended last phase
        is a resume under another config; one whose phases disagree with what was trained (the
        checkpoint is past this config's CLM budget, or inside a decay this config starts later, or
        the baseline's 30% masking now reads 15%) would start mid-phase, or train on with other
        settings, and export a model card that misstates what it trained."""
        saved = [list(phase) for phase in self._saved_history or [] if phase[1] < tokens_seen]  # the phases trained
        if not saved:
            return
        ours = [phase for phase in self._history() if phase[1] < tokens_seen]
        last = len(saved) - 1
        name, start = saved[last][:2]
        branch_hint = f"end phases[{last}] ({name}) there: tokens: {tokens_seen - start}"

        def described(history: list[list]) -> str:
            return ", then ".join(f"{name} from token {start:,}" for name, start, *_ in history)

        if [phase[:2] for phase in saved] != [phase[:2] for phase in ours]:
            raise UserError(
                f"the checkpoint ({tokens_seen:,} tokens seen) trained {described(saved)}, but this "
                f"config's phases give those tokens {described(ours)}: a resumed or branched run must agree with what "
                f"was trained. To branch off this checkpoint, keep those phases and {branch_hint}"
            )
        for i, (trained, (_, _, settings)) in enumerate(zip(saved, ours)):
            if len(trained) > 2 and trained[2] != settings:  # checkpoints before settings were saved: names only
                changed = sorted(key for key in {*trained[2], *settings} if trained[2].get(key) != settings.get(key))
                then, now = (", ".join(f"{key}={d.get(key)!r}" for key in changed) for d in (trained[2], settings))
                new_phase_may_differ = i == last and FROZEN not in changed  # LayerFreeze holds by objective name
                raise UserError(
                    f"the checkpoint ({tokens_seen:,} tokens seen) trained phases[{i}] ({trained[0]}) with {then}, but "
                    f"this config gives it {now}: put back {then}"
                    + (f", or, to train on with {now}, {branch_hint} and add a phase after it with {now}"
                       if new_phase_may_differ else "")
                )

    def check_resumed_history(self, trainer, pl_module) -> None:
        """A resume's phase history, checked at the start on the checkpoint's step grid (the first batch checks it
        again on the measured one): ``TokenValidation`` validates a resumed step before the first batch, and a
        refused branch then left its run folder and the validation's TensorBoard points behind."""
        if pl_module.tokens_per_step:  # restored from the checkpoint
            self._set_step_grid(trainer, pl_module.tokens_per_step)
            self._check_history(pl_module.tokens_seen)

    def _check_resumed_at_the_end(self, trainer, step: int, tokens_per_step: int) -> None:
        """What a resume that trains nothing is checked for, as the first batch would check it: the phase history
        first (its refusal names the phases that disagree), then whether the checkpoint is past the last phase."""
        self._set_step_grid(trainer, tokens_per_step)
        self._check_history(step * tokens_per_step)
        self._check_not_past_the_end(step, tokens_per_step)

    def _check_not_past_the_end(self, step: int, tokens_per_step: int) -> None:
        """A last phase shortened below what the checkpoint trained of it was "already done": exit 0, and no model of
        its end (a resume trains no step to save one), where an earlier phase shortened so is refused. Also checked
        as the checkpoint loads where a ``max_steps`` the checkpoint's step has reached skips the training loop."""
        on_steps, last = self.schedule.on_step_grid(tokens_per_step), len(self.phases) - 1
        tokens_seen, end = step * tokens_per_step, on_steps.total_tokens
        if self.stop_after_last_phase and tokens_seen > end:
            name, start = self.phases[last].objective.name, on_steps.starts[last]
            raise UserError(
                f"the checkpoint ({tokens_seen:,} tokens seen) trained past this config's last phase, which ends at "
                f"token {end:,}: a resumed or branched run must agree with what was trained. To end the run where the "
                f"checkpoint is, give phases[{last}] ({name}) tokens: {tokens_seen - start}"
            )

    def _check_max_steps(self, trainer, tokens_per_step: int) -> None:
        total_steps = self.total_steps(tokens_per_step)
        # fast_dev_run: Lightning's smoke test of a few steps, its own max_steps
        if not trainer.fast_dev_run and trainer.max_steps not in (None, -1) and trainer.max_steps < total_steps:
            raise UserError(
                f"the phases need {total_steps} optimizer steps ({self.schedule.total_tokens:,} tokens at "
                f"{tokens_per_step:,} tokens/step) but trainer.max_steps={trainer.max_steps}: raise it or set -1"
            )

    def _check_budgets(self, trainer, tokens_per_step: int, on_steps: TokenSchedule) -> None:
        """Fail before the first update if max_steps cannot cover the phases or a phase gets no step;
        warn where budgets round up and where a warmup leaves a phase's shape no step."""
        empty = [i for i, phase in enumerate(on_steps.phases) if phase.tokens == 0]
        if empty:
            phase = self.phases[empty[0]]
            raise UserError(
                f"ObjectiveSchedule.phases[{empty[0]}] ({phase.objective.name}, {phase.tokens:,} tokens) would never "
                f"train: it ends inside the optimizer step where it starts ({tokens_per_step:,} tokens/step); give it more tokens"
            )
        self._check_max_steps(trainer, tokens_per_step)
        for i, (phase, trained) in enumerate(zip(self.phases, on_steps.phases)):
            if trained.tokens != phase.tokens:  # where a phase ends is set by the budgets before it too
                boundary = on_steps.starts[i + 1]
                end = (f"step {boundary // tokens_per_step:,} ({boundary:,} tokens), the first step boundary at or after "
                       f"the budgets up to it ({self.schedule.starts[i + 1]:,})")
                if i < len(self.phases) - 1:
                    where = f"it ends at {end}, where the next phase's learning-rate shape starts"
                elif self.stop_after_last_phase:
                    where = f"the run ends at {end}"
                else:
                    where = f"its learning-rate shape ends at {end}; the run trains on at its final rate"
                steps = trained.tokens // tokens_per_step
                rank_zero_warn(
                    f"phase {i} ({phase.objective.name}) trains {trained.tokens:,} tokens "
                    f"({steps:,} step{'s' if steps != 1 else ''} of {tokens_per_step:,}) for its budget of "
                    f"{phase.tokens:,}: {where}"
                )
            self._warn_of_a_warmup_over_its_phase(i, trained)

    def _warn_of_a_warmup_over_its_phase(self, index: int, trained: PhaseLR) -> None:
        """A decay whose warmup fills its phase never decays, and a warmup longer than the phase's steps (the budget
        before it rounded up, shortening it) never reaches the peak: legal settings, most likely not the intent."""
        warmup, tokens = trained.warmup_tokens, trained.tokens
        if warmup < tokens or (warmup == tokens and trained.shape == "constant"):
            return
        never = "reaches the peak learning rate" if warmup > tokens else f"starts its {trained.shape}"
        rank_zero_warn(
            f"phase {index} ({self.phases[index].objective.name}) warms up over {warmup:,} tokens and "
            f"trains {tokens:,} (on the step grid): it never {never}; give it fewer warmup_tokens"
        )
