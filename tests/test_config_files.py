"""What `cpt fit` checks in its --config files and source-list options before jsonargparse reads them."""

import warnings

import pytest

from cpt_lightning import config_files
from cpt_lightning.config_files import check_arguments, check_source_lists, include_chain, option_values
from cpt_lightning.errors import UserError


def test_an_option_without_its_value_is_left_to_jsonargparse():
    """Its own one-line "expected one argument" (an IndexError traceback if read past the end)."""
    assert list(option_values(["fit", "--config"], "--config", "-c")) == []
    check_arguments(["fit", "--config"])
    check_arguments(["fit", "--data.init_args.sources"])


def test_a_config_that_includes_itself_through_another_is_read_once(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("config: b.yaml\nseed_everything: 1\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\n")
    reads, read = [], config_files._read

    def counted(path):
        reads.append(path)
        if len(reads) > 20:
            raise RuntimeError("the include chain is followed round its cycle forever (cpt fit hangs)")
        return read(path)

    monkeypatch.setattr(config_files, "_read", counted)
    assert [path.name for path, _ in include_chain(tmp_path / "a.yaml")] == ["a.yaml", "b.yaml"]


def test_a_missing_weight_is_said_not_to_default_to_one():
    with pytest.raises(UserError, match=r"at the same place, not 1\.0\)"):
        check_source_lists(["--data.init_args.sources", "[{name: a, path: x}, {name: b, path: y}]"])


def test_the_first_config_is_not_checked_as_merged_over_another(tmp_path):
    """Two sources without weights are a whole list of their own (weight defaults to 1.0)."""
    (tmp_path / "base.yaml").write_text(
        "data:\n  init_args:\n    sources:\n    - {name: a, path: x}\n    - {name: b, path: y}\n")
    check_source_lists(["--config", str(tmp_path / "base.yaml")])


@pytest.mark.parametrize("block, key, example", [
    ("trainer: {max_steps: 3}", "trainer", "trainer.max_steps: 3"),
    ("model:\n  init_args: {learning_rate: 0.001}", "model", "model.init_args.learning_rate: 0.001"),
    ("model.init_args: {learning_rate: 0.001}", "model.init_args", "model.init_args.learning_rate: 0.001"),
])
def test_a_block_over_an_included_file_is_refused_with_its_dotted_key(tmp_path, block, key, example):
    """``trainer: {max_steps: 3}`` over an included recipe replaced its whole trainer: the run trained the module's
    MaskedLM with no schedule, GlobalBatch or logger, exit 0, without a word."""
    (tmp_path / "recipe.yaml").write_text("trainer:\n  max_steps: -1\n  callbacks: [a.yaml]\nmodel.init_args.model: m\n")
    (tmp_path / "mine.yaml").write_text(f"config: recipe.yaml\n{block}\n")
    with pytest.raises(UserError) as refused:
        check_arguments(["fit", "--config", str(tmp_path / "mine.yaml")])
    assert str(refused.value) == (
        f"{tmp_path / 'mine.yaml'}: `{key}:` as a block replaces everything {tmp_path / 'recipe.yaml'} sets under {key} "
        f"(what the block does not set goes back to its default); write each setting as a dotted key instead, e.g. "
        f"`{example}`")


def test_a_key_given_twice_in_a_config_or_a_file_it_includes_is_refused(tmp_path, capsys):
    """YAML keeps the last: a ``trainer:`` block appended to a recipe to change one setting trained without the
    first block's schedule, callbacks and precision, exit 0, without a word."""
    from cpt_lightning.cli import main

    (tmp_path / "recipe.yaml").write_text("trainer:\n  max_steps: -1\n  precision: bf16-mixed\nseed_everything: 1\n"
                                          "model:\n  init_args: {seed: 1, seed: 2}\n")
    (tmp_path / "mine.yaml").write_text("config: recipe.yaml\ntrainer.max_steps: 3\n")
    (tmp_path / "appended.yaml").write_text("trainer:\n  max_steps: -1\n  precision: bf16-mixed\nseed_everything: 1\n"
                                            "trainer:\n  max_steps: 3\n")
    for config, where, key, lines in [("mine.yaml", "recipe.yaml:6", "seed", "6 and 6"),
                                      ("appended.yaml", "appended.yaml:5", "trainer", "1 and 5")]:
        assert main(["fit", "--config", str(tmp_path / config)]) == 2
        assert capsys.readouterr().err == (f"error: {tmp_path / where}: key {key!r} given twice (lines {lines}): YAML "
                                           "keeps only the last; merge the two\n")
    (tmp_path / "merged.yaml").write_text("base: &b {max_steps: -1, precision: 32}\ntrainer:\n  <<: *b\n  max_steps: 3\n")
    check_arguments(["fit", "--config", str(tmp_path / "merged.yaml")])  # a YAML merge's key overridden, as YAML says


def test_dotted_keys_and_blocks_the_included_files_do_not_set_are_not_refused(tmp_path):
    """Nor a block that switches the class (its init_args belong to the included class), unlike one that keeps it."""
    (tmp_path / "recipe.yaml").write_text("trainer.max_steps: -1\ntrainer.logger.class_path: TensorBoardLogger\n"
                                          "trainer.logger.init_args.name: x\nmodel.class_path: m.Pretraining\n")
    (tmp_path / "mine.yaml").write_text("config: recipe.yaml\ntrainer.max_steps: 3\ndata: {init_args: {seed: 4}}\n"
                                        "trainer.logger: {class_path: CSVLogger, init_args: {save_dir: y}}\n")
    check_arguments(["fit", "--config", str(tmp_path / "mine.yaml")])
    (tmp_path / "same.yaml").write_text("config: recipe.yaml\nmodel: {class_path: m.Pretraining, init_args: {seed: 1}}\n")
    with pytest.raises(UserError, match="`model:` as a block replaces everything"):
        check_arguments(["fit", "--config", str(tmp_path / "same.yaml")])
    (tmp_path / "alone.yaml").write_text("trainer: {max_steps: 3}\n")  # a block in a file that includes nothing
    check_arguments(["fit", "--config", str(tmp_path / "recipe.yaml"), "--config", str(tmp_path / "alone.yaml")])


def test_an_included_file_that_holds_no_settings_is_named_with_the_file_that_includes_it(tmp_path):
    """jsonargparse said "a --config file holds no mapping of settings (- a)", naming no file."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "notmap.yaml").write_text("- a\n")
    (tmp_path / "parts" / "middle.yaml").write_text("config: notmap.yaml\n")
    (tmp_path / "mine.yaml").write_text("config: parts/middle.yaml\n")
    with pytest.raises(UserError) as refused:
        check_arguments(["fit", "--config", str(tmp_path / "mine.yaml")])
    assert str(refused.value) == (
        f"{tmp_path / 'parts' / 'notmap.yaml'} (included by {tmp_path / 'parts' / 'middle.yaml'}: config: notmap.yaml) "
        "holds no mapping of settings ([a]): a config is a YAML mapping of model:, data: and trainer: settings")


def test_a_later_list_of_callbacks_is_said_to_drop_the_earlier_ones(tmp_path):
    """A second --config holding only an ObjectiveSchedule (to shorten a phase) replaced the recipe's list whole: no
    GlobalBatch (16 sequences a step, not 384), no checkpoints, no exports, exit 0, without a word."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "batch.yaml").write_text("class_path: callbacks.GlobalBatch\ninit_args: {sequences: 384}\n")
    (tmp_path / "base.yaml").write_text("trainer.callbacks:\n- class_path: callbacks.ObjectiveSchedule\n- parts/batch.yaml\n"
                                        "- {class_path: callbacks.TokenCheckpoint}\n")
    (tmp_path / "recipe.yaml").write_text("config: base.yaml\nseed_everything: 1\n")
    (tmp_path / "schedule.yaml").write_text("trainer:\n  callbacks:\n  - class_path: callbacks.ObjectiveSchedule\n")
    (tmp_path / "appended.yaml").write_text("trainer:\n  callbacks+:\n  - class_path: callbacks.StepTimer\n")
    recipe, schedule = str(tmp_path / "recipe.yaml"), str(tmp_path / "schedule.yaml")
    for later, where in ([["--config", schedule], schedule], [["--trainer.callbacks", "callbacks.ObjectiveSchedule"],
                                                             "--trainer.callbacks callbacks.ObjectiveSchedule"]):
        with pytest.warns(UserWarning) as said:
            check_arguments(["fit", "--config", recipe, *later])
        assert [str(w.message) for w in said] == [
            f"{where}: trainer.callbacks replaces the list of {recipe} whole, so this run has no GlobalBatch, "
            "TokenCheckpoint; list them too, or add to the list with trainer.callbacks+: in a --config of its own "
            "(docs/recipes.md)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_arguments(["fit", "--config", recipe, "--config", str(tmp_path / "appended.yaml")])
        check_arguments(["fit", "--config", recipe, "--trainer.callbacks+=callbacks.StepTimer"])
        check_arguments(["fit", "--config", recipe, "--config", recipe])  # the same list again


def test_a_callback_setting_on_the_command_line_names_the_last_callback_it_reaches(tmp_path):
    """``--trainer.callbacks.init_args.keep_last 3`` over the demo reached its last callback, StepLearningRateMonitor:
    jsonargparse's "Option 'keep_last' is not accepted" named a callback the user never meant. Each option reaches the
    last callback listed where it stands on the command line. After an append on the command line, over a list of
    one, or before any list, the callback it reaches is the one meant (or none): nothing is said."""
    (tmp_path / "two.yaml").write_text("trainer:\n  callbacks:\n  - class_path: callbacks.TokenCheckpoint\n"
                                       "  - class_path: callbacks.StepTimer\n")
    (tmp_path / "appended.yaml").write_text("trainer.callbacks+:\n- class_path: callbacks.LossSpikeMonitor\n")
    (tmp_path / "one.yaml").write_text("config: two.yaml\ntrainer.callbacks: [{class_path: callbacks.TokenCheckpoint}]\n")
    (tmp_path / "single.yaml").write_text("trainer: {callbacks: {class_path: callbacks.TokenCheckpoint}}\n")
    (tmp_path / "seed.yaml").write_text("seed_everything: 3\n")
    two, appended, one, single, seed = (str(tmp_path / f"{name}.yaml") for name in
                                        ("two", "appended", "one", "single", "seed"))
    keep_last, every = "--trainer.callbacks.init_args.keep_last", "--trainer.callbacks.init_args.every_n_train_steps"
    for argv, reached, options in (
            [["--config", two, keep_last, "3"], "StepTimer", [keep_last]],
            [["--config", two, "--config", appended, f"{keep_last}=3", f"{every}=5"], "LossSpikeMonitor",
             [keep_last, every]],
            [["--config", two, keep_last, "3", "--trainer.callbacks+=callbacks.LossSpikeMonitor"], "StepTimer",
             [keep_last]],
            [["--config", two, keep_last, "3", "--config", appended], "StepTimer", [keep_last]]):
        with pytest.warns(UserWarning) as said:
            check_arguments(["fit", *argv])
        keys = ", ".join(option.rpartition(".")[2] for option in options)
        assert [str(w.message) for w in said] == [
            f"{', '.join(options)} {'sets' if len(options) == 1 else 'set'} the last callback listed alone, {reached} "
            f"(jsonargparse's rule), not another that takes {keys}: change another callback's settings in the config "
            "file, or in a copy of it (docs/recipes.md)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_arguments(["fit", "--config", two, "--trainer.callbacks+=callbacks.LayerFreeze",
                         "--trainer.callbacks.init_args.layers=0-7"])
        check_arguments(["fit", "--config", one, keep_last, "3"])
        check_arguments(["fit", keep_last, "3", "--config", two])  # no list yet: jsonargparse refuses it
        check_arguments(["fit", "--config", two, "--trainer.callbacks+=callbacks.LossSpikeMonitor", "--config", seed,
                         "--trainer.callbacks.init_args.window", "7"])
    with pytest.warns(UserWarning) as said:  # one callback given alone is a list of one
        check_arguments(["fit", "--config", two, "--config", single, keep_last, "3"])
    assert [str(w.message).partition(":")[2][:40] for w in said] == [" trainer.callbacks replaces the list of "]


def test_a_later_model_config_or_validation_objectives_are_said_to_drop_the_earlier_keys(tmp_path):
    """jsonargparse replaces a dict whole: an arm's overlay `model_config: {num_hidden_layers: 2}` over the demo
    trained the defaults of every other setting (hidden size 768, not 128: a 49.4M-parameter model for 7.2M), exit
    0, without a word. Dotted settings on the command line, the whole dict again, or a first config are not said."""
    (tmp_path / "base.yaml").write_text("model:\n  init_args:\n    model_config: {hidden_size: 128, num_hidden_layers: 4,"
                                        " local_attention: 64}\n    val_objectives:\n      mlm15: {class_path: M}\n"
                                        "      clm: {class_path: C}\n")
    (tmp_path / "recipe.yaml").write_text("config: base.yaml\nmodel.init_args.model_config.vocab_size: 99\n")
    (tmp_path / "arm.yaml").write_text("model.init_args.model_config: {num_hidden_layers: 2}\n")
    (tmp_path / "whole.yaml").write_text("model:\n  init_args:\n    model_config: {hidden_size: 128, num_hidden_layers:"
                                         " 2, local_attention: 64, vocab_size: 99}\n")
    (tmp_path / "layers.yaml").write_text("num_hidden_layers: 2\n")  # a file as the option's value
    (tmp_path / "figures.yaml").write_text("model.init_args.val_objectives: {mlm30: {class_path: M}, clm: {class_path: "
                                           "C}}\n")
    (tmp_path / "short.yaml").write_text("model: {model_config: {num_hidden_layers: 2}}\n")  # no init_args: the same
    recipe, arm, layers = str(tmp_path / "recipe.yaml"), str(tmp_path / "arm.yaml"), str(tmp_path / "layers.yaml")
    short = str(tmp_path / "short.yaml")
    said_of = {"model_config": "hidden_size, local_attention, vocab_size go back to their defaults; give them too, or "
                               "change one setting with --model.init_args.model_config.KEY VALUE",
               "val_objectives": "mlm15 are no longer validated; give them too"}
    for later, where, key in ([["--config", arm], arm, "model_config"],
                              [["--model.model_config={num_hidden_layers: 2}"], "--model.model_config", "model_config"],
                              [["--model.init_args.model_config", layers], "--model.init_args.model_config", "model_config"],
                              [["--config", short], short, "model_config"],
                              [["--model.init_args", '{"model_config": {"num_hidden_layers": 2}}'], "--model.init_args",
                               "model_config"],
                              [["--config", str(tmp_path / "figures.yaml")], str(tmp_path / "figures.yaml"),
                               "val_objectives"]):
        with pytest.warns(UserWarning) as said:
            check_arguments(["fit", "--config", recipe, *later])
        assert [str(w.message) for w in said] == [
            f"{where}: its model.init_args.{key} replaces the whole one {recipe} gives (jsonargparse merges no dict), "
            f"so {said_of[key]}"]
    (tmp_path / "empty.yaml").write_text("model: {init_args: {model_config: {}}}\n")
    for later in (["--model.init_args={model_config: {}}"], ["--config", str(tmp_path / "empty.yaml")]):  # all dropped
        with pytest.warns(UserWarning, match="so hidden_size, local_attention, num_hidden_layers, vocab_size go back"):
            check_arguments(["fit", "--config", recipe, *later])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for later in (["--model.init_args.model_config.num_hidden_layers", "2"], ["--config", str(tmp_path / "whole.yaml")],
                      ["--model.init_args.model_config", "{hidden_size: 64, num_hidden_layers: 2, local_attention: 8, "
                                                         "vocab_size: 99, num_attention_heads: 2}"]):
            check_arguments(["fit", "--config", recipe, *later])
        check_arguments(["fit", "--config", arm, "--config", recipe])  # the recipe's gives all the arm's and more
