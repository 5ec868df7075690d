"""Frozen layers get no update during CLM (their optimizer state stays as their first step finds it),
resume under FSDP2, and train again after the switch."""

import lightning as L
import pytest
import torch

from callbacks import LayerFreeze, NonFiniteGuard, ObjectiveSchedule, Phase
from callbacks.layer_freeze import add_first_step_state, parse_layers
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
        self.weights, self.adam_steps, self.with_gradient = [], [], []

    def on_after_backward(self, trainer, pl_module):
        """Which layers' weights backward computed a gradient for (a frozen one needs none)."""
        self.with_gradient.append([layer.attn.Wqkv.weight.grad is not None for layer in pl_module.model.model.layers])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = pl_module.model.model.layers
        self.weights.append([full(layer.attn.Wqkv.weight) for layer in layers])
        self.adam_steps.append([adam_step(trainer.optimizers[0], layer.attn.Wqkv.weight) for layer in layers])


def adam_step(optimizer, param) -> int | None:
    """AdamW's step count for ``param`` (None: no state); a count of 0 must come with zero moments."""
    state = optimizer.state.get(param)
    if not state:
        return None
    if state["step"] == 0:
        assert not full(state["exp_avg"]).any() and not full(state["exp_avg_sq"]).any()
    return int(state["step"])


def fit_through_switch(module, *freezes, clm_steps: int, mlm_steps: int = 2, strategy="auto") -> Snapshots:
    """Train ``module`` for ``clm_steps`` CLM then ``mlm_steps`` MLM steps with ``freezes`` listed after the
    schedule; what each step left."""
    snaps = Snapshots()
    phases = [Phase(CausalLM(), tokens=clm_steps * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=mlm_steps * TOKENS_PER_STEP)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=-1, max_epochs=-1,
        callbacks=[ObjectiveSchedule(phases), *freezes, snaps],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    return snaps


STRATEGIES = {
    "single_device": lambda: "auto",
    # bf16 compute under fp32 masters: FSDP2 set the frozen units' gradient dtypes to none at the first forward
    "fsdp2": lambda: FSDP2(save_distributed_checkpoint=False, param_dtype="bfloat16"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layers_frozen_during_clm_only(tokenizer_dir, strategy):
    """No weight gradient is computed for them; also under FSDP2, which swaps every parameter for a sharded
    one after the callbacks' setup, and gives the unfrozen layers fp32 gradients again. A weight decay
    large enough to show (lr × wd = 1e-4) must not reach the frozen weights either."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3, weight_decay=0.1)
    initial = [full(layer.attn.Wqkv.weight) for layer in module.model.model.layers]
    snaps = fit_through_switch(module, LayerFreeze("0-1"), clm_steps=3, strategy=STRATEGIES[strategy]())
    for step in range(3):  # CLM: layers 0 and 1 untouched, their AdamW state as their first step finds it
        assert torch.equal(snaps.weights[step][0], initial[0]) and torch.equal(snaps.weights[step][1], initial[1])
        assert not torch.equal(snaps.weights[step][2], initial[2])
        assert snaps.adam_steps[step] == [0, 0, step + 1]
        assert snaps.with_gradient[step] == [False, False, True]
    for step in (3, 4):  # MLM: every layer trains, the frozen ones from their first step
        assert not torch.equal(snaps.weights[step][0], snaps.weights[step - 1][0])
        assert snaps.adam_steps[step] == [step - 2, step - 2, step + 1]
        assert snaps.with_gradient[step] == [True, True, True]
    assert {p.grad.dtype for p in module.model.model.layers[0].parameters()} == {torch.float32}  # last step's
    assert all(p.requires_grad for p in module.parameters())  # as it came, after fit


def test_a_layer_two_freezes_share_stays_frozen_while_either_holds_it(tokenizer_dir, caplog):
    """Layer 1 is held during CLM by one freeze and during MLM by the other: the CLM freeze, listed last,
    made it trainable again at the switch, after the MLM freeze had frozen it. Each freeze says what it holds (the
    log said nothing of it, and the model summary counts every weight trainable)."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    initial = [full(layer.attn.Wqkv.weight) for layer in module.model.model.layers]
    size = [sum(p.numel() for p in layer.parameters()) for layer in module.model.model.layers]
    with caplog.at_level("INFO"):
        snaps = fit_through_switch(module, LayerFreeze("1-2", during="mlm"), LayerFreeze("0-1", during="clm"),
                                   clm_steps=2)
    for held, parameters in (("1–2 frozen during MLM", size[1] + size[2]), ("0–1 frozen during CLM", size[0] + size[1])):
        assert f"[LayerFreeze] encoder layers {held}: {parameters:,} parameters not updated while" in caplog.text
    assert snaps.with_gradient == [[False, False, True]] * 2 + [[True, False, False]] * 2
    assert torch.equal(snaps.weights[-1][1], initial[1])
    assert all(p.requires_grad for p in module.parameters())


def test_under_ddp_frozen_layers_keep_requiring_gradients_which_are_dropped(tokenizer_dir):
    """DDP's reducer waits for every parameter that required a gradient when it wrapped the model:
    a weight that stopped requiring one mid-run failed the next step ("parameters that were not used")."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    initial = full(module.model.model.layers[0].attn.Wqkv.weight)
    snaps = fit_through_switch(module, LayerFreeze("0-1"), clm_steps=2, strategy="ddp")
    assert torch.equal(snaps.weights[1][0], initial) and not torch.equal(snaps.weights[2][0], initial)
    assert [steps[0] for steps in snaps.adam_steps] == [0, 0, 1, 2]


class GradNorms(L.Callback):
    """Each step's ``train/grad_norm`` as NonFiniteGuard logged it, and the norm of the gradients the step then took
    (listed last, after every other callback's ``on_before_optimizer_step``)."""

    def __init__(self):
        self.logged, self.stepped = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.logged.append(float(trainer.callback_metrics["train/grad_norm"]))
        self.stepped.append(float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()
                                                                 if p.grad is not None])))


def test_under_ddp_a_guard_listed_before_the_freeze_checks_the_gradients_the_step_takes(tokenizer_dir):
    """The frozen layers' gradients were dropped in LayerFreeze's ``on_before_optimizer_step``: a NonFiniteGuard
    listed before it logged and checked a norm that still held them (1.2289683 for the step's 1.2289588 here, CLM's
    two steps), not the one the clipping and AdamW then saw."""
    norms = GradNorms()
    fit_through_switch(tiny_module(tokenizer_dir), NonFiniteGuard(), LayerFreeze("0-1"), norms, clm_steps=2,
                       strategy="ddp")
    assert len(norms.logged) == 4 and norms.logged == norms.stepped


@pytest.mark.parametrize("strategy", ["auto", "ddp"], ids=["single_device", "ddp"])
def test_a_range_above_layer_0_freezes_those_layers_only(tokenizer_dir, strategy):
    """The recipe's other ablation freezes 8-14, not the bottom layers: the named layers stay fixed (with
    their first-step optimizer state) and the layer below them trains, whichever way they are frozen."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3)
    initial = [full(layer.attn.Wqkv.weight) for layer in module.model.model.layers]
    snaps = fit_through_switch(module, LayerFreeze("1-2"), clm_steps=2, strategy=strategy)
    for step in range(2):
        assert [torch.equal(weight, before) for weight, before in zip(snaps.weights[step], initial)] == [False, True, True]
        assert snaps.adam_steps[step] == [step + 1, 0, 0]
    assert [steps[1:] for steps in snaps.adam_steps[2:]] == [[1, 1], [2, 2]]  # they train from the switch


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step == self.step


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "gathered"])
def test_a_checkpoint_saved_while_layers_are_frozen_resumes_under_fsdp2(tokenizer_dir, tmp_path, sharded):
    """FSDP2 loads optimizer state into a fresh optimizer's, which holds every trainable parameter:
    a checkpoint without the frozen layers' state was refused ("Missing key in checkpoint state_dict")."""
    phases = lambda: [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]

    def trainer(*callbacks):
        return L.Trainer(
            accelerator="cpu", devices=1, strategy=FSDP2(save_distributed_checkpoint=sharded), max_steps=-1,
            max_epochs=-1, callbacks=[ObjectiveSchedule(phases()), LayerFreeze("0-1"), *callbacks],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )

    data = lambda: torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    first = trainer(StopAt(2))
    first.fit(tiny_module(tokenizer_dir, learning_rate=1e-3), data())
    first.save_checkpoint(tmp_path / "clm.ckpt")
    snaps = Snapshots()
    resumed = trainer(snaps)
    resumed.fit(tiny_module(tokenizer_dir, learning_rate=1e-3), data(), ckpt_path=tmp_path / "clm.ckpt")
    assert resumed.global_step == 6
    assert [steps[:2] for steps in snaps.adam_steps] == [[0, 0], [0, 0], [1, 1], [2, 2]]  # frozen to the switch
    assert torch.equal(snaps.weights[1][0], snaps.weights[0][0])
    assert not torch.equal(snaps.weights[3][0], snaps.weights[2][0])


def test_a_run_resumed_after_the_switch_keeps_the_unfrozen_layers_optimizer_state(tokenizer_dir, tmp_path):
    """The first-step state is for frozen layers without any; resumed after the switch, layers 0-1 have two MLM
    updates' moments, and their step count put back to 0 would restart AdamW's bias correction mid-run."""
    phases = lambda: [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=3 * TOKENS_PER_STEP)]

    def trainer(*callbacks):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1,
                         callbacks=[ObjectiveSchedule(phases()), LayerFreeze("0-1"), *callbacks], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    data = lambda: torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    first = trainer(StopAt(4))
    first.fit(tiny_module(tokenizer_dir, learning_rate=1e-3), data())
    assert [adam_step(first.optimizers[0], layer.attn.Wqkv.weight) for layer in first.lightning_module.model.model.layers] == [2, 2, 4]
    first.save_checkpoint(tmp_path / "step4.ckpt")
    snaps = Snapshots()
    trainer(snaps).fit(tiny_module(tokenizer_dir, learning_rate=1e-3), data(), ckpt_path=tmp_path / "step4.ckpt")
    assert snaps.adam_steps == [[3, 3, 5]]


@pytest.mark.parametrize("spec, expected", [("0-7", list(range(8))), ("8-14", list(range(8, 15))), ("0-1,5", [0, 1, 5]), ([3, 1], [1, 3])])
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.parametrize("spec, message", [("first-eight", "write ranges like '0-7'"), ("7-0", "names no layer"),
                                           ("0-3,7-5", "'7-5' names no layer"),  # was read as 0-3
                                           ("8-", "write ranges like '0-7'")])  # was read as layer 8 alone
def test_bad_layer_spec_names_the_field(spec, message):
    with pytest.raises(UserError, match=f"LayerFreeze.layers={spec!r}.*{message}"):
        parse_layers(spec)


@pytest.mark.parametrize("spec", [[0, "1"], [True, 2], [0.0]])  # a TypeError from sorting; True read as layer 1
def test_a_layer_list_holds_numbers_only(spec):
    with pytest.raises(UserError, match=r"LayerFreeze.layers=.*a list holds layer numbers only"):
        parse_layers(spec)


def test_the_first_step_state_is_made_without_changing_a_learning_rate_or_a_weight():
    """It steps at lr 0 and must put each group's rate back: a run with a freeze but no schedule (nothing sets the
    rate at the first batch) took its first step at lr 0."""
    held, trained = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [held], "lr": 1e-3}, {"params": [trained], "lr": 2e-3}],
                                  weight_decay=0.1)
    add_first_step_state(optimizer, [held])
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 2e-3]
    assert int(optimizer.state[held]["step"]) == 0 and not optimizer.state[held]["exp_avg"].any()
    assert trained not in optimizer.state and torch.equal(held.detach(), torch.ones(3)) and held.grad is None


def test_the_first_step_state_is_made_only_before_any_gradient_and_only_for_the_optimizers_parameters():
    """Its lr-0 step would move AdamW's moments and step count of any parameter that already had a gradient; a
    frozen parameter the optimizer does not hold, given an entry, would break saving the optimizer's state."""
    held, trained, unknown = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([held, trained])
    add_first_step_state(optimizer, [unknown])
    assert not optimizer.state and optimizer.state_dict()["state"] == {}
    trained.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="must run before any gradient exists"):
        add_first_step_state(optimizer, [held])
    assert not optimizer.state


def test_a_failed_fit_leaves_every_layer_trainable(tokenizer_dir):
    """Lightning skips the callbacks' teardown when fit raises: a module reused after the failure (a notebook)
    trained on with layers 0-1 frozen."""

    class FailsAtStep2(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("the data went away")

    module = tiny_module(tokenizer_dir)
    with pytest.raises(RuntimeError, match="the data went away"):
        fit_through_switch(module, LayerFreeze("0-1"), FailsAtStep2(), clm_steps=3)
    assert all(p.requires_grad for p in module.parameters())


def trainer_with(*callbacks):
    return L.Trainer(callbacks=list(callbacks), logger=False, enable_checkpointing=False)


def test_layers_beyond_the_model_fail_at_setup(tokenizer_dir):
    """Refused, and the refusal is what Lightning's exception hooks see through: the teardown they run indexed
    the missing layer, and its IndexError took the refusal's place (the run folder was then left behind)."""
    module, freeze, trainer = tiny_module(tokenizer_dir), LayerFreeze("2-3"), trainer_with()
    with pytest.raises(UserError, match=r"layers 3 do not exist") as refused:
        freeze.setup(trainer, module, "fit")
    freeze.on_exception(trainer, module, refused.value)
    assert all(p.requires_grad for p in module.parameters())
    with pytest.raises(UserError, match=r"layers -1 do not exist: the model has layers 0–2"):
        LayerFreeze([-1]).setup(trainer, module, "fit")  # Python's index of the last layer, which it froze
    with pytest.raises(UserError, match=r"layers 3–99 do not exist: the model has layers 0–2$"):  # not 97 numbers
        LayerFreeze("0-99").setup(trainer, module, "fit")


def test_an_objective_name_the_run_never_trains_fails_at_setup(tokenizer_dir):
    module = tiny_module(tokenizer_dir)
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=8), Phase(MaskedLM(), tokens=8)])
    with pytest.raises(UserError, match=r"LayerFreeze.during='CLM' matches no objective of this run \(clm, mlm\)"):
        LayerFreeze("0-1", during="CLM").setup(trainer_with(schedule), module, "fit")
    with pytest.raises(UserError, match=r"during='clm' matches no objective of this run \(mlm\)"):
        LayerFreeze("0-1").setup(trainer_with(), module, "fit")  # no schedule: the module's MaskedLM only
    freeze = LayerFreeze("0-1")
    freeze.setup(trainer_with(schedule, freeze), module, "fit")


def test_a_freeze_listed_before_the_schedule_fails_at_setup(tokenizer_dir):
    """It would freeze by the previous batch's objective: the first micro-batch after the switch (or after
    resuming in MLM) would leave the frozen layers without gradients."""
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=8), Phase(MaskedLM(), tokens=8)])
    freeze = LayerFreeze("0-1")
    module = tiny_module(tokenizer_dir)
    with pytest.raises(UserError, match="list LayerFreeze after ObjectiveSchedule"):
        freeze.setup(trainer_with(freeze, schedule), module, "fit")
    freeze.setup(trainer_with(freeze, schedule), module, "validate")  # nothing is frozen there
