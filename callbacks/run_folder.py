"""Where a run keeps its files, and whether ``--ckpt_path`` resumes that run or branches off another."""

from __future__ import annotations

from pathlib import Path


def resumes_this_run(trainer, *folders: Path | str) -> bool:
    """Whether ``--ckpt_path`` is this run's own checkpoint (in its run folder or ``folders``): a resume. One of
    another run's starts a branch (a decay off a CLM checkpoint), which must not take over that run's files."""
    if trainer.ckpt_path is None:
        return False
    checkpoint = Path(trainer.ckpt_path).resolve()
    return any(checkpoint.is_relative_to(Path(folder).resolve()) for folder in (run_folder(trainer), *folders))


def run_folder(trainer) -> Path:
    """The folder Lightning's ModelCheckpoint puts a run's ``checkpoints/`` in: ``save_dir/name/version`` of the
    first logger (per run for every logger, where ``trainer.log_dir`` is a shared folder for Wandb or MLflow),
    else ``default_root_dir``."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
