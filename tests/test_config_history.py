"""What counts as a config change on a resume (a line on the model card, a config-before-stepS.yaml kept)."""

import os

import pytest
import yaml

from cpt_lightning.config_history import comparable, history_after_restore
from cpt_lightning.model_card import config_change_texts, tokens_by_source


def config_text(path: str, weight: float = 1.0, ckpt_path: str | None = None) -> str:
    config = {"data": {"init_args": {"sources": [{"name": "pubmed", "path": path, "weight": weight}]}}}
    return yaml.safe_dump({**config, **({"ckpt_path": ckpt_path} if ckpt_path else {})})


def test_the_same_folder_written_otherwise_or_another_ckpt_path_is_no_change(tmp_path, monkeypatch):
    """A resume naming the data folder relatively, or through a link, added a "Config changed" line to the card."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    saved = {"run_config": config_text(str(tmp_path / "data"), ckpt_path="last"), "global_step": 4}
    for same in ("data", "./data/", str(tmp_path / "link")):
        assert comparable(config_text(same, ckpt_path="other.ckpt")) == comparable(saved["run_config"])
        assert history_after_restore(saved, config_text(same)) == []
    assert history_after_restore(saved, config_text("data", weight=0.5)) == [
        {"step": 4, "config": saved["run_config"], "data_digests": None}]


def test_a_copy_of_the_data_in_another_folder_is_no_change(tmp_path, prepared_mix):
    """A job that copies the data to node-local scratch resumes from another folder each time: each requeue added a
    "Config changed" line and a config-before-stepS.yaml. The previous copy is gone by then: the checkpoint's
    record of the digests tells what it held."""
    import shutil

    from cpt_lightning.config_history import DATA_DIGESTS_KEY, data_digests

    for name in ("pubmed", "medical_qa"):  # index.json is all a digest reads
        (tmp_path / "src" / name).mkdir(parents=True)
        shutil.copy(prepared_mix.dirs[name] / "index.json", tmp_path / "src" / name)
    job1 = shutil.copytree(tmp_path / "src" / "pubmed", tmp_path / "job1" / "pubmed")
    saved = {"run_config": config_text(str(job1)), "global_step": 4}
    saved[DATA_DIGESTS_KEY] = data_digests(saved["run_config"])
    shutil.rmtree(job1)
    job2 = shutil.copytree(tmp_path / "src" / "pubmed", tmp_path / "job2" / "pubmed")
    assert history_after_restore(saved, config_text(str(job2))) == []
    other = shutil.copytree(tmp_path / "src" / "medical_qa", tmp_path / "job2" / "medical_qa")
    assert history_after_restore(saved, config_text(str(other))) == [
        {"step": 4, "config": saved["run_config"], DATA_DIGESTS_KEY: saved[DATA_DIGESTS_KEY]}]
    # the card: a change of something else beside the copy names that alone (it listed the sources too)
    records = {"global_step": 6, DATA_DIGESTS_KEY: data_digests(config_text(str(job2))),
               "config_history": history_after_restore(saved, config_text(str(job2), weight=0.5))}
    assert "differs in data.init_args.sources" in config_change_texts(records, yaml.safe_load(config_text(str(other))))[0]
    (text,) = config_change_texts(records, yaml.safe_load(config_text(str(job2), weight=0.5)))
    assert "differs in data.init_args.sources" in text  # the weight changed
    lr = {"model": {"init_args": {"learning_rate": 1e-4}}}
    records["config_history"] = history_after_restore(saved, yaml.safe_dump({**yaml.safe_load(config_text(str(job2))), **lr}))
    (text,) = config_change_texts(records, {**yaml.safe_load(config_text(str(job2))), **lr})
    assert "differs in model." in text  # not in data.init_args.sources
    del saved[DATA_DIGESTS_KEY]  # a checkpoint saved before the record: the gone folder is its path only
    assert history_after_restore(saved, config_text(str(job2))) == [
        {"step": 4, "config": saved["run_config"], DATA_DIGESTS_KEY: None}]


@pytest.mark.parametrize("alone", [False, True], ids=["in-a-list", "alone"])
def test_a_larger_time_budget_is_no_change(tmp_path, alone):
    """The stop line after a max_time says to resume with a larger one: doing so would keep a
    config-before-stepS.yaml and put a "Config changed ... trainer.max_time" line on every card. A timer given as
    the only callback is saved as itself, not in a list, and is read the same."""
    def timed(max_time=None, duration=None, interval="step"):
        config = yaml.safe_load(config_text(str(tmp_path)))
        timer = {"class_path": "callbacks.StepTimer", "init_args": {"duration": duration, "interval": interval}}
        return yaml.safe_dump({**config, "trainer": {"max_time": max_time, "callbacks": timer if alone else [timer]}})

    saved = {"run_config": timed("00:00:00:15", "00:00:00:15"), "global_step": 6}
    assert history_after_restore(saved, timed("00:00:10:00", "00:00:10:00")) == []
    assert history_after_restore(saved, timed()) == []
    assert len(history_after_restore(saved, timed(interval="epoch"))) == 1


def test_the_saved_run_config_keeps_a_null_that_overrides_a_default(tmp_path):
    """`loss_chunk_size: null` over its 4096: a config.yaml without the key would rerun, validate and export at 4096."""
    from types import SimpleNamespace

    from jsonargparse import ArgumentParser

    from cpt_lightning.training_cli import SaveConfigOnceTraining

    parser = ArgumentParser()
    parser.add_argument("--loss_chunk_size", type=int | None, default=4096)
    config = parser.parse_args(["--loss_chunk_size", "null"])
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, global_step=0)
    SaveConfigOnceTraining(parser, config=config).on_before_backward(trainer, None, None)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"loss_chunk_size": None}


def test_tokens_by_source_never_counts_a_step_twice_or_below_zero(tmp_path):
    """A source is the one in its place: a resume keeps the sources in order, whatever their folders (copies on
    node-local scratch, one per job) and names."""
    records = {"tokens_per_step": 100, "global_step": 6, "config_history": [
        {"step": 8, "config": config_text(str(tmp_path / "b"))},  # past global_step (a hand-edited checkpoint)
        {"step": 2, "config": config_text(str(tmp_path / "a"), weight=0.5)}]}
    final = yaml.safe_load(config_text(str(tmp_path / "c")))
    assert tokens_by_source(records, final) == [600.0]
    records["config_history"][0]["config"] = "[not, a, config]"
    assert tokens_by_source(records, final) is None  # "not recorded" on the card, not a wrong count


def test_tokens_by_source_takes_no_other_list_of_sources_that_trained_steps(tmp_path):
    two = {"data": {"init_args": {"sources": [{"name": "pubmed", "path": "a", "weight": 3},
                                              {"name": "notes", "path": "b", "weight": 1}]}}}
    records = {"tokens_per_step": 100, "global_step": 6, "config_history": [{"step": 0, "config": config_text("x")}]}
    assert tokens_by_source(records, two) == [450.0, 150.0]  # the one-source config trained no step
    records["config_history"] = [{"step": 2, "config": config_text("x")}]
    assert tokens_by_source(records, two) is None


def test_each_config_change_is_against_the_config_that_followed_it(tmp_path):
    """Two resumes (the mix's weight at step 2, then the learning rate at step 4): each line was diffed against the
    final config, so the card blamed step 2 for the learning rate too."""
    data = str(tmp_path)
    second = config_text(data, weight=0.5)
    final = {**yaml.safe_load(second), "model": {"init_args": {"learning_rate": 1e-4}}}
    records = {"global_step": 6, "config_history": [{"step": 2, "config": config_text(data)},
                                                    {"step": 4, "config": second}]}
    first, then = config_change_texts(records, final)
    assert "differs in data.init_args.sources." in first and "model." not in first
    assert "differs in model." in then and "data." not in then


def test_each_config_is_read_with_the_data_digests_recorded_beside_it(tmp_path):
    """Each job copied the data to a scratch folder of its own, gone when the card is written: a config read with
    the digests of the config before it looked like another mix."""
    from cpt_lightning.config_history import DATA_DIGESTS_KEY

    job1, job2, job3 = (str(tmp_path / f"job{i}" / "pubmed") for i in (1, 2, 3))  # none left on disk
    lr = {"model": {"init_args": {"learning_rate": 1e-4}}}
    second = yaml.safe_dump({**yaml.safe_load(config_text(job2)), **lr})
    records = {"global_step": 6, DATA_DIGESTS_KEY: {job3: "same-chunks"},
               "config_history": [{"step": 2, "config": config_text(job1), DATA_DIGESTS_KEY: {job1: "same-chunks"}},
                                  {"step": 4, "config": second, DATA_DIGESTS_KEY: {job2: "same-chunks"}}]}
    first, then = config_change_texts(records, {**yaml.safe_load(config_text(job3)), **lr})
    assert "differs in model." in first and "data." not in first
    assert "differs in no setting." in then
