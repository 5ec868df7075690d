"""A non-finite loss skips its update (weights and AdamW moments untouched); K in a row stop the run."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import NonFiniteGuard, ObjectiveSchedule, Phase, TokenCheckpoint
from callbacks.non_finite_guard import MIN_LOSS_SCALE
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module
from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows


class NaNAtSteps(CausalLM):
    """CLM whose loss is NaN on chosen optimizer steps (a stand-in for a diverging batch)."""

    def __init__(self, bad_steps: list[int]):
        self.bad_steps = set(bad_steps)
        self.step = 0

    def loss(self, logits, labels):
        loss = super().loss(logits, labels)
        bad = self.step in self.bad_steps
        self.step += 1
        return loss * float("nan") if bad else loss


class Weights(L.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt_state = trainer.optimizers[0].state
        param = pl_module.model.model.layers[0].attn.Wqkv.weight
        self.after.append((param.detach().clone(), opt_state[param]["exp_avg"].clone() if param in opt_state else None))


def run(tokenizer_dir, bad_steps, steps, guard, precision=None, checkpoint=None, logger=False):
    """``steps`` steps of CLM whose loss is NaN at ``bad_steps``; ``precision``: a plugin (fp16's dense loss)."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3, **({"loss_chunk_size": None} if precision else {}))
    weights = Weights()
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=logger, enable_checkpointing=checkpoint is not None, enable_progress_bar=False,
        enable_model_summary=False, plugins=[precision] if precision else None, log_every_n_steps=1,
        callbacks=[ObjectiveSchedule([Phase(NaNAtSteps(bad_steps), tokens=steps * TOKENS_PER_STEP)]), guard, weights,
                   *([checkpoint] if checkpoint else [])],
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    return weights.after


def fp16(init_scale: float):
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_a_grad_scalers_overflows_are_its_own_to_skip(tokenizer_dir):
    """fp16 at a scale too high: the scaler skips and halves until the gradients fit. Counted as faults, the guard
    stopped the run after 5 ("lower the learning rate"), where the scaler recovers by itself."""
    guard, precision = NonFiniteGuard(), fp16(init_scale=2.0**30)
    after = run(tokenizer_dir, bad_steps=[], steps=16, guard=guard, precision=precision)
    assert guard.skipped == guard.consecutive == 0 and guard.scaler_overflows >= 5
    assert precision.scaler.get_scale() == 2.0**30 / 2**guard.scaler_overflows  # each overflow halved it
    assert torch.equal(after[0][0], after[guard.scaler_overflows - 1][0])  # nothing applied while it overflowed
    assert torch.isfinite(after[-1][0]).all() and not torch.equal(after[-1][0], after[0][0])  # then it trained


def test_a_nan_loss_under_a_grad_scaler_stops_once_the_scale_is_spent(tokenizer_dir):
    """A NaN loss overflows at every scale: the scaler's halvings down to MIN_LOSS_SCALE, then faults."""
    guard, precision = NonFiniteGuard(max_consecutive=3), fp16(init_scale=4.0)
    with pytest.raises(UserError, match="3 consecutive non-finite updates"):
        run(tokenizer_dir, bad_steps=range(10), steps=10, guard=guard, precision=precision)
    assert (guard.scaler_overflows, guard.skipped, precision.scaler.get_scale()) == (2, 3, MIN_LOSS_SCALE)


def test_faults_that_never_stop_the_run_leave_a_grad_scalers_scale_at_its_minimum(tokenizer_dir):
    """A NaN every other step, at the minimum scale: the scaler halved it after each (growing back only after
    2000 clean steps), down to 2**-30 in 60 steps, where the gradients underflowed to 0 and nothing trained."""
    guard, precision = NonFiniteGuard(max_consecutive=3), fp16(init_scale=MIN_LOSS_SCALE)
    after = run(tokenizer_dir, bad_steps=range(0, 12, 2), steps=12, guard=guard, precision=precision)
    assert (guard.skipped, guard.consecutive, guard.scaler_overflows) == (6, 0, 0)
    assert precision.scaler.get_scale() == MIN_LOSS_SCALE
    assert not torch.equal(after[-1][0], after[-2][0])  # the last (clean) step trained


def test_a_nan_step_is_skipped_and_counted(tokenizer_dir):
    guard = NonFiniteGuard(max_consecutive=3)
    after = run(tokenizer_dir, bad_steps=[2], steps=4, guard=guard)
    assert guard.skipped == 1 and guard.consecutive == 0
    weight_1, moment_1 = after[1]
    weight_2, moment_2 = after[2]
    assert torch.equal(weight_2, weight_1) and torch.equal(moment_2, moment_1)  # step 2 changed nothing
    assert torch.isfinite(after[3][0]).all() and not torch.equal(after[3][0], weight_2)  # training went on


def test_consecutive_faults_stop_the_run(tokenizer_dir):
    with pytest.raises(UserError, match="3 consecutive non-finite updates"):
        run(tokenizer_dir, bad_steps=[1, 2, 3], steps=6, guard=NonFiniteGuard(max_consecutive=3))


def test_the_stop_names_the_checkpoint_before_the_first_fault_and_logs_the_last(tokenizer_dir, tmp_path):
    """Step 4's checkpoint, saved between the faults of steps 3 to 5, holds the weights that faulted: the message
    said "the last checkpoint precedes the fault" and a resume from it stopped again. Step 5's fault, the one that
    stops the run, went unlogged: Lightning writes a step's values after it."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_cli import scalars

    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, keep_last=5)
    with pytest.raises(UserError) as stopped:
        run(tokenizer_dir, bad_steps=[3, 4, 5], steps=8, guard=NonFiniteGuard(max_consecutive=3),
            checkpoint=checkpoint, logger=TensorBoardLogger(tmp_path, name="tb"))
    assert sorted(path.name for path in (tmp_path / "ckpt").glob("step*")) == ["step000000002.ckpt", "step000000004.ckpt"]
    assert str(stopped.value) == (
        "3 consecutive non-finite updates (steps 3-5): none was applied, so the weights are those step 3 started from, "
        "as in every checkpoint saved since. If a batch is at fault, check the data; if the weights diverged, resume "
        f"with a lower learning rate from a checkpoint saved before step 3 (the newest: {tmp_path / 'ckpt' / 'step000000002.ckpt'})")
    logged = scalars(tmp_path / "tb")
    assert logged["train/skipped_updates"][-3:] == [(3, 1), (4, 2), (5, 3)]
    assert [step for step, norm in logged["train/grad_norm"] if math.isnan(norm)] == [3, 4, 5]


def test_a_resumed_run_keeps_counting_the_faults_in_a_row(tokenizer_dir):
    """Only the total was checkpointed: a preemption inside a run of faults reset the count, and a run
    that should have stopped after 3 in a row trained on."""
    before = NonFiniteGuard(max_consecutive=3)
    run(tokenizer_dir, bad_steps=[1, 2], steps=3, guard=before)  # ends (as if preempted) after 2 faults in a row
    resumed = NonFiniteGuard(max_consecutive=3)
    resumed.load_state_dict(before.state_dict())
    with pytest.raises(UserError, match="3 consecutive non-finite updates"):
        run(tokenizer_dir, bad_steps=[0], steps=2, guard=resumed)
    assert resumed.skipped == 3  # the run's total (train/skipped_updates) goes on counting too


def logging_module(layer: torch.nn.Module) -> tuple[SimpleNamespace, dict[str, list[float]]]:
    """A stand-in LightningModule over ``layer``'s parameters, and every value it is asked to log, by name."""
    logged = {}
    return SimpleNamespace(parameters=layer.parameters,
                           log=lambda name, value, **_: logged.setdefault(name, []).append(float(value))), logged


def test_infinite_gradients_are_skipped_too_and_the_runs_total_is_logged():
    """An overflow gives inf gradients without a NaN: they are not finite either. ``train/skipped_updates`` is the
    run's total, not the current streak (which a finite step sets back to 0)."""
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters())
    module, logged = logging_module(layer)
    guard = NonFiniteGuard(max_consecutive=3)
    for grad, applied in ((float("inf"), False), (1.0, True)):
        for parameter in layer.parameters():
            parameter.grad = torch.full_like(parameter, grad)
        guard.on_before_optimizer_step(SimpleNamespace(global_step=7, precision_plugin=None), module, optimizer)
        assert all((parameter.grad is not None) == applied for parameter in layer.parameters()), grad
    assert (guard.skipped, guard.consecutive, logged["train/skipped_updates"]) == (1, 0, [1.0, 1.0])
    # the skipped step's norm is drawn as what it was (left out, its point repeated the previous step's), then the
    # finite step's: 20 gradients of 1
    assert logged["train/grad_norm"] == [float("inf"), pytest.approx(20 ** 0.5)]


def test_a_grad_scalers_overflows_are_counted_logged_and_carried_over_a_resume():
    """Above the minimum scale, inf gradients are the GradScaler's to skip: the guard leaves them (the scaler
    lowers its scale), counts them apart from its own skips, logs the run's total and keeps it in checkpoints."""
    layer = torch.nn.Linear(4, 4)
    module, logged = logging_module(layer)
    scaler = SimpleNamespace(get_scale=lambda: 1024.0, is_enabled=lambda: True)
    trainer = SimpleNamespace(global_step=7, precision_plugin=SimpleNamespace(scaler=scaler))
    guard = NonFiniteGuard()
    for parameter in layer.parameters():
        parameter.grad = torch.full_like(parameter, float("inf"))
    guard.on_before_optimizer_step(trainer, module, torch.optim.AdamW(layer.parameters()))
    assert all(parameter.grad is not None for parameter in layer.parameters())
    assert (guard.scaler_overflows, guard.skipped, logged["train/grad_scaler_overflows"]) == (1, 0, [1.0])
    resumed = NonFiniteGuard()
    resumed.load_state_dict(guard.state_dict())
    assert resumed.scaler_overflows == 1


class LoggedGradNorms(L.Callback):
    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def test_the_gradient_norm_is_logged_before_clipping(tokenizer_dir):
    """``train/grad_norm`` is the norm the guard checks, before Lightning clips to ``gradient_clip_val``."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    logged = LoggedGradNorms()
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1e-3,
        callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP)]), NonFiniteGuard(), logged],
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    assert len(logged.norms) == 3 and all(norm > 0.1 for norm in logged.norms), logged.norms
    assert len(set(logged.norms)) == 3  # each step's own


@pytest.mark.parametrize("max_consecutive", [0, -1])
def test_a_limit_below_one_is_refused(max_consecutive):
    """A count of faults in a row needs at least one (1 already stops the run at its first fault)."""
    with pytest.raises(UserError, match="max_consecutive must be >= 1"):
        NonFiniteGuard(max_consecutive=max_consecutive)
