"""GlobalBatch: accumulation derived from micro-batch × world, honoured by Lightning's loop, checked at start-up."""

import itertools

import lightning as L
import pytest
import torch

from callbacks import GlobalBatch, ObjectiveSchedule, Phase
from callbacks.global_batch import BatchLayout, derive_layout
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module
from recorders import SaveAt
from test_objective_schedule import LENGTH, PackedRows


class Rows(L.LightningDataModule):
    """PackedRows batched by ``micro_batch_size`` (the attribute GlobalBatch reads); ``rows`` may lie."""

    def __init__(self, micro_batch_size: int, rows: int | None = None):
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.rows = rows or micro_batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(PackedRows(), batch_size=self.rows)


class MicroBatchCounter(L.Callback):
    def __init__(self):
        self.micro_batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches += 1


def fit(tokenizer_dir, sequences: int, datamodule: Rows, steps: int = 2, callbacks=(), **trainer_kwargs):
    """Train ``steps`` optimizer steps of ``sequences`` rows (the ObjectiveSchedule stops it)."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    counter = MicroBatchCounter()
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=steps * sequences * LENGTH)])
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, callbacks=[GlobalBatch(sequences), schedule, counter, *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, counter


def test_accumulation_set_at_setup_drives_the_loop_and_the_token_clock(tokenizer_dir):
    trainer, module, counter = fit(tokenizer_dir, sequences=8, datamodule=Rows(micro_batch_size=2), steps=2)
    assert trainer.accumulate_grad_batches == 4
    assert trainer.global_step == 2 and counter.micro_batches == 8  # 4 micro-batches per optimizer step
    assert module.tokens_per_step == 8 * LENGTH


def test_explicit_conflicting_accumulation_is_refused_and_the_derived_one_accepted(tokenizer_dir):
    with pytest.raises(UserError, match="trainer.accumulate_grad_batches=3 conflicts with GlobalBatch, which derives 4"):
        fit(tokenizer_dir, sequences=8, datamodule=Rows(micro_batch_size=2), accumulate_grad_batches=3)
    trainer, _, _ = fit(tokenizer_dir, sequences=8, datamodule=Rows(micro_batch_size=2), accumulate_grad_batches=4, steps=1)
    assert trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize("sequences", [0, -8, True, 384.0])
def test_a_global_batch_of_no_rows_is_refused(sequences):
    """0 divides by every layout: it derived an accumulation of 0. ``True`` (an int to Python) made a batch of 1."""
    with pytest.raises(UserError, match=f"GlobalBatch.sequences must be a positive integer, got {sequences}"):
        GlobalBatch(sequences)


def test_indivisible_global_batch_fails_before_any_step(tokenizer_dir):
    with pytest.raises(UserError, match=r"GlobalBatch.sequences=7 is not divisible"):
        fit(tokenizer_dir, sequences=7, datamodule=Rows(micro_batch_size=2))


@pytest.mark.parametrize("rows", [3, 1], ids=["more", "fewer"])
def test_batches_of_another_size_than_announced_are_refused(tokenizer_dir, rows):
    """Fewer rows than announced would shrink every optimizer step below the global batch as surely as more grow it."""
    with pytest.raises(UserError, match=f"the first batch has {rows} rows, not data.init_args.micro_batch_size=2"):
        fit(tokenizer_dir, sequences=8, datamodule=Rows(micro_batch_size=2, rows=rows))


def test_accumulation_counts_every_device_of_every_node(tokenizer_dir):
    """384 sequences on 2 nodes of 4 devices at micro-batch 4 accumulate 12 micro-batches: the trainer's devices
    are per node (``trainer.world_size`` would count the nodes twice; one device, 4 × the global batch)."""
    trainer = L.Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.datamodule = Rows(micro_batch_size=4)  # as fit attaches it (no process is launched: setup is called alone)
    callback = GlobalBatch(384)
    callback.setup(trainer, tiny_module(tokenizer_dir), "fit")
    assert trainer.accumulate_grad_batches == 12 and callback.layout.sequences == 384


def test_cpt_validate_derives_nothing_and_a_datamodule_without_micro_batches_is_named():
    """``cpt validate`` of a recipe that lists GlobalBatch trains nothing: no layout to derive (it would be refused on
    hardware the batch does not divide). A fit's datamodule without ``micro_batch_size`` is named, not a TypeError."""
    from types import SimpleNamespace

    world = dict(num_devices=5, num_nodes=1, accumulate_grad_batches=1)
    validating = SimpleNamespace(datamodule=Rows(micro_batch_size=4), **world)
    GlobalBatch(384).setup(validating, None, "validate")
    assert validating.accumulate_grad_batches == 1
    with pytest.raises(UserError, match="GlobalBatch needs a datamodule with micro_batch_size"):
        GlobalBatch(384).setup(SimpleNamespace(datamodule=SimpleNamespace(), **world), None, "fit")
    layout = BatchLayout(micro_batch_size=4, devices=4, num_nodes=1, accumulation=24)
    assert layout.describe(1024).endswith("(393,216 tokens at block_size 1024)")  # the global batch's, per step


@pytest.mark.parametrize(
    "micro, devices, nodes, accumulation",
    [(4, 4, 1, 24), (2, 4, 1, 48), (4, 8, 2, 6), (8, 8, 6, 1), (4, 1, 1, 96)],
    ids=["4gpu", "4gpu-large", "2x8gpu", "6x8gpu", "1gpu"],
)
def test_recipe_layouts_keep_384(micro, devices, nodes, accumulation):
    layout = derive_layout(384, micro, devices, nodes)
    assert layout.accumulation == accumulation and layout.sequences == 384


def test_any_divisible_hardware_keeps_the_global_batch():
    for micro, devices, nodes in itertools.product(range(1, 9), range(1, 9), range(1, 5)):
        if 384 % (micro * devices * nodes) == 0:
            assert derive_layout(384, micro, devices, nodes).sequences == 384
        else:
            with pytest.raises(UserError, match="is not divisible"):
                derive_layout(384, micro, devices, nodes)


def test_indivisible_batch_names_the_fields_and_what_fits():
    with pytest.raises(UserError) as err:
        derive_layout(384, 5, 4, 1)
    message = str(err.value)
    assert "\n" not in message
    for field in ("GlobalBatch.sequences=384", "data.init_args.micro_batch_size (5)", "trainer.devices (4)",
                  "trainer.num_nodes (1)"):
        assert field in message
    assert "values that fit: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]" in message
    with pytest.raises(UserError, match=r"values that fit: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]$"):
        derive_layout(384, 5, 4, 2)  # every node's devices: 32 × 8 processes is no longer 384
    with pytest.raises(UserError, match=r"values that fit: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384\]"):
        derive_layout(384, 5, 1, 1)  # one process: the whole batch in one micro-batch fits too
    with pytest.raises(UserError, match="no micro_batch_size fits 5 processes"):
        derive_layout(384, 4, 5, 1)


class StepOfEachMicroBatch(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_a_resume_with_another_accumulation_gives_its_first_step_every_micro_batch(tokenizer_dir, tmp_path):
    """A layout change (data.init_args.resume_on_another_layout) from a checkpoint of an odd step, 1 micro-batch per
    step before and 2 after: Lightning's restored micro-batch count (3) is not a multiple of 2, so the first step
    ended after its first micro-batch, training half the tokens the token clock counted."""
    fit(tokenizer_dir, sequences=4, datamodule=Rows(micro_batch_size=4), steps=5, callbacks=[SaveAt(3, tmp_path / "step3.ckpt")])
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    record = StepOfEachMicroBatch()
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GlobalBatch(4), ObjectiveSchedule([Phase(CausalLM(), tokens=5 * 4 * LENGTH)]), record])
    trainer.fit(module, datamodule=Rows(micro_batch_size=2), ckpt_path=tmp_path / "step3.ckpt")
    assert trainer.accumulate_grad_batches == 2 and trainer.global_step == 5
    assert record.steps == [3, 3, 4, 4] and module.tokens_seen == 5 * 4 * LENGTH
