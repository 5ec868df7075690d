"""FSDP2 sharding, configured from plain YAML values.

Lightning's ``ModelParallelStrategy`` is the FSDP2 route (``fully_shard`` applied in the module's
``configure_model``); unlike ``FSDPStrategy`` (FSDP1) it also runs on CPU with gloo, so the very
code path used on GPUs is tested here. Every option is a string/bool/number so
``--print_config`` reproduces the run (an ``auto_wrap_policy`` object would be dropped).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from cpt_lightning.atomic import disk_write_refusal, hidden_beside, replace_folder
from cpt_lightning.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(name: str | None, field: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"FSDP2.{field}={name!r}: choose one of {sorted(DTYPES)} or null")
    return DTYPES[name]


class FSDP2(ModelParallelStrategy):
    """Fully sharded data parallel over every device: one shard unit per encoder layer + the root.

    Args:
        activation_checkpointing: recompute each encoder layer in backward (memory for compute).
        param_dtype: dtype parameters are all-gathered and computed in (``bfloat16`` halves the
            communication); null keeps fp32 parameters and leaves compute precision to the
            trainer's ``precision`` (e.g. ``bf16-mixed``). Master weights stay fp32 either way.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 by default, as the recipe needs).
        reshard_after_forward: free gathered layer weights after forward (ZeRO-3) or keep them (ZeRO-2).
        save_distributed_checkpoint: one file per rank (fast, sharded) instead of a gathered file.
        process_group_backend: torch.distributed backend (null: nccl on GPUs, gloo on CPU).
        reduce_every_micro_batch: reduce-scatter each accumulated micro-batch's gradients (less memory)
            instead of once per optimizer step (accumulating unsharded gradients in ``reduce_dtype``).
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        reduce_every_micro_batch: bool = False,
    ):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = reshard_after_forward
        self.reduce_every_micro_batch = reduce_every_micro_batch

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallel: all ranks shard
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning's ``no_sync``: entered for each accumulated micro-batch but the last of an optimizer step.

        Lightning only blocks DDP's synchronisation; FSDP2 would reduce-scatter every micro-batch's
        gradients. Here every shard unit keeps them unsharded in ``reduce_dtype`` (fp32) instead, and
        the step's last backward reduce-scatters the sum once, before any ``on_before_optimizer_step``.
        """
        units = [] if self.reduce_every_micro_batch else shard_units(self.model)
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def refresh_gradient_dtypes(self, module: nn.Module) -> None:
        """Call after parameters of ``module``'s shard units start requiring a gradient again (an unfreeze).

        FSDP2 sets each unit's gradient dtypes at the first forward from the parameters that train
        then; a unit frozen at that time keeps none, and would reduce-scatter in ``param_dtype`` (bf16)
        and hand the fp32 master weights bf16 gradients. ``unshard()`` re-runs that initialisation
        (the public way to reach it) and ``reshard()`` frees the gathered weights again: one all-gather
        per unit, on every rank, as each calls this at the same step.
        """
        for unit in shard_units(module):
            unit.unshard()
            unit.reshard()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Sharded saves go to a hidden folder renamed into place: a crash mid-save never tears the newest one.

        (``ModelParallelStrategy`` writes sharded checkpoints itself, bypassing any CheckpointIO plugin.)
        A write that fails on some ranks stops them all (see ``_write_on_every_rank``).
        """
        path = Path(self.broadcast(str(filepath)))
        write = super().save_checkpoint
        if not self._save_distributed_checkpoint:
            return self._write_on_every_rank(lambda: write(checkpoint, path, storage_options), path)
        partial = hidden_beside(path, "partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("fsdp2_save_start")
        self._write_on_every_rank(lambda: write(checkpoint, partial, storage_options), path)
        self.barrier("fsdp2_save_written")
        if self.is_global_zero:
            replace_folder(partial, path)
        self.barrier("fsdp2_save_published")

    def _write_on_every_rank(self, write, path: Path) -> None:
        """Run this rank's part of a checkpoint write; if it failed on any rank, every rank raises.

        Rank 0 alone writes a gathered file and a sharded checkpoint's metadata: raising there alone
        left the other ranks waiting in the next collective (srun and torchrun do not stop them).
        """
        failure = None
        try:
            write()
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            failure = err
        if not self.reduce_boolean_decision(failure is not None, all=False):
            return
        cause = failure
        if isinstance(failure, CheckpointException):  # torch.distributed.checkpoint gathered the ranks' failures
            cause, _ = next(iter(failure.failures.values()))
        refusal = disk_write_refusal(cause, "checkpoint", path)
        if refusal is not None:
            raise refusal from failure
        if failure is not None:
            raise failure
        earlier = "; the previous checkpoint is intact" if path.exists() else ""
        raise UserError(f"could not write the checkpoint {path}: another rank failed (its error says why){earlier}")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Lightning's load, after the check the module makes on one device (``refuse_unfit_checkpoint``): the
        strategy loads the weights before the module's hook. Every rank reads the same shapes and refuses alike.
        A path that is no checkpoint is left to Lightning's own error."""
        from cpt_lightning.export import is_training_checkpoint, saved_weight_shapes
        from cpt_lightning.model_loading import refuse_unfit_checkpoint

        if is_training_checkpoint(checkpoint_path):
            refuse_unfit_checkpoint(checkpoint_path, self.lightning_module, saved_weight_shapes(checkpoint_path))
        with _optimizer_states_read_by_their_groups(self.optimizers):
            return super().load_checkpoint(checkpoint_path, weights_only)

    def parallelize(self, model: nn.Module) -> None:
        """Shard a Hugging Face ModernBERT masked-LM in place (called from ``configure_model``)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        options = {
            "mesh": self.device_mesh["data_parallel"],
            "mp_policy": MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype),
            "reshard_after_forward": self.reshard_after_forward,
        }
        for layer in model.model.layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)  # embeddings, final norm, head and the tied decoder


@contextmanager
def _optimizer_states_read_by_their_groups(optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Lightning's load of a gathered checkpoint file under FSDP2 reads an optimizer state keyed by numbers as
    numbered in the model's parameter order (``_rekey_optimizer_state_if_needed``), as FSDP2's own gathered save
    numbers it. A single-device or DDP run's file numbers them in its param groups' order, which the decay and
    no-decay groups make another: resumed under FSDP2 it ended in torch's size error on every rank (or, between
    parameters of one shape, would swap their AdamW moments). Such a state is keyed by name through the groups."""
    import lightning.fabric.strategies.model_parallel as lightning_model_parallel

    by_model_order = getattr(lightning_model_parallel, "_rekey_optimizer_state_if_needed", None)
    if by_model_order is None:  # another Lightning's load: left as it is (the test of this resume says if it reads)
        yield
        return

    def rekey(state: dict, module: nn.Module) -> dict:
        numbers = [number for group in state["param_groups"] for number in group["params"]]
        if len(optimizers) != 1 or numbers != list(range(len(numbers))):  # FSDP2's own numbering, or names
            return by_model_order(state, module)
        return keyed_by_name(state, module, optimizers[0])

    lightning_model_parallel._rekey_optimizer_state_if_needed = rekey
    try:
        yield
    finally:
        lightning_model_parallel._rekey_optimizer_state_if_needed = by_model_order


def keyed_by_name(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``state`` (torch's ``Optimizer.state_dict()``: parameters numbered in its groups' order) keyed by parameter
    name, each number naming the parameter at its place in ``optimizer``'s groups (the config builds the same)."""
    name_of = {id(parameter): name for name, parameter in module.named_parameters()}
    sizes, ours = ([len(group["params"]) for group in groups]
                   for groups in (state["param_groups"], optimizer.param_groups))
    if sizes != ours:
        raise UserError(f"the checkpoint's optimizer holds parameter groups of {sizes} parameters, this run's of "
                        f"{ours}: resume it with the config it was trained with")
    names = [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    return {"state": {names[number]: value for number, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[number] for number in group["params"]]}
                             for group in state["param_groups"]]}


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` made shard units (FSDPModule) in ``module``, itself included."""
    from torch.distributed.fsdp import FSDPModule

    return [unit for unit in module.modules() if isinstance(unit, FSDPModule)]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Hugging Face's layer recomputation, non-reentrant (as FSDP2 recommends). transformers 5.x renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and drops the old name in v6."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
