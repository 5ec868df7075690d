"""A start refused once Lightning has set up its loggers leaves the run's log folder as it was."""

import os
import shutil
import signal
import subprocess
import sys
import time

import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from cpt_lightning.folder_locks import lock_run_folder, release
from cpt_lightning.refused_start import HPARAMS_FILE, METRICS_FILE, LoggerStart, holds_only_a_start, listing
from test_bad_inputs import assert_one_line_error, digest, fit_config, own_mix, run  # noqa: F401 (a fixture)


def edited(config, **data):
    text = yaml.safe_load(config.read_text())
    text["data"]["init_args"].update(data)
    config.write_text(yaml.safe_dump(text))
    return config


def test_a_refused_first_start_leaves_no_run_folder_and_the_corrected_run_its_own_hparams(tmp_path, own_mix,
                                                                                        tokenizer_dir, capsys):
    """The refusal comes from the data module, after Lightning logged the hyperparameters: the folder held an events
    file of them, and an hparams.yaml that the corrected run kept (Lightning writes it only when it is missing)."""
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    code, err = run(["fit", "--config", str(edited(config, micro_batch_size=100_000, seed=5))], capsys)
    assert_one_line_error(code, err, "fewer than one micro-batch of 100000")
    assert not (tmp_path / "demo").exists()
    code, err = run(["fit", "--config", str(edited(config, micro_batch_size=4, seed=42))], capsys)
    assert code == 0, err[-2000:]
    assert len(list((tmp_path / "demo").glob("events.out.tfevents.*"))) == 1
    assert yaml.safe_load((tmp_path / "demo" / "hparams.yaml").read_text())["seed"] == 17  # the module's, as set


def test_a_finished_run_started_again_leaves_no_events_file_of_its_own(tmp_path, own_mix, tokenizer_dir, capsys):
    """Every phase already done, exit 0: each such start left an events file holding its hyperparameters alone (a
    job rerun in a loop, one more per rerun)."""
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    code, err = run(["fit", "--config", str(config)], capsys)
    assert code == 0, err[-2000:]
    before = digest(tmp_path / "demo")
    code, err = run(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert code == 0, err[-2000:]
    assert digest(tmp_path / "demo") == before


def test_a_refused_resume_or_rerun_leaves_the_run_folder_byte_identical(tmp_path, own_mix, tokenizer_dir, capsys):
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    assert run(["fit", "--config", str(config)], capsys)[0] == 0
    checkpoints = tmp_path / "demo" / "checkpoints"
    for name in ("last.ckpt", "step000000004.ckpt"):  # as if stopped at step 2
        (checkpoints / name).unlink()
    before = digest(tmp_path / "demo")
    code, err = run(["fit", "--config", str(config)], capsys)
    assert_one_line_error(code, err, "holds an earlier run's checkpoints")
    code, err = run(["fit", "--config", str(edited(config, seed=7)), "--ckpt_path",
                     str(checkpoints / "step000000002.ckpt")], capsys)
    assert_one_line_error(code, err, "saved with data.init_args.seed 42; this run has 7")
    assert digest(tmp_path / "demo") == before
    branch = yaml.safe_load(edited(config, seed=42).read_text())
    branch["trainer"]["logger"]["init_args"]["name"] = "branch"
    clm = branch["trainer"]["callbacks"][0]["init_args"]["phases"][0]
    clm["tokens"] = clm["warmup_tokens"] = clm["tokens"] // 2  # its CLM ends before step 2
    config.write_text(yaml.safe_dump(branch))
    code, err = run(["fit", "--config", str(config), "--ckpt_path", str(checkpoints / "step000000002.ckpt")], capsys)
    assert_one_line_error(code, err, "but this config's phases give those tokens clm from token 0, then mlm")
    assert not (tmp_path / "branch").exists()  # it held hparams.yaml, an events file and an empty checkpoints/


def test_a_refused_rollback_beside_the_runs_last_checkpoint_leaves_the_run_folder_byte_identical(
        tmp_path, own_mix, tokenizer_dir, capsys):
    """Its start record (what a requeue of its job compares, start_record) was kept: a refused start changes no file."""
    from cpt_lightning.start_record import RECORD_NAME

    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    assert run(["fit", "--config", str(config)], capsys)[0] == 0
    checkpoints = tmp_path / "demo" / "checkpoints"
    for record in (None, "an earlier start's"):
        if record:
            (tmp_path / "demo" / RECORD_NAME).write_text(record)
        before = digest(tmp_path / "demo")
        code, err = run(["fit", "--config", str(edited(config, seed=7)), "--ckpt_path",
                         str(checkpoints / "step000000002.ckpt")], capsys)
        assert_one_line_error(code, err, "saved with data.init_args.seed 42; this run has 7")
        assert digest(tmp_path / "demo") == before


def test_a_branch_refused_at_a_step_its_validation_would_repeat_leaves_no_run_folder(tmp_path, own_mix, tokenizer_dir,
                                                                                      capsys):
    """A branch's phase ends at its checkpoint, whose validation TokenValidation runs again before the first batch:
    it ran before the phase-history check, so the refused branch's folder kept its val/ points (an events file)."""
    def with_holdout(config):
        config["data"]["init_args"]["val_sources"] = [{"name": "pubmed_holdout", "path": str(own_mix.dirs["pubmed"] / "holdout")}]

    config = fit_config(tmp_path, own_mix, tokenizer_dir, with_holdout)
    assert run(["fit", "--config", str(config)], capsys)[0] == 0
    branch = yaml.safe_load(config.read_text())
    branch["trainer"]["logger"]["init_args"]["name"] = "branch"
    baseline = branch["trainer"]["callbacks"][0]["init_args"]["phases"][0]  # the checkpoint trained CLM there
    baseline["objective"] = {"class_path": "cpt_lightning.objectives.MaskedLM", "init_args": {"mask_rate": 0.3}}
    config.write_text(yaml.safe_dump(branch))
    checkpoint = tmp_path / "demo" / "checkpoints" / "step000000002.ckpt"
    code, err = run(["fit", "--config", str(config), "--ckpt_path", str(checkpoint)], capsys)
    assert_one_line_error(code, err, "trained clm from token 0, but this config's phases give those tokens mlm")
    assert not (tmp_path / "branch").exists()


def test_a_fit_into_a_run_folder_another_fit_holds_is_refused_and_writes_nothing_there(tmp_path, own_mix,
                                                                                        tokenizer_dir, capsys):
    """Two fits in one folder both trained and exited 0, each replacing the other's checkpoints and exports."""
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    folder = tmp_path / "demo"
    held, _ = lock_run_folder(folder)  # as a running fit holds it
    try:
        code, err = run(["fit", "--config", str(config)], capsys)
    finally:
        release(held)
    assert_one_line_error(code, err, f"run folder {folder} is in use by another cpt fit, still running")
    assert listing(folder) == set()
    assert run(["fit", "--config", str(config)], capsys)[0] == 0  # free again: the run trains, then frees it
    held, refusal = lock_run_folder(folder)
    release(held)
    assert refusal is None


def test_cpt_validate_of_a_run_that_a_fit_holds_takes_no_lock_and_opens_no_logger_there(tmp_path):
    """Validating a checkpoint while its run trains on is what cpt validate is for: only a fit locks the folder. Its
    loggers are dropped before one opens (a CSVLogger's start deleted the running fit's metrics.csv); the folder of a
    fit that is not running, or none yet, keeps them (the CLI's run: tests/test_cli.py::test_validate_logs_at_…)."""
    from types import SimpleNamespace

    import pytest

    from cpt_lightning.training_cli import SaveConfigOnceTraining, log_nothing_beside_a_running_fit

    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer = SimpleNamespace(log_dir=str(tmp_path), loggers=[logger])
    held, _ = lock_run_folder(tmp_path)  # as a running fit holds it
    try:
        SaveConfigOnceTraining(None, config={}).setup(trainer, None, "validate")
        with pytest.warns(UserWarning, match="these figures are printed, not logged among its curves"):
            log_nothing_beside_a_running_fit(trainer, tmp_path)
        assert trainer.loggers == []
    finally:
        release(held)
    lock, _ = lock_run_folder(tmp_path)  # nothing of the validation holds it
    assert lock is not False
    release(lock)
    for folder in (tmp_path, tmp_path / "new"):
        trainer.loggers = [logger]
        log_nothing_beside_a_running_fit(trainer, folder)
        assert trainer.loggers == [logger]


def test_a_forked_loader_worker_does_not_keep_its_fits_lock(tmp_path):
    """A worker outliving its fit (or forked mid-run) would hold the folder after the fit ended."""
    held, _ = lock_run_folder(tmp_path)
    started, ready = os.pipe()
    worker = os.fork()
    if worker == 0:  # past the fork hooks: what a loader worker runs from here holds no lock
        os.write(ready, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        release(held)
        held, refusal = lock_run_folder(tmp_path)
        assert refusal is None  # the worker lives on
        refused = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from "
                                  "cpt_lightning.folder_locks import lock_run_folder; "
                                  "print(lock_run_folder(Path(sys.argv[1]))[1])", str(tmp_path)],
                                 capture_output=True, text=True)
        assert "is in use by another cpt fit" in refused.stdout, refused.stderr  # held by this process, not another
    finally:
        release(held)
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        os.close(started)
        os.close(ready)


def test_only_what_the_refused_start_wrote_is_removed(tmp_path):
    """A run stopped by a UserError after it logged (NonFiniteGuard) keeps everything; a refused start removes its own
    events file and new hparams.yaml, never a file the folder held before or another job wrote meanwhile, and the
    folders it was made in when left empty (Lightning's version_N under the run's name)."""
    def start(version="", log=None):
        logger = TensorBoardLogger(tmp_path, name="run", version=version)
        started = LoggerStart.open(logger)
        logger.log_hyperparams({"learning_rate": 2e-4}, {"hp_metric": -1})
        if log:
            log(logger)
        logger.save()  # hparams.yaml, where missing
        logger.finalize("failed")
        return started

    logged = start(log=lambda logger: logger.log_metrics({"train/loss": 3.5}, step=1))
    folder = tmp_path / "run"
    assert not holds_only_a_start(logged.events[0])
    logged.undo()
    everything = listing(folder)
    assert {HPARAMS_FILE, logged.events[0].name} <= everything

    def another_job_starts(logger):
        other = TensorBoardLogger(tmp_path, name="run", version="")
        other.log_hyperparams({"learning_rate": 1e-4}, {"hp_metric": -1})
        other.finalize("success")

    refused = start(log=another_job_starts)
    assert holds_only_a_start(refused.events[0])
    others = listing(folder) - everything - {refused.events[0].name}
    assert len(others) == 1
    refused.undo()
    assert listing(folder) == everything | others

    unversioned = start(version=None)
    assert unversioned.folder == folder / "version_0" and unversioned.made == [folder / "version_0"]
    unversioned.undo()
    assert listing(folder) == everything | others
    shutil.rmtree(folder)
    first = start(version=None)
    assert first.made == [folder / "version_0", folder]
    first.undo()
    assert not folder.exists() and tmp_path.exists()


def test_a_refused_start_with_a_csv_logger_leaves_no_folder(tmp_path, own_mix, tokenizer_dir, capsys):
    def csv_logger(config):
        config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                       "init_args": {"save_dir": str(tmp_path), "name": "csv_run"}}
        config["data"]["init_args"]["micro_batch_size"] = 100_000

    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, csv_logger))], capsys)
    assert_one_line_error(code, err, "fewer than one micro-batch of 100000")
    assert not (tmp_path / "csv_run").exists()  # it held version_0/hparams.yaml


def test_a_refused_resume_puts_back_the_files_a_csv_logger_rewrote(tmp_path):
    """CSVLogger writes hparams.yaml at every start (TensorBoardLogger only where it is missing) and deletes the
    folder's metrics.csv: a refused resume replaced the run's hyperparameters with the refused config's and lost its
    metrics."""
    def start(learning_rate, metrics=None):
        logger = CSVLogger(tmp_path, name="run", version=0)
        started = LoggerStart.open(logger)
        logger.log_hyperparams({"learning_rate": learning_rate})
        if metrics:
            logger.log_metrics(metrics, step=1)
        logger.save()
        logger.finalize("failed")
        return started

    run_start = start(2e-4, {"train/loss": 3.5})
    run_start.undo()  # it logged: kept
    folder = tmp_path / "run" / "version_0"
    assert listing(folder) == {HPARAMS_FILE, METRICS_FILE}
    before = {name: (folder / name).read_bytes() for name in listing(folder)}
    refused = start(1e-3)
    assert listing(folder) == {HPARAMS_FILE}
    assert yaml.safe_load((folder / HPARAMS_FILE).read_text())["learning_rate"] == 1e-3
    refused.undo()
    assert {name: (folder / name).read_bytes() for name in listing(folder)} == before
    logged = start(1e-3, {"train/loss": 3.0})
    logged.undo()
    assert yaml.safe_load((folder / HPARAMS_FILE).read_text())["learning_rate"] == 1e-3  # its run's, kept
