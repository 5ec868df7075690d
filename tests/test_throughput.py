"""TokenThroughput logs tokens/s per device, the module's FLOP/s and MFU against a given peak."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks import ObjectiveSchedule, Phase, TokenThroughput
from cpt_lightning.errors import UserError
from cpt_lightning.flops import training_flops
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module
from test_objective_schedule import LENGTH, ROWS, TOKENS_PER_STEP, PackedRows


class Metrics(Logger):
    """Keeps every logged dict in memory."""

    def __init__(self):
        super().__init__()
        self.logged = []

    name, version, experiment = "memory", "0", None

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(tokenizer_dir, throughput, steps=6, accumulate=2):
    module = tiny_module(tokenizer_dir)
    logger = Metrics()
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=accumulate,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=steps * accumulate * TOKENS_PER_STEP)]), throughput],
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    return module, [m for m in logger.logged if "train/device/items_per_sec" in m]


def test_tokens_flops_and_mfu_against_a_given_peak(tokenizer_dir):
    module, logged = fit(tokenizer_dir, TokenThroughput(window_size=3, peak_tflops=1e-3))
    assert logged, "no throughput was logged"
    # CLM predicts every position but each document's last (PackedRows: 2 documents per row)
    predicted = ROWS * (LENGTH - 2)
    per_token = training_flops(module.model.config, ROWS, LENGTH, causal=True, predicted=predicted) / (ROWS * LENGTH)
    for metrics in logged:
        assert metrics["train/device/items_per_sec"] > 0
        assert metrics["train/device/flops_per_sec"] == pytest.approx(metrics["train/device/items_per_sec"] * per_token)
        assert metrics["train/device/mfu"] == pytest.approx(metrics["train/device/flops_per_sec"] / 1e9)


def test_without_a_known_peak_no_mfu_is_logged(tokenizer_dir):
    _, logged = fit(tokenizer_dir, TokenThroughput(window_size=3), steps=3)  # the CPU is not in Lightning's table
    assert logged and all("train/device/mfu" not in m and m["train/device/flops_per_sec"] > 0 for m in logged)


@pytest.mark.parametrize("peak", [0, -5.0])
def test_a_non_positive_peak_is_refused(peak):
    with pytest.raises(UserError, match="peak_tflops"):
        TokenThroughput(peak_tflops=peak)
