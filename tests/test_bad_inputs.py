"""The bad-input inventory across `cpt prepare`, `cpt fit`, `cpt export` and `cpt evaluate`.

Every case: exit code 2, exactly one ``error:`` line naming what to fix, no traceback, and what
was already on disk (prepared data, an earlier export) is left as it was. `cpt prepare`'s full
inventory (missing/empty files, invalid UTF-8, missing text field, block size above the
tokenizer's max length, interrupted runs) lives in tests/test_data_prepare.py; config mistakes
(unknown objective, missing/zero budgets, typos, vocab too large, budgets beyond max_steps) in
tests/test_cli.py. docs/reliability.md lists them all.
"""

import copy
import hashlib
import json
import re
import shutil

import pytest
import torch
import yaml

from cpt_lightning.cli import main
from test_cli import demo_config


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, stderr, message):
    assert code == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def own_mix(tmp_path, prepared_mix):
    """A private copy of the prepared mix that a test may damage."""
    dirs = {name: shutil.copytree(path, tmp_path / "data" / name) for name, path in prepared_mix.dirs.items()}
    return type(prepared_mix)(dirs=dirs, weights=prepared_mix.weights, block_size=prepared_mix.block_size)


def fit_config(tmp_path, mix, tokenizer_dir, edit=None):
    path = demo_config(tmp_path, mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    if edit:
        config = yaml.safe_load(path.read_text())
        edit(config)
        path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("field", ["sources", "val_sources"])
def test_fit_missing_prepared_dir_is_named_before_the_model_loads(tmp_path, own_mix, tokenizer_dir, capsys, monkeypatch,
                                                                  field):
    """Loading ModernBERT (a download on a fresh GPU box) before finding a mistyped data path wastes minutes."""
    import cpt_lightning.module

    def add_validation(config):
        config["data"]["init_args"]["val_sources"] = [{"name": "held_out", "path": str(tmp_path / "data" / "held_out")}]

    if field == "sources":
        shutil.rmtree(own_mix.dirs["medical_qa"])
    config = fit_config(tmp_path, own_mix, tokenizer_dir, add_validation if field == "val_sources" else None)
    monkeypatch.setattr(cpt_lightning.module, "build_model", lambda *args: pytest.fail("the model loaded first"))
    code, err = run(["fit", "--config", str(config)], capsys)
    assert_one_line_error(code, err, "medical_qa" if field == "sources" else "held_out")


def test_fit_truncated_chunk(tmp_path, own_mix, tokenizer_dir, capsys):
    chunk = sorted(own_mix.dirs["pubmed"].glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir))], capsys)
    assert_one_line_error(code, err, chunk.name)


def test_fit_data_prepared_with_another_tokenizer(tmp_path, own_mix, tokenizer_dir, capsys):
    other = shutil.copytree(tokenizer_dir, tmp_path / "other_tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]  # same size and merges, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    before = digest(tmp_path / "data")
    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, other))], capsys)
    assert_one_line_error(code, err, "vocabulary differs from the model's tokenizer")
    assert digest(tmp_path / "data") == before


def test_fit_block_size_beyond_max_positions(tmp_path, own_mix, tokenizer_dir, capsys):
    def shrink(config):
        config["model"]["init_args"]["model_config"]["max_position_embeddings"] = own_mix.block_size // 2

    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, shrink))], capsys)
    assert_one_line_error(code, err, "max_position_embeddings")


def test_fit_flex_attention_on_cpu_names_the_kernels_that_train_there(tmp_path, own_mix, tokenizer_dir, capsys):
    def flex(config):
        config["model"]["init_args"]["attn_implementation"] = "flex_attention"

    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, flex))], capsys)
    assert_one_line_error(code, err, "flex_attention cannot train on CPU")


def with_global_batch(sequences):
    return lambda config: config["trainer"]["callbacks"].append(
        {"class_path": "callbacks.GlobalBatch", "init_args": {"sequences": sequences}})


def test_fit_an_indivisible_global_batch_is_refused_before_the_model_loads(tmp_path, own_mix, tokenizer_dir, capsys,
                                                                            monkeypatch):
    """GlobalBatch refused it at setup: after the model had loaded (a download on a GPU box) and every rank started."""
    import cpt_lightning.module

    config = fit_config(tmp_path, own_mix, tokenizer_dir, with_global_batch(6))  # 4 rows per micro-batch
    monkeypatch.setattr(cpt_lightning.module, "build_model", lambda *args: pytest.fail("the model loaded first"))
    code, err = run(["fit", "--config", str(config), "--trainer.devices=1"], capsys)
    assert_one_line_error(code, err, "GlobalBatch.sequences=6 is not divisible by data.init_args.micro_batch_size (4) "
                                     "× trainer.devices (1) × trainer.num_nodes (1) = 4; micro_batch_size values that "
                                     "fit: [1, 2, 3, 6]")
    monkeypatch.undo()
    code, err = run(["validate", "--config", str(config)], capsys)  # validation steps are not training steps
    assert_one_line_error(code, err, "cpt validate needs validation data")  # this config's next refusal


@pytest.mark.parametrize("trainer, data, checked", [
    ({"devices": 3}, {"micro_batch_size": 4}, True),
    ({"devices": "3"}, {"micro_batch_size": 4}, True),  # as --trainer.devices=3 is parsed
    ({"devices": [0, 1, 2]}, {"micro_batch_size": 4}, True),  # three devices by index
    ({"devices": 1, "num_nodes": 3}, {"micro_batch_size": 4}, True),
    ({"devices": "auto"}, {"micro_batch_size": 4}, False),  # counted at setup, where GlobalBatch checks again
    ({"devices": -1}, {"micro_batch_size": 4}, False),
    ({"devices": "0,1,2"}, {"micro_batch_size": 4}, False),
    ({"devices": 3}, {}, False),  # a datamodule without micro-batches: GlobalBatch's own refusal at setup
])
def test_the_global_batch_layout_is_checked_where_the_config_names_it(trainer, data, checked):
    from callbacks.global_batch import check_configured_layout
    from cpt_lightning.errors import UserError

    entry = {"class_path": "callbacks.global_batch.GlobalBatch", "init_args": {"sequences": 32}}
    config = {"trainer": {**trainer, "callbacks": [entry]}, "data": {"init_args": data}}
    if checked:
        with pytest.raises(UserError, match="GlobalBatch.sequences=32 is not divisible"):
            check_configured_layout(config)
    else:
        check_configured_layout(config)
    entry["init_args"]["sequences"] = 36  # 4 × 3 × 3 rows
    check_configured_layout(config)
    for refused_by_its_constructor in (0, True):
        entry["init_args"]["sequences"] = refused_by_its_constructor
        check_configured_layout(config)


@pytest.mark.parametrize("setting", ["--trainer.accelerator=gpu", "--trainer.accelerator=cuda",
                                     "--trainer.accelerator=mps"])  # Lightning's message says "accelerator" only
def test_fit_a_gpu_config_on_a_cpu_machine_names_the_settings(tmp_path, own_mix, tokenizer_dir, capsys, setting):
    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, lambda config: None)), setting],
                    capsys)
    assert_one_line_error(code, err, "(this machine has 0 CUDA devices); set trainer.accelerator, trainer.devices")


@pytest.mark.parametrize("setting, says", [
    ("--trainer.devices=-1", "(this machine has 0 CUDA devices); set trainer.accelerator, trainer.devices"),
    ("--trainer.devices=0,1", "(this machine has 0 CUDA devices); set trainer.accelerator, trainer.devices"),
    ("--trainer.num_nodes=0", "trainer: `num_nodes` must be a positive integer, but got 0."),
    ("--trainer.strategy=fsdpp", "trainer: You selected an invalid strategy name"),
])  # Lightning's TypeError / ValueError: a traceback, exit 1
def test_fit_trainer_values_lightning_refuses_as_type_or_value_errors_are_one_line(tmp_path, own_mix, tokenizer_dir,
                                                                                   capsys, setting, says):
    config = fit_config(tmp_path, own_mix, tokenizer_dir, lambda config: None)
    code, err = run(["fit", "--config", str(config), setting], capsys)
    assert_one_line_error(code, err, says)


def test_fit_another_trainer_setting_lightning_refuses_is_one_line_without_the_hardware_hint(
        tmp_path, own_mix, tokenizer_dir, capsys):
    config = fit_config(tmp_path, own_mix, tokenizer_dir, lambda config: None)
    code, err = run(["fit", "--config", str(config), "--trainer.limit_val_batches=-1"], capsys)
    # -1 or -1.0: jsonargparse may read Trainer's int | float hint in either order (typing's cache, import order)
    assert_one_line_error(code, err, "trainer: You have passed invalid value -1")
    assert re.search(r"^error: .*invalid value -1(\.0)? for limit_val_batches", err, flags=re.M), err[-2000:]
    assert "CUDA devices" not in err


def test_fit_impossible_model_and_checkpoint_settings(tmp_path, own_mix, tokenizer_dir, capsys):
    def set_model(**values):
        return lambda config: config["model"]["init_args"].update(values)

    def five_heads(config):
        config["model"]["init_args"]["model_config"]["num_attention_heads"] = 5  # hidden 32 is not a multiple

    def misspelt_layers(config):
        config["model"]["init_args"]["model_config"].update(num_hiden_layers=2, reference_compile=True)  # were ignored

    def checkpoint_every(config):
        for callback in config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("TokenCheckpoint"):
                callback["init_args"]["every_n_tokens"] = -5

    cases = [(set_model(learning_rate=-1e-3), "learning_rate=-0.001: must be 0 or more"),
             (five_heads, "model_config is not a valid ModernBertConfig"),
             (misspelt_layers, "model_config: not ModernBertConfig fields: num_hiden_layers (did you mean 'num_hidden_layers'?), "
                              "reference_compile"),
             (checkpoint_every, "every_n_tokens and every_n_train_steps must be positive")]
    for i, (edit, message) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        config = fit_config(tmp_path / str(i), own_mix, tokenizer_dir, edit)
        code, err = run(["fit", "--config", str(config)], capsys)
        assert_one_line_error(code, err, message)


@pytest.mark.parametrize("text, says", [("", "a --config file holds nothing: a config is a YAML mapping"),
                                        ("- a\n", "a --config file holds no mapping of settings (- a): a config is")])
def test_a_config_file_that_is_empty_or_a_list_says_what_a_config_is(tmp_path, capsys, text, says):
    """jsonargparse's "Unexpected config:" named neither the file's problem nor what it should hold."""
    (tmp_path / "config.yaml").write_text(text)
    code, err = run(["fit", "--config", str(tmp_path / "config.yaml")], capsys)
    assert_one_line_error(code, err, says)


def test_a_tokenizer_folder_without_its_files_says_so(tmp_path, own_mix, tokenizer_dir, capsys):
    """A folder with only tokenizer_config.json: transformers advised installing sentencepiece or tiktoken."""
    (tmp_path / "tok").mkdir()
    shutil.copy(tokenizer_dir / "tokenizer_config.json", tmp_path / "tok")
    missing = "the folder holds no tokenizer files (tokenizer.json): save the tokenizer into it with save_pretrained"
    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir)),
                     f"--model.init_args.tokenizer={tmp_path / 'tok'}"], capsys)
    assert_one_line_error(code, err, f"model.init_args.tokenizer: cannot load '{tmp_path / 'tok'}' ({missing})")
    (tmp_path / "docs.jsonl").write_text('{"text": "A case report."}\n')
    code, err = run(["prepare", str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "--tokenizer",
                     str(tmp_path / "tok"), "--block-size", "64"], capsys)
    assert_one_line_error(code, err, f"cannot load tokenizer '{tmp_path / 'tok'}': {missing}")


def test_validate_without_validation_data_names_the_setting(tmp_path, own_mix, tokenizer_dir, capsys):
    """The demo config has no val_sources: ``cpt validate`` on it ended in Lightning's traceback."""
    code, err = run(["validate", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir))], capsys)
    assert_one_line_error(code, err, "cpt validate needs validation data: set data.init_args.val_sources")


def test_export_missing_and_corrupt_checkpoints_keep_an_earlier_export(tmp_path, capsys):
    earlier = tmp_path / "export"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    before = digest(earlier)

    code, err = run(["export", str(tmp_path / "nope.ckpt"), str(earlier)], capsys)
    assert_one_line_error(code, err, "nope.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    code, err = run(["export", str(corrupt), str(earlier)], capsys)
    assert_one_line_error(code, err, "corrupt.ckpt")
    assert digest(earlier) == before


def test_evaluate_missing_and_corrupt_task_files(tmp_path, capsys):
    code, err = run(["evaluate", "--tasks", str(tmp_path / "missing.yaml"), "--models", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    code, err = run(["evaluate", "--tasks", str(broken), "--models", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "broken.yaml")


def test_prepare_missing_empty_and_corrupt_inputs_keep_earlier_output(tmp_path, own_mix, sample_corpus, capsys):
    out = own_mix.dirs["case_reports"]  # an earlier, complete prepared source
    before = digest(out)
    tokenizer = str(sample_corpus.tokenizer_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 this is not gzip data")
    for source, message in [(tmp_path / "missing.jsonl", "missing.jsonl"), (empty, "empty.jsonl"), (corrupt, "corrupt.jsonl.gz")]:
        code, err = run(["prepare", str(source), "--output", str(out), "--tokenizer", tokenizer, "--overwrite", "--quiet"], capsys)
        assert_one_line_error(code, err, message)
    assert digest(out) == before


def test_prepare_into_a_prepared_sources_holdout_is_refused(tmp_path, own_mix, sample_corpus, capsys):
    """--overwrite replaced pubmed's holdout/ with another corpus, and pubmed's own prepare then found itself up to
    date: validation scored the other corpus as pubmed_holdout."""
    source = own_mix.dirs["pubmed"]
    before = digest(source)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"Document {i} about aspirin and fever."}) + "\n" for i in range(60)))
    for out in (source / "holdout", source / "holdout" / "deeper", source / "notes"):
        code, err = run(["prepare", str(other), "--output", str(out), "--tokenizer", str(sample_corpus.tokenizer_dir),
                         "--overwrite", "--quiet"], capsys)
        assert_one_line_error(code, err, f"--output {out} is inside {source.resolve()}, which cpt prepare wrote (its "
                                         "holdout/ is part of it, replaced only with it): give --output a folder of "
                                         "its own")
    assert digest(source) == before and not (source / "notes").exists()
    project = tmp_path / "project"  # a manifest.json of something else above the output: no prepared folder
    project.mkdir()
    (project / "manifest.json").write_text('{"name": "my-web-app", "short_name": "app"}')
    code, err = run(["prepare", str(other), "--output", str(project / "data" / "other"), "--tokenizer",
                     str(sample_corpus.tokenizer_dir), "--block-size", "64", "--quiet"], capsys)
    assert code == 0, err


def callback(config, name):
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name))


def phase(config, i):
    return callback(config, "ObjectiveSchedule")["init_args"]["phases"][i]


def after_the_schedule(entry):
    return lambda config: config["trainer"]["callbacks"].insert(1, entry)


def two_schedules(config):
    config["trainer"]["callbacks"].insert(1, copy.deepcopy(config["trainer"]["callbacks"][0]))


def one_folder_twice(config):
    sources = config["data"]["init_args"]["sources"]
    sources[1]["path"] = sources[0]["path"]


# Found by fuzzing the config: each trained on with the nonsense (a negative final learning rate trained the decay's
# last steps by gradient ascent; a negative clip value turned clipping off) or ended in a traceback.
FUZZED_SETTINGS = {
    "final_lr_ratio_above_1": (lambda c: phase(c, 1).update(final_lr_ratio=1.5),
                               "phases[1].final_lr_ratio must be within [0, 1]"),
    "final_lr_ratio_negative": (lambda c: phase(c, 1).update(final_lr_ratio=-0.5),
                                "phases[1].final_lr_ratio must be within [0, 1]"),
    "num_workers_negative": (lambda c: c["data"]["init_args"].update(num_workers=-1), "data.init_args.num_workers=-1"),
    "step_timer_per_epoch": (lambda c: callback(c, "StepTimer").update(init_args={"duration": "00:00:00:01",
                                                                                  "interval": "epoch"}),
                             "StepTimer interval='epoch' with a duration: the mix is one endless epoch"),  # ran on
    "objective_beside_the_phases": (lambda c: c["model"]["init_args"].update(  # the recipe's phases trained instead
        objective={"class_path": "cpt_lightning.objectives.MaskedLM", "init_args": {"mask_rate": 0.4}}),
        "model.init_args.objective does nothing beside an ObjectiveSchedule, whose phases set each step's objective "
        "and warmup: set it in the phases (trainer.callbacks → ObjectiveSchedule), or remove it"),
    "warmup_beside_the_phases": (lambda c: c["model"]["init_args"].update(warmup_tokens=1000),
                                 "model.init_args.warmup_tokens does nothing beside an ObjectiveSchedule"),
    "throughput_window_0": (lambda c: callback(c, "TokenThroughput")["init_args"].update(window_size=0),
                            "TokenThroughput window_size=0: must be at least 2"),
    "freeze_no_layer": (after_the_schedule({"class_path": "callbacks.LayerFreeze", "init_args": {"layers": []}}),
                        "LayerFreeze.layers=[] names no layer"),
    "betas_above_1": (lambda c: c["model"]["init_args"].update(betas=[1.5, 0.98]), "model.init_args.betas=[1.5, 0.98]"),
    "eps_negative": (lambda c: c["model"]["init_args"].update(eps=-1e-6), "model.init_args.eps=-1e-06"),
    "eps_zero": (lambda c: c["model"]["init_args"].update(eps=0.0),  # a LayerFreeze's first step wrote NaN weights
                 "model.init_args.eps=0.0: must be positive"),
    "activation_typo": (lambda c: c["model"]["init_args"]["model_config"].update(hidden_activation="GELU"),  # KeyError
                        "hidden_activation='GELU' is not an activation transformers knows (did you mean 'gelu'?)"),
    "pad_outside_vocab": (lambda c: c["model"]["init_args"]["model_config"].update(pad_token_id=50368),  # an assert
                          "model_config: pad_token_id=50368 is outside the vocabulary (vocab_size=50368)"),
    "model_folder_missing": (lambda c: c["model"]["init_args"].update(model="/no/such/run/export/clm", model_config=None),
                             "model.init_args.model: cannot load '/no/such/run/export/clm' (no such folder)"),
    "weight_decay_negative": (lambda c: c["model"]["init_args"].update(weight_decay=-0.1),
                              "model.init_args.weight_decay=-0.1"),
    "warmup_tokens_negative": (lambda c: c["model"]["init_args"].update(warmup_tokens=-5),
                               "model.init_args.warmup_tokens=-5"),
    "one_folder_twice": (one_folder_twice, "both read"),
    "two_schedules": (two_schedules, "trainer.callbacks lists ObjectiveSchedule more than once: keep one (one "
                      "ObjectiveSchedule holds every phase)"),
    "custom_objective_refusal": (lambda c: phase(c, 0).update(objective={  # as docs/objectives.md says to refuse
        "class_path": "custom_objectives.SpanMaskedLM", "init_args": {"span_length": 0}}),
        "SpanMaskedLM.span_length must be at least 1, got 0"),
    "two_global_batches": (lambda c: c["trainer"]["callbacks"].extend(  # the last set the batch, without a word
        [{"class_path": "callbacks.GlobalBatch", "init_args": {"sequences": n}} for n in (4, 8)]),
        "trainer.callbacks lists GlobalBatch more than once: keep one"),
    "two_exports": (lambda c: c["trainer"]["callbacks"].extend([{"class_path": "callbacks.PhaseEndExport"}] * 2),
                    "trainer.callbacks lists PhaseEndExport more than once: keep one"),
    "accumulate_0": (lambda c: c["trainer"].update(accumulate_grad_batches=0), "trainer.accumulate_grad_batches=0"),
    "negative_clip": (lambda c: c["trainer"].update(gradient_clip_val=-1.0), "trainer.gradient_clip_val=-1.0"),
    "no_layers": (lambda c: c["model"]["init_args"]["model_config"].update(num_hidden_layers=0),
                  "model_config: num_hidden_layers=0: must be at least 1"),
    "no_heads": (lambda c: c["model"]["init_args"]["model_config"].update(num_attention_heads=0),
                 "model_config: num_attention_heads=0: must be at least 1"),
    "no_global_layer_spacing": (lambda c: c["model"]["init_args"]["model_config"].update(global_attn_every_n_layers=0),
                                "model_config: global_attn_every_n_layers=0: must be at least 1"),
    "no_mlp": (lambda c: c["model"]["init_args"]["model_config"].update(intermediate_size=0),
               "model_config: intermediate_size=0: must be at least 1"),
    "no_window": (lambda c: c["model"]["init_args"]["model_config"].update(local_attention=0),
                  "model_config: local_attention=0: must be at least 2"),
    "odd_window": (lambda c: c["model"]["init_args"]["model_config"].update(local_attention=65),  # trained ±32
                   "model_config: local_attention=65: must be even (a sliding-window layer attends to "
                   "±local_attention/2 tokens): 64 or 66"),
    # Lightning flags that meant something else with the stream and its phases (found by trying them one by one)
    "min_steps": (lambda c: c["trainer"].update(min_steps=5), "trainer.min_steps=5: Lightning then ignores the "
                  "ObjectiveSchedule's stop until a whole epoch of the data has trained"),  # it trained 500+ steps on
    "min_epochs": (lambda c: c["trainer"].update(min_epochs=1), "trainer.min_epochs=1: Lightning then ignores"),
    "limit_train_batches": (lambda c: c["trainer"].update(limit_train_batches=5),  # a resume replayed or skipped rows
                            "trainer.limit_train_batches=5: Lightning would end its epoch after that many batches "
                            "and start the endless training mix over in a new shuffle (rows read again or skipped, and "
                            "no exact resume); for a shorter run give the phases fewer tokens, or set trainer.max_time "
                            "(--ckpt_path last goes on from where it stops)"),  # it said max_steps, refused next
    "limit_train_fraction": (lambda c: c["trainer"].update(limit_train_batches=0.5),  # a traceback: no length
                             "trainer.limit_train_batches=0.5: Lightning would end its epoch"),
    "overfit_batches": (lambda c: c["trainer"].update(overfit_batches=2),  # every epoch drew new rows
                        "trainer.overfit_batches=2: each of Lightning's epochs starts the training mix over"),
    "barebones": (lambda c: c["trainer"].update(barebones=True), "trainer.barebones turns off"),  # a traceback
    "check_val_every_n_epoch": (lambda c: c["trainer"].update(check_val_every_n_epoch=2),  # ignored
                                "trainer.check_val_every_n_epoch=2 conflicts with TokenValidation"),
    "val_check_interval_time": (lambda c: c["trainer"].update(val_check_interval="00:00:01:00"),  # a traceback
                                "trainer.val_check_interval=a time conflicts with TokenValidation"),
    "no_logger_for_lr_monitor": (lambda c: c["trainer"].update(logger=False),  # a traceback
                                 "Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger"),
    "checkpointing_off": (lambda c: c["trainer"].update(enable_checkpointing=False),  # named ModelCheckpoint only
                          "(callbacks.TokenCheckpoint is one: remove it from trainer.callbacks"),
    "max_time_not_a_time": (lambda c: c["trainer"].update(max_time="1:00"),  # named Timer(duration='1:00')
                            "trainer.max_time (or StepTimer's duration) '1:00': not a time budget"),
    "step_timer_not_a_time": (lambda c: callback(c, "StepTimer").update(init_args={"duration": "00:00:00:-5"}),
                              "trainer.max_time (or StepTimer's duration) '00:00:00:-5': not a time budget"),
    "max_time_beyond_timedelta": (lambda c: c["trainer"].update(max_time={"days": 10**9}),  # OverflowError
                                  "trainer.max_time (or StepTimer's duration) {'days': 1000000000}: not a time budget"),
    "max_steps_0": (lambda c: c["trainer"].update(max_steps=0),  # exit 0, nothing trained, a run folder made
                    "trainer.max_steps=0 trains nothing: set -1 (the phases end the run) or the steps to train"),
    "no_validation_batches": (lambda c: c["trainer"].update(limit_val_batches=0),  # no validation, not a word
                              "trainer.limit_val_batches=0 skips every validation callbacks.TokenValidation schedules"),
    "data_seed_negative": (lambda c: c["data"]["init_args"].update(seed=-1),  # litdata's traceback, once training
                           "data.init_args.seed=-1: must be within [0, 4294967295]"),
    "seed_everything_too_large": (lambda c: c.update(seed_everything=2**32),  # Lightning's seeding traceback
                                  "seed_everything=4294967296: must be within [0, 4294967295] (true: a random one)"),
}


@pytest.mark.parametrize("case", FUZZED_SETTINGS)
def test_fit_refuses_nonsense_settings_before_training(tmp_path, own_mix, tokenizer_dir, capsys, case):
    edit, message = FUZZED_SETTINGS[case]
    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, edit))], capsys)
    assert_one_line_error(code, err, message)
    assert len(list(tmp_path.rglob("config.yaml"))) == 1, "training started"  # the input config only


def test_trainer_flags_refused_beside_the_phases_keep_their_meaning_elsewhere():
    """min_steps/min_epochs are refused only beside an ObjectiveSchedule that ends the run (without one, or with one
    that trains on, they mean what Lightning says); limit_train_batches is refused but for its default 1.0: an int 1
    is one batch per epoch, not the whole stream."""
    from callbacks import ObjectiveSchedule, Phase
    from cpt_lightning.errors import UserError
    from cpt_lightning.objectives import CausalLM
    from cpt_lightning.training_cli import check_trainer_settings

    def schedule(stops):
        return ObjectiveSchedule([Phase(CausalLM(), tokens=1024)], stop_after_last_phase=stops)

    for callbacks in ([], [schedule(stops=False)]):
        check_trainer_settings({"min_steps": 5, "min_epochs": 1, "callbacks": callbacks})
    for callbacks in ([schedule(stops=True)], schedule(stops=True)):  # Lightning takes one callback unlisted too
        with pytest.raises(UserError, match="trainer.min_steps=5: Lightning then ignores"):
            check_trainer_settings({"min_steps": 5, "callbacks": callbacks})
    check_trainer_settings({"limit_train_batches": 1.0})
    with pytest.raises(UserError, match="trainer.limit_train_batches=1: Lightning would end its epoch"):
        check_trainer_settings({"limit_train_batches": 1})
    with pytest.raises(UserError, match="trainer.min_epochs=1: Lightning then ignores"):
        check_trainer_settings({"min_epochs": 1, "callbacks": [schedule(stops=True)]})


@pytest.mark.parametrize("settings, refusal", [
    ({"accumulate_grad_batches": 0}, r"trainer.accumulate_grad_batches=0: must be at least 1"),
    ({"gradient_clip_val": -1}, r"trainer.gradient_clip_val=-1: must be positive \(0 or null: no clipping\)"),
    ({"overfit_batches": 2}, r"trainer.overfit_batches=2: each of Lightning's epochs starts the training mix over"),
    ({"barebones": True}, r"trainer.barebones turns off the logging, checkpoints and progress bar"),
    ({"accumulate_grad_batches": 1, "gradient_clip_val": 0, "overfit_batches": 0.0, "barebones": False}, None),
    ({"gradient_clip_val": 0.0}, None),  # no clipping, as the refusal above says
])
def test_trainer_values_lightning_takes_without_a_word_are_refused(settings, refusal):
    from cpt_lightning.errors import UserError
    from cpt_lightning.training_cli import check_trainer_settings

    if refusal is None:
        check_trainer_settings(settings)
    else:
        with pytest.raises(UserError, match=refusal):
            check_trainer_settings(settings)


def test_a_default_root_dir_that_does_not_hold_the_loggers_folder_is_refused(tmp_path):
    """Lightning ignores default_root_dir beside a logger: a branch given ``--trainer.default_root_dir runs/demo_b``
    ran in the logger's runs/demo, its parent's folder (setting aside the parent's later checkpoints). A root that
    holds the logger's folder (the demo's runs/demo, a recipe's working directory) is what Lightning does anyway."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from cpt_lightning.errors import UserError
    from cpt_lightning.training_cli import check_default_root_dir

    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="demo", version="")
    for root in (None, tmp_path, tmp_path / "runs", tmp_path / "runs" / "demo"):
        check_default_root_dir(root, logger)
    for no_folder in (None, False, True, []):
        check_default_root_dir(tmp_path / "elsewhere", no_folder)
    with pytest.raises(UserError, match=rf"trainer.default_root_dir=.*demo_b holds nothing of this run: .* logger's "
                                        rf"folder {tmp_path / 'runs' / 'demo'}; to run elsewhere set"):
        check_default_root_dir(tmp_path / "runs" / "demo_b", [logger])
    with pytest.raises(UserError, match="holds nothing of this run"):
        check_default_root_dir(tmp_path / "runs" / "demo_b", CSVLogger(str(tmp_path / "runs"), name="demo", version=""))


def test_fit_phase_end_export_without_a_schedule_is_refused_before_the_first_step(tmp_path, own_mix, tokenizer_dir,
                                                                                    capsys):
    """It was refused at the end of the first micro-batch: after config.yaml was written (replaced, on a rerun)."""
    def export_without_schedule(config):
        callbacks = config["trainer"]["callbacks"]
        callbacks[:] = [{"class_path": "callbacks.PhaseEndExport"}, *callbacks[1:]]

    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, export_without_schedule)),
                     "--trainer.max_steps=2"], capsys)
    assert_one_line_error(code, err, "PhaseEndExport needs a callbacks.ObjectiveSchedule")
    assert not (tmp_path / "demo" / "config.yaml").exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_ckpt_path_that_is_no_checkpoint_is_one_line(tmp_path, own_mix, tokenizer_dir, capsys, subcommand):
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    text = tmp_path / "notes.txt"
    text.write_text("step 4 looked good\n")
    exported = tmp_path / "export" / "phase0-clm"  # cpt export's folder; PhaseEndExport saves phase0-clm.ckpt beside
    exported.mkdir(parents=True)
    (exported / "config.json").write_text("{}")
    lone = tmp_path / "lone"  # exported elsewhere, no checkpoint beside it
    shutil.copytree(exported, lone)
    (tmp_path / "export" / "phase0-clm.ckpt").write_bytes(b"")
    for ckpt_path, message in [(tmp_path / "missing.ckpt", "no such file"),
                               (tmp_path / "data", "a folder but not a sharded checkpoint"),
                               (exported, f"an exported model, not a training checkpoint; give {exported}.ckpt (its "
                                          "checkpoint) to resume or branch, or start a fresh run from it with "
                                          "model.init_args.model"),
                               (lone, "an exported model, not a training checkpoint; start a fresh run from it"),
                               (text, "not a PyTorch checkpoint"),
                               ("best", "Lightning's name for a checkpoint no new cpt process has; give last")]:
        code, err = run([subcommand, "--config", str(config), "--ckpt_path", str(ckpt_path)], capsys)
        assert_one_line_error(code, err, f"--ckpt_path {ckpt_path}: {message}")
    assert text.read_text() == "step 4 looked good\n"


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_damaged_last_checkpoint_names_the_newest_whole_one(tmp_path, own_mix, tokenizer_dir, capsys, subcommand):
    """`--ckpt_path last` (what every requeue passes) onto a last.ckpt cut short went to torch.load: a traceback, with
    no word that the run's step checkpoints were whole; an explicit path was already one line."""
    def add_validation(config):
        config["data"]["init_args"]["val_sources"] = [{"name": "qa", "path": str(own_mix.dirs["medical_qa"])}]

    config = fit_config(tmp_path, own_mix, tokenizer_dir, add_validation)
    folder = tmp_path / "demo" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (2, 4):
        torch.save({"global_step": step}, folder / f"step{step:09d}.ckpt")
    (folder / "step000000006.ckpt").write_bytes(b"cut")  # a newer one cut short too
    whole = (folder / "step000000004.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    code, err = run([subcommand, "--config", str(config), "--ckpt_path", "last"], capsys)
    assert_one_line_error(code, err, f"--ckpt_path last: {folder / 'last.ckpt'} is not a whole PyTorch checkpoint (cut "
                                     f"short or damaged); resume from --ckpt_path {folder / 'step000000004.ckpt'}")
    assert (folder / "step000000004.ckpt").read_bytes() == whole
    code, err = run([subcommand, "--config", str(config), "--ckpt_path", str(folder / "last.ckpt")], capsys)
    assert_one_line_error(code, err, f"--ckpt_path {folder / 'last.ckpt'}: not a whole PyTorch checkpoint (cut short or "
                                     f"damaged); resume from --ckpt_path {folder / 'step000000004.ckpt'}")  # given: alike


def test_resuming_last_after_a_branch_killed_before_its_first_save_names_its_start(tmp_path, own_mix, tokenizer_dir,
                                                                                   capsys):
    """A branch or rollback killed before its first save (SIGKILL, OOM) left no last.ckpt: `--ckpt_path last`, the
    advice after any stop, started the run from step 0, retraining its parent's phases from the base model, exit 0."""
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    parent = tmp_path / "parent" / "checkpoints" / "step000000002.ckpt"
    started = yaml.safe_load(config.read_text())
    (tmp_path / "demo" / "checkpoints").mkdir(parents=True)  # what the killed start left: its config, no checkpoint
    (tmp_path / "demo" / "config.yaml").write_text(yaml.safe_dump({**started, "ckpt_path": str(parent)}))
    before = digest(tmp_path / "demo")
    code, err = run(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert_one_line_error(code, err, f"--ckpt_path last: this config's run folder {tmp_path / 'demo'} holds no "
                                     f"last.ckpt: its last start, from {parent} (config.yaml), saved none; rerun that "
                                     f"start (--ckpt_path {parent})")
    assert digest(tmp_path / "demo") == before


def test_a_sharded_checkpoint_resumed_under_another_strategy_is_refused(tmp_path, own_mix, tokenizer_dir, capsys):
    """A folder of FSDP2's shards, given to the default strategy (one process, or DDP): Lightning torch.load-ed it
    as a file, an IsADirectoryError traceback on every rank."""
    def under_fsdp2(config):
        config["trainer"]["strategy"] = {"class_path": "cpt_lightning.parallel.FSDP2"}  # sharded saves by default

    code, err = run(["fit", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, under_fsdp2))], capsys)
    assert code == 0, err[-2000:]
    config = fit_config(tmp_path, own_mix, tokenizer_dir)  # the same run, the default strategy
    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    before = digest(tmp_path / "demo")
    for command in (["fit", "--ckpt_path", "last"], ["validate", "--ckpt_path", str(last)]):
        code, err = run([command[0], "--config", str(config), *command[1:]], capsys)
        assert_one_line_error(code, err, f"--ckpt_path {last} is a sharded checkpoint (a folder of FSDP2's shards): it "
                                         "loads under trainer.strategy cpt_lightning.parallel.FSDP2")
    assert digest(tmp_path / "demo") == before

def test_validate_last_without_a_checkpoint_is_refused(tmp_path, own_mix, tokenizer_dir, capsys):
    """Lightning warned and validated the config's fresh random weights, exit 0, as if they were the run's; without
    --ckpt_path it validated them too, into the run's TensorBoard at step 0."""
    def add_validation(config):
        config["data"]["init_args"]["val_sources"] = [{"name": "qa", "path": str(own_mix.dirs["medical_qa"])}]

    code, err = run(["validate", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, add_validation)),
                     "--ckpt_path", "last"], capsys)
    assert_one_line_error(code, err, f"--ckpt_path last: this config's run folder {tmp_path / 'demo'} holds no last.ckpt "
                                     "to validate (a run name mistyped?)")
    code, err = run(["validate", "--config", str(fit_config(tmp_path, own_mix, tokenizer_dir, add_validation))], capsys)
    assert_one_line_error(code, err, "cpt validate without --ckpt_path would score the random weights "
                                     "model.init_args.model_config builds: give --ckpt_path last or a checkpoint file")
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # nothing logged into the run's TensorBoard


@pytest.mark.parametrize("argv, message", [
    (["prepare", "docs.jsonl", "-o", "out", "--block-size", "1.5"], "argument --block-size: invalid int value: '1.5'"),
    (["export", "last.ckpt"], "the following arguments are required: out_dir"),
    (["data"], "the following arguments are required: command"),
    (["data", "bogus"], "argument command: invalid choice: 'bogus' (choose from 'sample')"),
    (["evaluate", "--tasks", "t", "--models", "m", "--seeds", "1.5"], "argument --seeds: invalid int value: '1.5'"),
    (["bench", "--config", "c.yaml", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    # argparse named a misspelt required option as the option missing: "required: --output/-o"
    (["prepare", "docs.jsonl", "--ouput", "out", "--tokenizer", "t"], "unrecognized arguments: --ouput out; did you "
                                                                      "mean --output?"),
    (["prepare", "docs.jsonl", "-o", "out", "--tokenzer", "t", "--text_field=body"], "unrecognized arguments: "
     "--tokenzer t --text_field=body; did you mean --tokenizer for --tokenzer, --text-field for --text_field=body?"),
    (["export", "last.ckpt", "out", "--verbose"], "unrecognized arguments: --verbose"),  # nothing near it
    (["data", "sample", "--ot", "x"], "unrecognized arguments: --ot x; did you mean --out?"),  # said by `cpt data`
])
def test_a_tool_argument_mistake_is_one_error_line_pointing_at_help(argv, message, capsys):
    """argparse printed its usage block and a `cpt X: error:` line: no line began with `error:` as for every
    other mistake."""
    code, err = run(argv, capsys)
    assert_one_line_error(code, err, f"{message} (cpt {argv[0]}")
    assert err.count("\n") == 1 and "usage:" not in err and "--help lists the options" in err


@pytest.mark.parametrize("help_option", ["--help", "--he", "-h"])
def test_a_tools_help_shows_its_required_options_as_required(help_option, capsys):
    """The pass that finds unknown options first makes every option optional while it runs: not in the help."""
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "docs.jsonl", help_option])
    assert exit_.value.code == 0
    assert "usage: cpt prepare [-h] --output OUTPUT --tokenizer TOKENIZER" in capsys.readouterr().out
