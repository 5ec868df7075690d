"""PhaseProgressBar: the phase and the steps until the last phase ends, not "Epoch 0/-2" counting towards "--"."""

import io
import logging
import re
import sys
import warnings
from typing import NamedTuple

import lightning as L
import pytest
import rich.progress
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from callbacks import ObjectiveSchedule, Phase, PhaseProgressBar
from callbacks.progress import LIGHTNING_LOGGER
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM, MaskedLM
from cpt_lightning.training_cli import CptCLI
from helpers import Terminal, tiny_module
from recorders import SaveAt
from test_cli import demo_config
from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows

ACCUMULATE = 2


class Frame(NamedTuple):
    """The bar after a micro-batch: its training task, and the descriptions of every task it shows."""

    step: int
    description: str
    completed: float
    total: float
    task: rich.progress.Task
    bars: list[str]


class Shown(L.Callback):
    """The bar's :class:`Frame` after each micro-batch."""

    def __init__(self, bar: PhaseProgressBar):
        self.bar, self.shown = bar, []

    def on_train_batch_end(self, trainer, *args) -> None:
        task = self.bar.progress._tasks[self.bar.train_progress_bar_id]
        bars = [shown.description.strip() for shown in self.bar.progress.tasks if shown.visible]
        self.shown.append(Frame(trainer.global_step, task.description, task.completed, task.total, task, bars))


def fit(tokenizer_dir, steps: tuple[int, ...], ckpt_path=None, save_to=None, bar=None, max_steps=-1, validate_every=None,
        callbacks=(), fast_dev_run=False, **schedule):
    """A CLM phase, then MLM phases, of ``steps`` optimizer steps each; a validation every ``validate_every``
    micro-batches and at the end."""
    phases = [Phase(objective, tokens=n * ACCUMULATE * TOKENS_PER_STEP)
              for objective, n in zip([CausalLM(), *(MaskedLM() for _ in steps[1:])], steps)]
    bar = bar or PhaseProgressBar()
    shown = Shown(bar)
    validation = {"val_check_interval": validate_every, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=ACCUMULATE, fast_dev_run=fast_dev_run, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[ObjectiveSchedule(phases, **schedule), bar, shown, *callbacks],
        **(validation if validate_every else {"limit_val_batches": 0}),
    )
    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    trainer.fit(tiny_module(tokenizer_dir), rows, rows if validate_every else None, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return shown.shown


def test_the_bar_names_the_phase_and_counts_steps_to_the_last_phases_end(tokenizer_dir):
    shown = fit(tokenizer_dir, (3, 2))
    assert [description.strip() for _, description, *_ in shown] == ["clm 1/2"] * 6 + ["mlm 2/2"] * 4  # 2 micro-batches a step
    assert [(frame.completed, frame.total) for frame in shown] == [(frame.step, 5) for frame in shown]
    assert shown[-1][2] == 5
    task = shown[-1][4]
    assert type(task) is rich.progress.Task  # a finite task: Lightning's open-ended one never gives a time left
    assert all(later.task.time_remaining is not None for later in shown[-3:])
    # one bar: the finite task replaces Lightning's open-ended one, which would go on showing beside it
    assert [frame.bars for frame in shown] == [["clm 1/2"]] * 6 + [["mlm 2/2"]] * 4
    assert {len(description) for _, description, *_ in shown} == {len(PhaseProgressBar().validation_description)}


def test_a_run_that_trains_on_past_its_last_phase_keeps_the_open_count(tokenizer_dir):
    """stop_after_last_phase: false trains until max_steps: the last phase's end is not where the run ends."""
    shown = fit(tokenizer_dir, (1, 1), max_steps=3, stop_after_last_phase=False)
    assert [description.strip() for _, description, *_ in shown] == ["clm 1/2"] * 2 + ["mlm 2/2"] * 4
    assert {frame.total for frame in shown} == {float("inf")}


def test_a_themed_bar_keeps_its_style_when_the_phase_changes(tokenizer_dir):
    from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

    shown = fit(tokenizer_dir, (1, 1), bar=PhaseProgressBar(theme=RichProgressBarTheme(description="green")))
    assert [description.rstrip() for _, description, *_ in shown] == ["[green]clm 1/2"] * 2 + ["[green]mlm 2/2"] * 2


def test_a_resumed_bar_starts_at_the_checkpoints_step_without_counting_the_jump_as_speed(tokenizer_dir, tmp_path):
    fit(tokenizer_dir, (2,), save_to=tmp_path / "step2.ckpt")  # then resumed with an MLM phase added
    shown = fit(tokenizer_dir, (2, 2), ckpt_path=tmp_path / "step2.ckpt")
    step, description, completed, total, task, _ = shown[0]
    assert (step, description.strip(), completed, total) == (2, "mlm 2/2", 2, 4)
    assert sum(sample.completed for sample in task._progress) <= 2  # Rich's speed samples: the steps trained here


@pytest.mark.parametrize("resumed", [False, True], ids=["from-scratch", "from-a-checkpoint"])
def test_a_fast_dev_run_counts_towards_its_own_few_steps(tokenizer_dir, tmp_path, resumed):
    """Lightning's smoke test trains N micro-batches (a log read "step 3/160 … 0:13:31 left" for a run of seconds):
    from scratch 3, 2 accumulated per step, are 2 steps, not the phases' 5; from a checkpoint of step 1, 2 are 1 more."""
    if resumed:  # a checkpoint saved where a step ends, as the runs' own are (not after fit, its epoch over)
        fit(tokenizer_dir, (2, 3), callbacks=[SaveAt(1, tmp_path / "step1.ckpt")])
    out = io.StringIO()
    bar = PhaseProgressBar(console_kwargs={"file": out}, line_interval_s=0)
    shown = fit(tokenizer_dir, (2, 3), bar=bar, fast_dev_run=2 if resumed else 3,
                ckpt_path=tmp_path / "step1.ckpt" if resumed else None)
    assert shown[-1].step == 2 and {frame.total for frame in shown} == {2}
    lines = [STEP_LINE.fullmatch(line) for line in out.getvalue().splitlines() if line]
    assert {int(m[3]) for m in lines} == {2} and (lines[-1][2], lines[-1][6]) == ("2", "0:00:00")  # left at the end


def printed_lines(tokenizer_dir, steps, line_interval_s, **console) -> list[str]:
    """What the bar printed to a file (not a terminal): a run validated after every step."""
    out = io.StringIO()
    bar = PhaseProgressBar(console_kwargs={"file": out, **console}, line_interval_s=line_interval_s)
    fit(tokenizer_dir, steps, bar=bar, validate_every=ACCUMULATE)
    return [line for line in out.getvalue().splitlines() if line]  # Rich's Progress ends a file's output with one empty


NOW = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"  # the date and time a line was printed
STEP_LINE = re.compile(NOW + r"  (\w+ \d/\d)  step (\d+)/(\d+)  ([\d,]+) tokens  ([\d,]+) tokens/s  (\d+:\d\d:\d\d) left  "
                       r"train/loss (\d+\.\d{4})")


def test_a_log_file_gets_a_line_per_interval_and_each_validations_figures(tokenizer_dir):
    """Rich's bar draws nothing in a file until the run ends: a SLURM log showed no step, loss or time left for days."""
    lines = printed_lines(tokenizer_dir, (2, 2), line_interval_s=0)  # and no last frame of Rich's bar
    steps = [STEP_LINE.fullmatch(line) for line in lines[::2]]
    assert [(m[1], int(m[2]), int(m[3]), m[4]) for m in steps] == [
        ("clm 1/2", 1, 4, "128"), ("clm 1/2", 2, 4, "256"), ("mlm 2/2", 3, 4, "384"), ("mlm 2/2", 4, 4, "512")]
    assert all(float(m[7]) > 10 for m in steps)  # the step's train/loss: a tiny random model's, near ln(50,368)
    # each validation's own figures: the CLM phase's stay in Lightning's metrics once MLM validates
    validations = [re.fullmatch(NOW + r"  validation after step (\d): (.*)", line) for line in lines[1::2]]
    assert [(int(m[1]), re.findall(r"(val/\w+) \d+\.\d{4}", m[2])) for m in validations] == [
        (1, ["val/clm_accuracy", "val/clm_loss"]), (2, ["val/clm_accuracy", "val/clm_loss"]),
        (3, ["val/mlm_accuracy", "val/mlm_loss"]), (4, ["val/mlm_accuracy", "val/mlm_loss"])]


def test_lines_come_at_the_first_step_every_interval_and_the_end(tokenizer_dir):
    lines = printed_lines(tokenizer_dir, (2, 2), line_interval_s=3600)
    validations = [line for line in lines if "  validation after step " in line]
    assert [int(STEP_LINE.fullmatch(line)[2]) for line in lines if line not in validations] == [1, 4]
    assert len(validations) == 4


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped")


def test_a_stopped_run_prints_its_last_steps_line(tokenizer_dir):
    """A stop on SIGTERM, as any error, skips Lightning's on_train_end."""
    out = io.StringIO()
    bar = PhaseProgressBar(console_kwargs={"file": out}, line_interval_s=3600)
    with pytest.raises(RuntimeError, match="stopped"):
        fit(tokenizer_dir, (2, 2), bar=bar, callbacks=[StopAt(3)])
    assert [STEP_LINE.fullmatch(line)[2] for line in out.getvalue().splitlines() if line] == ["1", "3"]


def test_a_terminal_gets_the_bar_and_no_lines(tokenizer_dir):
    lines = printed_lines(tokenizer_dir, (1, 1), line_interval_s=0, force_terminal=True)
    assert not [line for line in lines if " step " in line or "validation after" in line]


def test_lightnings_log_lines_print_above_a_terminals_bar(tokenizer_dir, monkeypatch):
    """Lightning's handler writes to the stderr of its import: in a terminal each line (a checkpoint saved, a phase
    begun) came after a frame of the bar, on the same line."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    handler = logging.StreamHandler(sys.stderr)  # as Lightning sets it up where the root logger has no handler
    monkeypatch.setattr(LIGHTNING_LOGGER, "handlers", [handler])
    monkeypatch.setattr(LIGHTNING_LOGGER, "propagate", False)
    out = io.StringIO()
    fit(tokenizer_dir, (1, 1), bar=PhaseProgressBar(console_kwargs={"file": out, "force_terminal": True}))
    # Rich erases the bar's line, prints the line, then draws the bar anew below it
    assert "\r\x1b[2K[ObjectiveSchedule] entering phase 1 (mlm" in out.getvalue()
    assert handler.stream is sys.stderr  # given back once the bar stops


def test_lightnings_log_lines_stay_in_a_file_that_stderr_goes_to(tokenizer_dir, monkeypatch):
    """cpt fit 2> err.log in a terminal: Rich's proxy would print them to the terminal, not to err.log."""
    errors = io.StringIO()
    monkeypatch.setattr(LIGHTNING_LOGGER, "handlers", [logging.StreamHandler(errors)])
    monkeypatch.setattr(LIGHTNING_LOGGER, "propagate", False)
    monkeypatch.setattr(sys, "stderr", errors)
    out = io.StringIO()
    fit(tokenizer_dir, (1, 1), bar=PhaseProgressBar(console_kwargs={"file": out, "force_terminal": True}))
    assert "[ObjectiveSchedule] entering phase 1 (mlm" in errors.getvalue()
    assert "[ObjectiveSchedule]" not in out.getvalue()


def test_a_negative_line_interval_is_refused():
    with pytest.raises(UserError, match=r"PhaseProgressBar line_interval_s=-1: must be seconds, 0 or more"):
        PhaseProgressBar(line_interval_s=-1)


def cli(config, *args):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return CptCLI(["--config", str(config), *args], run=False).trainer


@pytest.mark.parametrize("bar", ["default", "on", "off", "named"])
def test_cpt_fit_adds_the_bar_unless_the_config_names_one_or_turns_it_off(tmp_path, prepared_mix, tokenizer_dir, bar):
    config = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=1)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["enable_progress_bar"] = bar != "off"
    if bar == "default":  # not set: Lightning's default shows a bar
        del settings["trainer"]["enable_progress_bar"]
    if bar == "named":
        settings["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"})
    config.write_text(yaml.safe_dump(settings))
    expected = {"default": PhaseProgressBar, "on": PhaseProgressBar, "off": type(None), "named": TQDMProgressBar}[bar]
    assert type(cli(config).progress_bar_callback) is expected


def test_a_config_parsed_without_running_saves_no_config(tmp_path, prepared_mix, tokenizer_dir):
    """CptCLI(run=False) builds the trainer for tools that drive it (cpt bench): no config.yaml callback."""
    from lightning.pytorch.cli import SaveConfigCallback

    trainer = cli(demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=1))
    assert not [c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)]
