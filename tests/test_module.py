"""EncoderPretraining's own rules: what AdamW decays, the recipe's optimizer defaults, the MLM masks
a training step draws (new at every step, micro-batch and rank; the same again for the same ones), and
a step's gradient as a mean over every position it predicts, however its micro-batches split it."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cpt_lightning import EncoderPretraining
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import IGNORE_INDEX, CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module

WITH_BIASES = dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True, decoder_bias=True)


def test_weight_decay_shrinks_every_matrix_and_no_bias_or_norm(tokenizer_dir):
    """One AdamW step on zero gradients moves a parameter only by its decoupled weight decay."""
    module = tiny_module(tokenizer_dir, weight_decay=0.5, model_config=WITH_BIASES)
    optimizer = module.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, trained)) == sorted(id(p) for p in module.parameters())  # each in one group, none left out
    after = dict(module.model.named_parameters())
    decayed = {name for name, p in after.items() if not torch.equal(p, before[name])}
    matrices = {name for name, p in after.items() if p.ndim >= 2}
    assert "model.embeddings.tok_embeddings.weight" in matrices and "head.dense.bias" not in matrices  # what is checked
    assert decayed == matrices  # the embeddings (tied to the decoder) included; biases and norm weights never
    for name in matrices:
        torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("peak", [2e-4, 1e-3])
def test_decoupled_weight_decay_shrinks_by_the_schedules_share_of_the_peak_whatever_the_peak(tokenizer_dir, peak):
    """Composer's DecoupledAdamW (ModernBERT's trainer, the recipe's 1e-5): a step at lr_t multiplies a matrix by
    1 − 1e-5 · lr_t / peak. torch's AdamW reads the same 1e-5 as 1 − lr_t · 1e-5: at peak 2e-4, 5,000 times less."""
    for decoupled, shrink in ((True, 1e-5 * 0.5), (False, peak / 2 * 1e-5)):
        module = tiny_module(tokenizer_dir, learning_rate=peak, weight_decay=1e-5, decoupled_weight_decay=decoupled)
        optimizer = module.configure_optimizers()["optimizer"]
        matrix = module.model.model.embeddings.tok_embeddings.weight
        before = matrix.detach().double().clone()
        for group in optimizer.param_groups:
            group["lr"] = peak / 2  # halfway down a decay
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        torch.testing.assert_close(matrix.detach().double(), before * (1 - shrink), rtol=1e-6, atol=0)  # fp32: ~6e-8
    module = tiny_module(tokenizer_dir, learning_rate=0.0, decoupled_weight_decay=True)  # a run that only measures
    assert module.configure_optimizers()["optimizer"].param_groups[0]["weight_decay"] == 0.0


def test_optimizer_defaults_are_the_recipes(tokenizer_dir):
    """AdamW lr 2e-4, betas (0.9, 0.98), eps 1e-6, weight decay 1e-5 on matrices: what a config that
    names none of them (demo_cpu.yaml, a user's own) trains with."""
    module = EncoderPretraining(model_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2), tokenizer=str(tokenizer_dir))
    configured = module.configure_optimizers()
    decay, no_decay = configured["optimizer"].param_groups
    assert configured["lr_scheduler"]["scheduler"].base_lrs == [2e-4, 2e-4]
    assert (decay["betas"], decay["eps"], decay["weight_decay"], no_decay["weight_decay"]) == ((0.9, 0.98), 1e-6, 1e-5, 0.0)


class RecordedMaskedLM(MaskedLM):
    """MaskedLM that keeps which positions it masked, call after call."""

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        self.masked.append(labels != IGNORE_INDEX)
        return inputs, labels


def masks_drawn(tokenizer_dir, steps=3, accumulate=2):
    """Train on one fixed pair of rows, again and again, an epoch a step (``batch_idx`` restarts at every
    epoch, as when a run goes round its data again); the masks of every micro-batch, in order."""
    objective = RecordedMaskedLM()
    objective.masked = []
    rows = torch.randint(1000, 20000, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows, "position_ids": torch.arange(64).expand(2, -1)}
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_module(tokenizer_dir, objective=objective),
                torch.utils.data.DataLoader([batch] * accumulate, batch_size=None))
    return objective.masked


def test_training_masks_change_with_step_micro_batch_and_rank(tokenizer_dir, monkeypatch):
    """Masks seeded without the step would predict the same 15% of a row's positions at every step, and
    without the rank the same pattern on every GPU; an identical run must still draw identical masks."""
    masks = masks_drawn(tokenizer_dir)
    assert len(masks) == 6
    assert all(not torch.equal(masks[i], masks[j]) for i in range(6) for j in range(i))
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_drawn(tokenizer_dir)))
    monkeypatch.setattr(EncoderPretraining, "global_rank", property(lambda self: 1))
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks_drawn(tokenizer_dir)))


def test_the_configured_seed_changes_the_masks(tokenizer_dir):
    """``seed`` is the masking seed the config and the model card record: another seed must draw other
    masks at the same step, micro-batch and rank (a generator keyed without it ignores the setting)."""
    def draw(seed):
        return torch.rand(64, generator=tiny_module(tokenizer_dir, seed=seed)._generator(0, step=0))

    assert torch.equal(draw(17), draw(17))
    assert not torch.equal(draw(17), draw(18))


@pytest.mark.parametrize("objective, attention", [(CausalLM, "causal"), (MaskedLM, "bidirectional")], ids=["clm", "mlm"])
def test_a_training_step_attends_as_its_objective_says(tokenizer_dir, objective, attention):
    """The step's loss is the cross-entropy of a forward under the objective's attention kind. A CLM step
    run bidirectionally sees the very token it predicts: its loss collapses, and nothing else notices."""
    # weights ten times the default scale: at the default, near-uniform logits make both losses log(vocab)
    module = tiny_module(tokenizer_dir, attn_implementation="sdpa", model_config={"initializer_range": 0.2})
    module.set_objective(objective())
    rows = torch.randint(1000, 20000, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows, "position_ids": torch.stack([packed_position_ids([25, 15]), packed_position_ids([40])])}
    loss, _, _ = module.objective_step(batch, torch.Generator().manual_seed(5))
    input_ids, labels = module.objective.build_inputs(rows, batch["position_ids"], torch.Generator().manual_seed(5))
    predicted = labels != IGNORE_INDEX
    with torch.no_grad():
        expected = {kind: F.cross_entropy(module(input_ids, batch["position_ids"], kind).logits[predicted].float(),
                                          labels[predicted]) for kind in ("causal", "bidirectional")}
    assert not torch.allclose(expected["causal"], expected["bidirectional"], rtol=1e-3)  # the check can tell them apart
    torch.testing.assert_close(loss.detach(), expected[attention], rtol=1e-5, atol=1e-6)


def right_then_wrong(tokenizer_dir):
    """A CLM module that predicts one token everywhere, and two micro-batches: 32 predicted positions, all right
    (loss ~0), then 63, all wrong (loss ~100)."""
    module = tiny_module(tokenizer_dir, objective=CausalLM())
    favourite = 1234
    with torch.no_grad():
        module.model.decoder.bias[favourite] = 100.0  # every prediction is this token
    pairs = {"input_ids": torch.full((1, 64), favourite), "position_ids": packed_position_ids([2] * 32)[None]}
    other = torch.randint(2000, 20000, (1, 64), generator=torch.Generator().manual_seed(0))
    document = {"input_ids": other, "position_ids": torch.arange(64)[None]}
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return module, trainer, [pairs, document]


def validation_losses(module, batches) -> list[float]:
    with torch.no_grad():
        return [module.objective_step(batch, module._row_generators(batch))[0].item() for batch in batches]


def test_validation_seeds_each_row_from_its_tokens_in_their_order(tokenizer_dir):
    """The same row draws the same masks wherever it is read; a row and its reverse (the same token sum) draw
    their own: seeded by the sum alone, rows holding the same tokens masked the same positions."""
    module = tiny_module(tokenizer_dir)
    row = torch.randint(1000, 5000, (64,), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": torch.stack([row, row.flip(0), row])}
    draws = [torch.rand(16, generator=generator) for generator in module._row_generators(rows)]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_validation_weighs_each_micro_batch_by_the_positions_it_predicts(tokenizer_dir):
    """An evaluation's loss and accuracy are per predicted position, as the training curves are: a mean of
    micro-batch means would give a micro-batch predicting 32 positions the weight of one predicting 63."""
    module, trainer, batches = right_then_wrong(tokenizer_dir)
    (metrics,) = trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert metrics["val/clm_accuracy"] == pytest.approx(32 / 95)
    losses = validation_losses(module, batches)  # one loader: micro-batches 0 and 1
    assert metrics["val/clm_loss"] == pytest.approx((32 * losses[0] + 63 * losses[1]) / 95, rel=1e-5)
    assert losses[1] > 50 > 1 > losses[0]  # the two micro-batches differ: the weights matter


def test_each_validation_loader_has_its_own_figures_beside_those_over_all(tokenizer_dir):
    """Two loaders (a datamodule's two ``val_sources``): each one's figures under its name, Lightning's
    ``dataloader_<i>`` without a datamodule naming them, and the figures over all of them per predicted position."""
    module, trainer, batches = right_then_wrong(tokenizer_dir)
    loaders = [torch.utils.data.DataLoader([batch], batch_size=None) for batch in batches]
    metrics, _ = trainer.validate(module, loaders)  # one dict per loader, each holding every figure
    losses = validation_losses(module, batches)  # micro-batch 0 of loaders 0 and 1
    assert metrics["val/dataloader_0/clm_accuracy"] == 1 and metrics["val/dataloader_1/clm_accuracy"] == 0
    assert metrics["val/dataloader_0/clm_loss"] == pytest.approx(losses[0], rel=1e-5)
    assert metrics["val/dataloader_1/clm_loss"] == pytest.approx(losses[1], rel=1e-5)
    assert metrics["val/clm_accuracy"] == pytest.approx(32 / 95)
    assert metrics["val/clm_loss"] == pytest.approx((32 * losses[0] + 63 * losses[1]) / 95, rel=1e-5)
    assert not [key for key in metrics if "dataloader_idx" in key]  # Lightning's suffix: not added to ours


def test_a_non_finite_loss_is_left_out_of_the_logged_mean():
    """NaN or infinite alike (NonFiniteGuard skips both updates): one infinite micro-batch made its window's
    train/clm_loss inf, hiding the finite steps, and a window of infinite losses alone drew inf where NaN drew none."""
    from cpt_lightning.module import WeightedMeanLoss

    for fault in (float("nan"), float("inf"), float("-inf")):
        metric = WeightedMeanLoss()
        metric.update(torch.tensor(fault), 5)
        assert metric.compute().isnan(), fault  # nothing kept: the window draws no point
        metric.update(torch.tensor(3.0), 5)
        metric.update(torch.tensor(1.0), 15)
        assert metric.compute().item() == 1.5, fault


def test_the_logged_loss_sums_stay_float32_when_the_module_is_cast_to_bf16():
    """``precision: bf16-true`` casts the module with ``.to(torch.bfloat16)``, metric states included (torchmetrics
    guards ``.bfloat16()``, not ``.to``): train/*_loss came out in steps of 1/16 nat near 10."""
    from cpt_lightning.module import WeightedMeanLoss

    metric = WeightedMeanLoss().to(torch.bfloat16)
    for loss in (10.8308, 10.8228, 10.7966):
        metric.update(torch.tensor(loss), 4096)
    assert metric.mean_value.dtype == metric.weight.dtype == torch.float32
    assert metric.compute().item() == pytest.approx((10.8308 + 10.8228 + 10.7966) / 3, abs=1e-5)
    metric.reset()  # back to the defaults, which are cast too
    assert metric.mean_value.dtype == torch.float32


def test_the_rotary_frequencies_stay_those_the_exported_model_loads_when_the_module_is_cast_to_bf16(tokenizer_dir):
    """They are not saved: cast to bf16 with the module (``precision: bf16-true``), training rotated by other
    frequencies than the exported model recomputes in float32."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding

    module = tiny_module(tokenizer_dir).to(torch.bfloat16)
    assert module.model.model.embeddings.tok_embeddings.weight.dtype == torch.bfloat16
    fresh = dict(ModernBertRotaryEmbedding(module.model.config).named_buffers())
    frequencies = {name.rpartition("rotary_emb.")[2]: buffer for name, buffer in module.named_buffers()
                   if name.endswith("inv_freq")}
    assert frequencies.keys() == fresh.keys() and len(fresh) >= 2
    assert all(torch.equal(frequencies[name], fresh[name]) for name in fresh)  # float32, unrounded


def test_train_curves_are_per_position_accuracy_and_the_exponential_of_the_loss(tokenizer_dir, monkeypatch):
    """train/<name>_accuracy is the fraction of predicted positions that are right ("micro": torchmetrics'
    default "macro" would average over the classes instead) and train/<name>_perplexity is exp(loss)."""
    module = tiny_module(tokenizer_dir, objective=CausalLM())
    logged = []

    class Recorder:
        def log_metrics(self, values, step):
            logged.append(values)

    monkeypatch.setattr(EncoderPretraining, "loggers", property(lambda self: [Recorder()]))
    # token 5 right three times, token 7 wrong once: 3/4 of the positions, but 1/2 averaged over the classes
    module._update_metrics(torch.tensor(2.0), torch.tensor([5, 5, 5, 1]), torch.tensor([5, 5, 5, 7]))
    module.flush_objective_metrics(step=0)
    (values,) = logged
    assert values["train/clm_accuracy"] == pytest.approx(0.75)
    assert values["train/clm_loss"] == pytest.approx(2.0)
    assert values["train/clm_perplexity"] == pytest.approx(math.exp(2.0))


class StepGradient(L.Callback):
    """The step's gradient as the NonFiniteGuard sees it, and the logged train/loss."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradient = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = trainer.callback_metrics.get("train/loss")


def test_a_steps_gradient_and_loss_are_the_same_however_its_micro_batches_split_it(tokenizer_dir):
    """Two rows, one a 32-token document (31 positions predicted), one 16 documents of 2 (16): as one micro-batch
    or as two accumulated. Each micro-batch's mean loss weighed alike: the split's gradient was 35% off (a position
    of the short row weighed 31/16 times more) and its train/loss the mean of the two rows' means."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 50000, (32,), generator=g), "position_ids": lengths}
            for lengths in (packed_position_ids([32]), packed_position_ids([2] * 16))]

    def one_step(micro_batch, accumulate):
        module = tiny_module(tokenizer_dir, objective=CausalLM(), learning_rate=1e-3)
        recorded = StepGradient()
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[recorded], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=micro_batch))
        return recorded

    whole, split = one_step(micro_batch=2, accumulate=1), one_step(micro_batch=1, accumulate=2)
    assert (split.gradient - whole.gradient).norm() / whole.gradient.norm() < 1e-5  # fp32 sums in another order
    torch.testing.assert_close(split.loss, whole.loss)


def test_a_steps_gradient_is_that_of_the_mean_loss_over_every_position_it_predicted(tokenizer_dir):
    """An absolute reference, not one split against another (both splits of the test above agree without the
    averaging too): one MLM step of two accumulated micro-batches against autograd of the mean cross-entropy over
    the positions both masked. Without the averaging the step's gradient was summed over positions and divided by
    the tokens: 0.16 times the mean's for MLM at 15%, read by grad_norm and clipping, 6 times smaller after the
    switch from CLM."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 50000, (64,), generator=g), "position_ids": packed_position_ids([64])}
            for _ in range(2)]
    reference = tiny_module(tokenizer_dir, objective=MaskedLM())
    summed, predicted = 0.0, 0
    for index, row in enumerate(rows):  # the masks the step draws: micro-batch index, step 0
        loss, _, targets = reference.objective_step({k: v[None] for k, v in row.items()}, reference._generator(index, step=0))
        summed, predicted = summed + loss * targets.numel(), predicted + targets.numel()
    (summed / predicted).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])

    recorded = StepGradient()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[recorded], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_module(tokenizer_dir, objective=MaskedLM(), learning_rate=1e-3),
                torch.utils.data.DataLoader(rows, batch_size=1))
    assert 0 < predicted < 64 and (recorded.gradient - expected).norm() / expected.norm() < 1e-5


def test_fp16_with_a_grad_scaler_updates_from_the_first_step(tokenizer_dir):
    """The loss handed to backward keeps a mean's size: summed over a micro-batch's positions, its gradients
    overflowed fp16 at the GradScaler's starting scale, and the scaler skipped updates until it had halved the
    scale about log2(positions) times (NonFiniteGuard stopped the run after 5)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from callbacks import NonFiniteGuard

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 50000, (64,), generator=g), "position_ids": packed_position_ids([64])}
            for _ in range(3)]
    guard = NonFiniteGuard()
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, plugins=[precision], callbacks=[guard], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_module(tokenizer_dir, objective=CausalLM(), learning_rate=1e-3, loss_chunk_size=None),
                torch.utils.data.DataLoader(rows, batch_size=1))
    assert (guard.skipped, precision.scaler.get_scale()) == (0, 65536.0)


class SmoothedCLM(CausalLM):
    """An objective with its own loss: it trains on dense logits, not through the fused loss."""

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=0.1)


@pytest.mark.parametrize("phases", [None, [SmoothedCLM, MaskedLM]], ids=["one-objective", "a-later-phase-fused"])
def test_the_fused_loss_under_fp16_is_refused_before_the_first_step(tokenizer_dir, phases):
    """The fused loss computes its gradients in forward, before the GradScaler's factor arrives: fp16 flushed most
    softmax terms (p / positions, under 6e-8) to 0, a 14% relative error in the decoder bias's gradient at 1,024
    positions of a 50k vocabulary, and the error grows with the positions. Every phase's objective counts: one
    whose first phase has a loss of its own (dense logits) trained its MLM phase fused in fp16."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from callbacks.objective_schedule import ObjectiveSchedule, Phase

    schedule = [ObjectiveSchedule([Phase(objective(), tokens=16) for objective in phases])] if phases else []
    trainer = L.Trainer(accelerator="cpu", max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=schedule,
                        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    rows = [{"input_ids": torch.randint(5, 500, (16,)), "position_ids": packed_position_ids([16])}] * 2
    module = tiny_module(tokenizer_dir, objective=None if phases else CausalLM())
    with pytest.raises(UserError, match=r"loss_chunk_size=4096 with fp16 \(trainer.precision 16-mixed.*use bf16-mixed, "
                                        r"as the recipes do, or loss_chunk_size: null"):
        trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=1))


def test_a_restart_marked_at_the_resumed_step_drops_the_points_the_killed_run_logged_past_it(tmp_path):
    """A run killed past its last checkpoint (SIGKILL, the out-of-memory killer) had logged steps 3 to 5, which its
    resume from step 3 logs again: TensorBoard drew each of them twice, with two times and throughputs."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cpt_lightning.module import mark_restart

    killed = TensorBoardLogger(tmp_path, name="run", version="")
    killed.log_metrics({"train/time": 1.0}, step=0)
    for step in range(1, 6):
        killed.log_metrics({"train/time": float(step), "train/loss": 10.0 - step}, step=step)
    killed.finalize("failed")
    # events files are read in name order, their start time; two started within a second in one process differ by
    # a writer count, which sorts 10 before 9 (the test failed so in the suite): the killed run's started earlier
    (killed_file,) = (tmp_path / "run").glob("events.out.tfevents.*")
    killed_file.rename(killed_file.with_name("events.out.tfevents.1000000000.killed"))
    resumed = TensorBoardLogger(tmp_path, name="run", version="")  # a new events file in the same folder
    mark_restart([resumed], 3)
    for step in range(3, 6):
        resumed.log_metrics({"train/time": 0.5 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/time")] == [
        (0, 1.0), (1, 1.0), (2, 2.0), (3, 3.5), (4, 4.5), (5, 5.5)]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # the resumed run has not logged it again yet
