"""A start refused once Lightning has set up its loggers leaves the run's TensorBoard folder as it was."""

import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from cpt_lightning.refused_start import holds_only_a_start, listing, remove_start_logs
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


def test_only_files_that_appeared_and_hold_nothing_but_a_start_are_removed(tmp_path):
    """A run stopped by a UserError after it logged (NonFiniteGuard) keeps its events file; so does every file the
    folder held before."""
    folder = tmp_path / "run"

    def logger_writes(scalar: bool) -> None:
        logger = TensorBoardLogger(tmp_path, name="run", version="")
        logger.log_hyperparams({"learning_rate": 2e-4}, {"hp_metric": -1})
        if scalar:
            logger.log_metrics({"train/loss": 3.5}, step=1)
        logger.save()  # hparams.yaml, where missing
        logger.finalize("failed")

    logger_writes(scalar=True)
    (earlier,) = folder.glob("events.out.tfevents.*")
    assert not holds_only_a_start(earlier)
    before = listing(folder)
    logger_writes(scalar=False)
    (start,) = set(folder.glob("events.out.tfevents.*")) - {earlier}
    assert holds_only_a_start(start)
    (folder / "notes.txt").write_text("mine")
    remove_start_logs(folder, before)
    assert sorted(listing(folder)) == sorted({*before, "notes.txt"}) and "hparams.yaml" in before

    remove_start_logs(folder, None)  # as if the folder were new: a run that logged keeps all of it
    assert sorted(listing(folder)) == sorted({*before, "notes.txt"})
    fresh = tmp_path / "fresh"
    logger = TensorBoardLogger(tmp_path, name="fresh", version="")
    logger.log_hyperparams({"learning_rate": 2e-4}, {"hp_metric": -1})
    logger.save()
    logger.finalize("failed")
    assert {path.name for path in fresh.iterdir()} >= {"hparams.yaml"}
    remove_start_logs(fresh, None)
    assert not fresh.exists()
