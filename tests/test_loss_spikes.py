"""Loss spikes are counted against the recent level of the same objective."""

from types import SimpleNamespace

import torch

from callbacks.loss_spikes import LossSpikeMonitor


class Module:
    def __init__(self):
        self.objective = SimpleNamespace(name="clm")
        self.logged = {}

    def log(self, name, value, **_):
        self.logged[name] = value


def feed(monitor, module, losses):
    trainer = SimpleNamespace(global_step=0)
    for loss in losses:
        monitor.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss)}, None, 0)


def test_spike_counted_once_and_logged():
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    feed(monitor, module, noise[:20] + [3.5] + noise[20:])
    assert monitor.spikes == 1 and module.logged["train/loss_spikes"] == 1.0


def test_phase_switch_starts_a_fresh_window():
    monitor, module = LossSpikeMonitor(window=10, threshold=3.0), Module()
    feed(monitor, module, [2.0 + 0.01 * (i % 3) for i in range(10)])
    module.objective = SimpleNamespace(name="mlm")
    feed(monitor, module, [5.0] * 3)  # a higher MLM loss right after the switch is not a spike
    assert monitor.spikes == 0


def test_a_non_finite_loss_does_not_hide_later_spikes():
    monitor, module = LossSpikeMonitor(window=20, threshold=6.0), Module()
    noise = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    feed(monitor, module, noise[:20] + [float("nan")] + noise[20:25] + [50.0])
    assert monitor.spikes == 1
