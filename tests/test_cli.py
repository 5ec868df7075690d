"""`cpt fit` end to end on the real sample mix: both phases, the switch, TensorBoard, custom objectives."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cpt_lightning.cli import main
from cpt_lightning.errors import UserError
from cpt_lightning.export import main as main_export
from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
ROWS = 4


def demo_config(tmp_path: Path, prepared_mix, tokenizer_dir, clm_steps: int, mlm_steps: int, objective=None,
                demo_model: bool = False) -> Path:
    """configs/demo_cpu.yaml pointed at the test mix, with short phases and the run under tmp_path, and no
    validation data (so nothing is validated). The tests' tiny model (helpers.TINY) unless ``demo_model``: the
    demo's is 4× the compute and the checkpoint (86 MB, against 20), for tests that check what a run does, not
    what it learns; test_fit_runs_both_phases_and_logs_them trains the demo's own."""
    config = yaml.safe_load((ROOT / "configs/demo_cpu.yaml").read_text())
    tokens_per_step = ROWS * prepared_mix.block_size
    config["model"]["init_args"]["tokenizer"] = str(tokenizer_dir)
    if not demo_model:
        config["model"]["init_args"]["model_config"] = dict(TINY)
    data = config["data"]["init_args"]
    data.update(block_size=prepared_mix.block_size, micro_batch_size=ROWS, num_workers=0)
    del data["val_sources"]
    data["sources"] = [{"name": s.name, "path": s.path, "weight": s.weight} for s in prepared_mix.sources]
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp_path), log_every_n_steps=2, enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith("PhaseEndExport")]
    phases = callbacks[0]["init_args"]["phases"]
    phases[0].update(tokens=clm_steps * tokens_per_step, warmup_tokens=2 * tokens_per_step)
    phases[1]["tokens"] = mlm_steps * tokens_per_step
    if objective is not None:
        phases[1]["objective"] = objective
    trainer["callbacks"] = callbacks
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpt_lightning.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the one TensorBoard folder under ``log_dir`` (all its events files: a resume's, cpt validate's)."""
    (folder,) = {events.parent for events in log_dir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def custom_charts(log_dir: Path) -> dict[str, list[str]]:
    """The charts of the TensorBoard custom-scalars layout a run wrote (its first: TensorBoard keeps that one)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    (folder,) = {events.parent for events in log_dir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    layout = layout_pb2.Layout.FromString(accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


@pytest.mark.slow
def test_fit_runs_both_phases_and_logs_them(tmp_path, prepared_mix, tokenizer_dir):
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=20, mlm_steps=10, demo_model=True)
    validated = yaml.safe_load(config.read_text())  # the demo's validation, on two of the test mix's holdouts
    validated["data"]["init_args"]["val_sources"] = [{"name": f"{name}_holdout", "path": str(prepared_mix.dirs[name] / "holdout")}
                                                     for name in ("pubmed", "medical_qa")]
    (validation,) = [c for c in validated["trainer"]["callbacks"] if c["class_path"] == "callbacks.TokenValidation"]
    validation["init_args"]["every_n_tokens"] = 8 * ROWS * prepared_mix.block_size
    validated["trainer"]["limit_val_batches"] = 2
    config.write_text(yaml.safe_dump(validated))
    result = cpt("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "entering phase 1 (mlm" in result.stderr + result.stdout
    assert "[data] the phases' " in result.stderr + result.stdout and " passes" in result.stderr + result.stdout
    for notice in ("LeafSpec", "IterableDataset", "💡 Tip"):  # the libraries' notices
        assert notice not in result.stderr + result.stdout, notice

    logged = scalars(tmp_path)
    clm, mlm = logged["train/clm_loss"], logged["train/mlm_loss"]
    assert max(step for step, _ in clm) < 20 <= min(step for step, _ in mlm)  # no CLM value after the switch
    # The CLM loss falls from ~ln(50368) ≈ 10.8, by about a nat over these 20 steps (0.95 on torch 2.11, 1.02 on
    # 2.13: the kernels' numerics differ); with learning_rate 0 it stays within 0.02 of where it started.
    assert clm[-1][1] < clm[0][1] - 0.5
    assert mlm[-1][1] < clm[0][1]
    for tag in ("train/clm_accuracy", "train/clm_perplexity", "train/mlm_accuracy", "train/phase",
                "train/tokens_seen", "lr-AdamW/pg1"):
        assert tag in logged, f"{tag} missing from TensorBoard: {sorted(logged)}"
    assert logged["train/tokens_seen"][-1][1] == (30 - 1) * ROWS * prepared_mix.block_size
    assert any(tag.endswith("items_per_sec") for tag in logged)  # tokens/s
    # every 8 steps' tokens (x = 7, 15: CLM; 23: MLM), after CLM's last step (19) and at the end, both objectives,
    # whichever phase trains
    assert [step for step, _ in logged["val/mlm15_loss"]] == [step for step, _ in logged["val/clm_loss"]] == [7, 15, 19, 23, 29]
    assert "val/mlm15_accuracy" in logged and "val/clm_accuracy" in logged and "val/mlm_loss" not in logged
    for source in ("pubmed_holdout", "medical_qa_holdout"):  # and each source's own, at the same steps
        assert [step for step, _ in logged[f"val/{source}/clm_loss"]] == [7, 15, 19, 23, 29]
        assert f"val/{source}/mlm15_accuracy" in logged
    (drawn,) = custom_charts(tmp_path)["clm_loss"]  # one chart: the curve over both sources and each one's
    assert sorted(tag for tag in logged if re.search(drawn, tag)) == [
        "val/clm_loss", "val/medical_qa_holdout/clm_loss", "val/pubmed_holdout/clm_loss"]


@pytest.mark.slow
def test_a_printed_config_is_complete_and_trains_a_custom_objective_by_class_path(tmp_path, prepared_mix, tokenizer_dir):
    """--print_config spells out every default and prints itself again unchanged; `cpt fit` of the printed file trains
    (here with the span objective of tests/custom_objectives.py, named by class_path)."""
    from test_configs import _printed

    span = {"class_path": "custom_objectives.SpanMaskedLM", "init_args": {"mask_rate": 0.2, "span_length": 4}}
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=4, mlm_steps=4, objective=span)
    full = yaml.safe_load(_printed(str(config)))
    assert full["model"]["init_args"]["betas"] == [0.9, 0.98] and full["data"]["init_args"]["shuffle"] is True
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(full))
    assert yaml.safe_load(_printed(str(tmp_path / "printed.yaml"))) == full
    result = cpt("fit", "--config", str(tmp_path / "printed.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "span_mlm" in result.stderr + result.stdout
    assert "train/span_mlm_loss" in scalars(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["trainer"]["callbacks"][0]["init_args"]["phases"][0]["objective"].update(class_path="cpt_lightning.objectives.CasualLM"),
         "has no attribute 'CasualLM'"),
        (lambda c: c["trainer"]["callbacks"][0]["init_args"]["phases"][0].pop("tokens"), "required: tokens"),
        (lambda c: c["trainer"]["callbacks"][0]["init_args"]["phases"][1].update(tokens=0), "phases[1].tokens must be a positive"),
        (lambda c: c["model"]["init_args"]["model_config"].update(vocab_size=1000), "embeddings hold 1000"),
        (lambda c: c["trainer"].update(max_epoch=3), "max_epoch"),
        (lambda c: c["model"]["init_args"].update(tokenizer="/nonexistent/tokenizer"), "model.init_args.tokenizer: cannot load '/nonexistent/tokenizer' (no such folder)"),
        (lambda c: c["trainer"].update(max_steps=3), "trainer.max_steps=3"),
        (lambda c: c["model"]["init_args"]["model_config"].update(hidden_size="wide"),
         "model_config is not a valid ModernBertConfig: Validation error for field 'hidden_size': TypeError: Field "
         "'hidden_size' expected int, got str (value: 'wide')"),
    ],
    ids=["unknown-objective", "missing-budget", "zero-budget", "vocab-too-large", "typo", "missing-tokenizer",
         "budget-beyond-max-steps", "wrong-type-in-model-config"],
)
def test_bad_config_fails_before_training_with_one_line(tmp_path, prepared_mix, tokenizer_dir, edit, message, capsys):
    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    try:  # in-process (the subprocess path is covered above): parse errors exit via SystemExit(2)
        code = main(["fit", "--config", str(path)])
    except SystemExit as exit_:
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_checkpoint_file_leaves_the_module_to_the_config(tmp_path, prepared_mix, tokenizer_dir, subcommand, monkeypatch):
    """LightningCLI loads the hyperparameters of a ``--ckpt_path`` file over ``model``: a resume from a step's
    checkpoint ignored the config's learning rate and kernel, and ``cpt validate`` its ``val_objectives``."""
    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"].update(learning_rate=5e-4, attn_implementation="sdpa",
                                        val_objectives={"next": {"class_path": "cpt_lightning.objectives.CausalLM"}})
    path.write_text(yaml.safe_dump(config))
    saved = dict(CptCLI(["--config", str(path)], run=False).model.hparams)  # as a run under this config saved them
    assert saved["_class_path"] == "cpt_lightning.EncoderPretraining"  # the shape LightningCLI reads back
    checkpoint = tmp_path / "step000000002.ckpt"
    torch.save({"hyper_parameters": {**saved, "learning_rate": 1e-3, "attn_implementation": "eager"},
                "state_dict": {}, "pytorch-lightning_version": lightning.__version__}, checkpoint)

    monkeypatch.setattr(CptCLI, "_run_subcommand", lambda self, subcommand: None)
    module = CptCLI([subcommand, "--config", str(path), "--ckpt_path", str(checkpoint)]).model
    assert module.hparams.learning_rate == 5e-4 and module.hparams.attn_implementation == "sdpa"
    assert list(module.val_objectives) == ["next"]


def test_the_tokenizer_folder_is_recorded_absolute(tmp_path, prepared_mix, tokenizer_dir, monkeypatch):
    """A config naming the tokenizer relative to the working directory (the demo's): the run records where it is,
    so ``cpt export`` finds it from anywhere. LightningCLI's instantiator records the config's text."""
    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["tokenizer"] = tokenizer_dir.name
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tokenizer_dir.parent)
    module = CptCLI(["--config", str(path)], run=False).model
    assert module.hparams.tokenizer == str(tokenizer_dir.resolve())


def test_model_config_fields_from_the_command_line_keep_their_types(tmp_path, prepared_mix, tokenizer_dir):
    """``--model.init_args.model_config.num_hidden_layers=1`` reached ModernBertConfig as the string '1'."""
    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    overrides = ["--model.init_args.model_config.num_hidden_layers=1", "--model.init_args.model_config.initializer_range=0.05"]
    config = CptCLI(["--config", str(path), *overrides], run=False).model.model.config
    assert (config.num_hidden_layers, config.initializer_range) == (1, 0.05)


def test_trainer_callbacks_may_be_one_callback_unlisted(tmp_path, prepared_mix, tokenizer_dir):
    """Lightning's Trainer and LightningCLI take ``callbacks: {class_path: ...}`` alone; the CLI iterated over it
    (a TypeError traceback)."""
    from callbacks import ObjectiveSchedule
    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = next(c for c in config["trainer"]["callbacks"]
                                          if c["class_path"].endswith("ObjectiveSchedule"))
    path.write_text(yaml.safe_dump(config))
    callbacks = CptCLI(["--config", str(path)], run=False).trainer.callbacks
    assert sum(isinstance(c, ObjectiveSchedule) for c in callbacks) == 1


def test_cpt_fit_runs_the_timers_first_and_the_phase_end_export_after_the_others(tmp_path, prepared_mix, tokenizer_dir):
    """Listed second, as the recipes list it, the export runs after every callback but Lightning's checkpoints (which
    Lightning moves last): its phase-end checkpoint holds their state after the step (tests/test_throughput.py)."""
    from lightning.pytorch.callbacks import Checkpoint, Timer

    from callbacks import PhaseEndExport
    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].insert(1, {"class_path": "callbacks.PhaseEndExport"})
    path.write_text(yaml.safe_dump(config))
    callbacks = CptCLI(["--config", str(path), "--trainer.max_time=00:01:00:00"], run=False).trainer.callbacks
    ours = [c for c in callbacks if type(c).__module__.startswith("callbacks.") and not isinstance(c, Checkpoint)]
    assert isinstance(ours[0], Timer) and isinstance(ours[-1], PhaseEndExport) and len(ours) > 8, ours


@pytest.mark.parametrize("schedule, overrides, warned", [
    (False, [], True),
    (False, ["--trainer.max_steps=50"], False),
    (False, ["--trainer.max_epochs=3"], True),
    (False, ["--trainer.max_time=00:01:00:00"], False),
    (True, [], False),
    ("trains-on", ["--trainer.max_epochs=3"], True),
    ("trains-on", ["--trainer.max_steps=50"], False),
], ids=["nothing-ends-it", "max-steps", "max-epochs", "max-time", "schedule", "schedule-trains-on",
        "schedule-trains-on-to-max-steps"])
def test_a_fit_that_nothing_ends_is_said_at_the_start(tmp_path, prepared_mix, tokenizer_dir, schedule, overrides, warned):
    """Without an ObjectiveSchedule a recipe's ``max_steps: -1, max_epochs: -1`` trains the module's objective on the
    endless stream until stopped: a forgotten schedule showed only as a run that never finished. ``max_epochs``
    cannot end it (the mix is one endless epoch), nor a schedule that trains on after its last phase."""
    import warnings

    from cpt_lightning.training_cli import CptCLI

    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    if not schedule:
        config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                          if not c["class_path"].endswith("ObjectiveSchedule")]
    elif schedule == "trains-on":  # it ran on past max_epochs, which the help said ends it
        config["trainer"]["callbacks"][0]["init_args"]["stop_after_last_phase"] = False
    path.write_text(yaml.safe_dump(config))
    cli = CptCLI(["--config", str(path), *overrides], run=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.before_fit()
    said = [str(w.message) for w in caught if "nothing ends this run" in str(w.message)]
    limits = ("trainer.max_steps -1 without trainer.max_time (trainer.max_epochs=3 cannot end it: the training mix is "
              "one endless epoch)" if overrides == ["--trainer.max_epochs=3"]
              else "trainer.max_steps, trainer.max_epochs -1 without trainer.max_time")
    expected = (f"nothing ends this run: an ObjectiveSchedule with stop_after_last_phase false and {limits}, so it "
                "trains MaskedLM until stopped (SIGTERM saves last.ckpt); let the ObjectiveSchedule stop after its last "
                "phase, or set max_steps or max_time") if schedule == "trains-on" else (
                f"nothing ends this run: no callbacks.ObjectiveSchedule and {limits}, so it trains MaskedLM until "
                "stopped (SIGTERM saves last.ckpt); give the phases an ObjectiveSchedule, or set max_steps or max_time")
    assert said == ([expected] if warned else [])


def test_a_second_seed_given_only_to_seed_everything_is_told_the_seeds_that_draw(tmp_path, prepared_mix, tokenizer_dir):
    """``--seed_everything 18`` alone changes nothing a continued pretraining draws: the masks follow
    model.init_args.seed and the data order data.init_args.seed (the recipes keep seed_everything = the masking seed)."""
    import warnings

    from cpt_lightning.training_cli import CptCLI, split_seeds_warning

    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    said = []
    for seed in ("17", "18"):  # the demo's own, then a second seed
        cli = CptCLI(["--config", str(config), "--seed_everything", seed], run=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.before_fit()
        said.append([str(w.message) for w in caught if "seed_everything" in str(w.message)])
    assert said == [[], ["seed_everything 18 only initialises new weights (a pretrained encoder and MLM head have "
                         "none); the masks come from model.init_args.seed 17 and the data order from "
                         "data.init_args.seed 42: for another seed of the run, set those too"]]
    assert split_seeds_warning(True, 17, 42) is None and split_seeds_warning(18, 18, 42) is None


def test_max_time_stops_a_recipe_run_where_a_step_ends_and_saves_it(tmp_path, prepared_mix, tokenizer_dir, monkeypatch,
                                                                   caplog, capsys):
    """The recipes list a Timer (the model card's wall-clock), beside which Lightning ignored ``trainer.max_time``
    (its own Timer is added only when none is listed), and Lightning's Timer stops after any micro-batch, leaving
    an accumulated step half done. On a clock that ticks once per reading, the budget runs out after the 4th
    reading: Lightning's Timer reads it after every micro-batch, the StepTimer once per step (3 micro-batches)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import timer

    ticks = iter(range(10_000))
    monkeypatch.setattr(timer, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=30, mlm_steps=3)  # 10 + 1 steps of 3
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(config), "--trainer.max_time=00:00:00:04",
                     "--trainer.accumulate_grad_batches=3"]) == 0
    tokens = 12 * ROWS * prepared_mix.block_size
    assert (f"[ObjectiveSchedule] stopped in phase 0 (clm) at {tokens:,} of {33 * tokens // 12:,} tokens (step 4): "
            "--ckpt_path last with a larger --trainer.max_time continues the run") in caplog.messages
    # Lightning's own line for a max_time it leaves to a listed Timer: untrue here, the StepTimer enforces it
    assert not any("Ignoring `Trainer(max_time=...)`" in m for m in caplog.messages)
    (last,) = tmp_path.rglob("last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    micro_batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert (checkpoint["global_step"], micro_batches) == (4, 12)
    assert checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"] >= 4  # the model card's wall-clock
    # the same command resumed: the budget counts every resume, so it trained nothing and exited 0 without a word
    resume = ["fit", "--config", str(config), "--trainer.accumulate_grad_batches=3", "--ckpt_path", "last"]
    assert main([*resume, "--trainer.max_time=00:00:00:04"]) == 2
    assert "error: trainer.max_time 0:00:04 (or StepTimer's duration) is already spent by this run" in capsys.readouterr().err
    assert main([*resume, "--trainer.max_time=00:01:00:00", "--trainer.log_every_n_steps=1"]) == 0
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 11
    # TensorBoard is told where the resumed run starts again (what a killed run logged past step 4 is dropped), by
    # the run that trained, not the refused one, and before the resumed run's first point (its learning rate)
    assert restarts_marked(last.parent.parent) == [4]
    lr = scalars(tmp_path)["lr-AdamW/pg1"]
    assert [step for step, _ in lr if step >= 4] == list(range(4, 11))


def test_a_budget_spent_to_the_second_is_spent():
    """Lightning's Timer stops at elapsed >= duration: a resume with exactly the budget trained would take a step."""
    from callbacks import StepTimer

    timer = StepTimer("00:00:00:04")
    timer.load_state_dict({"time_elapsed": {"train": 4.0}})
    with pytest.raises(UserError, match="is already spent by this run"):
        timer.on_fit_start(None)
    timer.load_state_dict({"time_elapsed": {"train": 3.9}})
    timer.on_fit_start(None)


def restarts_marked(log_dir: Path) -> list[int]:
    """The steps of the TensorBoard restart markers (``SessionLog.START``) in the events files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return [event.step for path in sorted(log_dir.rglob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load() if event.session_log.status == SessionLog.START]


def test_max_time_beside_a_timer_with_its_own_duration_is_refused(tmp_path, prepared_mix, tokenizer_dir, capsys):
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    settings = yaml.safe_load(config.read_text())
    (timer,) = [c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("Timer")]
    timer.setdefault("init_args", {})["duration"] = "00:01:00:00"
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config), "--trainer.max_time=00:00:00:02"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.max_time and a Timer with its own duration in trainer.callbacks: keep one of the two")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_lightnings_timer_with_a_duration_is_refused_for_the_step_timer(tmp_path, prepared_mix, tokenizer_dir, capsys):
    """Lightning's Timer stops after any micro-batch: with accumulation the step is half done and the resume skips
    its drawn rows. The recipes list callbacks.StepTimer, whose duration stops where a step ends (the same class
    as max_time's, above); Lightning's own with a duration is refused, naming the one to use."""
    from lightning.pytorch.callbacks import Timer

    from cpt_lightning.training_cli import in_hook_order, step_aligned_timers

    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    settings = yaml.safe_load(config.read_text())
    (timer,) = [c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("Timer")]
    assert timer["class_path"] == "callbacks.StepTimer"
    timer.update(class_path="lightning.pytorch.callbacks.Timer", init_args={"duration": "00:01:00:00", "interval": "step"})
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.callbacks: Lightning's Timer with a duration stops after any micro-batch, in the middle of an "
        "accumulated step, whose drawn rows the resume skips: use callbacks.StepTimer (the same init_args) or "
        "trainer.max_time")
    wall_clock = Timer()  # without a duration it stops nothing: kept
    assert step_aligned_timers([wall_clock], max_time=None) == [wall_clock]
    from callbacks import LossSpikeMonitor, PhaseEndExport, StepTimer, TokenThroughput

    throughput = TokenThroughput()
    (first, *rest) = step_aligned_timers([throughput, wall_clock], max_time="00:00:01:00")
    assert isinstance(first, StepTimer) and first.time_remaining() == 60 and rest == [throughput]
    # a timer comes first: the callbacks after it see the stop it sets at a step's end and log that step as the last
    # (after them, train/hours_left and tokens/s kept the previous log step's values there); the phase-end export
    # last, so its checkpoint holds what the others took from the step (tests/test_throughput.py checks that)
    export, spikes, timer = PhaseEndExport(), LossSpikeMonitor(), StepTimer(duration="00:01:00:00")
    assert in_hook_order([export, throughput, spikes, timer]) == [timer, throughput, spikes, export]
    assert in_hook_order([export, throughput, wall_clock, spikes]) == [wall_clock, throughput, spikes, export]


def test_a_default_root_dir_beside_the_loggers_folder_is_refused_before_training(tmp_path, prepared_mix, tokenizer_dir,
                                                                                 capsys):
    """The flag a researcher gives a branch to run it elsewhere (Lightning ignores it beside a logger)."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "demo_b")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: trainer.default_root_dir={tmp_path / 'demo_b'} holds nothing of this run")
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "demo_b").exists()


def test_log_every_n_steps_0_trains_and_logs_at_the_switch_and_the_end(tmp_path, prepared_mix, tokenizer_dir):
    """Lightning takes 0 as "log no step"; the module's own flush divided by it (a ZeroDivisionError)."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=3, mlm_steps=2)
    assert main(["fit", "--config", str(config), "--trainer.log_every_n_steps=0"]) == 0
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["train/clm_loss"]] == [2] and [step for step, _ in logged["train/mlm_loss"]] == [4]


def test_a_resume_under_another_checkpoint_policy_says_so_and_not_that_a_callback_is_missing(
        tmp_path, prepared_mix, tokenizer_dir, caplog, recwarn):
    """Lightning keys TokenCheckpoint's state by its policy: resumed with another cadence or keep_last (supported: the
    folder's checkpoints are kept and pruned by the new one) it warned "Please add the following callbacks:
    [TokenCheckpoint{...}]", as if the config had lost one. A callback that is left out is still warned of."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=1)
    assert main(["fit", "--config", str(config)]) == 0
    changed = yaml.safe_load(config.read_text())
    (policy,) = [c for c in changed["trainer"]["callbacks"] if c["class_path"] == "callbacks.TokenCheckpoint"]
    before = dict(policy["init_args"])
    policy["init_args"] = {"every_n_train_steps": 1, "keep_last": 3}
    changed["trainer"]["callbacks"][0]["init_args"]["phases"][1]["tokens"] *= 2
    (tmp_path / "denser.yaml").write_text(yaml.safe_dump(changed))
    recwarn.clear()
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(tmp_path / "denser.yaml"), "--ckpt_path", "last"]) == 0
    assert not [w for w in recwarn if "Please add the following callbacks" in str(w.message)]
    assert ("[TokenCheckpoint] resumed under another checkpoint policy: {'every_n_tokens': %r, 'every_n_train_steps': "
            "None, 'keep_last': %r} before, {'every_n_tokens': None, 'every_n_train_steps': 1, 'keep_last': 3} now; "
            "the folder's checkpoints are kept and pruned by the new one"
            % (before["every_n_tokens"], before["keep_last"])) in caplog.messages
    changed["trainer"]["callbacks"] = [c for c in changed["trainer"]["callbacks"]
                                       if not c["class_path"].endswith("LossSpikeMonitor")]
    policy["init_args"] = before
    changed["trainer"]["callbacks"][0]["init_args"]["phases"][1]["tokens"] *= 2
    (tmp_path / "fewer.yaml").write_text(yaml.safe_dump(changed))
    recwarn.clear()
    assert main(["fit", "--config", str(tmp_path / "fewer.yaml"), "--ckpt_path", "last"]) == 0
    (missing,) = [str(w.message) for w in recwarn if "Please add the following callbacks" in str(w.message)]
    assert "LossSpikeMonitor" in missing and "TokenCheckpoint" in missing


def test_the_card_of_a_run_resumed_under_another_config_gives_each_config_its_steps(tmp_path, prepared_mix,
                                                                                   tokenizer_dir, caplog):
    """Resumed at the switch (step 2) with a longer decay on another mix, one source renamed: the card credited
    every token to the last mix and described the decay as if it had run whole, with no word of the change. The
    start-up forecast credited the new mix with all tokens too."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    assert main(["fit", "--config", str(config)]) == 0
    changed = yaml.safe_load(config.read_text())
    for source, weight in zip(changed["data"]["init_args"]["sources"], (0.2, 0.4, 0.4)):
        source["weight"] = weight
    changed["data"]["init_args"]["sources"][0]["name"] = "abstracts"  # the same folder: its tokens still count
    changed["trainer"]["callbacks"][0]["init_args"]["phases"][1]["tokens"] *= 2
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(changed))
    checkpoints = tmp_path / "demo" / "checkpoints"
    caplog.clear()
    with pytest.warns(UserWarning, match="resumed at step 2"), caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(tmp_path / "longer.yaml"), "--ckpt_path", str(checkpoints / "step000000002.ckpt")]) == 0
    tokens_per_step = ROWS * prepared_mix.block_size
    (plan,) = [m for m in caplog.messages if m.startswith("[data] ")]
    assert plan.startswith(f"[data] the phases' {4 * tokens_per_step:,} left of {6 * tokens_per_step:,} (resumed at "
                           f"{2 * tokens_per_step:,}) training tokens read abstracts 20% ≈ {round(0.8 * tokens_per_step):,} ")
    requeued = main(["fit", "--config", str(tmp_path / "longer.yaml"), "--ckpt_path", "last"])  # adds no change
    assert requeued == 0 and torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6
    assert main_export([str(checkpoints / "last.ckpt"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("Config changed at step") == 1
    assert ("Config changed at step 2 (a resume or branch under another config): the steps before were trained under "
            "one that differs in data.init_args.sources, trainer.callbacks: ObjectiveSchedule.") in card
    for name, before, after in [("abstracts", 0.6, 0.2), ("medical_qa", 0.2, 0.4), ("case_reports", 0.2, 0.4)]:
        trained = round(2 * tokens_per_step * before + 4 * tokens_per_step * after)
        assert re.search(rf"\| {name} \| {after:.1%} \| [\d,]+ \| [\d,]+ \| {trained:,} \|", card), name


def test_a_run_resumes_from_a_copy_of_its_data_in_another_folder(tmp_path, prepared_mix, tokenizer_dir, recwarn):
    """A job that copies the prepared sources to node-local scratch reads them from another folder at each resume:
    the resume was refused. It now trains on to the end, and the card credits each copy with the steps its source
    trained before (the earlier folders counted as other sources, not on the card) and, as for any requeue, names no
    config change (each requeue from a new folder would add one, and a config-before-stepS.yaml)."""
    import shutil

    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)

    def on_scratch(job):
        """The job's own copy of every source, its holdout validated (the recorded digests, not the folders, tell
        two jobs' copies for the same data: the job before's copy is gone with its node)."""
        moved = yaml.safe_load(config.read_text())
        data = moved["data"]["init_args"]
        for source in data["sources"]:
            source["path"] = str(shutil.copytree(source["path"], tmp_path / job / source["name"]))
        data["val_sources"] = [{"name": "pubmed_holdout", "path": str(tmp_path / job / "pubmed" / "holdout")}]
        (tmp_path / f"{job}.yaml").write_text(yaml.safe_dump(moved))
        return moved

    on_scratch("job1")
    assert main(["fit", "--config", str(tmp_path / "job1.yaml")]) == 0
    checkpoints = tmp_path / "demo" / "checkpoints"
    for name in ("last.ckpt", "step000000004.ckpt"):  # as if the job had stopped at step 2
        (checkpoints / name).unlink()
    moved = on_scratch("job2")
    shutil.rmtree(tmp_path / "job1")
    recwarn.clear()
    assert main(["fit", "--config", str(tmp_path / "job2.yaml"), "--ckpt_path", str(checkpoints / "step000000002.ckpt")]) == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # Lightning's, at every resume
    assert main_export([str(checkpoints / "last.ckpt"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Config changed" not in card  # the same data: a requeue from scratch changes no setting
    assert not list((tmp_path / "demo").glob("config-before-*"))
    for source in moved["data"]["init_args"]["sources"]:  # each copy is the source it was: the four steps count
        trained = round(4 * ROWS * prepared_mix.block_size * source["weight"])
        assert re.search(rf"\| {source['name']} \| {source['weight']:.1%} \| [\d,]+ \| [\d,]+ \| {trained:,} \|", card), card


def table_of(out: str) -> dict[str, list[float]]:
    """The figures cpt validate printed: a row per figure, the value over all sources then each one's."""
    printed = [line.split() for line in out.splitlines()]
    header = printed.index(["validation", "all", "pubmed_held_out", "medical_qa_held_out"])
    return {row[0]: [float(value) for value in row[1:]] for row in printed[header + 1:header + 5]}


def test_validate_logs_at_the_checkpoints_step_and_refuses_to_validate_nothing(tmp_path, prepared_mix, tokenizer_dir,
                                                                               capsys):
    from cpt_lightning.folder_locks import lock_run_folder, release
    from cpt_lightning.refused_start import LoggerStart

    """``cpt validate`` logged its values at step 0 of the run's TensorBoard curves (Lightning restores no loop for
    it), then one step past the point the run logged for the same weights; and ``--trainer.limit_val_batches=0``
    validated nothing, exit 0. The run validates when it ends: cpt validate of its last checkpoint gives the same
    point, at the same step."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    held_out = ("--data.init_args.val_sources=[" + ", ".join(f"{{name: {name}_held_out, path: {prepared_mix.dirs[name] / 'holdout'}}}"
                                                             for name in ("pubmed", "medical_qa")) + "]")
    assert main(["fit", "--config", str(config), held_out, "--trainer.limit_val_batches=2"]) == 0
    trained = scalars(tmp_path)
    validate = ["validate", "--config", str(config), held_out, "--ckpt_path", "last"]
    capsys.readouterr()
    assert main([*validate, "--trainer.limit_val_batches=2"]) == 0
    logged = scalars(tmp_path)
    for key in ("val/clm_loss", "val/mlm15_loss", "val/medical_qa_held_out/clm_loss"):
        at_the_switch, at_the_end = trained[key]
        assert at_the_switch[0] == 1 and at_the_end[0] == 3
        assert logged[key] == [at_the_switch, at_the_end, pytest.approx(at_the_end, abs=1e-5)]
    assert "step" not in logged
    # one table: a row per figure, the value over both sources then each one's (Lightning's repeated them per loader)
    out = capsys.readouterr().out
    assert f"validated {tmp_path / 'demo' / 'checkpoints' / 'last.ckpt'} (step 4)\n" in out  # what the table is of
    printed = [line.split() for line in out.splitlines()]
    table = table_of(out)
    assert sorted(table) == ["clm_accuracy", "clm_loss", "mlm15_accuracy", "mlm15_loss"]
    assert table["clm_loss"] == [pytest.approx(logged[f"val/{key}clm_loss"][-1][1], abs=1e-4)
                                 for key in ("", "pubmed_held_out/", "medical_qa_held_out/")]
    assert "DataLoader 0" not in "\n".join(map(" ".join, printed))
    assert main([*validate, "--trainer.limit_val_batches=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.limit_val_batches=0: cpt validate would validate nothing")
    # other validation settings stay out of the run's curves (they added a second value at its steps)
    events = sorted(p.name for p in (tmp_path / "demo").glob("events.out.tfevents.*"))
    # a fit training on in the folder keeps its curves: the figures are printed (they joined them mid-run)
    # (and its metrics.csv, which a CSVLogger's start deletes, stays whole)
    held, _ = lock_run_folder(tmp_path / "demo")
    (tmp_path / "demo" / "metrics.csv").write_text("step,train/loss\n1,9.5\n")
    csv_logger = '--trainer.logger={class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s, ' \
                 'name: demo, version: ""}}' % tmp_path
    try:
        with pytest.MonkeyPatch.context() as patch:  # no logger opens there, even for a moment
            patch.setattr(LoggerStart, "open", lambda logger: pytest.fail(f"{logger} opened in a running fit's folder"))
            for logger in ([], [csv_logger]):
                with pytest.warns(UserWarning, match="run folder of a cpt fit still training: these figures are "
                                                     "printed, not logged among its curves"):
                    assert main([*validate, "--trainer.limit_val_batches=2", *logger]) == 0
                out = capsys.readouterr().out  # the run's last.ckpt, as without the fit (not the config's weights)
                assert f"validated {tmp_path / 'demo' / 'checkpoints' / 'last.ckpt'} (step 4)\n" in out
                assert table_of(out) == table
    finally:
        release(held)
    assert sorted(p.name for p in (tmp_path / "demo").glob("events.out.tfevents.*")) == events
    assert (tmp_path / "demo" / "metrics.csv").read_text() == "step,train/loss\n1,9.5\n"
    (tmp_path / "demo" / "metrics.csv").unlink()
    for setting in ("--trainer.limit_val_batches=1", "--model.init_args.val_objectives={clm: {class_path: "
                                                     "cpt_lightning.objectives.CausalLM}}"):
        assert main([*validate, "--trainer.limit_val_batches=2", setting]) == 2  # the run's, but for the setting
        key = setting[2:].partition("=")[0]
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {key} differ from the run's in {tmp_path / 'demo' / 'config.yaml'}, whose val/* curves these "
            "figures would join at its steps: validate with the run's settings, or into a folder of its own "
            "(--trainer.logger.init_args.name NAME)")
    # an earlier checkpoint stays out too: TensorBoard's viewer dropped the run's val points after the one it logged
    switch = tmp_path / "demo" / "checkpoints" / "step000000002.ckpt"
    assert main([*validate[:-1], str(switch), "--trainer.limit_val_batches=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --ckpt_path {switch} (step 2) is earlier than the run in {tmp_path / 'demo'}, saved at step 4: "
        "TensorBoard's viewer keeps one try of a curve, so its figures logged there would drop the run's later val/* "
        "points from the charts; validate into a folder of its own (--trainer.logger.init_args.name NAME)")
    assert sorted(p.name for p in (tmp_path / "demo").glob("events.out.tfevents.*")) == events
    # another run's checkpoint stays out of a trained run's curves (one validated config for every arm mixed them)
    (last,) = tmp_path.rglob("last.ckpt")
    other = ["validate", "--config", str(config), held_out, "--ckpt_path", str(last), "--trainer.limit_val_batches=1"]
    for run, logger in (("baseline", {"name": "baseline"}), ("demo/seed2", {"name": "demo", "version": "seed2"})):
        (tmp_path / run).mkdir()  # a run trained there (a second seed's run may differ by version alone)
        (tmp_path / run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"logger": {"init_args": logger}}}))
        assert main([*other, *(f"--trainer.logger.init_args.{key}={value}" for key, value in logger.items())]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
            f"error: --ckpt_path {last} is a checkpoint of run 'demo', and {tmp_path / run} holds run '{run}'")
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["config.yaml"]
    assert main([*other, "--trainer.logger.init_args.name=demo_validated"]) == 0
    assert list((tmp_path / "demo_validated").glob("events.out.tfevents.*"))


def test_fast_dev_run_trains_a_few_steps_beside_a_run_and_writes_nothing(tmp_path, prepared_mix, tokenizer_dir, caplog):
    """Lightning's smoke test of a config (``--trainer.fast_dev_run=N``: N steps, no logger, no checkpoint) was refused
    by the phases' budget check (Lightning sets max_steps to N), and the end-of-training checkpoint ignored it. In
    a layout whose default_root_dir is the run folder (where a fast_dev_run's checkpoint callbacks look) it was
    then refused beside the finished run, and from one of its checkpoints it set aside the later ones and exports
    (or, from a checkpoint of step N or later, trained nothing)."""
    import hashlib

    def files() -> dict[Path, str]:
        return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in tmp_path.rglob("*") if path.is_file()}

    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["default_root_dir"] = str(tmp_path / "demo")  # the run folder, as a config may set it
    settings["trainer"]["callbacks"].append({"class_path": "callbacks.PhaseEndExport"})
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    before = files()
    switch_checkpoint = tmp_path / "demo" / "checkpoints" / "step000000002.ckpt"  # last.ckpt is step 4
    assert {"phase0-clm", "phase1-mlm"} <= {path.name for path in (tmp_path / "demo" / "export").iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["fit", "--config", str(config), "--trainer.fast_dev_run=3"]) == 0
    entered = [m for m in caplog.messages if m.startswith("[ObjectiveSchedule] entering")]
    assert [m.split(" (")[0] for m in entered] == ["[ObjectiveSchedule] entering phase 0", "[ObjectiveSchedule] "
                                                   "entering phase 1"]  # the switch is smoke-tested too
    assert not any("stopped in phase" in m for m in caplog.messages)  # nothing saved to continue from
    assert files() == before
    caplog.clear()
    with caplog.at_level(logging.INFO):  # Lightning's max_steps=N counts from step 0: from step N it trained nothing
        assert main(["fit", "--config", str(config), "--trainer.fast_dev_run=2", "--ckpt_path", str(switch_checkpoint)]) == 0
    assert any(m.startswith("[ObjectiveSchedule] resuming in phase 1") for m in caplog.messages)
    assert any("`max_steps=4` reached" in m for m in caplog.messages)  # 2 steps from the checkpoint's step 2
    assert files() == before


def test_a_finished_checkpoint_is_checked_against_the_config_before_it_is_done(tmp_path, prepared_mix, tokenizer_dir,
                                                                                   capsys):
    """A checkpoint past the config's last phase (a branch off the wrong checkpoint: a step of the parent's decay under a
    branch config whose decay masks 30%) was "every phase is already done ... nothing left to train", exit 0, before the
    check of what the checkpoint trained ran (at the first batch): the refusal docs/recipes.md "Branching" names never
    came, and the branch's folder was left without models. The same for a max_steps below the phases' steps."""
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    assert main(["fit", "--config", str(config)]) == 0
    branch = yaml.safe_load(config.read_text())
    phases = branch["trainer"]["callbacks"][0]["init_args"]["phases"]
    phases[1]["objective"]["init_args"]["mask_rate"] = 0.3
    branch["trainer"]["logger"]["init_args"]["name"] = "branch"
    (tmp_path / "branch.yaml").write_text(yaml.safe_dump(branch))
    capsys.readouterr()
    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    assert main(["fit", "--config", str(tmp_path / "branch.yaml"), "--ckpt_path", str(last)]) == 2
    assert "mask_rate=0.15" in capsys.readouterr().err
    # a max_steps the checkpoint's step has reached trains no batch: Lightning skipped the loop, and the first batch's
    # check of max_steps against the phases, and exited 0 ("max_steps=1 reached")
    assert main(["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: the phases need 4 optimizer steps")


LEFT_IN_A_CYCLE = """
import atexit, gc, sys
from cpt_lightning.cli import main

gc.disable()  # only the command's own collection may reach the cycle below


class Finalized:
    def __del__(self):
        with open({path!r}, "w") as f:
            f.write("finalized")


atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count()))
cycle = Finalized()
cycle.self = cycle
del cycle
sys.argv = ["cpt", "prepare", "--help"]
sys.exit(main())
"""


def test_a_cpt_process_leaves_its_heap_out_of_the_collections_at_exit_but_finalizes_its_garbage(tmp_path):
    """Python's shutdown walked every object torch, Lightning and transformers leave several times: 1.6 s after a
    run's last line, on every rank. The process's command freezes the heap at its end (``gc.get_freeze_count``),
    after a collection that finalizes what was left unreachable while the modules are there: the object in a cycle
    here writes its file (left to shutdown's collections, its ``__del__`` found ``open`` gone: a NameError)."""
    written = tmp_path / "finalized.txt"
    result = subprocess.run([sys.executable, "-c", LEFT_IN_A_CYCLE.format(path=str(written))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    frozen = int(result.stdout.strip().splitlines()[-1].removeprefix("frozen at exit: "))
    assert frozen > 10_000, result.stdout[-500:]
    assert written.read_text() == "finalized"


def test_main_called_in_process_leaves_the_callers_collector_as_it_was(capsys):
    """Frozen objects are never collected: a caller running several commands would pile up their garbage."""
    import gc

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert gc.get_freeze_count() == 0
