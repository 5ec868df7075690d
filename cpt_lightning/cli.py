"""The ``cpt`` command: training through LightningCLI, data and tooling subcommands beside it."""

from __future__ import annotations

import sys
from importlib import import_module

from cpt_lightning.errors import PREEMPTED_EXIT_CODE, one_line, report_interrupt, report_user_error
from cpt_lightning.launched_ranks import ranks_follow_their_starter

# name → (module with ``main(argv) -> int``, one-line help)
TOOLS = {
    "prepare": ("cpt_lightning.data.prepare", "raw corpora → LitData token chunks (one dir per source)"),
    "data": ("cpt_lightning.data.sample", "data sample: write the real offline sample corpus + tokenizer"),
    "export": ("cpt_lightning.export", "checkpoint → Hugging Face folder (config, safetensors, tokenizer, card)"),
    "evaluate": ("cpt_lightning.evaluate", "fine-tune encoders on NER / classification tasks, F1 tables"),
    "analyze": ("cpt_lightning.analysis", "per-layer CKA and weight drift between models"),
    "bench": ("cpt_lightning.bench", "training throughput per objective: tokens/s/device, step time, MFU, peak memory"),
}
TRAINING = {
    "fit": "train (e.g. cpt fit --config configs/demo_cpu.yaml)",
    "validate": "evaluate a checkpoint on the validation data",
}

USAGE = "usage: cpt COMMAND [ARGS]   (cpt COMMAND --help for its options)\n\ncommands:\n" + "".join(
    f"  {name:<10} {text}\n" for name, text in {**TRAINING, **{k: v[1] for k, v in TOOLS.items()}}.items()
)


def preempted_message(saved_checkpoint, saves_nothing: str | None = None) -> str:
    """What a preempted run left to resume from: without callbacks.PreemptionCheckpoint, nothing was saved
    at the stop, and the resume hint pointed at a last.ckpt that might not exist (a restart from step 0).
    ``saves_nothing``: what was stopped that saves nothing by design (a fast_dev_run, cpt validate)."""
    if saves_nothing:
        return f"preempted (SIGTERM) during {saves_nothing}: it saves nothing, so rerun it as it was"
    if saved_checkpoint is not None:
        return f"preempted (SIGTERM): rerun the same command with --ckpt_path last to resume (saved {saved_checkpoint})"
    return ("preempted (SIGTERM) without a checkpoint of this step (the config has no callbacks.PreemptionCheckpoint "
            "and a checkpoint callback): --ckpt_path last resumes from the run's newest checkpoint, if it saved one, "
            "and the steps since are trained again")


def run_training(argv: list[str]) -> int:
    # Imported here: `cpt prepare` / `cpt data` need neither Lightning nor transformers.
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cpt_lightning.config_files import check_arguments
    from cpt_lightning.training_cli import CptCLI

    try:
        check_arguments(argv)
        CptCLI(None if argv == sys.argv[1:] else argv)  # None: LightningCLI reads sys.argv itself
    except SIGTERMException as err:
        print(preempted_message(getattr(err, "saved_checkpoint", None), getattr(err, "saves_nothing", None)),
              file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except MisconfigurationException as err:  # Lightning's refusal of settings that meet once the run has started
        print(f"error: {one_line(err)}", file=sys.stderr)  # (logger: false beside a LearningRateMonitor)
        return 2
    except Exception as err:
        return report_user_error(err)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one ``cpt`` command. ``argv`` None: the process's own command line, which ends with the command
    (``cpt``, ``python -m cpt_lightning.cli``, the ranks Lightning starts with the same command line)."""
    the_process_ends_with_it = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)  # asked for, or the failure's message
        return 0 if argv else 2
    command = argv[0]
    if command not in TOOLS and command not in TRAINING:
        print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        with ranks_follow_their_starter():  # first: rank 0 may fail while a rank it started imports torch
            if command in TOOLS:
                return import_module(TOOLS[command][0]).main(argv[1:])
            return run_training(argv)
    except KeyboardInterrupt as err:  # a Ctrl-C in the first seconds, while torch and transformers are imported
        return report_interrupt(err)
    finally:
        destroy_process_group()
        if the_process_ends_with_it:
            leave_the_heap_out_of_the_collections_at_exit()


def destroy_process_group() -> None:
    """Shut down the process group a multi-device run started, while the interpreter is still alive.

    Lightning does it at exit for NCCL only. A gloo group left to interpreter teardown has worker threads
    that may still drop tensors after Python is gone: the process then aborted ("terminate called without
    an active exception", exit -6 or 134) after a run that had succeeded or printed its one-line error.
    """
    distributed = sys.modules.get("torch.distributed")  # never imported by the data tools: nothing to do
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def leave_the_heap_out_of_the_collections_at_exit() -> None:
    """Collect once, then freeze every object: Python's shutdown collects several times, and each pass walks
    the ~490k objects torch, Lightning and transformers leave (0.25 s a pass on a 2-core box). A finished
    `cpt fit` took 1.6 s from its last line to its exit, on every rank; 0.5 s with this. The collection here
    finalizes what the command left unreachable while the modules it may need are there (shutdown's passes ran
    such a ``__del__`` after ``open`` was gone), and refcounting frees the rest as shutdown clears the modules.
    Never for an in-process caller: frozen objects are never collected, so its later garbage would pile up."""
    import gc

    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
