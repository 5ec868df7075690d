"""EncoderPretraining: a Hugging Face ModernBERT masked-LM trained by the *current* objective.

The module owns the encoder, the optimizer (AdamW, no decay on biases/norms) and the token
clock. Which objective runs, and the learning-rate shape, can be swapped while training (the
ObjectiveSchedule callback does it at phase boundaries); the optimizer state is never rebuilt.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoTokenizer

from cpt_lightning.attention import attention_inputs, kernel_for_run
from cpt_lightning.data.manifest import SOURCES_RECORD
from cpt_lightning.devices import host_scalar
from cpt_lightning.errors import UserError, raise_on_every_rank
from cpt_lightning.flops import training_flops
from cpt_lightning.model_loading import (
    MODEL_CONFIG_RECORD,
    TOKENIZER_RECORD,
    build_model,
    changed_compute_settings,
    load_named,
    local_absolute,
    refuse_unfit_checkpoint,
    shapes,
    tokenizer_differences,
    tokenizer_facts,
    tokenizer_identity,
)
from cpt_lightning.objectives import IGNORE_INDEX, MaskedLM, Objective, TokenizerFacts, bind_checked, check_objective
from cpt_lightning.peak_flops import compute_dtype
from cpt_lightning.schedules import TokenSchedule, warmup_then_constant
from cpt_lightning.validation import ValidationSums, sources_layout


# Compiled variants allowed per code object (dynamo's default: 8); see EncoderPretraining.compile_model.
RECOMPILE_LIMIT = 32
TRAINING_STREAM, VALIDATION_STREAM = 0, 1  # the first key of a mask draw's seed: training's never draws validation's


def mark_restart(loggers, step: int) -> None:
    """Tell TensorBoard the run starts again at ``step`` (its restart marker, as ``SummaryWriter(purge_step=)`` writes
    one): the points a killed run logged from there on, past its last checkpoint (a SIGKILL, the out-of-memory
    killer, a lost node), are dropped, where each of those steps was drawn twice, once per try, with two times,
    throughputs and hours left. A run stopped by SIGTERM or max_time saved where it stopped: nothing to drop.

    Written for a resume from ``last.ckpt`` only, before any training point: a rollback to an earlier checkpoint
    keeps the abandoned steps' points in the event files, to compare with (TensorBoard's default viewer drops them
    from the rollback step on by itself; ``--load_fast=false`` and EventAccumulator keep them). A validation of the
    step before (a resume's first) stays."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights (1-D) are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def bound_val_objectives(objectives: dict[str, Objective], tokens: TokenizerFacts) -> dict[str, Objective]:
    """The validation objectives, checked and given the tokenizer's ids before any batch: a mistake in one
    would otherwise surface at the first validation, hours into a run."""
    for key, objective in objectives.items():
        if not isinstance(key, str) or not key.strip() or "/" in key:
            raise UserError(f"model.init_args.val_objectives: key {key!r} must be a name without '/' (it names "
                            "the curve val/<key>_loss)")
        check_objective(objective)
        bind_checked(objective, tokens)
    return dict(objectives)


def check_inputs(objective: Objective, rows: torch.Tensor, built) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``build_inputs`` returned, checked before the model turns a mistake into an unreadable error
    (types, shapes and dtypes only: no device sync), as ``(input_ids, labels)`` with int64 labels, which both the
    fused loss and ``F.cross_entropy`` read (int32 labels passed one and not the other)."""
    pair = isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(t, torch.Tensor) for t in built)
    if pair and built[0].shape == built[1].shape == rows.shape and all(
            not t.is_floating_point() and t.dtype != torch.bool for t in built):
        return built[0], built[1].long()
    found = (f"input_ids {list(built[0].shape)} and labels {list(built[1].shape)} ({built[0].dtype}, {built[1].dtype})"
             if pair else f"a {type(built).__name__}")
    raise UserError(
        f"{type(objective).__name__}.build_inputs returned {found}: it must return (input_ids, labels), both integer "
        f"and shaped like the batch {list(rows.shape)}, labels {IGNORE_INDEX} where nothing is predicted"
    )


class _ObjectiveLoss:
    """Adapts ``Objective.loss`` to the model's ``loss_function(logits, labels, vocab_size, **kw)``.

    A micro-batch with nothing to predict gets a zero loss that still reaches the head and decoder,
    as the fused loss's does: a mean over no position is NaN, which NonFiniteGuard would take for a
    divergence and drop the whole step for, and every rank must run the same backward under FSDP2.
    """

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, logits, labels, vocab_size=None, **kwargs):
        if labels.numel() == 0:
            return logits.sum() * 0.0
        loss = self.objective.loss(logits, labels)
        if not torch.is_tensor(loss) or loss.dim() != 0:  # shape only: no device sync
            raise UserError(f"{type(self.objective).__name__}.loss returned {_described(loss)}: {LOSS_CONTRACT}")
        return loss


# The module weighs each micro-batch's loss by its predicted positions, logs exp(loss) as the perplexity and the
# argmax over the vocabulary as the predictions (accuracy against the labels).
LOSS_CONTRACT = "it must return the mean over the predicted positions, a 0-dimensional float tensor"


def _described(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def default_loss(objective: Objective) -> bool:
    """Whether the objective keeps ``Objective.loss`` (cross-entropy, which the fused loss computes) or has its own."""
    return type(objective).loss is Objective.loss


def check_loss(trial: Objective, labels: torch.Tensor, vocab_size: int) -> None:
    """Try an objective's own ``loss`` on a few of the first batch's labels: a per-position or integer loss
    failed inside the metrics only at its phase switch (after 50B tokens of the English recipe's CLM phase).
    ``trial`` is a copy of the run's objective (a loss that counts its calls counts only the run's)."""
    if labels.numel() == 0:
        return
    with torch.inference_mode(False), torch.enable_grad():  # as training computes it, from a validation step too
        logits = torch.randn(labels.numel(), vocab_size, device=labels.device, generator=torch.Generator(
            device=labels.device).manual_seed(0), requires_grad=True)
        loss = trial.loss(logits, labels.clone())  # not the validation's inference tensor: saved for backward
    if not torch.is_tensor(loss) or loss.dim() != 0 or not loss.is_floating_point() or not loss.requires_grad:
        raise UserError(f"{type(trial).__name__}.loss returned {_described(loss)} on the first batch"
                        f"{'' if not torch.is_tensor(loss) or loss.requires_grad else ' without a gradient'}: "
                        f"{LOSS_CONTRACT} computed from the logits")


class WeightedMeanLoss(Metric):
    """torchmetrics' ``MeanMetric`` (default ``nan_strategy="warn"``) for one loss per micro-batch, without its
    host checks: a NaN or infinite loss is left out of the mean on the device instead of after a ``.item()`` (and
    without the warning; NonFiniteGuard warns about that step and skips its update). An infinite one kept made the
    window's point inf, hiding its finite steps. ``MeanMetric(nan_strategy="disable")`` would not
    do: it drops the weights."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("mean_value", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        kept = value.isfinite()
        self.mean_value += torch.where(kept, value * weight, 0.0)
        self.weight += torch.where(kept, float(weight), 0.0)

    def compute(self) -> torch.Tensor:
        return self.mean_value / self.weight

    def _apply(self, fn, *args, **kwargs):
        """The sums stay float32 under ``precision: bf16-true``: Lightning's ``module.to(torch.bfloat16)`` casts
        metric states (torchmetrics guards ``.bfloat16()``, not ``.to``), and a bf16 sum of losses rounds to 1/16
        nat near 10: train/*_loss read 10.8125, 10.75, 10.8125 where float32 read 10.831, 10.823, 10.797."""
        this = super()._apply(fn, *args, **kwargs)
        for name in ("mean_value", "weight"):
            setattr(this, name, getattr(this, name).float())
            this._defaults[name] = this._defaults[name].float()
        return this


DEFAULT_WARMUP_TOKENS = 100_000_000  # the recipe's


class EncoderPretraining(L.LightningModule):
    """Continued pretraining of a ModernBERT encoder with its own MLM head.

    Args:
        model: Hugging Face name or local path (``from_pretrained``).
        model_config: ModernBertConfig fields for a randomly initialised model (tests, demos); ``vocab_size`` and the
            special-token ids default to the tokenizer's (set ``vocab_size`` to pad the embeddings).
        tokenizer: name or path; defaults to ``model``. Gives the mask and special-token ids.
        objective: the objective used when no ObjectiveSchedule sets one (default: MaskedLM()); refused beside one.
        attn_implementation: ``auto`` (the fastest kernel available: ``flash_attention_2`` when
            flash-attn is installed on a GPU, else ``flex_attention`` on GPU, else ``sdpa``), or one
            of those, or ``eager``. The resolved choice is what the checkpoint records.
        learning_rate: AdamW's peak learning rate (the recipe's 2e-4); phases scale it.
        betas: AdamW's betas (the recipe's 0.9, 0.98).
        eps: AdamW's epsilon (the recipe's 1e-6).
        weight_decay: AdamW's decoupled weight decay on matrices only, not biases or norms (the recipe's 1e-5).
        decoupled_weight_decay: read ``weight_decay`` as Composer's DecoupledAdamW does (ModernBERT's trainer, where
            the recipe's 1e-5 comes from): every step multiplies a matrix by 1 − weight_decay × lr_t / lr_peak.
            False: torch's AdamW, 1 − lr_t × weight_decay (at the recipe's lr 2e-4, 5,000 times less: none to speak of).
        warmup_tokens: linear warmup of the schedule when no ObjectiveSchedule sets one (its phases bring their own:
            another value than the default is refused beside one, as ``objective`` is).
        seed: seeds the objectives' random draws, per step, so a resumed run masks identically.
        loss_chunk_size: positions whose logits exist at once in the fused head + cross-entropy
            (fp32 ``[chunk, vocab]``); null computes all logits at once. Objectives that override
            ``loss`` always get the dense logits.
        compile: ``torch.compile`` each encoder layer (after FSDP2 wraps it) and the fused loss's
            chunk arithmetic, as torchtitan compiles model and loss.
        val_objectives: validate with these objectives whatever the phase trains, each logged as
            ``val/<key>_loss`` and ``_accuracy`` (``{mlm: MaskedLM(0.15)}`` in every run of a comparison judges the detour's
            CLM phase and the baseline's 30% phase on the same task); null validates with the objective
            being trained, logged under its name.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,  # not a bare dict: its --model_config.KEY=96 stayed a string
        tokenizer: str | None = None,
        objective: Objective | None = None,
        attn_implementation: str = "auto",
        learning_rate: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 1e-5,
        decoupled_weight_decay: bool = False,
        warmup_tokens: int = DEFAULT_WARMUP_TOKENS,
        seed: int = 17,
        loss_chunk_size: int | None = 4096,
        compile: bool = False,
        val_objectives: dict[str, Objective] | None = None,
    ):
        super().__init__()
        model, tokenizer = local_absolute(model), local_absolute(tokenizer)
        self.save_hyperparameters(ignore=["objective", "val_objectives"])
        # Recorded absolute, so export works from any directory; under LightningCLI save_hyperparameters records
        # the config's text (its instantiator), not these arguments.
        self.hparams.model, self.hparams.tokenizer = model, tokenizer
        if tokenizer is None and model is None:
            raise UserError("model.init_args.tokenizer is required when the model is built from model_config")
        self.tokenizer = load_named(AutoTokenizer, tokenizer or model,
                                    "model.init_args.tokenizer" if tokenizer else "model.init_args.model (its tokenizer)")
        if not learning_rate >= 0:  # 0 is allowed: a run that measures its noise without learning
            raise UserError(f"model.init_args.learning_rate={learning_rate}: must be 0 or more")
        if not all(0 <= beta < 1 for beta in betas):
            raise UserError(f"model.init_args.betas={list(betas)}: each must be in [0, 1)")
        if not eps > 0:  # AdamW divides by sqrt(v) + eps: with 0, a weight whose gradient is 0 becomes 0/0 = NaN
            raise UserError(f"model.init_args.eps={eps}: must be positive")
        if not weight_decay >= 0:  # AdamW checks its default, not the parameter groups' value it is given here
            raise UserError(f"model.init_args.weight_decay={weight_decay}: must be 0 or more")
        if warmup_tokens < 0:
            raise UserError(f"model.init_args.warmup_tokens={warmup_tokens}: must be 0 or more")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"model.init_args.loss_chunk_size={loss_chunk_size}: must be positive, or null")
        self.requested_attn_implementation = attn_implementation  # "auto" is settled again once the trainer is known
        self.model = build_model(model, model_config, attn_implementation, self.tokenizer)
        self.hparams.attn_implementation = self.model.config._attn_implementation  # "auto" resolved
        self.model.sparse_prediction = True  # the head runs on labelled positions only (inference unaffected)
        self.tokens = tokenizer_facts(self.tokenizer)
        self.val_objectives = bound_val_objectives(val_objectives or {}, self.tokens)
        self.lr_schedule: TokenSchedule = warmup_then_constant(warmup_tokens)
        self.phase_objectives: list[Objective] = []  # what an ObjectiveSchedule will train, phase by phase
        # set here beside an ObjectiveSchedule, whose phases replace them, they would do nothing (it refuses them)
        self.replaced_by_phases = [name for name, given in (("objective", objective is not None),
                                                            ("warmup_tokens", warmup_tokens != DEFAULT_WARMUP_TOKENS))
                                   if given]
        self.tokens_per_step: int | None = None
        self.branched_from: list[dict] = []  # other runs' checkpoints this run started from, for the model card
        self.checkpoint_step: int | None = None  # the step of the checkpoint loaded, for cpt validate's curve
        self.checkpoint_accumulation: int | None = None  # the micro-batches per step it was saved with, if recorded
        self._last_batch: tuple[torch.Tensor, int] | None = None  # position_ids, predicted positions
        self._step_loss_sums: list[torch.Tensor] = []  # this optimizer step's micro-batch loss sums, for train/loss
        self._checked_val_objectives = False  # at the first validation batch, as the phases' at the first training one
        self._step_predicted = 0  # the positions this rank predicted in this optimizer step, all micro-batches
        self._loss_divisor: int | None = None  # the positions of the run's first micro-batch (see training_step)
        self._validation: ValidationSums | None = None  # the running evaluation's sums
        self._charted = False  # the per-source charts are in TensorBoard's layout
        self.objective_metrics = nn.ModuleDict()
        self._unflushed_micro_batches = 0
        self.set_objective(objective or MaskedLM())

    # -- objective and token clock ---------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        """The rotary frequencies stay float32, as transformers computes them and as the exported model loads them.
        ``precision: bf16-true`` casts the module with ``.to(torch.bfloat16)``, which rounded them (they are not
        saved): the exported model's logits then differed from the trained ones, by 2e-3 at position 512."""
        frequencies = {name: buffer for name, buffer in self.named_buffers() if name.endswith("inv_freq")}
        this = super()._apply(fn, *args, **kwargs)
        for name, before in frequencies.items():
            owner, _, leaf = name.rpartition(".")
            module = this.get_submodule(owner)
            if getattr(module, leaf).dtype != before.dtype:
                setattr(module, leaf, before.to(getattr(module, leaf).device))
        return this

    def set_objective(self, objective: Objective) -> None:
        """Switch objective; everything else (weights, optimizer state) stays as it is."""
        check_objective(objective)
        if hasattr(self, "objective") and self._trainer is not None:
            self.flush_objective_metrics(step=self.global_step - 1)  # the phase's last step, not the new one's
        bind_checked(objective, self.tokens)
        self.objective = objective
        self._compute_loss_of(objective)
        if objective.name not in self.objective_metrics:
            self.objective_metrics[objective.name] = nn.ModuleDict(
                {  # updated on the device only (see _update_metrics); read at each flush
                    "loss": WeightedMeanLoss(),
                    "accuracy": MulticlassAccuracy(
                        num_classes=self.model.config.vocab_size, average="micro", validate_args=False
                    ),
                }
            ).to(self.device)

    def _compute_loss_of(self, objective: Objective) -> None:
        """Make the model's forward compute ``objective``'s loss: fused and chunked for the default
        cross-entropy, over dense logits for an objective with its own ``loss``."""
        self.model.loss_function = _ObjectiveLoss(objective)
        self.model.loss_chunk_size = self.hparams.loss_chunk_size if default_loss(objective) else None

    @property
    def tokens_seen(self) -> int:
        """Tokens consumed by completed optimizer steps, over all devices."""
        return self.global_step * (self.tokens_per_step or 0)

    def measure_tokens_per_step(self, batch: dict) -> int:
        """Measure tokens per optimizer step from a batch (rows are packed: every token counts).

        Refuses a resumed run whose global batch changed, since the token clock would silently drift.
        """
        measured = batch["input_ids"].numel() * self.trainer.world_size * self.trainer.accumulate_grad_batches
        if self.tokens_per_step is not None and measured != self.tokens_per_step:
            length = batch["input_ids"].shape[-1]
            raise UserError(
                f"tokens per optimizer step changed from {self.tokens_per_step:,} (checkpoint) to {measured:,} "
                f"({self.tokens_per_step / length:g} → {measured // length:,} rows of {length} tokens): keep the rows "
                "per step (GlobalBatch.sequences, or micro_batch_size × accumulate_grad_batches × devices × nodes) "
                "and data.init_args.block_size the same when resuming"
            )
        self.tokens_per_step = measured
        return measured

    def setup(self, stage: str) -> None:
        """Check, before any step, that the kernel can train here and the model can read the data."""
        kernel = kernel_for_run(self.requested_attn_implementation, self.model.config._attn_implementation,
                                self.trainer.strategy.root_device.type, compute_dtype(self.trainer),
                                self.model.config.attention_dropout, training=stage == "fit")
        if kernel != self.model.config._attn_implementation:
            self.model.set_attn_implementation(kernel)
            self.hparams.attn_implementation = kernel
        fp16 = str(self.trainer.precision).startswith("16") or getattr(self.trainer.strategy, "param_dtype", None) == torch.float16
        fused = any(default_loss(o) for o in self.phase_objectives or [self.objective])  # every phase's, not phase 0's
        if stage == "fit" and fp16 and self.hparams.loss_chunk_size and fused:
            raise UserError(
                f"model.init_args.loss_chunk_size={self.hparams.loss_chunk_size} with fp16 (trainer.precision "
                f"{self.trainer.precision}, or FSDP2 param_dtype float16): the fused loss computes its gradients "
                "before the GradScaler scales them, and fp16 flushes most softmax terms to 0 (a relative error of "
                "14% in the decoder bias's gradient); use bf16-mixed, as the recipes do, or loss_chunk_size: null"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        check = getattr(datamodule, "check_compatible", None)
        if check is not None:
            config = self.model.config
            check(config.vocab_size, config.max_position_embeddings, self.tokenizer)

    def configure_model(self) -> None:
        """Let a sharding strategy (FSDP2) wrap the encoder, then compile it if asked."""
        if getattr(self, "_configured", False):
            return
        strategy = self._trainer.strategy if self._trainer is not None else None  # load_from_checkpoint: no trainer
        parallelize = getattr(strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self.model)
        if self.hparams.compile:
            self.compile_model()
        self._configured = True

    def compile_model(self) -> None:
        """``torch.compile`` every encoder layer in place, and the fused loss's per-chunk arithmetic.

        Layers: fixed ``[B, L]`` shapes, no graph breaks at FSDP2 units (torchtitan's choice). The
        head's matmuls stay eager (their row count changes with every MLM batch); the softmax, loss
        and gradient between them compile with a dynamic row count, fusing about ten passes over each
        ``[chunk, vocab]`` block into a few (torchtitan compiles its loss too).

        All layers share one code object, so dynamo's variants of it multiply: layer 0 (no attention
        norm), training and validation (no grad), frozen and trainable weights (LayerFreeze), a short
        last validation batch. A freeze run validating during CLM reached the default limit of 8 and
        ran the rest eager; the limit is raised to ``RECOMPILE_LIMIT``.
        """
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # before torch 2.7
        setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
        for layer in self.model.model.layers:
            layer.compile()
        self.model.compile_loss = True
        rank_zero_info(f"compile: {len(self.model.model.layers)} encoder layers and the fused loss wrapped by torch.compile")

    # -- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: str, labels: torch.Tensor | None = None):
        """The Hugging Face forward with packed-document masks of the given kind (causal/bidirectional).

        Without labels: logits ``[B, L, V]`` at every position. With labels: the head (dense → act →
        norm → tied decoder) runs only where ``labels != -100``; with ``loss_chunk_size`` set the
        decoder and loss are fused (loss and argmax ``predictions [N]``, see ModernBertForPretraining),
        otherwise the output holds the logits ``[N, V]`` and the objective's loss. Going through the
        root module's forward (not ``model.model``) is what lets FSDP2 gather the embeddings/head.
        """
        kernel_inputs = attention_inputs(self.model.config, position_ids, attention, dtype=self.model.dtype)
        return self.model(input_ids=input_ids, position_ids=position_ids, labels=labels, **kernel_inputs)

    def objective_step(self, batch: dict, generator: torch.Generator | list[torch.Generator],
                       objective: Objective | None = None):
        """Run an objective (default: the current one) on a batch: loss, and the predictions/targets at
        predicted positions.

        The fused loss returns the predictions itself; the dense path (custom losses) takes the argmax.
        """
        objective = objective or self.objective
        self._compute_loss_of(objective)
        input_ids, labels = self.built_inputs(objective, batch, generator)
        out = self(input_ids, batch["position_ids"], objective.attention, labels)
        if self.model.loss_chunk_size:  # the fused loss hands back the labelled positions' targets (no second sync)
            return out.loss, out.predictions, out.targets
        return out.loss, out.logits.detach().argmax(-1), labels[labels != IGNORE_INDEX]

    @staticmethod
    def built_inputs(objective: Objective, batch: dict,
                     generator: torch.Generator | list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """``objective``'s model inputs and labels for ``batch``, checked (``check_inputs``); given a generator per
        row (``_row_generators``), each row is built on its own."""
        if isinstance(generator, list):
            rows = [EncoderPretraining.built_inputs(
                objective, {key: batch[key][i:i + 1] for key in ("input_ids", "position_ids")}, row)
                for i, row in enumerate(generator)]
            return torch.cat([inputs for inputs, _ in rows]), torch.cat([labels for _, labels in rows])
        # copies: an objective that writes into its inputs (as transformers' collator masks) left the batch masked for
        # the objectives after it (the other val_objectives; the first step's, after every phase's check)
        built = objective.build_inputs(batch["input_ids"].clone(), batch["position_ids"].clone(), generator)
        return check_inputs(objective, batch["input_ids"], built)

    def check_objective_on(self, objective: Objective, batch: dict) -> None:
        """Build ``objective``'s inputs for ``batch`` once and check them: a later phase's objective is checked at the
        first batch, not at its switch, after the phases before it trained (50B tokens in the English recipe).
        Tried on a copy, so an objective that keeps state (a curriculum counting its calls) counts only the run's;
        one that does not copy (it holds a handle) builds once more, and its loss is checked at its first use."""
        try:
            trial = copy.deepcopy(objective)
        except Exception:
            trial = None
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
        inputs, labels = self.built_inputs(trial or objective, batch, generator)
        predicted, vocab_size = labels[labels != IGNORE_INDEX], self.model.config.vocab_size
        # here only (a check per batch would cost a sync); unchecked, an index error in the embedding or the loss (a
        # device assert on CUDA), at the phase's first step, after the phases before it trained
        for what, ids, allowed in (("input ids", inputs, ""), ("labels", predicted, f" or {IGNORE_INDEX} (not predicted)")):
            low, high = (int(end) for end in torch.aminmax(ids)) if ids.numel() else (0, 0)
            if low < 0 or high >= vocab_size:
                raise UserError(f"{type(objective).__name__}.build_inputs gave {what} from {low} to {high} on the first "
                                f"batch: each is a token id in [0, {vocab_size}){allowed}")
        if trial is not None and not default_loss(trial):
            check_loss(trial, predicted[:8], vocab_size)

    def check_objectives_on_every_rank(self, objectives: Iterable[Objective], batch: dict, which: str) -> None:
        """``check_objective_on`` each objective for this rank's ``which`` batch, every rank stopping where any refused
        (``raise_on_every_rank``): a rank refusing alone left the others in their next collective."""
        refusal = None
        try:
            for objective in objectives:
                self.check_objective_on(objective, batch)
        except UserError as err:
            refusal = err
        raise_on_every_rank(self.trainer, refusal, f"another rank's {which} gave an objective's inputs it refused: its "
                                                   "error says why")

    def _row_generators(self, batch: dict) -> list[torch.Generator]:
        """A generator per row, seeded from (seed, the row's tokens): validation masks a row the same way at every
        evaluation (the curve moves only with the weights), on any layout and whichever loader reads it. Seeded by
        micro-batch and rank, as training is, the figures moved with the GPU count, the micro-batch and a resume on
        another layout, and ``cpt validate`` on other GPUs did not give the logged ones; seeded by the loader's
        index, a holdout's moved when ``val_sources`` were listed in another order or one was validated alone. One
        host sync per validation micro-batch and objective."""
        ids = batch["input_ids"]
        odd = torch.arange(1, 2 * ids.shape[-1], 2, device=ids.device)  # a weight per position: order counts
        keys = (ids.long() * odd).sum(-1).tolist()
        return [self._seeded(VALIDATION_STREAM, key) for key in keys]

    def _generator(self, batch_idx: int, step: int) -> torch.Generator:
        """A generator seeded from (seed, step, micro-batch, rank): resumed runs draw the same masks."""
        return self._seeded(TRAINING_STREAM, step, batch_idx, self.global_rank)

    def _seeded(self, *key: int) -> torch.Generator:
        """A generator on this device seeded from (seed, *key): the same on every process (ints hash to themselves)."""
        return torch.Generator(device=self.device).manual_seed(hash((self.hparams.seed, *key)) & (2**63 - 1))

    # -- Lightning hooks -------------------------------------------------------------------

    @property
    def flops_per_batch(self) -> float | None:
        """Nominal training FLOPs of the last micro-batch, read by TokenThroughput (ThroughputMonitor) for MFU."""
        return self.last_batch_flops()

    def last_batch_flops(self, document_masked: bool = False):
        """Training FLOPs of the last micro-batch (see cpt_lightning.flops): nominal (a float), or with the
        attention counted over the keys document masking leaves visible (a 0-dim tensor: no sync)."""
        if self._last_batch is None:
            return None
        position_ids, predicted = self._last_batch
        causal = self.objective.attention == "causal"
        visible = position_ids if document_masked else None
        frozen = sum(p.numel() for p in self.model.model.layers.parameters() if p.ndim >= 2 and not p.requires_grad)
        return training_flops(self.model.config, *position_ids.shape, causal, predicted, position_ids=visible,
                              frozen_weights=frozen)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """The micro-batch's loss summed over its predicted positions, over a constant of the run (the positions
        of its first micro-batch: a mean's size, which fp16 gradients and a GradScaler's starting scale need):
        ``optimizer_step`` then divides the step's gradient by the positions all its micro-batches, on all ranks,
        predicted. A mean per micro-batch made the gradient depend on how a step is split (a token of a
        micro-batch that predicts few positions weighed more) and scaled it down for one predicting nothing.
        ``mean_loss`` is the micro-batch's loss per predicted position, for the callbacks that read it."""
        loss, predictions, targets = self.objective_step(batch, self._generator(batch_idx, step=self.global_step))
        predicted = targets.numel()
        self._last_batch = (batch["position_ids"], predicted)
        self._update_metrics(loss, predictions, targets)
        self._step_predicted += predicted
        if predicted:  # a micro-batch with nothing to predict has no loss to report, only a zero to backward
            self._step_loss_sums.append(loss.detach() * predicted)
        self.log("train/tokens_seen", host_scalar(self.tokens_seen), rank_zero_only=True)
        if self._loss_divisor is None:
            self._loss_divisor = batch["input_ids"].numel()
        return {"loss": loss * (predicted / self._loss_divisor), "predicted": predicted, "mean_loss": loss.detach()}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, with the step's gradient made a mean over its predicted positions once the last
        micro-batch's backward is done: before any ``on_before_optimizer_step`` (the gradient norm the guard
        logs), clipping and the update."""

        def closure():
            result = optimizer_closure()
            self._average_step_gradients()
            return result

        optimizer.step(closure=closure)

    def _average_step_gradients(self) -> None:
        """Lightning divided each micro-batch's loss (its sum over the run's divisor) by the accumulation, DDP and
        FSDP2 average over ranks: the gradients hold sum / (divisor × accumulation × ranks). Times that, over the
        positions the step predicted on all ranks (one all-reduce of a number made on the device: no host sync)."""
        trainer = self.trainer
        predicted = torch.full((), float(self._step_predicted), device=self.device)
        if trainer.world_size > 1:
            predicted = trainer.strategy.reduce(predicted, reduce_op="sum")
        scale = self._loss_divisor * trainer.accumulate_grad_batches * trainer.world_size / predicted.clamp_min(1)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], scale)

    def on_validation_epoch_start(self) -> None:
        self._validation = ValidationSums(list(self._validated_objectives()), self._val_source_names(), self.device)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and accuracy per predicted position, as the training curves, summed per source (a loader each)
        and logged when the evaluation ends (``cpt_lightning.validation``)."""
        if not self._checked_val_objectives:  # bad ids were an index error (a device assert on CUDA) mid-validation
            self.check_objectives_on_every_rank(self._validated_objectives().values(), batch, "first validation batch")
            self._checked_val_objectives = True
        for name, objective in self._validated_objectives().items():  # each its own draws, as in a run of it alone
            generators = self._row_generators(batch)
            loss, predictions, targets = self.objective_step(batch, generators, objective)
            self._validation.add(name, dataloader_idx, loss, predictions, targets)

    def _validated_objectives(self) -> dict[str, Objective]:
        return self.val_objectives or {self.objective.name: self.objective}

    def _val_source_names(self) -> list[str]:
        """The datamodule's names of its validation loaders, else Lightning's ``dataloader_<i>``."""
        loaders = len(self.trainer.num_val_batches)
        names = list(getattr(self.trainer.datamodule, "val_source_names", None) or [])
        return names if len(names) == loaders else [f"dataloader_{index}" for index in range(loaders)]

    def on_validation_epoch_end(self) -> None:
        """The evaluation's figures over every rank's predicted positions: the ranks' sums are added up (one
        all-reduce) and each rank logs the same means. Lightning's ``sync_dist`` mean of the ranks' means, weighted
        by their positions, divided by an integer mean of those counts, cut short (3 positions on one rank and
        none on the other logged 1.5 × the loss). With two sources or more, the first evaluation also gives
        TensorBoard its charts of each figure over all sources and each (``sources_layout``).

        Then Lightning's x-axis for a logged "step": cpt validate's points go where the run logged its validation of
        the same weights (Lightning restores no loop for it: they were at step 0, the run's curve starting with its
        final value). That is the checkpoint's step less one: Lightning's x-axis counts the steps before the one
        a point follows."""
        self._validation.sums = self.trainer.strategy.reduce(self._validation.sums, reduce_op="sum")
        for key, mean, predicted in self._validation.figures():
            self.log(key, mean, batch_size=max(predicted, 1))
        if len(self._validation.sources) > 1 and not self._charted:
            self._charted = True
            for logger in self.loggers:  # other ranks' experiment is Lightning's no-op stand-in
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(sources_layout(list(self.val_objectives)))
        if self.trainer.state.fn == "validate" and self.checkpoint_step is not None and self.logger is not None:
            self.log("step", float(max(self.checkpoint_step - 1, 0)))

    def _update_metrics(self, loss: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulated on the device, with no host sync: see WeightedMeanLoss; the targets are the predicted
        positions already (no ``ignore_index`` filtering, a boolean mask) and ids of the tokenizer's
        vocabulary (no ``validate_args``, two ``unique`` calls)."""
        self._unflushed_micro_batches += 1  # the same count on every rank, so every rank flushes or none does
        if targets.numel() == 0:  # nothing predicted in this micro-batch (a targeted objective can do that)
            return
        metrics = self.objective_metrics[self.objective.name]
        metrics["loss"].update(loss.detach(), weight=targets.numel())
        metrics["accuracy"].update(predictions, targets)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._step_loss_sums:  # the step's mean per predicted position (Lightning would keep the last micro-batch)
            # read once per step: a GPU tensor in the progress bar is read back at every micro-batch
            self.log("train/loss", (torch.stack(self._step_loss_sums).sum() / self._step_predicted).cpu(), prog_bar=True)
            self._step_loss_sums.clear()
        elif (logged := self.trainer._results.get("on_before_optimizer_step.train/loss")) is not None:
            logged.reset()  # a step that predicted nothing has no loss: Lightning logged the last one's again
        self._step_predicted = 0
        every = self.trainer.log_every_n_steps  # 0: Lightning logs no step; the flushes at a switch,
        if every and (self.global_step + 1) % every == 0:  # a checkpoint and the end still come
            self.flush_objective_metrics()

    def on_train_end(self) -> None:
        self.flush_objective_metrics(step=self.global_step - 1)  # the last steps, short of a full window

    def flush_objective_metrics(self, step: int | None = None) -> None:
        """Log the current objective's loss/accuracy/perplexity averaged since the last flush, then reset.

        Called every ``log_every_n_steps`` steps, at a phase switch, at every checkpoint (a preempted run
        would lose the steps since the last flush: the metrics are not in the checkpoint) and at the end;
        ``step`` is the last optimizer step the values cover (default: the one being taken).
        Written straight to the loggers: ``self.log`` would keep re-logging the previous objective's
        last values after a switch (results live for the whole epoch), drawing flat fake curves.
        """
        metrics = self.objective_metrics[self.objective.name]
        if not self._unflushed_micro_batches:  # not the metrics' own update_called: a rank that predicted nothing
            return  # in the window skipped compute(), a collective under DDP/FSDP2, and the others waited in it
        self._unflushed_micro_batches = 0
        with warnings.catch_warnings():  # that rank's compute() before any update(): its zero sums are right
            warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
            mean_loss = metrics["loss"].compute()
            accuracy = metrics["accuracy"].compute()
        for metric in metrics.values():
            metric.reset()
        if mean_loss.isnan():  # no rank predicted a position (or only non-finite losses, which NonFiniteGuard reports)
            return
        name = self.objective.name
        values = {
            f"train/{name}_loss": mean_loss.item(),
            f"train/{name}_perplexity": mean_loss.exp().item(),
            f"train/{name}_accuracy": accuracy.item(),
        }
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step if step is None else step)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            decay_groups(self.model, self.torch_weight_decay()), lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps
        )
        # Late-bound: the ObjectiveSchedule may replace self.lr_schedule; the token clock drives it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_schedule.multiplier(step * (self.tokens_per_step or 0))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def torch_weight_decay(self) -> float:
        """torch's AdamW multiplies its weight_decay by the step's learning rate: Composer's decoupled reading of
        ``weight_decay`` (× lr_t / lr_peak) is weight_decay / lr_peak there."""
        hp = self.hparams
        if not hp.decoupled_weight_decay:
            return hp.weight_decay
        return hp.weight_decay / hp.learning_rate if hp.learning_rate else 0.0  # lr 0: no step moves a weight

    def on_train_start(self) -> None:
        self.apply_configured_optimizer_settings()
        self.note_branch(self.trainer.ckpt_path)
        self.align_micro_batch_count()
        last = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"  # --ckpt_path last's
        resumed = self.trainer.ckpt_path is not None and Path(self.trainer.ckpt_path).name == last
        if resumed and self.global_step > 0 and self.trainer.is_global_zero:
            mark_restart(self.loggers, self.global_step)

    def align_micro_batch_count(self) -> None:
        """Lightning ends a step where its count of the epoch's micro-batches is a multiple of the accumulation, and
        restores the count from a checkpoint (steps × the accumulation then). A resume on another layout
        (``data.init_args.resume_on_another_layout``: GlobalBatch derives another accumulation) from an odd step
        ended its first step after fewer micro-batches than the token clock counted; rounded down to a multiple of the
        new accumulation, the count gives that step all of them. Only then: with the same accumulation Lightning
        counts on right, also where an epoch of a loader with a length ended inside a step."""
        if self.checkpoint_accumulation in (None, self.trainer.accumulate_grad_batches):
            return
        current = self.trainer.fit_loop.epoch_loop.batch_progress.current
        excess = current.ready % self.trainer.accumulate_grad_batches
        for field in ("ready", "started", "processed", "completed"):
            setattr(current, field, getattr(current, field) - excess)

    def note_branch(self, ckpt_path: str | None) -> None:
        """Record a start from a checkpoint outside this run's folders (another run's): the model card of a
        decay branched off a detour then says where its earlier steps were trained. A requeue resuming
        from its own checkpoints adds nothing."""
        if ckpt_path is None:
            return
        folders = [self.trainer.log_dir, *(getattr(callback, "dirpath", None) for callback in self.trainer.callbacks)]
        checkpoint = Path(ckpt_path).resolve()
        if any(Path(folder).resolve() in checkpoint.parents for folder in folders if folder):
            return
        self.branched_from.append({"checkpoint": str(ckpt_path), "step": self.global_step})

    def apply_configured_optimizer_settings(self) -> None:
        """Put the config's learning rate, betas, eps and weight decay over those a resumed checkpoint restored.

        Lightning restores the optimizer's and scheduler's state whole, so a rerun with a lower
        learning rate (what NonFiniteGuard advises after a divergence) kept training at the old one
        while its config and model card recorded the new. The moments and the step count carry over.
        """
        hp, optimizer = self.hparams, self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        configured = {"betas": tuple(hp.betas), "eps": hp.eps}
        changed = set()
        weight_decays = [group["weight_decay"] for group in decay_groups(self.model, self.torch_weight_decay())]
        # torch's decoupled weight_decay is the config's / peak lr: a new peak alone changes it, not the config's
        as_configured = (lambda torch_value, peak: torch_value * peak) if hp.decoupled_weight_decay else (lambda v, _: v)
        for group, weight_decay, base_lr in zip(optimizer.param_groups, weight_decays, scheduler.base_lrs):
            for key, value in configured.items():
                if (tuple(group[key]) if key == "betas" else group[key]) != value:
                    changed.add(key)
                    group[key] = value
            if not math.isclose(as_configured(group["weight_decay"], base_lr),
                                as_configured(weight_decay, hp.learning_rate), rel_tol=1e-9):
                changed.add("weight_decay")
            group["weight_decay"] = weight_decay
            if base_lr != hp.learning_rate:  # the same point of the schedule, at the new peak
                changed.add("learning_rate")
                multiplier = group["lr"] / base_lr if base_lr else scheduler.lr_lambdas[0](scheduler.last_epoch)
                group["lr"], group["initial_lr"] = hp.learning_rate * multiplier, hp.learning_rate
        scheduler.base_lrs = [hp.learning_rate] * len(optimizer.param_groups)
        if changed:
            rank_zero_info(f"[EncoderPretraining] resumed with the config's {', '.join(sorted(changed))} "
                           f"(the checkpoint had others) from step {self.global_step}")

    def follow_lr_schedule(self, schedule: TokenSchedule) -> None:
        """Drive the learning rate by ``schedule`` from the coming step on, this step included.

        The scheduler sets a step's rate after the step before it, so a resumed run's first step
        used the rate the saving run's schedule left in the optimizer: under a config that extends
        or branches the phases, a decay resumed from its end at 0.1 × peak, then jumped back up.
        """
        self.lr_schedule = schedule
        if not self.trainer.lr_scheduler_configs:  # a subclass's own optimizer setup
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        multiplier = schedule.multiplier(self.tokens_seen)
        groups = self.trainer.optimizers[0].param_groups
        restored = groups[0]["lr"] / scheduler.base_lrs[0] if scheduler.base_lrs[0] else multiplier
        if not math.isclose(restored, multiplier, rel_tol=1e-6, abs_tol=1e-12):
            rank_zero_warn(
                f"the learning rate of step {self.global_step} is {multiplier:.4g} × peak under this config's phases; "
                f"the checkpoint's schedule had {restored:.4g} × peak there (its phases' budgets or shapes differ)"
            )
        for group, base_lr in zip(groups, scheduler.base_lrs):
            group["lr"] = base_lr * multiplier

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.flush_objective_metrics(step=self.global_step - 1)  # saved after a step: global_step counts it
        checkpoint["tokens_per_step"] = self.tokens_per_step
        checkpoint["branched_from"] = self.branched_from
        checkpoint[MODEL_CONFIG_RECORD] = self.model.config.to_dict()  # exports need neither the Hub nor its later edits
        checkpoint[TOKENIZER_RECORD] = tokenizer_identity(self.tokenizer)  # its vocabulary hashed once
        if manifests := getattr(self.trainer.datamodule, "manifests", None):  # the card's data table, from any folder
            checkpoint[SOURCES_RECORD] = {name: {"num_tokens": m.num_tokens, "num_documents": m.num_documents,
                                                 "block_size": m.block_size} for name, m in manifests.items()}
        checkpoint["hardware"] = {  # for the exported model card: what ran, where a config may say "auto"
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
            "accelerator": self.device.type,
            "world_size": self.trainer.world_size,
            "num_nodes": self.trainer.num_nodes,
            "accumulate_grad_batches": self.trainer.accumulate_grad_batches,  # GlobalBatch derives it at start
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before Lightning loads the weights, :func:`refuse_unfit_checkpoint`, and a warning where the config's
        model computes otherwise than the checkpoint's (:func:`changed_compute_settings`). Under FSDP2 the strategy loads
        them before this hook (the checkpoint holds no ``state_dict`` by then) and checks first itself.

        ``fast_dev_run=N`` from a checkpoint trains N micro-batches from the checkpoint's step. Lightning sets
        ``max_steps=N``, counted from step 0: from a checkpoint of step N or later (every one the demo keeps) the fit
        stopped before its first step ("max_steps=N reached", exit 0), a smoke test of the resume that tested
        nothing. Set here, before the loops are restored, under every strategy.

        ``EncoderPretraining.load_from_checkpoint(path)`` calls it with no trainer attached."""
        trainer = self._trainer
        path = trainer.ckpt_path if trainer else "the checkpoint"
        if saved := checkpoint.get("state_dict"):
            refuse_unfit_checkpoint(path, self, shapes(saved))
        if (trained := checkpoint.get(TOKENIZER_RECORD)) and (
                differences := tokenizer_differences(trained, tokenizer_identity(self.tokenizer))):
            raise UserError(f"{path} was trained with another tokenizer than model.init_args.tokenizer "
                            f"{self.hparams.tokenizer or self.hparams.model!r}: it differs in {'; '.join(differences)}; "
                            "give the tokenizer the run trained with")
        if changed := changed_compute_settings(checkpoint.get(MODEL_CONFIG_RECORD) or {}, self.model.config.to_dict()):
            rank_zero_warn(f"{path} was trained with another model_config: {', '.join(changed)} (the checkpoint's → "
                           "this config's). It goes on with this config's, which the export's config.json describes; to "
                           "go on as trained, put the checkpoint's values in model.init_args.model_config")
        self.tokens_per_step = checkpoint.get("tokens_per_step")
        self.branched_from = list(checkpoint.get("branched_from", []))
        self.checkpoint_step = checkpoint.get("global_step")
        self.checkpoint_accumulation = (checkpoint.get("hardware") or {}).get("accumulate_grad_batches")
        if trainer and trainer.fast_dev_run and trainer.state.fn == "fit" and self.checkpoint_step is not None:
            trainer.fit_loop.epoch_loop.max_steps = self.checkpoint_step + int(trainer.fast_dev_run)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.measure_tokens_per_step(batch)
