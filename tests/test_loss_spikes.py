"""Loss spikes are counted against the recent level of the same phase."""

from types import SimpleNamespace

import pytest
import torch

from callbacks.loss_spikes import LossSpikeMonitor
from cpt_lightning.errors import UserError


class Module:
    device = torch.device("cpu")

    def __init__(self):
        self.objective = SimpleNamespace(name="clm")
        self.logged = {}

    def log(self, name, value, **_):
        self.logged[name] = value


ONE_RANK = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)
PREDICTED = 64  # positions each micro-batch predicts


def output(loss, accumulate, predicted=PREDICTED):
    """What Lightning hands over of the module's training_step: the loss to backward (its sum over the predicted
    positions, over a divisor of the run, divided by the accumulation), the positions and the loss per position."""
    return {"loss": torch.tensor(loss * predicted / 512 / accumulate), "predicted": predicted,
            "mean_loss": torch.tensor(loss)}


def feed(monitor, module, losses, accumulate=1, trainer=None):
    """One optimizer step per loss, as Lightning runs it: ``accumulate`` micro-batches, each handing
    over its summed loss divided by ``accumulate``; the step count moves with the last one."""
    trainer = trainer or SimpleNamespace(callbacks=[], global_step=0, accumulate_grad_batches=accumulate, strategy=ONE_RANK)
    for loss in losses:
        for micro_batch in range(accumulate):
            monitor.on_train_batch_start(trainer, module, None, 0)
            trainer.global_step += micro_batch == accumulate - 1
            monitor.on_train_batch_end(trainer, module, output(loss, accumulate), None, 0)
    return trainer


def test_spike_counted_once_and_logged():
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    feed(monitor, module, noise[:20] + [3.5] + noise[20:])
    assert monitor.spikes == 1 and module.logged["train/loss_spikes"] == 1.0


@pytest.mark.parametrize("threshold, spikes", [(1.0, 0), (0.5, 1)])
def test_a_spike_is_threshold_sample_standard_deviations_above_the_windows_mean(threshold, spikes):
    """The window 0, 2: mean 1, sample standard deviation √2. 2.2 is 0.85 of them above: a spike at 0.5, not at 1
    (where the population's, 1, would have flagged it)."""
    monitor = LossSpikeMonitor(window=2, threshold=threshold)
    feed(monitor, Module(), [0.0, 2.0, 2.2])
    assert monitor.spikes == spikes


def test_a_non_finite_step_is_left_out_of_the_window_and_still_logs_its_point():
    monitor, module = LossSpikeMonitor(window=2, threshold=1.0), Module()
    feed(monitor, module, [float("nan")])
    assert module.logged["train/loss_spikes"] == 0.0 and list(monitor._recent) == []


def test_only_a_rise_measured_against_a_full_window_is_a_spike():
    """A sudden drop is good news, not a spike; before ``window`` steps there is no level to judge by."""
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    dropped, early = LossSpikeMonitor(window=20, threshold=6.0), LossSpikeMonitor(window=20, threshold=6.0)
    feed(dropped, Module(), noise[:20] + [2.5] + noise[20:])
    feed(early, Module(), noise[:19] + [50.0])
    assert (dropped.spikes, early.spikes) == (0, 0)


def test_phase_switch_starts_a_fresh_window():
    monitor, module = LossSpikeMonitor(window=10, threshold=3.0), Module()
    trainer = feed(monitor, module, [2.0 + 0.01 * (i % 3) for i in range(10)])
    module.objective = SimpleNamespace(name="mlm")
    feed(monitor, module, [5.0] * 3, trainer=trainer)  # a higher MLM loss right after the switch is not a spike
    assert monitor.spikes == 0


def test_the_mlm_baselines_switch_from_30_to_15_percent_starts_a_fresh_window():
    """Both phases' objectives are named mlm: the window was keyed on the name, so the decay's first steps were
    judged against the 30% phase's level and spread (a loss 0.3 above it a spike). It follows the schedule's phase,
    through a resume too."""
    from callbacks import ObjectiveSchedule, Phase
    from cpt_lightning.objectives import MaskedLM

    schedule = ObjectiveSchedule([Phase(MaskedLM(mask_rate=0.3), tokens=10), Phase(MaskedLM(mask_rate=0.15), tokens=10)])
    monitor, module = LossSpikeMonitor(window=10, threshold=3.0), Module()
    module.objective = SimpleNamespace(name="mlm")
    trainer = SimpleNamespace(callbacks=[schedule], global_step=0, accumulate_grad_batches=1, strategy=ONE_RANK)
    schedule.current = 0
    feed(monitor, module, [2.0 + 0.01 * (i % 3) for i in range(10)], trainer=trainer)
    resumed = LossSpikeMonitor(window=10, threshold=3.0)
    resumed.load_state_dict(monitor.state_dict())
    schedule.current = 1
    for watching in (monitor, resumed):
        feed(watching, module, [2.3], trainer=trainer)
        assert watching.spikes == 0 and list(watching._recent) == pytest.approx([2.3])
    # a checkpoint saved before the phase was (by objective name) keeps its window in the phase it was saved in
    earlier = LossSpikeMonitor(window=10, threshold=3.0)
    earlier.load_state_dict({"spikes": 0, "recent": [2.0 + 0.01 * (i % 3) for i in range(10)], "objective": "mlm"})
    feed(earlier, module, [2.3], trainer=trainer)
    assert earlier.spikes == 1


@pytest.mark.parametrize("fault", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_loss_does_not_hide_later_spikes(fault):
    """Neither a spike itself (an overflow to inf is the NonFiniteGuard's business, as a NaN is) nor part of the
    window: an inf there held its mean at inf and hid every spike of the next ``window`` steps."""
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    trainer = feed(monitor, module, noise[:20] + [fault])
    assert monitor.spikes == 0
    feed(monitor, module, noise[20:25] + [50.0], trainer=trainer)
    assert monitor.spikes == 1


def test_under_accumulation_each_step_is_one_entry_at_its_full_loss(recwarn):
    """The window took every micro-batch's loss, divided by the accumulation: with the recipes' 24
    micro-batches per step, "the last 100 steps" were 4 steps, and warnings printed losses 24× too small."""
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    feed(monitor, module, noise[:20] + [3.5] + noise[20:], accumulate=4)
    assert len(monitor._recent) == 20 and min(monitor._recent) > 2.9
    assert monitor.spikes == 1 and "loss spike at step 20: 3.5000 vs 3.0" in str(recwarn.pop(UserWarning).message)


def test_a_resumed_monitor_keeps_its_window():
    """Only the spike count was checkpointed: a resumed run needed ``window`` new steps to watch again."""
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    trainer = feed(monitor, module, noise[:20] + [3.5] + noise[20:])  # one spike before the save
    resumed = LossSpikeMonitor(window=20, threshold=6.0)
    resumed.load_state_dict(monitor.state_dict())
    feed(resumed, module, [3.5], trainer=trainer)
    assert resumed.spikes == 2 and module.logged["train/loss_spikes"] == 2.0  # train/loss_spikes counts the whole run


def test_a_micro_batch_with_nothing_to_predict_is_left_out_of_its_step():
    """Its zero (returned so that every rank backpropagates the same graph) is not a loss: it halved the
    step's mean and could hide a spike."""
    monitor, module = LossSpikeMonitor(window=5, threshold=6.0), Module()
    trainer = SimpleNamespace(callbacks=[], global_step=0, accumulate_grad_batches=2, strategy=ONE_RANK)
    for predicted in (0, 64):
        monitor.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step += predicted > 0
        monitor.on_train_batch_end(trainer, module, output(3.0, 2, predicted), None, 0)
    assert list(monitor._recent) == [3.0]


def test_a_steps_loss_weighs_each_predicted_position_alike():
    """As the gradient does: a micro-batch of 10 positions at 1.0 and one of 30 at 3.0 make a step at 2.5, not 2.0."""
    monitor, module = LossSpikeMonitor(window=5, threshold=6.0), Module()
    trainer = SimpleNamespace(callbacks=[], global_step=0, accumulate_grad_batches=2, strategy=ONE_RANK)
    for micro_batch, (loss, predicted) in enumerate([(1.0, 10), (3.0, 30)]):
        monitor.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step += micro_batch == 1
        monitor.on_train_batch_end(trainer, module, output(loss, 2, predicted), None, 0)
    assert list(monitor._recent) == [2.5]


def test_a_spike_on_another_rank_is_seen():
    """Each rank watched its own loss and only rank 0 warned: a spike in another rank's data went unreported."""
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    other_rank = {"loss": 3.0}
    two_ranks = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor + torch.tensor([other_rank["loss"] * PREDICTED,
                                                                                          PREDICTED]))
    trainer = SimpleNamespace(callbacks=[], global_step=0, accumulate_grad_batches=1, strategy=two_ranks)
    feed(monitor, module, [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(20)], trainer=trainer)
    other_rank["loss"] = 9.0  # this rank sees 3.0; the step's loss over both is 6.0
    feed(monitor, module, [3.0], trainer=trainer)
    assert monitor.spikes == 1 and monitor._recent[-1] == 6.0


def test_a_step_with_nothing_to_predict_on_any_rank_is_left_out():
    """No micro-batch of the step had a target on any rank: there is no loss to judge (it was 0 / 0)."""
    monitor, module = LossSpikeMonitor(window=5, threshold=6.0), Module()
    trainer = SimpleNamespace(callbacks=[], global_step=0, accumulate_grad_batches=2, strategy=ONE_RANK)
    for micro_batch in range(2):
        monitor.on_train_batch_start(trainer, module, None, 0)
        trainer.global_step += micro_batch == 1
        monitor.on_train_batch_end(trainer, module, output(0.0, 2, predicted=0), None, 0)
    assert list(monitor._recent) == [] and monitor.spikes == 0
    feed(monitor, module, [3.0], accumulate=2, trainer=trainer)  # the next step counts as usual
    assert list(monitor._recent) == [3.0]


@pytest.mark.parametrize("window, threshold", [(1, 6.0), (0, 6.0), (20, 0.0), (20, -1.0), (20, float("nan"))])
def test_a_monitor_that_could_never_flag_or_flags_everything_is_refused(window, threshold):
    """One step has no standard deviation (a 1-step window never flagged anything); a threshold <= 0 flags
    half the steps of a flat run."""
    with pytest.raises(UserError, match="LossSpikeMonitor"):
        LossSpikeMonitor(window=window, threshold=threshold)
