"""Phases switch at the exact token budget; the optimizer state carries over; only the LR shape restarts."""

import warnings

import lightning as L
import pytest
import torch

from callbacks import LayerFreeze, ObjectiveSchedule, Phase, TokenCheckpoint
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module
from recorders import SaveAt

ROWS, LENGTH = 2, 32
TOKENS_PER_STEP = ROWS * LENGTH


class PackedRows(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        pos = packed_position_ids([12, 20])
        while True:
            yield {"input_ids": torch.randint(0, 50000, (LENGTH,), generator=g), "position_ids": pos}


class Recorder(L.Callback):
    """Per optimizer step: objective, LR used, and the optimizer's state tensors (objects and values)."""

    def __init__(self):
        self.objectives, self.lrs, self.states_at_start, self.states_at_end = [], [], [], []
        self.group_lrs = []  # every param group's LR (``lrs`` is the first group's: the matrices')

    @staticmethod
    def snapshot(optimizer):
        return {id(p): {k: (v, v.clone()) for k, v in s.items()} for p, s in optimizer.state.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # runs after ObjectiveSchedule's hook (callback order), so it sees the state after any switch
        self.objectives.append(pl_module.objective.name)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.group_lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])
        self.states_at_start.append(self.snapshot(trainer.optimizers[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states_at_end.append(self.snapshot(trainer.optimizers[0]))


def fit(tokenizer_dir, phases, accumulate=1, stop_after_last_phase=True, max_steps=-1, logger=False,
        callbacks_extra=(), **trainer_kwargs):
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    recorder = Recorder()
    schedule = ObjectiveSchedule(phases, stop_after_last_phase=stop_after_last_phase)
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=accumulate,
        callbacks=[schedule, recorder, *callbacks_extra], logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    return module, trainer, recorder


def test_switch_at_exact_budget_and_stop_after_last_phase(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=3 * TOKENS_PER_STEP)]
    module, trainer, rec = fit(tokenizer_dir, phases)
    assert rec.objectives == ["clm"] * 5 + ["mlm"] * 3
    assert trainer.global_step == 8 and module.tokens_seen == 8 * TOKENS_PER_STEP


def test_without_stopping_after_the_last_phase_the_run_trains_on_at_its_final_rate(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP),
              Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP, lr="sqrt_decay", final_lr_ratio=0.25)]
    module, trainer, rec = fit(tokenizer_dir, phases, stop_after_last_phase=False, max_steps=6)
    assert rec.objectives == ["clm"] * 2 + ["mlm"] * 4 and trainer.global_step == 6
    assert rec.lrs[-2:] == [pytest.approx(0.25e-3)] * 2


@pytest.mark.parametrize("stopped, stops, said", [
    (None, True, False), (None, False, False), (2, True, True),
], ids=["finished", "trains-on", "stopped-in-phase-0"])
def test_only_a_run_stopped_before_its_last_phase_ended_says_where(tokenizer_dir, caplog, stopped, stops, said):
    """The "stopped in phase … --ckpt_path last continues the run" line: not after the phases ended the run, nor
    for a run that trains on after them (nothing left to continue)."""
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=TOKENS_PER_STEP)]
    with caplog.at_level("INFO"):
        fit(tokenizer_dir, phases, stop_after_last_phase=stops, max_steps=4 if stops else 5,
            callbacks_extra=[StopAt(stopped)] if stopped else ())
    lines = [m for m in caplog.messages if "stopped in phase" in m]
    assert lines == ([f"[ObjectiveSchedule] stopped in phase 0 (clm) at {2 * TOKENS_PER_STEP:,} of "
                      f"{4 * TOKENS_PER_STEP:,} tokens (step 2): --ckpt_path last continues the run"] if said else [])


def test_switch_waits_for_the_accumulation_boundary(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=4 * TOKENS_PER_STEP)]
    module, trainer, rec = fit(tokenizer_dir, phases, accumulate=2)
    # 2 micro-batches per step: the CLM phase is 2 optimizer steps = 4 micro-batches, never a mixed step
    assert rec.objectives == ["clm"] * 4 + ["mlm"] * 4
    assert module.tokens_per_step == 2 * TOKENS_PER_STEP


def test_optimizer_state_carries_over_the_switch(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
    _, trainer, rec = fit(tokenizer_dir, phases)
    assert rec.objectives[2:4] == ["clm", "mlm"]
    after_last_clm, entering_mlm = rec.states_at_end[2], rec.states_at_start[3]
    assert entering_mlm.keys() == after_last_clm.keys() and len(entering_mlm) == len(list(trainer.lightning_module.parameters()))
    for param_id, state in entering_mlm.items():
        for name, (tensor, value) in state.items():
            before_tensor, before_value = after_last_clm[param_id][name]
            assert tensor is before_tensor, f"optimizer state {name!r} was rebuilt at the switch"
            assert torch.equal(value, before_value), f"optimizer state {name!r} changed at the switch"
    steps = {value.item() for state in entering_mlm.values() for name, (_, value) in state.items() if name == "step"}
    assert steps == {3.0}  # three CLM updates already accumulated in the moments


def test_lr_follows_the_phase_shapes(tokenizer_dir):
    phases = [
        Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP, warmup_tokens=2 * TOKENS_PER_STEP),
        Phase(MaskedLM(), tokens=4 * TOKENS_PER_STEP, lr="sqrt_decay", final_lr_ratio=0.1),
    ]
    _, _, rec = fit(tokenizer_dir, phases)
    peak = 1e-3
    decay = [0.1 + 0.9 * (1 - (k / 4) ** 0.5) for k in range(4)]
    expected = [0.0, 0.5, 1.0, 1.0] + decay
    assert rec.lrs == pytest.approx([peak * m for m in expected], rel=1e-9, abs=1e-15)


def test_a_phase_switched_between_budgets_starts_its_shape_at_its_first_step(tokenizer_dir):
    """CLM of 2.5 steps switches after 3: MLM's decay starts there at exactly peak and spans the 4 steps left."""
    phases = [
        Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP // 2),
        Phase(MaskedLM(), tokens=4 * TOKENS_PER_STEP, lr="sqrt_decay", final_lr_ratio=0.1),
    ]
    module, _, rec = fit(tokenizer_dir, phases)
    assert rec.objectives == ["clm"] * 3 + ["mlm"] * 4 and module.tokens_seen == 7 * TOKENS_PER_STEP
    decay = [0.1 + 0.9 * (1 - (k / 4) ** 0.5) for k in range(4)]
    assert rec.lrs[3:] == pytest.approx([1e-3 * m for m in decay], rel=1e-9)


def fit_warnings(tokenizer_dir, phases, saying: str, **schedule) -> list[str]:
    """The warnings a fit of ``phases`` gives that hold ``saying``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tokenizer_dir, phases, **schedule)
    return [str(w.message) for w in caught if saying in str(w.message)]


def budget_warnings(tokenizer_dir, clm_steps, mlm_steps, **schedule) -> list[str]:
    phases = [Phase(CausalLM(), tokens=int(clm_steps * TOKENS_PER_STEP)),
              Phase(MaskedLM(), tokens=int(mlm_steps * TOKENS_PER_STEP))]
    return fit_warnings(tokenizer_dir, phases, "for its budget of", **schedule)


def test_the_rounding_warning_names_the_phases_whose_step_count_differs_from_their_budget(tokenizer_dir):
    """It tested each budget alone and spoke of a next phase after the last one: 2 CLM steps then 2.5 MLM steps had
    MLM 'switch where the next phase's shape starts'; 2.5 then 1.5 (4 in all) said nothing of MLM's 1 step. The end
    it named was the budgets' sum, not the step boundary, and a run training on past the last phase 'ended' there."""
    assert budget_warnings(tokenizer_dir, 2, 2.5) == [
        f"phase 1 (mlm) trains {3 * TOKENS_PER_STEP:,} tokens (3 steps of {TOKENS_PER_STEP:,}) for its budget of "
        f"{5 * TOKENS_PER_STEP // 2:,}: the run ends at step 5 ({5 * TOKENS_PER_STEP:,} tokens), the first step "
        f"boundary at or after the budgets up to it ({9 * TOKENS_PER_STEP // 2:,})"]
    trains_on, = budget_warnings(tokenizer_dir, 2, 2.5, stop_after_last_phase=False, max_steps=6)
    assert trains_on.endswith(f"its learning-rate shape ends at step 5 ({5 * TOKENS_PER_STEP:,} tokens), the first step "
                              f"boundary at or after the budgets up to it ({9 * TOKENS_PER_STEP // 2:,}); the run trains "
                              "on at its final rate")
    clm, mlm = budget_warnings(tokenizer_dir, 2.5, 1.5)
    assert clm.startswith("phase 0 (clm) trains") and clm.endswith("where the next phase's learning-rate shape starts")
    assert mlm.startswith(f"phase 1 (mlm) trains {TOKENS_PER_STEP:,} tokens (1 step of")


def warmup_warnings(tokenizer_dir, phases) -> list[str]:
    return fit_warnings(tokenizer_dir, phases, "warms up over")


def test_a_warmup_that_leaves_its_phase_no_decay_or_no_peak_is_warned_of(tokenizer_dir):
    """A decay warmed up over its whole phase never decays; a warmup the step grid made longer than its phase (the
    budget before it rounded up) never reaches the peak. A constant phase that is all warmup is a plain setting."""
    step = TOKENS_PER_STEP
    assert warmup_warnings(tokenizer_dir, [Phase(CausalLM(), tokens=2 * step, warmup_tokens=2 * step),
                                           Phase(MaskedLM(), tokens=2 * step, lr="sqrt_decay")]) == []
    assert warmup_warnings(tokenizer_dir, [Phase(CausalLM(), tokens=step), Phase(
        MaskedLM(), tokens=2 * step, lr="sqrt_decay", warmup_tokens=2 * step)]) == [
        f"phase 1 (mlm) warms up over {2 * step:,} tokens and trains {2 * step:,} (on the step grid): it never starts "
        "its sqrt_decay; give it fewer warmup_tokens"]
    shortened = [Phase(CausalLM(), tokens=step + step // 2),
                 Phase(MaskedLM(), tokens=step + step // 2, lr="linear_decay", warmup_tokens=step + step // 4)]
    assert warmup_warnings(tokenizer_dir, shortened) == [
        f"phase 1 (mlm) warms up over {step + step // 4:,} tokens and trains {step:,} (on the step grid): it never "
        "reaches the peak learning rate; give it fewer warmup_tokens"]


def test_a_phase_shorter_than_its_step_is_refused(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=TOKENS_PER_STEP + 8), Phase(MaskedLM(), tokens=8), Phase(CausalLM(), tokens=TOKENS_PER_STEP)]
    with pytest.raises(ValueError, match=r"phases\[1\] \(mlm, 8 tokens\) would never train"):
        fit(tokenizer_dir, phases)
    # the last phase too: CLM's 1.5 steps round up to 2, where a quarter-step decay would end without a step of its own
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP // 2), Phase(MaskedLM(), tokens=TOKENS_PER_STEP // 4)]
    with pytest.raises(ValueError, match=rf"phases\[1\] \(mlm, {TOKENS_PER_STEP // 4} tokens\) would never train"):
        fit(tokenizer_dir, phases)


class ValidationLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.losses.append(trainer.callback_metrics["val/mlm_loss"].item())


def test_validation_masks_the_same_tokens_at_every_evaluation(tokenizer_dir):
    """With frozen weights (learning rate 0) every evaluation gives the same MLM loss: the curve shows the model only."""
    module = tiny_module(tokenizer_dir, learning_rate=0.0)
    recorder = ValidationLosses()
    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    trainer = L.Trainer(max_steps=4, max_epochs=-1, callbacks=[recorder], limit_val_batches=2, val_check_interval=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, rows, val_dataloaders=rows)
    assert len(recorder.losses) == 2 and recorder.losses[0] == recorder.losses[1]


def test_validation_masks_do_not_depend_on_how_rows_are_split_into_micro_batches(tokenizer_dir):
    """Seeded by micro-batch and rank, as training is, validation's masks moved with the micro-batch and the GPU
    count: cpt validate on other GPUs did not give the logged figures, nor a resume on another layout its curve."""
    losses = []
    for micro_batch in (ROWS, 1):
        trainer = L.Trainer(limit_val_batches=2 * ROWS // micro_batch, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        module = tiny_module(tokenizer_dir, objective=MaskedLM(), model_config={"initializer_range": 0.2})
        (metrics,) = trainer.validate(module, torch.utils.data.DataLoader(PackedRows(), batch_size=micro_batch))
        losses.append(metrics["val/mlm_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_holdouts_figures_do_not_depend_on_its_place_among_the_validation_loaders(tokenizer_dir):
    """Seeded by the loader's index, a holdout's masks and figures moved when val_sources were listed in another
    order or one was validated alone: noise that reads as a difference between two runs."""
    rows = iter(torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    holdouts = {"a": [next(rows)], "b": [next(rows)]}
    figures = []
    for order in (["a", "b"], ["b", "a"], ["b"]):
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        module = tiny_module(tokenizer_dir, objective=MaskedLM(), model_config={"initializer_range": 0.2})
        per_loader = trainer.validate(module, [torch.utils.data.DataLoader(holdouts[name], batch_size=None)
                                               for name in order])
        key = "val/mlm_loss" if len(order) == 1 else "val/dataloader_{}/mlm_loss"
        figures.append({name: per_loader[place][key.format(place)] for place, name in enumerate(order)})
    assert figures[0] == pytest.approx(figures[1], rel=1e-6) and figures[2]["b"] == pytest.approx(figures[0]["b"], rel=1e-6)


def validate_through_both_phases(tokenizer_dir, **module_kwargs) -> dict[str, list[tuple[int, float]]]:
    """Two CLM steps then two MLM steps with frozen weights (learning rate 0), validating after every step:
    the ``val/*`` points logged, ``(step, value)``."""
    phases = [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
    logger = MemoryLogger()
    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, callbacks=[ObjectiveSchedule(phases)], logger=logger,
                        limit_val_batches=2, val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    # weights ten times the default scale: at the default, near-uniform logits hardly depend on the attention
    module = tiny_module(tokenizer_dir, learning_rate=0.0, model_config={"initializer_range": 0.2}, **module_kwargs)
    trainer.fit(module, rows, val_dataloaders=rows)
    return {tag: points for tag, points in logger.points.items() if tag.startswith("val/")}


def test_validation_objectives_judge_every_phase_by_the_same_objectives(tokenizer_dir):
    """With ``val_objectives`` every evaluation logs each listed objective under its key, whichever phase trains,
    and each under its own attention: the frozen weights give the values the trained objective's own validation
    gives in its phase (an MLM judged with the CLM phase's causal masks would differ)."""
    own = validate_through_both_phases(tokenizer_dir)
    assert {tag: [step for step, _ in points] for tag, points in own.items()} == {
        "val/clm_loss": [0, 1], "val/clm_accuracy": [0, 1], "val/mlm_loss": [2, 3], "val/mlm_accuracy": [2, 3]}
    both = validate_through_both_phases(tokenizer_dir, val_objectives={"next_token": CausalLM(), "mlm15": MaskedLM(0.15)})
    assert {tag: [step for step, _ in points] for tag, points in both.items()} == {
        f"val/{key}_{metric}": [0, 1, 2, 3] for key in ("next_token", "mlm15") for metric in ("loss", "accuracy")}
    clm_alone, mlm_alone = own["val/clm_loss"][0][1], own["val/mlm_loss"][0][1]
    assert clm_alone != pytest.approx(mlm_alone, rel=1e-4)  # values 100 times further apart than the tolerance below
    assert [value for _, value in both["val/next_token_loss"]] == pytest.approx([clm_alone] * 4, rel=1e-6)
    assert [value for _, value in both["val/mlm15_loss"]] == pytest.approx([mlm_alone] * 4, rel=1e-6)


class DoubledMaskedLM(MaskedLM):
    """An objective with its own loss (computed over dense logits, not by the fused loss): twice MaskedLM's."""

    def loss(self, logits, labels):
        return 2 * super().loss(logits, labels)


def test_a_validation_objective_with_its_own_loss_is_judged_by_it(tokenizer_dir):
    """The fused cross-entropy the trained objective uses must not stand in for a validation objective's own loss."""
    points = validate_through_both_phases(tokenizer_dir, val_objectives={"mlm": MaskedLM(), "doubled": DoubledMaskedLM()})
    doubled, plain = ([value for _, value in points[f"val/{key}_loss"]] for key in ("doubled", "mlm"))
    assert len(doubled) == 4 and doubled == pytest.approx([2 * value for value in plain], rel=1e-6)


def test_a_validation_key_that_names_another_phases_objective_is_refused(tokenizer_dir):
    """``val/mlm_loss`` of a CausalLM beside ``train/mlm_loss`` of the MLM phase read as one objective's curves
    (a MaskedLM of another rate under that key is the MLM baseline's kind of sharing, and allowed)."""
    with pytest.raises(UserError) as refused:
        validate_through_both_phases(tokenizer_dir, val_objectives={"clm": CausalLM(), "mlm": CausalLM()})
    assert str(refused.value) == (
        "model.init_args.val_objectives key 'mlm' (CausalLM) is the name of ObjectiveSchedule.phases[1] (MaskedLM): "
        "its val/mlm_loss would read as that phase's objective; give it a key of its own")
    assert validate_through_both_phases(tokenizer_dir, val_objectives={"mlm": MaskedLM(0.3)})["val/mlm_loss"]


@pytest.mark.parametrize("key", ["", "val/mlm", 15], ids=["empty", "slash", "not-a-string"])
def test_a_validation_objective_key_that_cannot_name_a_curve_is_refused(tokenizer_dir, key):
    with pytest.raises(UserError, match=r"val_objectives: key .* must be a name"):
        tiny_module(tokenizer_dir, val_objectives={key: MaskedLM()})


def test_a_malformed_validation_objective_is_refused_before_training(tokenizer_dir):
    """Checked and bound to the tokenizer when the module is built, not at the first validation hours later."""
    casual = CausalLM()
    casual.attention = "casual"
    with pytest.raises(UserError, match="attention='casual'"):
        tiny_module(tokenizer_dir, val_objectives={"clm": casual})
    module = tiny_module(tokenizer_dir, val_objectives={"mlm": MaskedLM()})
    assert module.val_objectives["mlm"].tokens == module.tokens


def test_budgets_beyond_max_steps_fail_before_training(tokenizer_dir):
    phases = [Phase(CausalLM(), tokens=10 * TOKENS_PER_STEP)]
    with pytest.raises(ValueError, match="max_steps=4"):
        module = tiny_module(tokenizer_dir)
        L.Trainer(max_steps=4, callbacks=[ObjectiveSchedule(phases)], logger=False, enable_progress_bar=False,
                  enable_checkpointing=False).fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    assert module.global_step == 0


def test_max_steps_must_cover_the_budgets_rounded_up_to_whole_steps(tokenizer_dir):
    """2.5 steps of tokens train in 3 steps: max_steps=3 trains them all, max_steps=2 is refused before the first
    step (it would end the run half a step before the phase's end, with no word)."""
    phases = [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP // 2)]
    module, trainer, _ = fit(tokenizer_dir, phases, max_steps=3)
    assert trainer.global_step == 3 and module.tokens_seen >= phases[0].tokens
    with pytest.raises(UserError, match=r"the phases need 3 optimizer steps .* trainer.max_steps=2"):
        fit(tokenizer_dir, phases, max_steps=2)


def test_the_mix_plan_counts_the_tokens_the_phases_train_in_whole_steps(tokenizer_dir):
    """2.5 steps of CLM and 2 of MLM train in 3 + 2 steps: the plan of what each source gives said 4.5 steps' tokens."""

    class Rows(L.LightningDataModule):
        planned = []

        def mix_plan(self, tokens, seen):
            self.planned.append((tokens, seen))
            return "[data] planned"

        def train_dataloader(self):
            return torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)

    phases = [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP // 2), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, callbacks=[ObjectiveSchedule(phases)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_module(tokenizer_dir), datamodule=Rows())
    assert trainer.global_step == 5 and Rows.planned == [(5 * TOKENS_PER_STEP, 0)]


def test_a_fresh_run_reports_no_learning_rate_mismatch(tokenizer_dir, recwarn):
    """Before the first batch the module already follows the phases' schedule, not its default warmup: a fresh
    run was told its "checkpoint's schedule had 0 × peak" where its first phase starts at peak."""
    fit(tokenizer_dir, [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP)])
    assert [str(w.message) for w in recwarn if "the checkpoint's schedule had" in str(w.message)] == []


@pytest.mark.parametrize("tokens", [0, -5, 1.5])
def test_non_positive_budget_is_refused(tokens):
    with pytest.raises(ValueError, match=r"phases\[0\].tokens"):
        ObjectiveSchedule([Phase(CausalLM(), tokens=tokens)])


def test_empty_phase_list_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ObjectiveSchedule([])


@pytest.mark.parametrize("phases_trained, objective", [(1, "clm"), (2, "mlm")], ids=["clm-phase", "mlm-phase"])
def test_validating_a_checkpoint_uses_the_objective_of_its_phase(tokenizer_dir, tmp_path, phases_trained, objective):
    """``cpt validate`` restores weights, not the step: every checkpoint was judged by phase 0's CLM loss,
    a final MLM-phase model included."""
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]

    def trainer(schedule, **kwargs):
        return L.Trainer(callbacks=[schedule], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kwargs)

    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    training = trainer(ObjectiveSchedule(phases[:phases_trained]), max_steps=-1, max_epochs=-1)
    training.fit(tiny_module(tokenizer_dir, learning_rate=1e-3), rows)
    training.save_checkpoint(tmp_path / "checkpoint.ckpt")  # the end of the CLM phase, or of the MLM phase

    validation = trainer(ObjectiveSchedule(phases), limit_val_batches=2)
    (metrics,) = validation.validate(tiny_module(tokenizer_dir), rows, ckpt_path=tmp_path / "checkpoint.ckpt")
    assert sorted(metrics) == [f"val/{objective}_accuracy", f"val/{objective}_loss"]


def test_validating_with_val_objectives_names_no_phase_objective(tokenizer_dir, caplog):
    """The module validates by its ``val_objectives`` then: "validating with phase 1's objective" was untrue."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=TOKENS_PER_STEP)])
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    checkpoint = {"global_step": 4, "tokens_per_step": TOKENS_PER_STEP}
    with caplog.at_level("INFO"):
        schedule.on_load_checkpoint(trainer, tiny_module(tokenizer_dir), checkpoint)
        assert "validating with phase 1's objective (mlm)" in caplog.text
        caplog.clear()
        schedule.on_load_checkpoint(trainer, tiny_module(tokenizer_dir, val_objectives={"clm": CausalLM()}), checkpoint)
        assert "validating with phase" not in caplog.text


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step == self.step


def run(module, phases, ckpt_path=None, stop_at=None, freezes=(), **trainer_kwargs):
    """Fit ``module`` through ``phases`` (optionally from a checkpoint, optionally stopping after a step)."""
    recorder = Recorder()
    callbacks = [ObjectiveSchedule(phases), *freezes, recorder, *([StopAt(stop_at)] if stop_at else [])]
    trainer = L.Trainer(**{"max_steps": -1, "enable_checkpointing": False, **trainer_kwargs}, max_epochs=-1,
                        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS), ckpt_path=ckpt_path)
    return trainer, recorder


def steps(clm, mlm):
    """CLM detour then an MLM decay, budgets in optimizer steps."""
    return [Phase(CausalLM(), tokens=clm * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=mlm * TOKENS_PER_STEP, lr="sqrt_decay")]


def test_resuming_with_other_optimizer_settings_applies_them_from_the_resume(tokenizer_dir, tmp_path):
    """The restored optimizer state carried the checkpoint's learning rate (and betas, eps, weight decay)
    over the config's: NonFiniteGuard's advice "lower the learning rate, then resume" changed nothing,
    while the config and the model card recorded the lower rate."""
    phases = steps(3, 3)
    settings = dict(learning_rate=1e-4, betas=[0.8, 0.9], eps=1e-7, weight_decay=0.1)
    _, reference = run(tiny_module(tokenizer_dir, **settings), phases)
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), phases, stop_at=4)  # into the MLM phase
    interrupted.save_checkpoint(tmp_path / "step4.ckpt")
    resumed, recorder = run(tiny_module(tokenizer_dir, **settings), phases, ckpt_path=tmp_path / "step4.ckpt")
    assert recorder.lrs == pytest.approx(reference.lrs[4:], rel=1e-9)  # the decay's shape, at the new peak
    decay, no_decay = resumed.optimizers[0].param_groups
    assert (decay["betas"], decay["eps"], decay["weight_decay"], no_decay["weight_decay"]) == ((0.8, 0.9), 1e-7, 0.1, 0.0)


def test_a_longer_last_phase_resumes_on_its_own_schedule_from_the_first_step(tokenizer_dir, tmp_path):
    """Extending a finished run's decay: its first resumed step trained at the rate the old schedule left
    in the optimizer (0.1 × peak, the old decay's end), the next ones on the new decay (×3.6 higher)."""
    finished, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 3))
    finished.save_checkpoint(tmp_path / "last.ckpt")
    _, reference = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 6))
    with pytest.warns(UserWarning, match=r"step 6 is 0\.3636 × peak under this config's phases; the checkpoint's schedule had 0\.1 × peak"):
        _, extended = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 6), ckpt_path=tmp_path / "last.ckpt")
    assert extended.lrs == pytest.approx(reference.lrs[6:], rel=1e-9)


def test_every_param_group_resumes_on_the_configs_schedule(tokenizer_dir, tmp_path):
    """The biases and norm weights (the second param group) follow the schedule too: resumed under a longer
    decay, their first step kept the rate the old schedule left (0.1 × peak) while the matrices' moved on."""
    finished, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 3))
    finished.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="the checkpoint's schedule had 0.1 × peak"):
        _, extended = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 6), ckpt_path=tmp_path / "last.ckpt")
    assert len(extended.group_lrs) == 3 and all(len(lrs) == 2 for lrs in extended.group_lrs)
    assert [lrs[1] for lrs in extended.group_lrs] == pytest.approx(extended.lrs, rel=1e-12)


def test_resuming_with_another_global_batch_is_refused(tokenizer_dir, tmp_path):
    """The token clock is optimizer steps × tokens per step: resumed at twice the tokens per step, the two
    steps trained (128 tokens) would count as 256, the end of this CLM phase, and the run would go on in MLM."""
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 4), stop_at=2)
    interrupted.save_checkpoint(tmp_path / "step2.ckpt")
    with pytest.raises(UserError, match=r"tokens per optimizer step changed from 64 \(checkpoint\) to 128 \(2 → 4 rows "
                                        r"of 32 tokens\): keep the rows per step \(GlobalBatch.sequences, or "):
        run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 4), ckpt_path=tmp_path / "step2.ckpt",
            accumulate_grad_batches=2)


def test_resuming_a_finished_run_trains_no_step(tokenizer_dir, tmp_path):
    """A requeued job rerunning ``--ckpt_path last`` after the last phase: no step past the budget (one
    more at the final rate, and a last.ckpt past the end, before the first batch's check stopped it)."""
    finished, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2))
    finished.save_checkpoint(tmp_path / "last.ckpt")
    resumed, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4 and recorder.objectives == []


def test_a_last_phase_shortened_below_its_checkpoint_is_refused_and_to_it_saves_its_end(tokenizer_dir, tmp_path):
    """Resumed 2 steps into a 4-step decay: the decay shortened to 1 step was "already done", exit 0, where an earlier
    phase shortened so is refused; shortened to 2 steps (the refusal's advice) it was done too, with no model of its
    end, as no step trained to save one."""
    from callbacks import PhaseEndExport

    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 4), stop_at=4)
    interrupted.save_checkpoint(tmp_path / "step4.ckpt")
    for max_steps in (-1, 4):  # 4: the checkpoint's step, where Lightning skips the training loop and its hooks
        with pytest.raises(UserError, match=rf"the checkpoint \({4 * TOKENS_PER_STEP} tokens seen\) trained past "
                                            rf"this config's last phase, which ends at token {3 * TOKENS_PER_STEP}: .* "
                                            rf"give phases\[1\] \(mlm\) tokens: {2 * TOKENS_PER_STEP}"):
            run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 1), ckpt_path=tmp_path / "step4.ckpt",
                max_steps=max_steps)
    export = tmp_path / "export"
    _, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2), ckpt_path=tmp_path / "step4.ckpt",
                      freezes=[PhaseEndExport(str(export), export=False)])
    assert recorder.objectives == [] and sorted(path.name for path in export.iterdir()) == ["phase1-mlm.ckpt"]
    assert torch.load(export / "phase1-mlm.ckpt", weights_only=False)["global_step"] == 4
    saved = (export / "phase1-mlm.ckpt").stat().st_mtime_ns
    run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2), ckpt_path=export / "phase1-mlm.ckpt",
        freezes=[PhaseEndExport(str(export), export=False)])  # a rerun of the finished run keeps it
    assert (export / "phase1-mlm.ckpt").stat().st_mtime_ns == saved
    longer = tmp_path / "longer"  # the whole longer run's phase end and checkpoints, where the shortened branch saves
    saving = lambda: [PhaseEndExport(str(longer), export=False),  # noqa: E731
                      TokenCheckpoint(dirpath=str(longer / "ckpt"), every_n_train_steps=2)]
    run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 4), freezes=saving(), enable_checkpointing=True)
    run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2), ckpt_path=longer / "ckpt" / "step000000004.ckpt",
        freezes=saving(), enable_checkpointing=True)
    assert torch.load(longer / "phase1-mlm.ckpt", weights_only=False)["global_step"] == 4
    aside = longer / "after-step000000004-set-aside" / "phase1-mlm.ckpt"
    assert torch.load(aside, weights_only=False)["global_step"] == 6
    later = sorted(path.name for path in (longer / "ckpt" / "after-step000000004-set-aside").iterdir())
    assert later == ["last.ckpt", "step000000006.ckpt"]  # no validation ran: the branch trained nothing, saved nothing
    assert torch.load(longer / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4
    for max_steps in (-1, 4):  # the phases that disagree named first, whether Lightning skips the loop or not
        with pytest.raises(UserError, match=r"but this config's phases give those tokens clm from token 0, then mlm "
                                            rf"from token {TOKENS_PER_STEP}"):
            run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(1, 2), ckpt_path=tmp_path / "step4.ckpt",
                max_steps=max_steps)


def test_an_earlier_phase_shortened_to_its_checkpoint_saves_its_end_then_trains_the_next(tokenizer_dir, tmp_path):
    """Resumed 2 steps into a 4-step CLM detour with the detour shortened to those 2 steps (the refusal's advice for
    a shorter one): the run went on into the decay, and the detour's end model, which no step it trains passes, was
    never saved (only the last phase's was looked for at a resume)."""
    from callbacks import PhaseEndExport

    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 2), stop_at=2)
    interrupted.save_checkpoint(tmp_path / "step2.ckpt")
    export = tmp_path / "export"
    _, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(2, 2), ckpt_path=tmp_path / "step2.ckpt",
                      freezes=[PhaseEndExport(str(export), export=False)])
    assert recorder.objectives == ["mlm", "mlm"]
    assert sorted(path.name for path in export.iterdir()) == ["phase0-clm.ckpt", "phase1-mlm.ckpt"]
    ends = {name: torch.load(export / f"{name}.ckpt", weights_only=False) for name in ("phase0-clm", "phase1-mlm")}
    assert {name: ckpt["global_step"] for name, ckpt in ends.items()} == {"phase0-clm": 2, "phase1-mlm": 4}
    trained = torch.load(tmp_path / "step2.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(trained[key], value) for key, value in ends["phase0-clm"]["state_dict"].items())


def test_a_run_that_trains_on_past_its_phases_resumes_at_its_max_steps_without_a_refusal(tokenizer_dir, tmp_path):
    """``stop_after_last_phase: false`` trains on after the last phase's budget until ``max_steps``: its requeue at
    that step is done, not "past this config's last phase"."""
    def fit(ckpt_path=None):
        trainer = L.Trainer(max_steps=6, max_epochs=-1, callbacks=[ObjectiveSchedule(steps(2, 2), False)],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(tiny_module(tokenizer_dir, learning_rate=1e-3),
                    torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS), ckpt_path=ckpt_path)
        return trainer

    fit().save_checkpoint(tmp_path / "last.ckpt")
    assert fit(tmp_path / "last.ckpt").global_step == 6


@pytest.mark.parametrize("decoupled", [False, True], ids=["torch-weight-decay", "decoupled-weight-decay"])
def test_a_run_without_phases_resumes_at_the_configured_learning_rate(tokenizer_dir, tmp_path, caplog, decoupled):
    """No ObjectiveSchedule re-applies the schedule at the first batch: the checkpoint's rate must be replaced
    at the start, or the first resumed step trains at the old one (the rate NonFiniteGuard advised lowering). The
    log names the learning rate alone: torch's value of a decoupled weight decay (config's / peak) changes with the
    peak, and was reported as the config's weight_decay changing."""

    def fit_steps(module, max_steps, ckpt_path=None):
        recorder = Recorder()
        trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=[recorder], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS), ckpt_path=ckpt_path)
        return trainer, recorder

    settings = dict(warmup_tokens=4 * TOKENS_PER_STEP, weight_decay=0.1, decoupled_weight_decay=decoupled)
    first, _ = fit_steps(tiny_module(tokenizer_dir, learning_rate=1e-3, **settings), max_steps=2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    with caplog.at_level("INFO"):
        _, resumed = fit_steps(tiny_module(tokenizer_dir, learning_rate=1e-4, **settings), max_steps=4,
                               ckpt_path=tmp_path / "step2.ckpt")
    assert [lr for lrs in resumed.group_lrs for lr in lrs] == pytest.approx([0.5e-4] * 2 + [0.75e-4] * 2, rel=1e-9)  # steps 2, 3
    assert "resumed with the config's learning_rate (the checkpoint had others) from step 2" in caplog.text


def test_a_decay_branched_off_a_clm_checkpoint_starts_at_peak_with_the_optimizer_state(tokenizer_dir, tmp_path):
    """An MLM decay after 3 steps of a 6-step detour: the branch trains the decay a 3 + 3 run trains,
    from the parent's step-3 weights and AdamW moments."""
    parent, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(6, 3), stop_at=3)
    parent.save_checkpoint(tmp_path / "step3.ckpt")
    _, reference = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 3))
    branch, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(3, 3), ckpt_path=tmp_path / "step3.ckpt")
    assert recorder.objectives == ["mlm"] * 3 and branch.global_step == 6
    assert recorder.lrs == pytest.approx(reference.lrs[3:], rel=1e-9) and recorder.lrs[0] == pytest.approx(1e-3)
    exp_avg_sq = next(iter(recorder.states_at_start[0].values()))["exp_avg_sq"][1]
    assert exp_avg_sq.abs().sum() > 0  # the moments came with it


@pytest.mark.parametrize("parent, branch, hint", [
    ((6, 2), (2, 4), r"end phases\[0\] \(clm\) there: tokens: 256"),  # the checkpoint is past the branch's CLM budget
    ((2, 4), (4, 2), r"end phases\[1\] \(mlm\) there: tokens: 128"),  # it is inside a decay the branch starts later
    ((2, 4), (3, 3), r"mlm from token 128.*mlm from token 192"),  # the same objectives, the switch a step later
], ids=["past_the_clm_budget", "inside_a_decay", "a_moved_switch"])
def test_a_config_that_gives_the_trained_tokens_other_objectives_is_refused(tokenizer_dir, tmp_path, parent, branch, hint):
    """Resumed at step 4 under phases that disagree with what steps 0-3 trained, the run started mid-phase
    silently: mid-decay at a stale rate, with a model card misstating each phase's tokens."""
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(*parent), stop_at=4)
    interrupted.save_checkpoint(tmp_path / "step4.ckpt")
    with pytest.raises(UserError, match=r"the checkpoint \(256 tokens seen\) trained clm from token 0.*" + hint):
        run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(*branch), ckpt_path=tmp_path / "step4.ckpt")


def baseline(*phases):
    """The matched baseline's MLM phases, given as (mask rate, optimizer steps)."""
    return [Phase(MaskedLM(mask_rate=rate), tokens=n * TOKENS_PER_STEP) for rate, n in phases]


@pytest.fixture
def baseline_step4(tokenizer_dir, tmp_path):
    """Step 4 of the baseline: 3 steps of MLM at 30%, then one of the 15% phase."""
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.3, 3), (0.15, 3)), stop_at=4)
    interrupted.save_checkpoint(tmp_path / "step4.ckpt")
    return tmp_path / "step4.ckpt"


@pytest.mark.parametrize("phases, refusal", [
    (((0.15, 3), (0.15, 3)), r"trained phases\[0\] \(mlm\) with mask_rate=0\.3, but this config gives it mask_rate=0\.15: "
                             r"put back mask_rate=0\.3$"),
    (((0.3, 3), (0.2, 3)), r"trained phases\[1\] \(mlm\) with mask_rate=0\.15, but this config gives it mask_rate=0\.2: "
                           r"put back mask_rate=0\.15, or, to train on with mask_rate=0\.2, end phases\[1\] \(mlm\) there: "
                           r"tokens: 64 and add a phase after it with mask_rate=0\.2"),
], ids=["a_finished_phase", "the_phase_in_progress"])
def test_a_config_that_gives_the_trained_tokens_other_settings_is_refused(tokenizer_dir, baseline_step4, phases, refusal):
    """The names and switches agreed, so the baseline resumed its 15% phase at 20%, or under the 15% masking of
    the detour config, while its model card stated the new setting for every token of the phase."""
    with pytest.raises(UserError, match=r"the checkpoint \(256 tokens seen\) " + refusal):
        run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline(*phases), ckpt_path=baseline_step4)


def test_a_resume_at_its_max_steps_checks_the_last_steps_phase_too(tokenizer_dir, baseline_step4):
    """With max_steps at the checkpoint's step Lightning skips the training loop, and the history is checked at the
    end instead: the step that began the 15% phase must be in it, or the run ended "done" under 20%."""
    for max_steps in (-1, 4):
        with pytest.raises(UserError, match=r"trained phases\[1\] \(mlm\) with mask_rate=0\.15, but this config gives "
                                            r"it mask_rate=0\.2"):
            run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.3, 3), (0.2, 1)), ckpt_path=baseline_step4,
                max_steps=max_steps)


def test_following_the_hint_trains_the_new_settings_from_the_checkpoint(tokenizer_dir, baseline_step4):
    """What the refusal advises is accepted, as is any change to phases not yet trained."""
    phases = [*baseline((0.3, 3), (0.15, 1), (0.2, 2)), Phase(CausalLM(), tokens=TOKENS_PER_STEP)]
    resumed, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), phases, ckpt_path=baseline_step4)
    assert resumed.global_step == 7 and recorder.objectives == ["mlm", "mlm", "clm"]


@pytest.mark.parametrize("parent, branch, refusal", [
    (("0-1",), (), r"trained phases\[0\] \(clm\) with LayerFreeze\.layers=\[0, 1\], but this config gives it "
                   r"LayerFreeze\.layers=\[\]: put back LayerFreeze\.layers=\[0, 1\]$"),
    (("0-1",), ("0-2",), r"trained phases\[0\] \(clm\) with LayerFreeze\.layers=\[0, 1\], but this config gives it "
                         r"LayerFreeze\.layers=\[0, 1, 2\]"),
    ((), ("0-1",), r"trained phases\[0\] \(clm\) with LayerFreeze\.layers=\[\], but"),
], ids=["unfrozen", "other_layers", "frozen"])
def test_a_config_that_freezes_the_trained_tokens_otherwise_is_refused(tokenizer_dir, tmp_path, parent, branch, refusal):
    """The freeze ablation resumed under the detour's config trained on unfrozen, and its card read as the
    detour's: the intervention that tells where the benefit lives was lost without a word."""
    freezes = lambda specs: [LayerFreeze(spec) for spec in specs]
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 2), stop_at=2, freezes=freezes(parent))
    interrupted.save_checkpoint(tmp_path / "step2.ckpt")
    with pytest.raises(UserError, match=r"the checkpoint \(128 tokens seen\) " + refusal):
        run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 2), ckpt_path=tmp_path / "step2.ckpt",
            freezes=freezes(branch))
    resumed, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), steps(4, 2), ckpt_path=tmp_path / "step2.ckpt",
                     freezes=[*freezes(parent), *(LayerFreeze(spec, during="mlm") for spec in branch)])  # MLM untrained
    assert resumed.global_step == 6


def test_a_branch_off_a_phase_end_may_change_the_phase_it_has_not_trained(tokenizer_dir, tmp_path):
    """A checkpoint exactly at the switch (a phase-end one) trained none of the next phase: another mask rate
    there is a branch, not a change to what was trained."""
    interrupted, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.3, 4), (0.3, 2)), stop_at=4)
    interrupted.save_checkpoint(tmp_path / "step4.ckpt")
    branch, recorder = run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.3, 4), (0.15, 2)),
                           ckpt_path=tmp_path / "step4.ckpt")
    assert branch.global_step == 6 and recorder.objectives == ["mlm", "mlm"]


def test_a_checkpoint_that_saved_no_settings_is_checked_on_names_and_switches(tokenizer_dir, baseline_step4):
    """Checkpoints written before the settings were part of the history still resume and branch."""
    checkpoint = torch.load(baseline_step4, weights_only=False)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("ObjectiveSchedule")]
    state["phases"] = [phase[:2] for phase in state["phases"]]
    torch.save(checkpoint, baseline_step4)
    resumed, _ = run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.15, 3), (0.15, 3)), ckpt_path=baseline_step4)
    assert resumed.global_step == 6
    with pytest.raises(UserError, match=r"mlm from token 192, but this config's phases give those tokens mlm from token 0, then mlm from token 128"):
        run(tiny_module(tokenizer_dir, learning_rate=1e-3), baseline((0.3, 2), (0.15, 4)), ckpt_path=baseline_step4)


class MemoryLogger(L.pytorch.loggers.Logger):
    name, version, experiment = "memory", "0", None

    def __init__(self):
        super().__init__()
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics, step=None):
        for tag, value in metrics.items():
            self.points.setdefault(tag, []).append((step, value))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class MicroBatchLosses(L.Callback):
    """Each micro-batch's loss and how many positions it predicted."""

    def __init__(self):
        self.losses, self.predicted = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["mean_loss"]))
        self.predicted.append(outputs["predicted"])

    def token_mean(self, first_step, last_step, accumulate=2):
        """The loss over every predicted position of steps ``first_step..last_step``."""
        window = range(accumulate * first_step, accumulate * (last_step + 1))
        return sum(self.losses[i] * self.predicted[i] for i in window) / sum(self.predicted[i] for i in window)


def test_curves_cover_every_step_at_the_step_they_end_and_train_loss_is_the_steps_mean(tokenizer_dir):
    """train/loss was the step's last micro-batch; the CLM window closed by the switch was drawn at the first
    MLM step; the steps after the last full window were never drawn. A curve's point is its window's loss
    per predicted position (MLM micro-batches predict different numbers of positions), train/loss its step's."""
    logger, losses = MemoryLogger(), MicroBatchLosses()
    phases = [Phase(CausalLM(), tokens=3 * 2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=4 * 2 * TOKENS_PER_STEP)]
    fit(tokenizer_dir, phases, accumulate=2, logger=logger, log_every_n_steps=2, callbacks_extra=[losses])
    points = logger.points
    assert [step for step, _ in points["train/clm_loss"]] == [1, 2]  # every 2 steps, then the switch after step 2
    assert [step for step, _ in points["train/mlm_loss"]] == [3, 5, 6]  # ..., and the end after step 6
    assert [value for _, value in points["train/clm_loss"]] == pytest.approx(
        [losses.token_mean(0, 1), losses.token_mean(2, 2)], rel=1e-5)
    assert len(set(losses.predicted[6:])) > 1 and [value for _, value in points["train/mlm_loss"]] == pytest.approx(
        [losses.token_mean(3, 3), losses.token_mean(4, 5), losses.token_mean(6, 6)], rel=1e-5)
    assert [step for step, _ in points["train/loss"]] == [1, 3, 5, 6]  # Lightning also logs the last step
    assert [value for _, value in points["train/loss"]] == pytest.approx(  # per position, as the gradient weighs them
        [losses.token_mean(s, s) for s in (1, 3, 5, 6)], rel=1e-5)


def test_a_checkpoint_draws_the_steps_since_the_last_point(tokenizer_dir, tmp_path):
    """The metrics are not in the checkpoint: a run preempted between two points lost those steps' values."""
    logger = MemoryLogger()
    fit(tokenizer_dir, [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP)], logger=logger, log_every_n_steps=100,
        callbacks_extra=[SaveAt(2, tmp_path / "preempted.ckpt")])
    assert [step for step, _ in logger.points["train/clm_loss"]] == [1, 4]
