"""The training hot path waits for the GPU as little as it can, with unchanged results.

A host sync is counted device-independently, on CPU, as the operators that make a CUDA stream
synchronise: ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()``), ``nonzero`` (also
inside boolean-mask indexing and its backward), ``unique``, and ``lift_fresh`` (a tensor built from
Python data: made on a GPU, a pageable host-to-device copy that waits for all queued work).
"""

import warnings

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from callbacks import ObjectiveSchedule, Phase, TokenThroughput
from cpt_lightning.objectives import IGNORE_INDEX, CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module


class HostSyncs(TorchDispatchMode):
    """Records each operator that would synchronise a CUDA stream."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith(("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique",
                            "aten::lift_fresh", "aten::masked_select")):
            self.seen.append(name)
        elif name.startswith(("aten::index.Tensor", "aten::index_put")):
            if any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.seen.append(f"{name} (boolean mask)")
        return func(*args, **kwargs)


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 50000, (2, 40), generator=g)
    pos = torch.stack([packed_position_ids([25, 15]), packed_position_ids([40])])
    return {"input_ids": ids, "position_ids": pos}


@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_a_micro_batch_waits_for_the_gpu_once(tokenizer_dir, objective):
    """Inputs, forward, metrics and backward: one sync, for the number of predicted positions (the head
    runs on those only). There were 10 (CLM) and 12 (MLM): the labelled positions found three times and
    again in the backward, torchmetrics' NaN and label checks, Python numbers copied to the device."""
    module = tiny_module(tokenizer_dir, attn_implementation="sdpa")
    module.set_objective(objective())

    def micro_batch():
        loss, predictions, targets = module.objective_step(batch(), torch.Generator().manual_seed(5))
        module._update_metrics(loss, predictions, targets)
        loss.backward()

    micro_batch()  # the first one copies the objective's id tables to the device, once
    with HostSyncs() as syncs:
        micro_batch()
    assert syncs.seen == ["aten::nonzero"]


def test_the_metrics_accumulate_as_torchmetrics_checked_them(tokenizer_dir):
    """Loss mean weighted by predicted positions, a NaN micro-batch left out of it (MeanMetric's default did
    that with a host check), micro accuracy over the predicted positions (torchmetrics filtered -100)."""
    module = tiny_module(tokenizer_dir, attn_implementation="sdpa")
    vocab = module.model.config.vocab_size
    mean, accuracy = MeanMetric(), MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX)
    g = torch.Generator().manual_seed(0)
    for loss in (2.5, float("nan"), 3.0, 4.25):
        labels = torch.randint(0, vocab, (50,), generator=g)
        labels[torch.rand(50, generator=g) < 0.6] = IGNORE_INDEX
        targets = labels[labels != IGNORE_INDEX]
        predictions = torch.where(torch.rand(targets.shape, generator=g) < 0.5, targets, (targets + 1) % vocab)
        module._update_metrics(torch.tensor(loss), predictions, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Encountered `nan` values in tensor. Will be removed."
            mean.update(torch.tensor(loss), weight=targets.numel())
        full = torch.full_like(labels, IGNORE_INDEX)
        full[labels != IGNORE_INDEX] = predictions
        accuracy.update(full, labels)
    metrics = module.objective_metrics[module.objective.name]
    torch.testing.assert_close(metrics["loss"].compute(), mean.compute())
    torch.testing.assert_close(metrics["accuracy"].compute(), accuracy.compute())


def test_throughput_reads_the_clock_once_per_optimizer_step(tokenizer_dir, monkeypatch):
    """Reading the clock needs torch.cuda.synchronize() on a GPU: once per optimizer step (it was once per
    micro-batch, draining the GPU's queue while the host fetched and prepared the next micro-batch)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import throughput_monitor
    from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows

    reads = []
    monkeypatch.setattr(throughput_monitor, "time",
                        SimpleNamespace(perf_counter=lambda: reads.append(None) or 0.1 * len(reads)))
    steps, accumulate = 4, 3
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=False, accumulate_grad_batches=accumulate, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=steps * accumulate * TOKENS_PER_STEP)]),
                   TokenThroughput(window_size=3)],
    )
    trainer.fit(tiny_module(tokenizer_dir), torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    assert len(reads) == 1 + steps  # the start, then each step's last micro-batch
