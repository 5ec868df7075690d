"""PreemptionCheckpoint: on SIGTERM (SLURM's warning before a kill), save ``last.ckpt`` and exit.

Lightning turns SIGTERM into an exception at the next batch boundary, on every rank at once;
this saves where ``--ckpt_path last`` looks, so rerunning the same command resumes. The CLI then
exits with 143 (128 + SIGTERM) and says so, which a requeue script can test.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        callback = trainer.checkpoint_callback
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(f"[PreemptionCheckpoint] SIGTERM at step {trainer.global_step}: saved {path}")
