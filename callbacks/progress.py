"""PhaseProgressBar: Lightning's Rich progress bar for a run measured in tokens, not epochs.

A run here is one endless epoch (``max_epochs: -1``) over a stream, so Lightning's bar read
"Epoch 0/-2", counted micro-batches towards "--" and never gave a time left. This one names the phase
("clm 1/2") and counts optimizer steps towards the step where the last phase ends (known from the
``ObjectiveSchedule`` once the first batch has measured the tokens per step; a ``fast_dev_run``'s towards its own
few), so it fills and Rich shows the time left. A run without a schedule, or one that trains on past its last phase
(``stop_after_last_phase: false``), keeps the open count.

When the output is not a terminal (a SLURM job's log, ``> run.log``, ``nohup``), Rich draws nothing until
the run ends, so the bar prints lines instead, each starting with the date and time: one after the first step, then
one every ``line_interval_s`` seconds and one where training ends or stops (the phase, the step of the total, tokens
seen, tokens/s since the previous line, the time left at the pace since this process began training, validation and
saves included, and ``train/loss``), and one after each validation with its figures over all sources.

``cpt fit`` adds it when the config names no progress bar and does not turn the bar off.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.errors import UserError

FIGURE_OVER_ALL_SOURCES = re.compile(r"val/[^/]+")  # not a source's own: val/SOURCE/...
LIGHTNING_LOGGER = logging.getLogger("lightning.pytorch")  # its handler prints rank_zero_info: the callbacks' lines too


class CurrentStderr:
    """``sys.stderr`` as it is at each write: Rich's live display replaces it with a proxy that prints above the bar."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


class Mark(NamedTuple):
    """Where the previous printed line left the run."""

    seconds: float  # time.monotonic()
    step: int
    tokens: int | None


class PhaseProgressBar(RichProgressBar):
    """Args (others: Lightning's ``RichProgressBar``):
        line_interval_s: when the output is not a terminal, the seconds between printed lines.
    """

    _total: float = float("inf")  # what the bar counts towards; Lightning starts it open-ended
    _description: str | None = None
    _start: Mark | None = None  # where this process began training
    _mark: Mark | None = None  # where the previous line left it (``_start`` until one is printed)
    _before_validation: dict = {}  # Lightning's callback metrics when the current validation began
    _rerouted: tuple = ()  # (handler, its stream) of Lightning's log handlers sent through Rich while the bar shows

    def __init__(self, refresh_rate: int = 100, leave: bool = False, theme: RichProgressBarTheme = RichProgressBarTheme(),
                 console_kwargs: dict[str, Any] | None = None, line_interval_s: float = 60.0):
        if not line_interval_s >= 0:
            raise UserError(f"callbacks.PhaseProgressBar line_interval_s={line_interval_s!r}: must be seconds, 0 or more")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.line_interval_s = line_interval_s

    def _get_train_description(self, current_epoch: int) -> str:
        schedule = find_objective_schedule(self.trainer)
        if schedule is None or schedule.current is None:
            text = "training"
        else:
            text = f"{schedule.phases[schedule.current].objective.name} {schedule.current + 1}/{len(schedule.phases)}"
        return text.ljust(len(self.validation_description))  # as Lightning pads: no flicker beside the val bar

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps until the last phase ends, or a ``fast_dev_run``'s few (it read "step 3/160 … 0:13:31
        left" for a smoke test of seconds); inf while the tokens per step are unknown, or for a run without phases or
        one that trains on past them."""
        trainer, schedule = self.trainer, find_objective_schedule(self.trainer)
        tokens_per_step = getattr(trainer.lightning_module, "tokens_per_step", None)
        if schedule is None or not schedule.stop_after_last_phase or not tokens_per_step:
            return float("inf")
        total = schedule.total_steps(tokens_per_step)
        if trainer.fast_dev_run and self._start is not None:  # its N micro-batches, from where it began
            total = min(total, self._start.step + math.ceil(int(trainer.fast_dev_run) / trainer.accumulate_grad_batches))
        return total

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = self._mark = Mark(time.monotonic(), trainer.global_step, getattr(pl_module, "tokens_seen", None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self._follow_the_schedule(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)  # counts steps
        if self._a_step_unprinted(trainer):
            if self._mark is self._start or time.monotonic() - self._mark.seconds >= self.line_interval_s:
                self._print_step_line(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._a_step_unprinted(trainer):
            self._print_step_line(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stop on SIGTERM (or an error) skips ``on_train_end``: the log still gets the last step's line."""
        try:
            if self._a_step_unprinted(trainer):
                self._print_step_line(trainer, pl_module)
        finally:
            super().on_exception(trainer, pl_module, exception)

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer, pl_module) -> None:
        """The figures this validation logged: an earlier phase's objective's stay in Lightning's metrics."""
        super().on_validation_end(trainer, pl_module)
        if self._printing_lines() and trainer.state.fn == "fit" and not trainer.sanity_checking:
            figures = [f"{key} {float(value):.4f}" for key, value in sorted(trainer.callback_metrics.items())
                       if FIGURE_OVER_ALL_SOURCES.fullmatch(key) and value is not self._before_validation.get(key)]
            if figures:
                self._print(f"{_now()}  validation after step {trainer.global_step:,}: " + ", ".join(figures))

    def _init_progress(self, trainer) -> None:
        stderr = sys.stderr  # before Rich's live display replaces it
        super()._init_progress(trainer)
        if self.progress is None or self._rerouted:
            return
        if not self._draws_live():
            self.progress.live.transient = True  # its one frame, at the end, would repeat the last line printed
            return
        # Lightning's log handler holds the stderr of its import: each line (a checkpoint saved, a phase begun) was
        # written after the bar's frame on the same line, and the bar drawn anew below it. Not where stderr goes to
        # a file: Rich's proxy prints to the terminal, and the file would lose the lines.
        self._rerouted = tuple((handler, handler.stream) for handler in LIGHTNING_LOGGER.handlers
                               if isinstance(handler, logging.StreamHandler) and handler.stream is stderr
                               and stderr.isatty())
        for handler, _ in self._rerouted:
            handler.setStream(CurrentStderr())

    def _stop_progress(self) -> None:
        try:
            super()._stop_progress()
        finally:
            for handler, stream in self._rerouted:
                handler.setStream(stream)
            self._rerouted = ()

    def _draws_live(self) -> bool:
        """Rich's live display shows in a terminal or a notebook; elsewhere it prints its last frame only, at the end."""
        console = self._console
        return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)

    def _printing_lines(self) -> bool:
        return self.is_enabled and self._console is not None and not self._draws_live() and self._mark is not None

    def _a_step_unprinted(self, trainer) -> bool:
        """Lines are printed, and a step has ended since the last one (or since training began here)."""
        return self._printing_lines() and trainer.global_step > self._mark.step

    def _print_step_line(self, trainer, pl_module) -> None:
        now, step, tokens = time.monotonic(), trainer.global_step, getattr(pl_module, "tokens_seen", None)
        seconds, total = now - self._mark.seconds, self.total_train_batches
        parts = [_now(), self._get_train_description(trainer.current_epoch).strip(),
                 f"step {step:,}" + (f"/{total:,}" if total != float("inf") else "")]
        if tokens is not None:
            parts.append(f"{tokens:,} tokens")
            if seconds > 0:  # the module's tokens_seen was read at the mark too
                parts.append(f"{(tokens - self._mark.tokens) / seconds:,.0f} tokens/s")
        if total != float("inf"):  # at the pace since training began here: a validation's pause spreads over the run
            pace = (now - self._start.seconds) / (step - self._start.step)
            parts.append(f"{timedelta(seconds=round((total - step) * pace))} left")
        parts += [f"{key} {float(value):.4f}" for key, value in trainer.progress_bar_metrics.items()]
        self._print("  ".join(parts))
        self._mark = Mark(now, step, tokens)

    def _print(self, line: str) -> None:
        """Through Rich's console, which flushes each line (Python holds 8 KB of output bound for a file)."""
        self._console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)

    def _follow_the_schedule(self, trainer) -> None:
        total, description = self.total_train_batches, self._get_train_description(trainer.current_epoch)
        if total != self._total:  # the first batch measured the tokens per step
            # a new task: Lightning's open-ended one never shows a time left. reset() starts its clock and
            # speed samples at the current step, so a resumed run's jump from 0 does not count as speed.
            self.progress.remove_task(self.train_progress_bar_id)
            self.train_progress_bar_id = self._add_task(total, description)
            self.progress.reset(self.train_progress_bar_id, completed=trainer.global_step)
            self._total, self._description = total, description
        elif description != self._description:  # a phase began
            styled = f"[{self.theme.description}]{description}" if self.theme.description else description
            self.progress.update(self.train_progress_bar_id, description=styled)
            self._description = description
