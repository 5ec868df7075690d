"""Where a ``cpt fit`` or ``cpt validate`` starts: the checkpoint it is given (or the run's ``last.ckpt``, or a
requeued job's choice between them) checked against the run folder it lands in, before Lightning loads anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cpt_lightning.config_history import RUN_CONFIG_KEY, source_key
from cpt_lightning.errors import UserError, one_line
from cpt_lightning.start_record import saved_nothing_since_the_start

REQUEUED_ENV = "CPT_REQUEUED"  # set by scripts/slurm/train.sbatch in a job SLURM requeued


def saved_last_checkpoints(trainer) -> set[str]:
    """The ``last.ckpt`` files that ``--ckpt_path last`` would resume from, where Lightning itself looks for them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return {path for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
            for path in callback._find_last_checkpoints(trainer) if Path(path).exists()}


def newest_last_checkpoint(trainer) -> str | None:
    """The file ``--ckpt_path last`` validates: the checkpoint callbacks' newest ``last.ckpt``, by Lightning's rule
    (which also counts an ``OnExceptionCheckpoint``'s file; no config here names one)."""
    return max(saved_last_checkpoints(trainer), key=os.path.getmtime, default=None)


def run_config_here(trainer) -> Path | None:
    """The ``config.yaml`` of a run that trained in the folder ``cpt validate`` logs into, or None."""
    path = Path(trainer.log_dir) / "config.yaml"
    return path if trainer.logger is not None and path.is_file() else None


def saved_run_config(trainer) -> tuple[Path, dict] | None:
    """``run_config_here`` and what it holds, or None where there is none or it is no YAML mapping."""
    import yaml

    if (path := run_config_here(trainer)) is None:
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return (path, config) if isinstance(config, dict) else None


def check_a_start_that_saved_nothing(trainer) -> None:
    """``cpt fit --ckpt_path last`` where no ``last.ckpt`` is: Lightning starts the run from step 0, right for a run
    that never saved (a first submission) but not after a start from a checkpoint (a branch, a rollback) that was
    killed before its first save (SIGKILL, OOM, a lost node): a branch retrained its parent's phases from the base
    model, exit 0. The run's ``config.yaml`` names the checkpoint that start began from (what a requeue goes on
    from, ``requeued_ckpt_path``)."""
    if saved_last_checkpoints(trainer) or (saved := saved_run_config(trainer)) is None:
        return
    path, config = saved
    if (started_from := config.get("ckpt_path")) not in (None, "last"):
        raise UserError(f"--ckpt_path last: this config's run folder {path.parent} holds no last.ckpt: its last start, "
                        f"from {started_from} ({path.name}), saved none; rerun that start (--ckpt_path {started_from})")


def check_a_sharded_checkpoint_has_its_strategy(trainer, ckpt_path) -> None:
    """A sharded checkpoint (a folder of ``torch.distributed.checkpoint`` shards, FSDP2's) loads under FSDP2 alone:
    another strategy ``torch.load``-ed the folder as one file, an IsADirectoryError traceback on every rank."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(trainer.strategy, ModelParallelStrategy):
        return
    paths = saved_last_checkpoints(trainer) if ckpt_path == "last" else {str(ckpt_path)} if ckpt_path else set()
    for path in sorted(paths):
        if Path(path).is_dir():
            raise UserError(f"--ckpt_path {path} is a sharded checkpoint (a folder of FSDP2's shards): it loads under "
                            "trainer.strategy cpt_lightning.parallel.FSDP2 (on any number of devices; another layout "
                            "needs data.init_args.resume_on_another_layout), or `cpt export` it and start a run from "
                            "the export (model.init_args.model)")


def check_a_checkpoint_for_the_runs_curves(trainer, ckpt_path: str | None) -> None:
    """``cpt validate`` logs into the config's run folder, at the checkpoint's step (step 0 for weights validated as
    they load). A folder where a run trained (its ``config.yaml``) takes only:

    - that run's checkpoints, by logger name and version (a second seed's folder may differ by version alone):
      another run's (one validated config for every arm of a comparison) joined its curves without a word;
    - none earlier than its newest: TensorBoard's viewer keeps one try of a curve, so a point logged at an earlier
      step than the curve's last drops every later one from its charts (the base model at step 0: all of them).

    A new or validation-only folder takes any."""
    from cpt_lightning.export import read_checkpoint

    if ckpt_path == "last" or (trained_here := run_config_here(trainer)) is None:
        return
    records = read_checkpoint(ckpt_path, weights=False).records if ckpt_path else {}
    theirs, ours = run_of(records.get(RUN_CONFIG_KEY)), run_of(trained_here.read_text())
    if None not in (theirs, ours) and theirs != ours:
        raise UserError(f"--ckpt_path {ckpt_path} is a checkpoint of run {'/'.join(filter(None, theirs))!r}, and "
                        f"{trained_here.parent} holds run {'/'.join(filter(None, ours))!r}, whose curves its figures would "
                        "join: validate it with its own run's config, or into a folder of its own "
                        "(--trainer.logger.init_args.name NAME)")
    step = records.get("global_step") or 0
    saved = [read_checkpoint(last, weights=False).records.get("global_step") or 0
             for last in saved_last_checkpoints(trainer)]
    if saved and step < (newest := max(saved)):
        weights = f"--ckpt_path {ckpt_path} (step {step:,})" if ckpt_path else "the weights as they load (step 0)"
        raise UserError(f"{weights} is earlier than the run in {trained_here.parent}, saved at step {newest:,}: "
                        "TensorBoard's viewer keeps one try of a curve, so its figures logged there would drop the run's "
                        "later val/* points from the charts; validate into a folder of its own "
                        "(--trainer.logger.init_args.name NAME)")


def _validation_settings(config: dict) -> dict:
    """What a validation's figures depend on besides the weights, comparable between two configs (a source by its
    folder, however written)."""
    data, model = ((config.get(key) or {}).get("init_args") or {} for key in ("data", "model"))
    sources = data.get("val_sources") or []
    return {
        "data.init_args.val_sources": sorted((str(s.get("name")), source_key(s)) for s in sources if isinstance(s, dict)),
        "data.init_args.block_size": data.get("block_size"),
        "model.init_args.val_objectives": model.get("val_objectives"),
        "trainer.limit_val_batches": (config.get("trainer") or {}).get("limit_val_batches"),
    }


def check_validation_matches_the_run(trainer, config_text: str) -> None:
    """``cpt validate`` into a folder where a run trained logs at the run's steps, in its curves: a validation of
    the whole holdout, of other sources or objectives, added a second value at a step of the run's ``val/*`` curves,
    without a word. It takes the run's validation settings, or a folder of its own."""
    import yaml

    if (saved := saved_run_config(trainer)) is None:
        return
    trained_here, run = saved
    ours, theirs = _validation_settings(yaml.safe_load(config_text)), _validation_settings(run)
    if differing := [key for key in ours if ours[key] != theirs[key]]:
        raise UserError(f"{', '.join(differing)} differ from the run's in {trained_here}, whose val/* curves these "
                        "figures would join at its steps: validate with the run's settings, or into a folder of its "
                        "own (--trainer.logger.init_args.name NAME)")


def run_of(config_text) -> tuple[str, str] | None:
    """A run config's logger name and version, None when it names no logger."""
    import yaml

    from cpt_lightning.model_card import logger_args

    try:
        config = yaml.safe_load(config_text) if isinstance(config_text, str) else None
    except yaml.YAMLError:
        return None
    args = logger_args(config) if isinstance(config, dict) else None
    return None if args is None else (str(args.get("name") or ""), str(args.get("version") or ""))


def requeued_ckpt_path(trainer, given):
    """Where a requeued job (a time limit's, a preemption's, a node failure's) goes on: the run's ``last.ckpt`` once it
    has saved one, else where its first job started (``given``: a branch's parent checkpoint, a rollback's step, or
    nothing for a fresh run). Always ``last`` restarted a branch that had not saved yet from step 0, retraining its
    parent's phases from the base model without a word. A rollback in its own run folder finds the later steps'
    ``last.ckpt`` there until its first micro-batch sets it aside: while the start record says it is unchanged since
    the start from ``given`` (``start_record``), the job starts from ``given`` again."""
    lasts = saved_last_checkpoints(trainer)
    goes_on = bool(lasts) and not saved_nothing_since_the_start(Path(trainer.log_dir), given, lasts)
    resume = "last" if goes_on else given
    if trainer.is_global_zero:
        print(f"[requeued] resuming from {resume or 'the start (nothing saved yet)'}", file=sys.stderr)
    return resume


def check_ckpt_path(ckpt_path) -> None:
    """A ``--ckpt_path`` that is no checkpoint, found before the model is built: Lightning's ``torch.load`` ended
    in a traceback (FileNotFoundError, IsADirectoryError, or an unpickler's KeyError for a text file), as did
    ``best`` (Lightning's ValueError: a new process has no best model path). One that
    a sharded save killed between its two renames left missing is put back first."""
    import zipfile

    from cpt_lightning.checkpointing import damage, restore_interrupted_replacements
    from cpt_lightning.export import DCP_METADATA, is_training_checkpoint

    if ckpt_path is None or str(ckpt_path) in ("last", "hpc") or str(ckpt_path).startswith("registry") \
            or "://" in str(ckpt_path):  # hpc: the checkpoint of Lightning's own SLURM requeue (on SIGUSR1)
        return
    if str(ckpt_path) == "best":  # a callback's ranking, restored only from a checkpoint: none in a new process
        raise UserError("--ckpt_path best: Lightning's name for a checkpoint no new cpt process has; give last (the "
                        "run's newest) or a checkpoint (RUN/checkpoints/step….ckpt)")
    path = Path(ckpt_path)
    if not path.exists() and path.parent.is_dir():
        restore_interrupted_replacements(path.parent)  # RUN/checkpoints/last.ckpt named after a kill mid-rename
    if not path.exists():
        raise UserError(f"--ckpt_path {ckpt_path}: no such file; give a checkpoint (.ckpt file or sharded folder) or last")
    if not is_training_checkpoint(path) and (path / "config.json").is_file():  # cpt export's, or any HF model folder
        beside = path.with_name(f"{path.name}.ckpt")
        checkpoint = f"give {beside} (its checkpoint) to resume or branch, or " if beside.is_file() else ""
        raise UserError(f"--ckpt_path {ckpt_path}: an exported model, not a training checkpoint; {checkpoint}start a "
                        "fresh run from it with model.init_args.model")
    if not is_training_checkpoint(path):
        raise UserError(f"--ckpt_path {ckpt_path}: a folder but not a sharded checkpoint (no {DCP_METADATA}); "
                        "give a checkpoint file in it (step….ckpt, last.ckpt) or last")
    # torch.save's format is a zip (Lightning's): a text file is none, a checkpoint cut short begins as one
    if path.is_file() and not zipfile.is_zipfile(path) and not _starts_as_zip(path):
        raise UserError(f"--ckpt_path {ckpt_path}: not a PyTorch checkpoint; give a .ckpt file cpt fit saved, or last")
    if (problem := damage(path)) is not None:
        raise UserError(f"--ckpt_path {ckpt_path}: {problem}; {_resume_instead(path)}")
    if path.is_file() and (problem := _not_a_lightning_checkpoint(path)) is not None:
        raise UserError(f"--ckpt_path {ckpt_path}: {problem}; give a .ckpt file cpt fit saved, or last (weights alone "
                        "start a fresh run as a Hugging Face folder in model.init_args.model)")


def _starts_as_zip(path: Path) -> bool:
    """Whether a file that is no whole zip begins as one: a checkpoint cut short (``damage`` names it), not another
    kind of file."""
    with path.open("rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _not_a_lightning_checkpoint(path: Path) -> str | None:
    """Why a whole PyTorch file is not one Lightning resumes from (a saved ``state_dict``, a ``pytorch_model.bin``),
    or None: Lightning's loader ended in a KeyError traceback. Its tensors are mapped, not read."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a zip that torch did not write, a pickle of classes not installed here
        return f"not a checkpoint PyTorch can load ({type(err).__name__}: {one_line(err)})"
    if not isinstance(saved, dict) or not {"state_dict", "pytorch-lightning_version"} <= saved.keys():
        return "a PyTorch file but not a Lightning checkpoint (no 'state_dict' and 'pytorch-lightning_version')"
    return None


def check_last_checkpoints(trainer) -> None:
    """``--ckpt_path last`` onto a ``last.ckpt`` that is no whole checkpoint (a copy cut short, a file system fault; a
    file, or a sharded folder with a shard missing or short): Lightning's ``torch.load`` or torch's distributed reader
    ended in a traceback, on every rank, that did not say the run's step checkpoints are intact."""
    from cpt_lightning.checkpointing import damage

    for last in map(Path, saved_last_checkpoints(trainer)):
        if (problem := damage(last)) is not None:
            raise UserError(f"--ckpt_path last: {last} is {problem}; {_resume_instead(last)}")


def _resume_instead(damaged: Path) -> str:
    """Where to resume from instead: the newest whole ``step*.ckpt`` beside a damaged checkpoint (file or folder)."""
    from cpt_lightning.checkpointing import damage

    intact = next((step for step in sorted(damaged.parent.glob("step*.ckpt"), reverse=True)
                   if step != damaged and damage(step) is None), None)
    return f"resume from --ckpt_path {intact}" if intact else "resume from a checkpoint of the run that is whole"
