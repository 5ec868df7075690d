"""Frozen layers get no update and no optimizer state during CLM, and train again after the switch."""

import lightning as L
import pytest
import torch

from callbacks import LayerFreeze, ObjectiveSchedule, Phase
from callbacks.layer_freeze import parse_layers
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM, MaskedLM
from cpt_lightning.parallel import FSDP2
from helpers import tiny_module
from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows


def full(weight: torch.Tensor) -> torch.Tensor:
    """A layer weight as one plain tensor (FSDP2 shards it into a DTensor)."""
    return (weight.full_tensor() if hasattr(weight, "full_tensor") else weight).detach().clone()


class Snapshots(L.Callback):
    def __init__(self):
        self.weights, self.has_state = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = pl_module.model.model.layers
        self.weights.append([full(layer.attn.Wqkv.weight) for layer in layers])
        state = trainer.optimizers[0].state
        self.has_state.append([layer.attn.Wqkv.weight in state for layer in layers])


STRATEGIES = {"single_device": lambda: "auto", "fsdp2": lambda: FSDP2(save_distributed_checkpoint=False)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layers_frozen_during_clm_only(tokenizer_dir, strategy):
    """Also under FSDP2, which swaps every parameter for a sharded one after the callbacks' setup."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    initial = [full(layer.attn.Wqkv.weight) for layer in module.model.model.layers]
    snaps = Snapshots()
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=STRATEGIES[strategy](), max_steps=-1, max_epochs=-1,
        callbacks=[ObjectiveSchedule(phases), LayerFreeze("0-1"), snaps],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    for step in range(3):  # CLM: layers 0 and 1 untouched, without optimizer state; layer 2 trains
        assert torch.equal(snaps.weights[step][0], initial[0]) and torch.equal(snaps.weights[step][1], initial[1])
        assert not torch.equal(snaps.weights[step][2], initial[2])
        assert snaps.has_state[step] == [False, False, True]
    for step in (3, 4):  # MLM: every layer trains
        assert not torch.equal(snaps.weights[step][0], snaps.weights[step - 1][0])
        assert snaps.has_state[step] == [True, True, True]


@pytest.mark.parametrize("spec, expected", [("0-7", list(range(8))), ("8-14", list(range(8, 15))), ("0-1,5", [0, 1, 5]), ([3, 1], [1, 3])])
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.parametrize("spec, message", [("first-eight", "write ranges like '0-7'"), ("7-0", "names no layer")])
def test_bad_layer_spec_names_the_field(spec, message):
    with pytest.raises(UserError, match=f"LayerFreeze.layers={spec!r}.*{message}"):
        parse_layers(spec)


def trainer_with(*callbacks):
    return L.Trainer(callbacks=list(callbacks), logger=False, enable_checkpointing=False)


def test_layers_beyond_the_model_fail_at_setup(tokenizer_dir):
    module = tiny_module(tokenizer_dir)
    with pytest.raises(UserError, match=r"layers \[3\] do not exist"):
        LayerFreeze("2-3").setup(trainer_with(), module, "fit")


def test_an_objective_name_the_run_never_trains_fails_at_setup(tokenizer_dir):
    module = tiny_module(tokenizer_dir)
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=8), Phase(MaskedLM(), tokens=8)])
    with pytest.raises(UserError, match=r"LayerFreeze.during='CLM' matches no objective of this run \(clm, mlm\)"):
        LayerFreeze("0-1", during="CLM").setup(trainer_with(schedule), module, "fit")
    with pytest.raises(UserError, match=r"during='clm' matches no objective of this run \(mlm\)"):
        LayerFreeze("0-1").setup(trainer_with(), module, "fit")  # no schedule: the module's MaskedLM only
    LayerFreeze("0-1").setup(trainer_with(schedule), module, "fit")
