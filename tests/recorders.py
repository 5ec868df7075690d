"""Test-only callbacks, strategies and objectives, importable by ``class_path`` from CLI runs (tests/ is on PYTHONPATH there)."""

import errno
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from unittest import mock

import lightning as L
import torch

from cpt_lightning.objectives import IGNORE_INDEX, CausalLM
from cpt_lightning.parallel import FSDP2
from helpers import without_exchange


class BatchLog(L.Callback):
    """Append one JSON line per micro-batch: optimizer step, a fingerprint of the rows, the loss."""

    def __init__(self, path: str):
        self.path = path
        self.step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step  # the optimizer step this micro-batch belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rows = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        record = {"step": self.step, "rows": rows, "loss": float(outputs["mean_loss"])}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class ReduceScatterCount(L.Callback):
    """Append one JSON line per optimizer step: this rank's micro-batches and gradient reduce-scatters in it.

    FSDP2 reduce-scatters a shard unit's gradients with one ``torch.distributed.reduce_scatter_single``.
    """

    def __init__(self, path: str):
        self.path = path
        self.micro_batches = self.reduce_scatters = 0
        self.original = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.original = original = torch.distributed.reduce_scatter_single

        def counted(*args, **kwargs):
            self.reduce_scatters += 1
            return original(*args, **kwargs)

        torch.distributed.reduce_scatter_single = counted

    def teardown(self, trainer, pl_module, stage: str) -> None:
        torch.distributed.reduce_scatter_single = self.original

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        record = {"rank": trainer.global_rank, "step": trainer.global_step,
                  "micro_batches": self.micro_batches, "reduce_scatters": self.reduce_scatters}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.micro_batches = self.reduce_scatters = 0


class SigtermAtTrainStart(L.Callback):
    """Send SIGTERM to this process in ``on_train_start``: listed before a PreemptionCheckpoint, the signal reaches
    Lightning's handler (registered once the checkpoint is restored) before the callback takes SIGTERM over."""

    def on_train_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


class SigtermInSanityCheck(L.Callback):
    """Send SIGTERM to this process after the first batch of the sanity validation before training."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInValidation(L.Callback):
    """Send SIGTERM to this process after the first validation batch of ``cpt validate`` (not a fit's)."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "validate" and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class SaveAt(L.Callback):
    """Saves ``path`` where optimizer step ``step`` ends, as TokenCheckpoint does, and the run goes on."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not trainer.fit_loop._should_accumulate():
            trainer.save_checkpoint(self.path)


class SigtermAt(L.Callback):
    """Send SIGTERM to this process at the end of the first micro-batch of optimizer step ``step``.

    ``rank``: only that rank signals itself (as when a launcher signals only the main process).
    """

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rank not in (None, trainer.global_rank):
            return
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class KilledMidSave(FSDP2):
    """FSDP2 whose every rank is SIGKILLed during the save of step ``kill_at_step``: once the shards of the step's
    checkpoint are written, before publishing; or, ``between_renames`` (on a file system that cannot exchange two
    names, where a folder is replaced by two renames), once rank 0 has moved the previous ``last.ckpt`` aside to put the new one (a second name for the step's checkpoint) in its place, before it renames
    it there (the other ranks die waiting for it)."""

    def __init__(self, kill_at_step: int, between_renames: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.kill_at_step, self.between_renames = kill_at_step, between_renames
        self._killed_save = self._replacing_last = False

    def barrier(self, name: str | None = None) -> None:
        super().barrier(name)
        if self._killed_save and name == "fsdp2_save_written":
            os.kill(os.getpid(), signal.SIGKILL)

    def broadcast(self, obj, src: int = 0):
        if self._replacing_last and self.global_rank != 0:  # waiting to learn whether rank 0 put last.ckpt in place
            os.kill(os.getpid(), signal.SIGKILL)
        return super().broadcast(obj, src)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        at_step = self.lightning_module.global_step == self.kill_at_step
        self._killed_save = at_step and not self.between_renames
        super().save_checkpoint(checkpoint, filepath, storage_options)
        if at_step and self.between_renames:  # last.ckpt is put in place next
            self._replacing_last = True
            if self.global_rank == 0:
                without_exchange(lambda *target: mock.patch.object(*target).start())  # two renames, as on NFS
                rename = Path.rename

                def killed_after_moving_aside(path, target):
                    renamed = rename(path, target)
                    if Path(target).name == ".last.ckpt.old":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return renamed

                mock.patch.object(Path, "rename", killed_after_moving_aside).start()  # the process dies with it


class FullDiskOnRank0(FSDP2):
    """FSDP2 whose rank 0 finds the disk full while writing the first checkpoint of step ``at_step``
    (rank 0 alone writes a gathered checkpoint file, and a sharded checkpoint's metadata)."""

    def __init__(self, at_step: int, **kwargs):
        super().__init__(**kwargs)
        self.at_step = at_step

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self.global_rank != 0 or self.lightning_module.global_step != self.at_step:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        with mock.patch("torch.save", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            return super().save_checkpoint(checkpoint, filepath, storage_options)


class DiesOnRank0(FSDP2):
    """FSDP2 whose rank 0 dies before joining the process group (a stand-in for a crash on one rank)."""

    def setup_environment(self) -> None:
        if self.cluster_environment.global_rank() == 0:
            raise RuntimeError("rank 0 died")
        super().setup_environment()


class Rank0FailsAlone(L.Callback):
    """At ``at_step`` rank 0 fails alone while the other ranks wait for it, as NCCL's next collective would until its
    timeout (a sleep here: gloo's would fail at once on rank 0's closed connection)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            if trainer.global_rank != 0:
                time.sleep(600)
            raise RuntimeError("rank 0 failed alone")


class PredictsOnRank0Only(CausalLM):
    """Next-token labels on rank 0's rows and none on the other ranks': a targeted objective whose targets all
    fall in one rank's share of the validation rows."""

    name = "rank0_clm"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            labels = torch.full_like(labels, IGNORE_INDEX)
        return inputs, labels
