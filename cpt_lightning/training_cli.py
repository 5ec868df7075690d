"""LightningCLI for ``cpt fit`` / ``cpt validate``: every piece named by ``class_path``."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning_utilities.core import rank_zero as lightning_rank_zero  # its `log` is the logger rank_zero_info uses

from cpt_lightning.atomic import remove_abandoned_partials, unused_path, write_beside
from cpt_lightning.cli import TRAINING
from cpt_lightning.config_history import (
    CONFIG_HISTORY_KEY,
    DATA_DIGESTS_KEY,
    RUN_CONFIG_KEY,
    comparable,
    configured_callbacks,
    data_digests,
    history_after_restore,
)
from cpt_lightning.errors import UserError, refuse_on_every_rank
from cpt_lightning.refused_start import nothing_logged_without_a_run
from cpt_lightning.folder_locks import lock_run_folder, release, try_lock
from cpt_lightning.parse_errors import ConciseErrorParser
from cpt_lightning.start_checks import (
    REQUEUED_ENV,
    check_a_checkpoint_for_the_runs_curves,
    check_a_sharded_checkpoint_has_its_strategy,
    check_a_start_that_saved_nothing,
    check_ckpt_path,
    check_last_checkpoints,
    check_validation_matches_the_run,
    newest_last_checkpoint,
    requeued_ckpt_path,
    saved_last_checkpoints,
)
from cpt_lightning.start_record import RECORD_NAME, held_record, put_back_the_record, record_the_start
from cpt_lightning.validation import scored_weights, validation_table

# Warnings about the libraries, not the run, printed at every start; the second reads like a data bug.
LIBRARY_NOTICES = (
    # Lightning 2.6 builds the LeafSpec torch deprecates (2.10+): nothing a user can change.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Said of any IterableDataset with a length; litdata gives each loader worker rows of its own (data/loader.py).
    (UserWarning, r"Your `IterableDataset` has `__len__` defined"),
    # Said at every resume (its own checkpoints are there); a fresh run into an earlier run's folder is refused
    # before it by TokenCheckpoint, naming what to do.
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),
    # Said of every val/ figure in a multi-process run: they are summed over the ranks by hand before they are
    # logged (EncoderPretraining.on_validation_epoch_end), which Lightning cannot see; cpt validate's "step" (the
    # x-axis of its points) is the same on every rank.
    (UserWarning, r"It is recommended to use `self\.log\('(?:val/|step')"),
    # Said at every branch into a run folder of its own ("... won't be reloaded"): TokenCheckpoint takes the
    # checkpoints of its own folder as the ones it keeps and prunes (_adopt_checkpoints_up_to_start), not the parent's.
    (UserWarning, r"The dirpath has changed from"),
)


def refuse_repeated_callbacks(callbacks: list) -> None:
    """Callbacks that hold no state, which Lightning runs as often as they are listed: of two GlobalBatches the
    last set the batch (or the second blamed an accumulate_grad_batches nobody wrote), two PhaseEndExports
    exported twice. ``--trainer.callbacks+=callbacks.GlobalBatch`` over a recipe lists a second."""
    from callbacks import GlobalBatch, PhaseEndExport, PreemptionCheckpoint, TokenValidation

    for kind in (GlobalBatch, PhaseEndExport, PreemptionCheckpoint, TokenValidation):
        if sum(isinstance(callback, kind) for callback in callbacks) > 1:
            raise UserError(f"trainer.callbacks lists {kind.__name__} more than once: keep one")


def not_an_advert(record: logging.LogRecord) -> bool:
    """Lightning logs a "💡 Tip" for its cloud services (litlogger, litmodels) at every start."""
    return not record.getMessage().startswith("💡 Tip")


class SaveConfigOnceTraining(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when the first micro-batch reaches backward, not at setup, and
    saves its text in every checkpoint.

    Lightning writes it in ``setup``, before the checks that can refuse a rerun (data the model
    cannot read, a resumed layout or global batch that changed): a refused rerun replaced the config
    of the run whose checkpoints sit beside it, and ``cpt export`` copies that file into the model
    card. By the first backward every check has passed, and no phase has ended yet (a phase-end
    export reads the file). The file is written beside itself and renamed into place, so a full disk
    leaves the previous one whole. ``cpt validate`` trains nothing and writes nothing.

    The copy in each checkpoint is what ``cpt export`` reads first: the log folder's file describes
    the latest resume, and a checkpoint set aside or moved elsewhere has none beside it. A run started
    from a checkpoint saved under another config also keeps that one (``config_history``).
    """

    text: str | None = None  # the config as written, once training has started
    digests: dict | None = None  # its data folders' index digests (config_history.data_digests)
    restored: dict | None = None  # the checkpoint's config records, when the run started from one
    history: list[dict] | None = None  # what this run's checkpoints save as config_history
    run_lock: int | bool | None = None  # a fit's lock on its run folder (folder_locks), on rank 0
    started_from: str | None = None  # the fit's ckpt_path as the CLI gives it (``last``: the run's own)
    record_held: tuple[Path, bytes | None] | None = None  # the run folder's start record before this start, on rank 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        """A fit takes its run folder's lock (``folder_locks``): before anything of this start is kept there. Then
        it removes what a write of its config or start record killed midway left, and a start from a checkpoint
        beside the run's ``last.ckpt`` writes what a requeue of its job compares (``start_record``)."""
        if stage != "fit":
            return
        folder = Path(trainer.log_dir)  # a broadcast: every rank reads it

        def refusal() -> str | None:
            self.run_lock, refused = lock_run_folder(folder)
            if refused:
                return refused
            config = Path(self.config_filename)  # config.yaml, and the config-before-step….yaml kept beside it
            for names in (f"{config.stem}*{config.suffix}", RECORD_NAME):
                remove_abandoned_partials(folder, names)
            self.record_held = (folder, held_record(folder))
            return record_the_start(folder, self.started_from, saved_last_checkpoints(trainer))

        refuse_on_every_rank(trainer, refusal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        release(self.run_lock)
        self.run_lock = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Lightning skips teardown after an exception: a refused or failed fit frees the folder here, a refused one
        (a UserError) with its start record as it was."""
        if isinstance(exception, UserError) and self.record_held is not None:
            put_back_the_record(*self.record_held)
        self.teardown(trainer, pl_module, "fit")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.restored = {key: checkpoint.get(key)
                         for key in (RUN_CONFIG_KEY, CONFIG_HISTORY_KEY, DATA_DIGESTS_KEY, "global_step")}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.already_saved:
            return
        self.text = self.parser.dump(self.config, skip_unset=False)  # what parser.save writes (one file)
        self.digests = data_digests(self.text)
        if self.restored is not None:
            self.history = history_after_restore(self.restored, self.text)
        log_dir = Path(trainer.log_dir)  # a broadcast: every rank reads it
        if trainer.is_global_zero:
            target = log_dir / self.config_filename

            def save(partial: Path) -> None:
                partial.write_text(self.text)
                restored = self.restored or {}
                keep_replaced_config(target, partial, trainer.global_step, restored.get(DATA_DIGESTS_KEY),
                                     restored.get(RUN_CONFIG_KEY))

            write_beside(target, save, "run config")
        self.already_saved = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.text is not None:
            checkpoint[RUN_CONFIG_KEY] = self.text
            checkpoint[DATA_DIGESTS_KEY] = self.digests
            if self.history is not None:
                checkpoint[CONFIG_HISTORY_KEY] = self.history


def log_nothing_beside_a_running_fit(trainer, folder: Path) -> None:
    """``cpt validate`` into the run folder of a fit still training (its lock held: ``folder_locks``) prints its
    figures but logs none: they went into the run's TensorBoard curves mid-run, points off the run's validation
    cadence, and one logged at an earlier step than the fit's latest point drops every later one from the viewer's
    charts. Looked at before any logger opens (a CSVLogger's start deletes the folder's metrics.csv), and on each
    rank (the loggers write on rank 0 only); the folder is not locked: a fit may start while a validation runs."""
    from lightning.pytorch.utilities import rank_zero_warn

    def fit_running() -> bool:
        lock = try_lock(folder, shared=True) if folder.is_dir() else True
        release(lock)
        return lock is False

    if trainer.loggers and fit_running():
        rank_zero_warn(f"{folder} is the run folder of a cpt fit still training: these figures are printed, not "
                       "logged among its curves; validate with --trainer.logger.init_args.name NAME to keep them in a "
                       "folder of their own")
        trainer.loggers = []


def check_trainer_settings(trainer: dict) -> None:
    """Trainer values Lightning takes without a word: an accumulation below 1 divided by zero in a callback's
    ``on_train_start`` (a traceback), a negative ``gradient_clip_val`` turned clipping off (Lightning clips only above 0).
    And Lightning flags that mean something else for one endless epoch of a stream whose phases end the run."""
    from callbacks.objective_schedule import ObjectiveSchedule

    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate < 1:
        raise UserError(f"trainer.accumulate_grad_batches={accumulate}: must be at least 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise UserError(f"trainer.gradient_clip_val={clip}: must be positive (0 or null: no clipping)")
    stops = any(isinstance(c, ObjectiveSchedule) and c.stop_after_last_phase for c in configured_callbacks(trainer))
    for key in ("min_steps", "min_epochs"):  # Lightning makes a min_steps a min_epochs of 1 too
        if trainer.get(key) and stops:
            raise UserError(f"trainer.{key}={trainer[key]}: Lightning then ignores the ObjectiveSchedule's stop until "
                            "a whole epoch of the data has trained, which the endless training mix never ends; the "
                            "phases end the run: remove it")
    limit = trainer.get("limit_train_batches")
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):
        raise UserError(f"trainer.limit_train_batches={limit}: Lightning would end its epoch after that many "
                        "batches and start the endless training mix over in a new shuffle (rows read again or "
                        "skipped, and no exact resume); for a shorter run give the phases fewer tokens, or set "
                        "trainer.max_time (--ckpt_path last goes on from where it stops)")
    if trainer.get("overfit_batches"):
        raise UserError(f"trainer.overfit_batches={trainer['overfit_batches']}: each of Lightning's epochs starts the "
                        "training mix over in a new shuffle, so no batch repeats and nothing is overfitted; remove it")
    if trainer.get("barebones"):
        raise UserError("trainer.barebones turns off the logging, checkpoints and progress bar the config's callbacks "
                        "are; cpt bench measures a config's speed without them")
    check_default_root_dir(trainer.get("default_root_dir"), trainer.get("logger"))


def check_fit_settings(trainer) -> None:
    """Trainer values with which a fit silently does less than its config says: ``max_steps`` 0 trained nothing and
    exited 0 (its run folder made), ``limit_val_batches`` 0 skipped every validation TokenValidation schedules."""
    from callbacks.token_validation import TokenValidation

    if trainer.max_steps == 0:
        raise UserError("trainer.max_steps=0 trains nothing: set -1 (the phases end the run) or the steps to train")
    validates = any(isinstance(c, TokenValidation) for c in trainer.callbacks)
    if trainer.limit_val_batches == 0 and validates:
        raise UserError("trainer.limit_val_batches=0 skips every validation callbacks.TokenValidation schedules: "
                        "remove TokenValidation to train without validating, or set limit_val_batches to 1 or more")


def check_default_root_dir(root, logger) -> None:
    """With a logger, Lightning writes a run's checkpoints, config and exports in the logger's folder;
    ``default_root_dir`` counts only without one. A branch given ``--trainer.default_root_dir runs/other`` to run
    elsewhere ran in the logger's folder, its parent's: the parent's later checkpoints set aside, its curves
    continued. A root that does not hold the logger's folder is refused."""
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    save_dir = getattr(logger, "save_dir", None)
    if root is None or save_dir is None:
        return
    folder = Path(getattr(logger, "log_dir", save_dir)).resolve()
    if not folder.is_relative_to(Path(root).resolve()):
        raise UserError(f"trainer.default_root_dir={root} holds nothing of this run: with a logger, Lightning writes "
                        f"the checkpoints, config and exports in the logger's folder {folder}; to run elsewhere set "
                        "trainer.logger.init_args.name (or save_dir), or remove default_root_dir")


def step_aligned_timers(callbacks: list, max_time) -> list:
    """Every time limit stops where an optimizer step ends (``callbacks.StepTimer``). Lightning's Timer stops after
    any micro-batch, leaving an accumulated step half done (its drawn micro-batches skipped by the resume): one
    with a duration is refused. ``trainer.max_time`` becomes a StepTimer: Lightning adds its own Timer only when
    the callbacks list none, and the recipes list one (the model card's wall-clock), so max_time was ignored (an
    info line) and a run meant to stop within a time budget ran on. A listed Timer without a duration gives way
    (same checkpoint key); one with a duration is refused beside max_time."""
    from lightning.pytorch.callbacks import Timer

    from callbacks import StepTimer

    if has_time_limit([c for c in callbacks if not isinstance(c, StepTimer)]):
        raise UserError("trainer.callbacks: Lightning's Timer with a duration stops after any micro-batch, in the "
                        "middle of an accumulated step, whose drawn rows the resume skips: use callbacks.StepTimer "
                        "(the same init_args) or trainer.max_time")
    if max_time is not None:
        if has_time_limit(callbacks):
            raise UserError("trainer.max_time and a Timer with its own duration in trainer.callbacks: keep one of the "
                            "two")
        callbacks = [StepTimer(duration=max_time)] + [c for c in callbacks if not isinstance(c, Timer)]
    return callbacks


def in_hook_order(callbacks: list) -> list:
    """The order their hooks run in, the others' kept. Timers first: the callbacks after them see the stop they set
    at a step's end, and log that step as Lightning's last (``train/hours_left``, the memory peaks and tokens/s were
    left at the previous log step). ``callbacks.PhaseEndExport`` last (Lightning puts its own checkpoints after it):
    its phase-end checkpoint holds what every other callback took from the step's last micro-batch (the throughput
    totals and the loss-spike window were one micro-batch short)."""
    from lightning.pytorch.callbacks import Timer

    from callbacks import PhaseEndExport

    return sorted(callbacks, key=lambda c: 0 if isinstance(c, Timer) else 2 if isinstance(c, PhaseEndExport) else 1)


def has_time_limit(callbacks: list) -> bool:
    """A Timer among the callbacks stops the run (a Timer without a duration only keeps the wall-clock)."""
    from lightning.pytorch.callbacks import Timer

    return any(isinstance(c, Timer) and c.time_remaining() is not None for c in callbacks)


def split_seeds_warning(seed_everything, mask_seed, data_seed) -> str | None:
    """Three seeds drive a run: ``seed_everything`` initialises new weights (none when continuing a pretrained
    encoder with its own MLM head), ``model.init_args.seed`` draws the masks, ``data.init_args.seed`` orders and
    mixes the data. A second seed made with ``--seed_everything 18`` alone kept the first run's masks and data
    order. Said when ``seed_everything`` is not the masking seed (the recipes keep them equal)."""
    if isinstance(seed_everything, bool) or seed_everything is None or mask_seed is None or seed_everything == mask_seed:
        return None
    return (f"seed_everything {seed_everything} only initialises new weights (a pretrained encoder and MLM head have "
            f"none); the masks come from model.init_args.seed {mask_seed} and the data order from data.init_args.seed "
            f"{data_seed}: for another seed of the run, set those too")


def keep_replaced_config(previous: Path, new: Path, step: int, digests: dict | None = None,
                         trained: str | None = None) -> None:
    """A resume under another config (a longer decay, a branch that kept the parent's run name) replaces
    the config that trained the steps before it: that one stays as ``config-before-step{S}.yaml``, which
    ``cpt export --run-config`` takes for a checkpoint of those steps. A resume that differs only in
    ``ckpt_path`` (every requeue) or in the folders of the same data (``digests``: the checkpoint's record of
    the previous config's) keeps nothing.

    ``trained``: the config the resumed checkpoint holds, the one that trained its steps. The file beside it is
    a later resume's after a rollback (it trained the steps set aside): kept as the config before S, it named
    the wrong one. Without a record (an older checkpoint) the file is taken."""
    if not previous.is_file():
        return
    before = trained if trained is not None else previous.read_text()
    if comparable(before, digests) == comparable(new.read_text()):
        return
    named = lambda suffix: previous.with_name(f"{previous.stem}-before-step{step:09d}{suffix}{previous.suffix}")  # noqa: E731
    if any(path.read_text() == before for path in previous.parent.glob(named("*").name)):
        return  # a second resume from the same step: kept already
    write_beside(unused_path(named), lambda partial: partial.write_text(before), "run config")


class CptCLI(LightningCLI):
    """LightningCLI with every piece (model, data, callbacks, objectives) named by ``class_path``.

    ``run=False`` parses a config (no subcommand) and builds model, data and trainer without
    running anything or saving the config, for tools that drive the trainer themselves (``cpt bench``).
    """

    def __init__(self, args: list[str] | None = None, run: bool = True):
        for category, message in LIBRARY_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        lightning_rank_zero.log.addFilter(not_an_advert)
        # Imported before the parser is built, so --help lists them among the known subclasses of
        # DataModule, Callback, Strategy and CheckpointIO (jsonargparse lists the imported ones).
        import callbacks  # noqa: F401
        import cpt_lightning.checkpointing  # noqa: F401
        import cpt_lightning.data.datamodule  # noqa: F401
        import cpt_lightning.parallel  # noqa: F401
        from cpt_lightning.module import EncoderPretraining

        super().__init__(
            EncoderPretraining,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigOnceTraining if run else None,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def _parse_ckpt_path(self) -> None:
        """The config, not the checkpoint, sets the module's arguments. LightningCLI (2.6) loads the hyperparameters
        of a ``--ckpt_path`` *file* over ``model``: a resume or branch from a step's checkpoint then ignored the
        config's learning rate (what NonFiniteGuard asks to lower), ``attn_implementation`` and ``compile``, and
        ``cpt validate`` dropped ``val_objectives`` (not hyperparameters); ``--ckpt_path last`` was not affected.
        A checkpoint whose weights do not fit the config's model is refused when it is loaded."""

    def _set_seed(self) -> None:
        """A ``seed_everything`` numpy cannot take is one line, not the traceback of Lightning's seeding."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not min_seed_value <= seed <= max_seed_value:
            raise UserError(f"seed_everything={seed}: must be within [{min_seed_value}, {max_seed_value}] (true: a "
                            "random one)")
        super()._set_seed()

    def init_parser(self, **kwargs):
        self.parser_class = ConciseErrorParser
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, but for ``test`` and ``predict``, which ``cpt`` does not run (``TRAINING``): their parsers,
        built at every start, took half of the 0.09 s the subcommands' parsers cost."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINING}

    def _add_subcommands(self, parser, **kwargs) -> None:
        """``cpt fit --help`` read ``usage: cpt [options] fit``, jsonargparse's, but ``cpt`` takes its command first
        (``cpt --config X fit`` is an unknown command): each usage starts ``cpt fit``."""
        super()._add_subcommands(parser, **kwargs)
        for name, subcommand_parser in self._subcommand_parsers.items():
            subcommand_parser.prog = f"cpt {name}"

    def instantiate_trainer(self, **kwargs):
        """Lightning's refusal of the trainer's settings (a recipe's GPUs on a CPU machine, more devices than
        there are, an unknown strategy) is a config error: one line with what to set, not a traceback. A config that names no
        progress bar gets ``callbacks.PhaseProgressBar`` instead of Lightning's epoch-counting one, and
        ``trainer.max_time`` a ``callbacks.StepTimer`` (``step_aligned_timers``); they run ``in_hook_order``."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.callbacks import ProgressBar

        from callbacks import PhaseProgressBar

        trainer = self._get(self.config_init, "trainer", default={})
        check_trainer_settings(trainer)
        callbacks = step_aligned_timers(configured_callbacks(trainer), trainer.get("max_time"))
        refuse_repeated_callbacks(callbacks)
        kwargs["max_time"] = None  # enforced by the StepTimer above
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(PhaseProgressBar())
        kwargs["callbacks"] = in_hook_order(callbacks)
        try:
            return super().instantiate_trainer(**kwargs)
        except RuntimeError as err:  # Lightning's refusal of a stateful callback listed twice (two ObjectiveSchedules)
            twice = re.match(r"Found more than one stateful callback of type `(\w+)`", str(err))
            if twice is None:
                raise
            hint = " (one ObjectiveSchedule holds every phase)" if twice[1] == "ObjectiveSchedule" else ""
            raise UserError(f"trainer.callbacks lists {twice[1]} more than once: keep one{hint}") from None
        except (MisconfigurationException, ValueError, TypeError) as err:  # devices -1 or "0,1" on CPU, num_nodes 0, strategy typo
            import torch

            if "enable_checkpointing=False" in str(err):
                raise UserError(f"trainer: {err} (callbacks.TokenCheckpoint is one: remove it from trainer.callbacks "
                                "to train without checkpoints)") from None
            if not any(word in str(err).lower() for word in ("gpu", "cuda", "accelerator", "device", "backend")):
                raise UserError(f"trainer: {err}") from None
            raise UserError(
                f"trainer: {err} (this machine has {torch.cuda.device_count()} CUDA devices); set "
                "trainer.accelerator, trainer.devices and trainer.num_nodes to the hardware, e.g. "
                "--trainer.accelerator=cpu --trainer.devices=1 on a machine without GPUs"
            ) from None

    def before_instantiate_classes(self) -> None:
        """Read the data manifests and check the global batch's layout before the model loads (a download on a GPU
        box) and the ranks start: a wrong path or micro-batch fails in a second."""
        from callbacks.global_batch import check_configured_layout
        from cpt_lightning.data.manifest import Manifest

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if not self._requeued():  # a requeue checks the checkpoint it chooses (fit)
            check_ckpt_path(config.get("ckpt_path"))
        if self.subcommand != "validate":  # GlobalBatch lays out training steps only
            check_configured_layout(config)
        data = (config.get("data") or {}).get("init_args") or {}
        for source in [*(data.get("sources") or []), *(data.get("val_sources") or [])]:
            Manifest.read(source["path"])

    def before_fit(self) -> None:
        """Seeds that a second-seed run changed only in part (``split_seeds_warning``). A fit that nothing ends (no
        ObjectiveSchedule or one with ``stop_after_last_phase`` false, ``max_steps`` -1, no ``max_time``, and
        ``max_epochs`` -1 or a ``PackedDataModule``, whose mix is one endless epoch) trains until stopped: allowed,
        but said, since a forgotten schedule otherwise shows only as a run that never finishes."""
        from lightning.pytorch.utilities import rank_zero_warn

        from callbacks.objective_schedule import find_objective_schedule
        from callbacks.token_checkpoint import ANOTHER_POLICY_NOTICE, TokenCheckpoint
        from cpt_lightning.data import PackedDataModule

        trainer = self.trainer
        check_fit_settings(trainer)
        if any(isinstance(callback, TokenCheckpoint) for callback in trainer.callbacks):  # it tells a policy change
            warnings.filterwarnings("ignore", message=ANOTHER_POLICY_NOTICE, category=UserWarning)
        seeds = split_seeds_warning(self._get(self.config, "seed_everything"), self.model.hparams.get("seed"),
                                    getattr(self.datamodule, "seed", None))
        if seeds:
            rank_zero_warn(seeds)
        epochs_limited = trainer.max_epochs not in (-1, None)
        epochs_end_it = epochs_limited and not isinstance(self.datamodule, PackedDataModule)  # one endless epoch there
        schedule = find_objective_schedule(trainer)
        schedule_ends_it = schedule is not None and schedule.stop_after_last_phase
        if schedule_ends_it or trainer.max_steps != -1 or epochs_end_it or has_time_limit(trainer.callbacks):
            return
        limits = (f"trainer.max_steps -1 without trainer.max_time (trainer.max_epochs={trainer.max_epochs} cannot end "
                  "it: the training mix is one endless epoch)" if epochs_limited
                  else "trainer.max_steps, trainer.max_epochs -1 without trainer.max_time")
        if schedule is None:
            what, objective = "no callbacks.ObjectiveSchedule", self.model.objective
            fix = "give the phases an ObjectiveSchedule"
        else:
            what, objective = "an ObjectiveSchedule with stop_after_last_phase false", schedule.phases[-1].objective
            fix = "let the ObjectiveSchedule stop after its last phase"
        rank_zero_warn(
            f"nothing ends this run: {what} and {limits}, so it trains {type(objective).__name__} until stopped "
            f"(SIGTERM saves last.ckpt); {fix}, or set max_steps or max_time"
        )

    def before_validate(self) -> None:
        """``cpt validate --ckpt_path last`` where no ``last.ckpt`` exists: Lightning only warns and validates the
        weights the config builds (random ones for a ``model_config``), exit 0, as if they were the run's; the same
        without ``--ckpt_path`` for a ``model_config``, logged into the run's TensorBoard (a pretrained ``model``
        validates as it is: its figures before any training, into a folder of its own); and ``limit_val_batches: 0``,
        which validated nothing, exit 0."""
        if self.trainer.limit_val_batches == 0:  # Lightning skips validation: exit 0 with nothing said
            raise UserError("trainer.limit_val_batches=0: cpt validate would validate nothing")
        ckpt_path = self.config.validate.get("ckpt_path")
        said_by_the_data = getattr(self.datamodule, "val_sources", None) == []  # no validation data: fixed first
        if ckpt_path is None and self.model.hparams.get("model") is None and not said_by_the_data:
            raise UserError("cpt validate without --ckpt_path would score the random weights model.init_args.model_config "
                            "builds: give --ckpt_path last or a checkpoint file (RUN/checkpoints/step….ckpt)")
        if ckpt_path == "last" and not saved_last_checkpoints(self.trainer):
            raise UserError(f"--ckpt_path last: this config's run folder {Path(self.trainer.log_dir)} holds no last.ckpt "
                            "to validate (a run name mistyped?); give a checkpoint file (--ckpt_path "
                            "RUN/checkpoints/step….ckpt)")
        check_a_checkpoint_for_the_runs_curves(self.trainer, ckpt_path)
        check_validation_matches_the_run(self.trainer, self._parser(self.subcommand).dump(self.config.validate,
                                                                                          skip_none=False))
        if ckpt_path == "last":
            check_last_checkpoints(self.trainer)
        check_a_sharded_checkpoint_has_its_strategy(self.trainer, ckpt_path)

    def _requeued(self) -> bool:
        """A ``cpt fit`` its scheduler requeued (``REQUEUED_ENV``); ``cpt validate`` never is."""
        return self.subcommand == "fit" and bool(os.environ.get(REQUEUED_ENV))

    def fit(self, **kwargs) -> None:
        """``trainer.fit``; a start refused once it runs, or one that logged nothing (a finished run started again),
        leaves the TensorBoard folder as it was (``refused_start``).
        A job its scheduler requeued (``REQUEUED_ENV``) goes on from the run's ``last.ckpt`` (``requeued_ckpt_path``)."""
        if self._requeued():  # the job's own --ckpt_path may be gone by now (keep_last pruned it): checked if chosen
            kwargs["ckpt_path"] = requeued_ckpt_path(self.trainer, kwargs.get("ckpt_path"))
            check_ckpt_path(kwargs["ckpt_path"])
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigOnceTraining):
                callback.started_from = kwargs.get("ckpt_path")
        if kwargs.get("ckpt_path") == "last":
            check_a_start_that_saved_nothing(self.trainer)
            check_last_checkpoints(self.trainer)
        check_a_sharded_checkpoint_has_its_strategy(self.trainer, kwargs.get("ckpt_path"))
        with nothing_logged_without_a_run(self.trainer):
            self.trainer.fit(**kwargs)

    def validate(self, verbose: bool = True, **kwargs) -> list[dict]:
        """``trainer.validate``, printing the weights it scored (:func:`scored_weights`) over one table: a row per
        figure, a column over all validation sources and one per source. Lightning's has a column per loader (one per
        source here), each repeating every figure. A refusal once it runs leaves the TensorBoard folder as it was,
        and a fit still training in that folder keeps it to itself (``log_nothing_beside_a_running_fit``)."""
        if kwargs.get("ckpt_path") == "last":  # found through the loggers' folder, which a running fit's drops
            kwargs["ckpt_path"] = newest_last_checkpoint(self.trainer)
        log_nothing_beside_a_running_fit(self.trainer, Path(self.trainer.log_dir))
        with nothing_logged_without_a_run(self.trainer):
            results = self.trainer.validate(verbose=False, **kwargs)
        if verbose and self.trainer.is_global_zero and results:
            print(scored_weights(self.trainer.ckpt_path, self.model.checkpoint_step, self.model.hparams.get("model")))
            print(validation_table(results[0], getattr(self.datamodule, "val_source_names", [])))
        return results
