"""``cpt bench``: training throughput of each objective of a config (tokens/s, step time, MFU, peak memory).

    cpt bench --config configs/en_detour.yaml --steps 20 --warmup 5 [-- --data.init_args.micro_batch_size=8]

Each objective runs on the config's own model, data, precision and strategy (built by CptCLI) for
warm-up + measured optimizer steps, with that objective fixed. Only what would write files,
evaluate or switch objectives is left out (loggers, checkpoints, validation, the
ObjectiveSchedule, exports, monitors); the callbacks that shape the work of a step stay
(``STEP_WORK``). Every objective gets a freshly built model and trainer: a Trainer runs ``fit``
once, and a fresh start means no row inherits another's optimizer state, allocator cache or data
position, so each row's peak memory is its own. Figures are rank 0's, tokens and FLOPs × world
size (rows are packed: every token counts). The JSON goes to ``--out``, by default
``runs/bench/<config name>.json`` (beside the runs' own folders, ignored by git).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks import GlobalBatch, LayerFreeze, NonFiniteGuard
from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.atomic import check_output_folder, write_beside
from cpt_lightning.bench_tables import cell, format_table
from cpt_lightning.config_files import check_arguments
from cpt_lightning.errors import PREEMPTED_EXIT_CODE, ArgumentParser, UserError, report_interrupt, report_user_error
from cpt_lightning.peak_flops import compute_dtype, peak_flops
from cpt_lightning.training_cli import CptCLI

STEP_WORK = (GlobalBatch, LayerFreeze, NonFiniteGuard)  # accumulation, skipped weight gradients, the gradient-norm check
FLOP_COUNT = (
    "cpt_lightning/flops.py, training = 3 × forward: 6 × encoder-layer weights per token (4 × a frozen one's) + "
    "12·hidden·context per layer and token (attention) + 6·(hidden² + hidden·vocab) per predicted position (head); "
    "nominal context: the row as one document, L (global) or 2w+1 (sliding) keys a query but near the row's ends, "
    "when causal the keys up to the query ((L+1)/2 on average, w+1 sliding); document-masked: the keys each query "
    "sees in its document"
)


@dataclass
class Measurement:
    """What rank 0 saw over the measured optimizer steps (tokens and FLOPs of this device only)."""

    seconds: float
    micro_batches: int
    tokens: int
    flops: float | None
    document_masked_flops: float | None
    peak_memory_bytes: int | None


class StepWindow(L.Callback):
    """Time optimizer steps ``warmup+1 … warmup+steps``: clock, tokens, FLOPs and peak memory of that window.

    The window opens when step ``warmup`` has finished and closes when step ``warmup+steps`` has,
    so it holds whole optimizer steps (every accumulated micro-batch, data loading included). On
    CUDA the clock is read after a synchronize, and the allocator's peak is reset when it opens.
    """

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.device: torch.device | None = None
        self._started: float | None = None
        self._batches, self._tokens, self._flops, self._masked_flops = 0, 0, 0.0, 0.0
        self.measurement: Measurement | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.device = trainer.strategy.root_device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.measurement is not None:
            return
        if self._started is not None:
            self._count(batch, pl_module.flops_per_batch, pl_module.last_batch_flops(document_masked=True))
            if trainer.global_step == self.warmup + self.steps:
                self._close()
        elif trainer.global_step == self.warmup:
            self._open()

    def _open(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._started = time.perf_counter()

    def _count(self, batch: dict, flops: float | None, masked_flops) -> None:
        """``masked_flops`` is a device tensor: summed there, read once when the window closes."""
        self._batches += 1
        self._tokens += batch["input_ids"].numel()
        self._flops = None if flops is None or self._flops is None else self._flops + flops
        self._masked_flops = None if masked_flops is None or self._masked_flops is None else self._masked_flops + masked_flops

    def _close(self) -> None:
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.device)
        self.measurement = Measurement(
            seconds=time.perf_counter() - self._started,
            micro_batches=self._batches,
            tokens=self._tokens,
            flops=self._flops,
            document_masked_flops=None if self._masked_flops is None else float(self._masked_flops),
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.device) if on_cuda else None,
        )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Own options before ``--``, LightningCLI overrides after it; values checked here, before any model is built."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = ArgumentParser(
        prog="cpt bench",
        description="Training throughput of each objective of a config: tokens/s/device, step time, MFU (nominal and "
        "over document-masked attention), peak memory.",
        epilog="arguments after -- go to LightningCLI, e.g.\n  -- --trainer.devices=1 --model.init_args.attn_implementation=sdpa\n"
        "  -- --trainer.profiler=pytorch   (Lightning's PyTorchProfiler report of the steps)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, action="append",
                        help="a cpt fit config (YAML); again for a later one merged over it, as cpt fit takes them")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per objective (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps run before measuring (default 5)")
    parser.add_argument("--objectives", help="comma-separated objective names, phase{i}-{name} where phases share one "
                        "(default: every phase's objective)")
    parser.add_argument("--out", help="JSON to write (default: runs/bench/<config name>.json)")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak dense TFLOP/s of one device in the compute dtype, for MFU (default: "
                        "cpt_lightning/peak_flops.py, Lightning's table with the Hopper chips' dense figures; a GPU "
                        "it lacks logs no MFU: pass its figure)")
    args = parser.parse_args(argv[:split])
    for option in ("steps", "warmup"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option} must be a positive integer, got {getattr(args, option)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    for config in args.config:
        if not Path(config).is_file():
            raise UserError(f"--config {config}: no such file")
    name = f"{Path(args.config[-1]).stem}.json"  # the last config's: an arm's overlay over a recipe names the arm
    args.out = Path(args.out or Path("runs/bench") / name)
    if args.out.is_dir():  # found only once every objective had been measured
        raise UserError(f"--out {args.out} is a folder: name the JSON file to write, e.g. {args.out / name}")
    if not args.out.exists():
        check_output_folder(args.out, "--out")  # a file on its path
    return args, argv[split + 1:]


def build_cli(configs: list[str], overrides: list[str], max_steps: int, out: Path):
    """Model, data and trainer from the config; the bench's own settings come last, so they win. Without a logger,
    Lightning writes what a profiler given after ``--`` reports into ``default_root_dir``: the JSON's folder, not the
    current one or the run folder of the config."""
    bench_settings = [  # checkpoint callbacks are dropped in measure(), with the other non-STEP_WORK ones
        f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1", "--trainer.logger=false",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out.parent}",
    ]
    # The args are deliberately not sys.argv (LightningCLI warns when both exist), and the bench validates
    # nothing by design. Not in catch_warnings(): leaving it would drop CptCLI's filters of library notices.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    return CptCLI([*config_options(configs), *overrides, *bench_settings], run=False)


def config_options(configs: list[str]) -> list[str]:
    return [argument for config in configs for argument in ("--config", config)]


def config_objectives(cli) -> dict:
    """Row label → objective, one per phase in order, else the model's own objective.

    A label is the objective's name, or ``phase{i}-{name}`` where phases share a name (the MLM
    baseline's 30% and 15% phases cost differently: the head runs on the masked positions).
    """
    schedule = find_objective_schedule(cli.trainer)
    if schedule is None:
        return {cli.model.objective.name: cli.model.objective}
    names = [phase.objective.name for phase in schedule.phases]
    return {name if names.count(name) == 1 else f"phase{i}-{name}": phase.objective
            for i, (name, phase) in enumerate(zip(names, schedule.phases))}


def choose(available: list[str], requested: str | None) -> list[str]:
    if requested is None:
        return available
    names = [name.strip() for name in requested.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise UserError(f"--objectives {requested!r}: unknown {unknown}; the config's objectives are {available}")
    if repeated := sorted({name for name in names if names.count(name) > 1}):  # measured twice, on lent GPU time
        raise UserError(f"--objectives {requested!r} names {', '.join(repeated)} more than once: list each once")
    return names


def shapes_the_step(callback, objective: str) -> bool:
    """A STEP_WORK callback, except a freeze of another objective's phase (it would do nothing here)."""
    if isinstance(callback, LayerFreeze):
        return callback.during == objective
    return isinstance(callback, STEP_WORK)


def measure(cli, objective: str, warmup: int, steps: int) -> Measurement:
    """Fit with ``objective`` fixed and only the step-shaping callbacks, for warm-up + measured steps."""
    trainer, model = cli.trainer, cli.model
    model.set_objective(config_objectives(cli)[objective])
    window = StepWindow(warmup, steps)
    trainer.callbacks = [c for c in trainer.callbacks if shapes_the_step(c, model.objective.name)] + [window]
    release_memory()  # the previous objective's model and optimizer state, before this one's memory counts
    trainer.fit(model, datamodule=cli.datamodule)
    if window.measurement is None:
        raise UserError(
            f"{objective}: training stopped at step {trainer.global_step}, before the {warmup + steps} "
            "the bench needs (a callback stopped it, or the data ran out)"
        )
    return window.measurement


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {os.cpu_count()} cores)"


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": installed("transformers"),
        "lightning": installed("lightning"),
        "flash_attn": installed("flash_attn"),
    }


def describe_setup(cli, peak_tflops: float | None = None) -> dict:
    """The run's hardware and batch layout, read from the trainer after a fit (accumulation is set by then)."""
    trainer, data = cli.trainer, cli.datamodule
    device = trainer.strategy.root_device
    dtype = compute_dtype(trainer)
    return {
        "device": device_name(device),
        "accelerator": device.type,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": trainer.precision,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "peak_flops_per_device": peak_tflops * 1e12 if peak_tflops else peak_flops(device, dtype),
        "attn_implementation": cli.model.hparams.attn_implementation,
        "compile": cli.model.hparams.compile,
        "loss_chunk_size": cli.model.hparams.loss_chunk_size,
        "micro_batch_size": getattr(data, "micro_batch_size", None),
        "block_size": getattr(data, "block_size", None),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
    }


def result_row(objective: str, m: Measurement, steps: int, setup: dict) -> dict:
    """Per-step and per-second figures from one measurement (tokens and FLOPs over all devices)."""
    world = setup["world_size"]
    tokens, flops = m.tokens * world, None if m.flops is None else m.flops * world
    masked = None if m.document_masked_flops is None else m.document_masked_flops * world
    peak_flops = setup["peak_flops_per_device"]
    return {
        "objective": objective,
        "tokens_per_s": tokens / m.seconds,
        "tokens_per_s_per_device": tokens / m.seconds / world,
        "step_time_s": m.seconds / steps,
        "micro_batches_per_step": m.micro_batches / steps,
        "tokens_per_step": tokens / steps,
        "flops_per_token": None if flops is None else flops / tokens,
        "mfu": None if flops is None or not peak_flops else flops / m.seconds / world / peak_flops,
        "document_masked_flops_per_token": None if masked is None else masked / tokens,
        "mfu_document_masked": None if masked is None or not peak_flops else masked / m.seconds / world / peak_flops,
        "peak_memory_gib": None if m.peak_memory_bytes is None else m.peak_memory_bytes / 2**30,
        "measured_seconds": m.seconds,
    }


def null_notes(setup: dict) -> list[str]:
    """Why a column is null, in words (the JSON and the table both say it)."""
    notes = []
    if setup["accelerator"] != "cuda":
        notes.append(f"peak_memory_gib is null: {setup['accelerator']} has no allocator peak statistic (CUDA only)")
    if setup["peak_flops_per_device"] is None:
        notes.append(
            f"mfu is null: no peak figure for {setup['device']} in {setup['compute_dtype']} (Lightning's "
            "get_available_flops, cpt_lightning/peak_flops.py); pass --peak-tflops"
        )
    return notes


def release_memory() -> None:
    """Free what earlier builds left: trainer ↔ module hold a cycle, and the parser keeps the latest CLI reachable."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(args: argparse.Namespace, overrides: list[str]) -> Iterator[dict]:
    """Measure each chosen objective on its own fresh build; the first build also lists the objectives.

    Yields the report after every objective, so a run stopped during a later one (a time limit on a
    lent GPU, an out-of-memory error) has already written the rows it measured."""
    check_arguments([*config_options(args.config), *overrides])  # once: its warnings said once, not per objective
    cli = build_cli(args.config, overrides, args.warmup + args.steps, args.out)
    names = choose(list(config_objectives(cli)), args.objectives)
    rows, setup = [], None
    for name in names:
        cli = cli or build_cli(args.config, overrides, args.warmup + args.steps, args.out)
        measurement = measure(cli, name, args.warmup, args.steps)
        setup = setup or describe_setup(cli, args.peak_tflops)
        rows.append(result_row(name, measurement, args.steps, setup))
        cli = None  # the next objective's build must not keep this one alive
        missing = names[len(rows):]
        yield {
            "config": args.config,
            "overrides": overrides,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **setup,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "versions": versions(),
            "flop_count": FLOP_COUNT,
            "notes": null_notes(setup) + ([f"incomplete: {', '.join(missing)} not measured"] if missing else []),
            "not_measured": missing,
            "results": list(rows),
        }


@rank_zero_only
def publish(report: dict, out: Path) -> None:
    """Write the report so far; print its table once every objective is in it, else the latest row."""
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_beside(out, lambda path: path.write_text(text), "bench report")  # a kill mid-write keeps the rows before
    if report["not_measured"]:
        row = report["results"][-1]
        print(f"{row['objective']}: {cell(row['tokens_per_s_per_device'], ',.0f')} tokens/s/device, MFU "
              f"{cell(row['mfu'], '.1%')}, peak {cell(row['peak_memory_gib'], '.2f')} GiB (in {out})", flush=True)
        return
    print(format_table(report))
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    try:
        args, overrides = parse_args(argv)
        for report in run_bench(args, overrides):
            publish(report, args.out)
    except SIGTERMException:  # a SystemExit without a code: the job ended 0 as if it had measured everything
        print(f"preempted (SIGTERM): {args.out} holds the objectives measured before it, if any; rerun to measure "
              "them all", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt as err:
        return report_interrupt(err)
    except Exception as err:  # LightningCLI wraps the UserErrors raised while it builds the run
        return report_user_error(err)
    return 0
