"""TokenValidation: validation on the token clock, at the same optimizer steps on any hardware and after a resume."""

import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import ObjectiveSchedule, Phase, TokenValidation
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module
from recorders import SaveAt
from test_objective_schedule import MemoryLogger

LENGTH, SEQUENCES = 32, 4  # rows per optimizer step, however they are split into micro-batches
TOKENS_PER_STEP = SEQUENCES * LENGTH
STEPS = 6


class Rows(torch.utils.data.IterableDataset):
    def __init__(self, seed=0):
        self.seed = seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield {"input_ids": torch.randint(1000, 20000, (LENGTH,), generator=g), "position_ids": packed_position_ids([12, 20])}


class StopAfter(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def validated_steps(tokenizer_dir, every_n_tokens, micro_batch_size=2, rows=None, steps=STEPS, save_after=None,
                    phases=None, stop_after_last_phase=True, callbacks=(), tags=False, val_sources=0, **fit_kwargs):
    """The x of the validation loss points of a run of ``steps`` optimizer steps of SEQUENCES rows (or of
    ``phases``), from ``rows`` (default: endless); stopped after step ``save_after`` into
    ``fit_kwargs["default_root_dir"]``/stopped.ckpt. ``tags``: (tag, x, value) of each point. ``val_sources``: held-out
    loaders of their own (default: the training rows)."""
    logger = MemoryLogger()
    phases = phases or [Phase(CausalLM(), tokens=steps * TOKENS_PER_STEP)]
    callbacks = [ObjectiveSchedule(phases, stop_after_last_phase), TokenValidation(every_n_tokens), *callbacks]
    if save_after is not None:
        callbacks.append(StopAfter(save_after))
    ckpt_path = fit_kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(**{"max_steps": -1, "max_epochs": -1, "enable_checkpointing": False, **fit_kwargs},
                        accumulate_grad_batches=SEQUENCES // micro_batch_size,
                        callbacks=callbacks, logger=logger, limit_val_batches=2, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(rows or Rows(), batch_size=micro_batch_size)
    held_out = [torch.utils.data.DataLoader(Rows(seed), batch_size=micro_batch_size) for seed in range(1, 1 + val_sources)]
    trainer.fit(tiny_module(tokenizer_dir), loader, val_dataloaders=held_out or loader, ckpt_path=ckpt_path)
    if save_after is not None:
        trainer.save_checkpoint(f"{trainer.default_root_dir}/stopped.ckpt")
    points = [(tag, step, value) for tag in ("val/clm_loss", "val/mlm_loss") for step, value in logger.points.get(tag, [])]
    return sorted(points, key=lambda point: point[1]) if tags else sorted(step for _, step, _ in points)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4], ids=["accumulate-4", "accumulate-2", "accumulate-1"])
def test_validation_falls_on_the_same_steps_however_a_step_is_split(tokenizer_dir, micro_batch_size):
    """Every 2 steps' tokens: after steps 2, 4 and 6 (drawn at x = 1, 3, 5, where Lightning draws a step's
    validation), whether a step is 4 micro-batches (fewer GPUs) or 1 (more)."""
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, micro_batch_size) == [1, 3, 5]


def test_a_budget_between_steps_validates_at_the_next_whole_step(tokenizer_dir):
    assert validated_steps(tokenizer_dir, 3 * TOKENS_PER_STEP // 2) == [1, 3, 5]
    assert validated_steps(tokenizer_dir, 5 * TOKENS_PER_STEP) == [4, 5]  # and when training ends


@pytest.mark.parametrize("clm_tokens", [3 * TOKENS_PER_STEP, 5 * TOKENS_PER_STEP // 2], ids=["on-a-step", "inside-a-step"])
def test_the_model_each_phase_ends_with_is_validated(tokenizer_dir, clm_tokens):
    """Every 4 steps' tokens, 3 CLM steps then 3 MLM steps: the model the detour hands on (after step 3, x = 2) was
    validated only after step 4, one MLM step in (at the recipes' scale: 5 steps after the switch, 154 before it)."""
    phases = [Phase(CausalLM(), tokens=clm_tokens), Phase(MaskedLM(), tokens=3 * TOKENS_PER_STEP)]
    assert validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, phases=phases) == [2, 3, 5]


def test_a_run_that_trains_past_its_phases_validates_their_end_and_its_own(tokenizer_dir):
    """``stop_after_last_phase: false`` and ``max_steps: 5`` after a 3-step phase, every 2 steps' tokens: the
    phases' end (step 3, x = 2) and the run's (step 5, x = 4) were not validated, while PhaseEndExport saved the
    first."""
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, steps=3, stop_after_last_phase=False,
                           max_steps=5) == [1, 2, 3, 4]


def test_a_max_time_stop_validates_only_where_a_point_is_due(tokenizer_dir):
    """Lightning validates wherever a callback stops the run; the whole holdout, off the grid, before last.ckpt is
    saved, spent the margin a max_time leaves before a job's limit."""
    from callbacks import StepTimer

    class SpentByTheFirstStep(StepTimer):
        def on_fit_start(self, *args, **kwargs):  # no budget: Lightning's Timer would stop before the first step
            pass

    assert validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, callbacks=[SpentByTheFirstStep("00:00:00:00")]) == []
    assert validated_steps(tokenizer_dir, TOKENS_PER_STEP, callbacks=[SpentByTheFirstStep("00:00:00:00")]) == [0]


def test_a_stop_another_callback_makes_is_validated_as_lightning_does(tokenizer_dir):
    """StepTimer holds back only the validation of its own stop: the recipes list one without a duration."""
    from callbacks import StepTimer

    assert validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, callbacks=[StopAfter(2), StepTimer()]) == [1]


@pytest.mark.parametrize("every_n_epochs, due", [(None, True), (1, False)], ids=["token-grid", "per-epoch"])
def test_a_validation_is_due_by_the_runs_micro_batches_on_the_token_grid(every_n_epochs, due):
    """TokenValidation counts micro-batches over the run (its grid goes on across epochs); Lightning's per-epoch
    cadence counts them in the epoch."""
    from callbacks.step_timer import validation_due

    loop = SimpleNamespace(total_batch_idx=9, batch_idx=2)  # the 10th micro-batch of the run, the 3rd of its epoch
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop), val_check_batch=10,
                              check_val_every_n_epoch=every_n_epochs)
    assert validation_due(trainer) is due


def test_a_fast_dev_run_validates(tokenizer_dir):
    """The README's smoke test runs the checks: with the grid in place its 2 steps validated nothing, so a broken
    validation surfaced at the first real point, 500M tokens into a recipe run."""
    class CountBatches(L.Callback):
        batches = 0

        def on_validation_batch_end(self, *args):
            self.batches += 1

    counted = CountBatches()
    validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, callbacks=[counted], fast_dev_run=2)
    assert counted.batches == 2


def test_a_resumed_run_validates_on_the_same_token_grid(tokenizer_dir, tmp_path):
    """Stopped after step 3 and resumed: the validations after steps 4 and 6 still come every 2 steps' tokens
    from the start of the run, not from the resume."""
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, save_after=3, default_root_dir=tmp_path) == [1, 2]
    saved = torch.load(tmp_path / "stopped.ckpt", weights_only=False)
    assert saved["phase_ends_validated_since_step"] == 0 and "TokenValidation" not in saved["callbacks"]
    del saved["phase_ends_validated_since_step"]  # as a run before TokenValidation validated phase ends saved it
    torch.save(saved, tmp_path / "earlier.ckpt")
    validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, ckpt_path=tmp_path / "earlier.ckpt", save_after=4,
                    default_root_dir=tmp_path / "later")
    assert torch.load(tmp_path / "later" / "stopped.ckpt", weights_only=False)["phase_ends_validated_since_step"] == 3
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, ckpt_path=tmp_path / "stopped.ckpt") == [3, 5]


class SavedThenValidationFails(SaveAt):
    """A TokenCheckpoint's save at ``step`` (before that step's validation), then a validation that never ends: a
    kill, an OOM, a lost node."""
    def on_validation_start(self, trainer, *args):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError("killed while validating")


@pytest.mark.parametrize("killed_at, resumed", [(4, [3, 5]), (6, [5])], ids=["on-the-grid", "the-last-step"])
def test_a_resume_from_a_step_whose_validation_was_cut_off_validates_it_first(tokenizer_dir, tmp_path, killed_at,
                                                                                resumed):
    """The point was lost for good; at the last step the rerun trained nothing, validated nothing and exited 0."""
    path, every_2_steps = tmp_path / "saved.ckpt", 2 * TOKENS_PER_STEP
    uninterrupted = validated_steps(tokenizer_dir, every_2_steps, tags=True, val_sources=2)
    with pytest.raises(RuntimeError, match="killed while validating"):
        validated_steps(tokenizer_dir, every_2_steps, callbacks=[SavedThenValidationFails(killed_at, path)], val_sources=2)
    points = validated_steps(tokenizer_dir, every_2_steps, ckpt_path=path, tags=True, val_sources=2)
    assert [x for _, x, _ in points] == resumed
    # the run's own validation of that step: every held-out loader whole (the earlier one's counters, restored
    # from the checkpoint, had it read the first loader alone), the same weights
    tag, x, value = next(point for point in uninterrupted if point[1] == killed_at - 1)
    assert points[0] == (tag, x, pytest.approx(value, rel=1e-6))
    # the CLM phase ending on step 3 or inside it (its last step starts in CLM: validated with CLM's objective)
    for clm_tokens in (3 * TOKENS_PER_STEP, 5 * TOKENS_PER_STEP // 2):
        phases = [Phase(CausalLM(), tokens=clm_tokens), Phase(MaskedLM(), tokens=3 * TOKENS_PER_STEP)]
        uninterrupted = validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, phases=phases, tags=True, val_sources=2)
        with pytest.raises(RuntimeError, match="killed while validating"):  # the CLM phase's end, with CLM's objective
            validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, phases=phases,
                            callbacks=[SavedThenValidationFails(3, path)], val_sources=2)
        resumed = validated_steps(tokenizer_dir, 4 * TOKENS_PER_STEP, phases=phases, ckpt_path=path, tags=True,
                                  val_sources=2)
        assert [(tag, x) for tag, x, _ in resumed] == [("val/clm_loss", 2), ("val/mlm_loss", 3), ("val/mlm_loss", 5)]
        # the same validation as the run's own: the whole holdout, the same weights (the steps after read other rows
        # here, from a dataset without a resumable state)
        assert uninterrupted[0][:2] == ("val/clm_loss", 2)
        assert resumed[0][2] == pytest.approx(uninterrupted[0][2], rel=1e-6)


def test_a_resume_from_a_checkpoint_saved_after_its_steps_validation_does_not_validate_it_again(tokenizer_dir,
                                                                                               tmp_path):
    """A SIGTERM's save and the end's come after the step's validation: the resumed run logged a second point for
    the step (one step late, at x = 4 beside the run's own x = 3), and a finished run's every requeue one more."""
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, save_after=4, default_root_dir=tmp_path) == [1, 3]
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, ckpt_path=tmp_path / "stopped.ckpt") == [5]
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, save_after=6, default_root_dir=tmp_path) == [1, 3, 5]
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, ckpt_path=tmp_path / "stopped.ckpt") == []


def test_a_finished_run_whose_last_step_is_on_the_checkpoint_grid_is_not_validated_again_by_a_rerun(tokenizer_dir,
                                                                                                 tmp_path):
    """TokenCheckpoint saves a step on its grid before the step's validation, and the end saved nothing more
    (already saved at that step): every requeue of the finished run validated its last step again, one more point;
    also after a rerun had validated it (the catch-up of a final validation a kill cut off)."""
    from callbacks import TokenCheckpoint

    def saving(**kwargs):
        return validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, enable_checkpointing=True, **kwargs,
                               callbacks=[TokenCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2)])

    assert saving() == [1, 3, 5]
    assert saving(ckpt_path=tmp_path / "last.ckpt") == []
    shutil.copy(tmp_path / "step000000006.ckpt", tmp_path / "last.ckpt")  # what a kill in the final validation leaves
    assert saving(ckpt_path=tmp_path / "last.ckpt") == [5]  # saved before its validation: it may have been cut off
    assert saving(ckpt_path=tmp_path / "last.ckpt") == []  # validated by that rerun, and saved after it
    # a branch of 4 steps off step 4, into this folder: it trains nothing, and its last.ckpt replaces a later one
    assert saving(ckpt_path=tmp_path / "step000000004.ckpt", steps=4) == [3]
    aside = tmp_path / "after-step000000004-set-aside"
    assert sorted(path.name for path in aside.iterdir()) == ["last.ckpt", "step000000006.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 4


def test_a_run_without_validation_data_says_so_and_records_no_validated_phase_ends(tokenizer_dir, tmp_path, caplog):
    """It validated nothing: a resume adding validation data would have the card claim phase ends from step 0. The
    shipped recipes have no val_sources: a 22-hour run without a val/ curve said nothing of it."""
    callbacks = [ObjectiveSchedule([Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP)]), TokenValidation(TOKENS_PER_STEP)]
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    with caplog.at_level("INFO"):
        trainer.fit(tiny_module(tokenizer_dir), torch.utils.data.DataLoader(Rows(), batch_size=SEQUENCES))
    assert "[TokenValidation] no validation data (data.init_args.val_sources): this run logs no val/ curve" in caplog.text
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert "phase_ends_validated_since_step" not in torch.load(tmp_path / "last.ckpt", weights_only=False)


def test_the_grid_runs_across_epochs(tokenizer_dir):
    """A corpus read several times over (epochs of 5 steps here): Lightning's per-epoch count would validate
    after steps 2, 4, then 7, 9."""
    rows = [row for row, _ in zip(Rows(), range(5 * SEQUENCES))]
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, rows=rows, steps=10) == [1, 3, 5, 7, 9]


def test_the_grid_holds_after_an_epoch_that_ends_inside_a_step(tokenizer_dir):
    """An epoch of 9 micro-batches of 2 rows ends with a step of one micro-batch: counted in micro-batches, the
    next validations came after steps 7 and 9 (x = 6, 8) instead of after steps 6 and 8."""
    rows = [row for row, _ in zip(Rows(), range(5 * SEQUENCES - 2))]
    assert validated_steps(tokenizer_dir, 2 * TOKENS_PER_STEP, rows=rows, steps=10) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("interval", [3, 1, 0.5], ids=["micro-batches", "every-micro-batch", "fraction-of-an-epoch"])
def test_a_lightning_interval_beside_it_is_refused(tokenizer_dir, interval):
    with pytest.raises(UserError, match=f"trainer.val_check_interval={interval} conflicts with TokenValidation"):
        validated_steps(tokenizer_dir, TOKENS_PER_STEP, val_check_interval=interval)


@pytest.mark.parametrize("every_n_tokens", [0, -5, 1.5, True])
def test_a_budget_that_is_not_a_positive_integer_is_refused(every_n_tokens):
    with pytest.raises(UserError, match="TokenValidation.every_n_tokens must be a positive integer"):
        TokenValidation(every_n_tokens)
