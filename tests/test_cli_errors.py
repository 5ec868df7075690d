"""Config mistakes fail before training with one line naming the field to fix."""

import signal

import pytest
import yaml

from cpt_lightning.parse_errors import condense_parse_error

JSONARGPARSE_UNKNOWN_CLASS = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'callbacks.ObjectiveSchedule':
        Parser key "phases":
          Problem with given class_path 'callbacks.Phase':
            Parser key "objective":
              Problem with given class_path 'cpt_lightning.objectives.CasualLM':
                module 'cpt_lightning.objectives' has no attribute 'CasualLM'
    - Not a valid subclass of Callback
    - Expected a <class 'NoneType'>
  Given value type: <class 'list'>"""


def test_condensed_error_is_the_path_to_the_problem():
    assert condense_parse_error(JSONARGPARSE_UNKNOWN_CLASS) == (
        "trainer.callbacks → callbacks.ObjectiveSchedule → phases → callbacks.Phase → objective → "
        "cpt_lightning.objectives.CasualLM: module 'cpt_lightning.objectives' has no attribute 'CasualLM'"
    )


def test_a_budget_written_as_a_float_gets_the_whole_number_to_write(tmp_path, capsys):
    """`tokens: 50e9` is the natural way to write a budget; YAML reads it as a float and the int field refused
    it with no hint why."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    config = (ROOT / "configs/demo_cpu.yaml").read_text().replace("tokens: 102400 ", "tokens: 1.024e5 ")
    (tmp_path / "floats.yaml").write_text(config)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "floats.yaml"), "--print_config"])
    assert capsys.readouterr().err.strip().endswith(
        "tokens: Expected a <class 'int'>. Got value: 102400.0 (a number written 1e5 is a float in YAML: write 102_400)")


@pytest.mark.parametrize("mistake, error", [
    (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3; did you mean --trainer.max_steps?"),
    (["--data.init_args.micro_batch", "3"], "data → cpt_lightning.data.PackedDataModule: Option 'micro_batch' is not "
                                            "accepted; did you mean micro_batch_size?"),
    (["--trainer.callbacks+=callbacks.LayerFreeze", "--trainer.callbacks.init_args.layrs", "0"],
     "trainer.callbacks → callbacks.LayerFreeze: Option 'layrs' is not accepted; did you mean layers?"),
    ({"trainer": {"max_stepz": 1}}, "Group 'trainer' does not accept option 'max_stepz'; did you mean "
                                    "trainer.max_steps?"),
    ({"trainer": {"max_stepz": 1}, "print_config": False},  # the same file without --print_config
     "Subcommand 'fit' does not accept option 'trainer.max_stepz'; did you mean trainer.max_steps?"),
    ({"model": {"init_args": {"learning_rat": 1}}}, "model → cpt_lightning.EncoderPretraining: Option 'learning_rat' "
                                                    "is not accepted; did you mean learning_rate?"),
    (["--trainer.bogus", "3"], "unrecognized arguments: --trainer.bogus 3"),  # nothing near it: no guess
], ids=["option", "data-argument", "callback-argument", "file-key", "file-key-fit", "file-model-argument",
        "no-guess"])
def test_a_misspelt_setting_gets_the_nearest_one(mistake, error, tmp_path, capsys):
    """jsonargparse named a misspelt setting, on the command line or in a config file, but not the one meant."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    printed = ["--print_config"]  # nothing trains if the mistake were taken
    if isinstance(mistake, dict):
        printed = printed if mistake.pop("print_config", True) else []
        (tmp_path / "mistake.yaml").write_text(yaml.safe_dump(mistake))
        mistake = ["--config", str(tmp_path / "mistake.yaml")]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/demo_cpu.yaml"), *mistake, *printed])
    assert capsys.readouterr().err.strip() == f"error: {error}"


def test_plain_messages_pass_through():
    message = "Subcommand 'fit' does not accept option 'trainer.max_epoch'"
    assert condense_parse_error(message) == message


@pytest.mark.parametrize("message, condensed", [
    ("Unexpected config:", "a --config file holds nothing: a config is a YAML mapping of model:, data: and trainer: "
     "settings, e.g. configs/demo_cpu.yaml"),
    # without a subcommand's prefix (fit.model), as CptCLI(run=False) in cpt bench says it
    ("the following arguments are required: model", "the following arguments are required: model; a run's model:, "
     "data: and trainer: settings come from a config, e.g. cpt fit --config configs/demo_cpu.yaml"),
    ('Parser key "trainer.callbacks":\n  Unexpected import path format: recipe/callbacks/checkpoints.yml',
     "trainer.callbacks: no such file: recipe/callbacks/checkpoints.yml (a relative path is read from the folder of "
     "the file naming it)"),
    # a class path mistyped with slashes is not a missing file
    ('Parser key "trainer.callbacks":\n  Unexpected import path format: callbacks/ObjectiveSchedule',
     "trainer.callbacks: Unexpected import path format: callbacks/ObjectiveSchedule"),
    # a fraction where an int goes is no whole number written as a float: no hint to write it whole
    ('Parser key "tokens":\n  Expected a <class \'int\'>. Got value: 1024.5',
     "tokens: Expected a <class 'int'>. Got value: 1024.5"),
])
def test_condensed_errors_name_the_fix_only_where_it_applies(message, condensed):
    assert condense_parse_error(message) == condensed


def test_an_exception_chain_that_loops_is_reported_not_followed_forever():
    """A full disk under Lightning's error handling chains OSError → ValueError (raised from it) → the same
    OSError again; following __cause__/__context__ without a memory spun forever, so the job never exited."""
    import threading

    from cpt_lightning.errors import file_system_refusal, user_error_in

    disk_full = OSError(28, "No space left on device")
    logging_failed = ValueError("could not log")
    logging_failed.__cause__, disk_full.__context__ = disk_full, logging_failed
    found = []
    search = threading.Thread(target=lambda: found.append(user_error_in(disk_full)), daemon=True)
    search.start()
    search.join(timeout=10)
    assert found == [None]
    assert file_system_refusal(ValueError("a bug")) is None
    search = threading.Thread(target=lambda: found.append(file_system_refusal(logging_failed)), daemon=True)
    search.start()
    search.join(timeout=10)
    assert found[1] == "No space left on device (free space on that disk)"


def test_a_full_disk_or_a_read_only_folder_is_one_line_in_fit_and_in_every_tool(capsys):
    """TensorBoard's writer on a full disk, a read-only run folder, an export onto a full disk: 140-line tracebacks
    (exit 1) through Lightning, where the user's fix is the machine's."""
    import errno

    from cpt_lightning.errors import command, report_user_error

    read_only = OSError(errno.EROFS, "Read-only file system", b"runs/demo/events.out.tfevents.1")
    failed = RuntimeError("logger.finalize failed")
    failed.__context__ = read_only
    assert report_user_error(failed) == 2
    assert capsys.readouterr().err == ("error: Read-only file system: runs/demo/events.out.tfevents.1 (give a folder "
                                       "this user can write)\n")

    @command
    def tool(argv):
        if argv == ["ctrl-c"]:  # inside a lazy import (matplotlib's backend): an ImportError from the interrupt
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as err:
                raise ImportError("initialization failed") from err
        raise OSError(errno.ENOSPC if argv == ["full"] else errno.ENOENT, "as the tool met it")

    assert tool(["ctrl-c"]) == 130 and capsys.readouterr().err == "error: interrupted\n"

    assert tool(["full"]) == 2 and capsys.readouterr().err == "error: No space left on device (free space on that disk)\n"
    with pytest.raises(FileNotFoundError):  # not the machine's to fix: its traceback
        tool(["missing"])
    with pytest.raises(ValueError, match="a bug"):
        report_user_error(ValueError("a bug"))


def test_a_user_error_is_found_through_causes_and_contexts():
    """Wrapped ``from`` it (jsonargparse) or raised while handling it (an ``except`` block without ``from``)."""
    from cpt_lightning.errors import UserError, user_error_in

    cause = UserError("data.init_args.sources: no such folder")
    wrapped, handled = ValueError("could not instantiate"), RuntimeError("while cleaning up")
    wrapped.__cause__, handled.__context__ = cause, cause
    assert user_error_in(wrapped) is cause and user_error_in(handled) is cause
    assert user_error_in(ValueError("a bug")) is None


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    import torch

    from cpt_lightning.devices import resolve_device
    from cpt_lightning.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda:1: no CUDA device here"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match="--device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(UserError, match="--device meta: holds no data"):
        resolve_device("meta")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    backends = {"mps": torch.backends.mps, "xpu": torch.xpu, "hpu": getattr(torch, "hpu", None)}
    lacking = [name for name, backend in backends.items() if backend is None or not backend.is_available()]
    for name in lacking:  # each backend fails in its own way (RuntimeError, AssertionError, ModuleNotFoundError)
        with pytest.raises(UserError, match=f"--device {name}: not usable here") as refused:
            resolve_device(name)
        assert len(str(refused.value)) < 200  # torch's message for mps lists every backend: 5,000 characters


def test_a_failed_run_config_write_keeps_the_previous_one(tmp_path):
    """jsonargparse opened config.yaml for writing in place: a full disk left a rerun's folder with an
    empty config, which cpt export then copied into the model card."""
    import errno
    from pathlib import Path
    from types import SimpleNamespace
    from unittest import mock

    import pytest

    from cpt_lightning.errors import UserError
    from cpt_lightning.training_cli import SaveConfigOnceTraining

    class Parser:
        def dump(self, config, **kwargs):
            return "seed_everything: 1\ntrainer: {}\n"

    def full_disk(path, text):
        with open(path, "w") as partial:
            partial.write(text[:10])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "config.yaml").write_text("the run's config\n")
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda x: x))
    with (mock.patch.object(Path, "write_text", full_disk),
          pytest.raises(UserError, match=r"could not write the run config .*config.yaml \(No space left on device; "
                                         r"free space on that disk\)")):
        SaveConfigOnceTraining(Parser(), config={}).on_before_backward(trainer, None, None)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "the run's config\n"


def test_a_resume_under_another_config_keeps_the_config_it_replaces(tmp_path):
    """A longer decay, or a branch that kept the parent's run name, overwrote the config.yaml that trained
    the steps before it; a requeue (the same config, another --ckpt_path) keeps nothing."""
    from types import SimpleNamespace

    from cpt_lightning.training_cli import SaveConfigOnceTraining

    class Writes:
        def __init__(self, text):
            self.text = text

        def dump(self, config, **kwargs):
            return self.text

    def resume(text, step):
        trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, global_step=step)
        callback = SaveConfigOnceTraining(Writes(text), config={})
        callback.on_before_backward(trainer, None, None)
        checkpoint = {}
        callback.on_save_checkpoint(trainer, None, checkpoint)
        assert checkpoint == {"run_config": text, "data_digests": {}}  # each holds the config that trained it

    resume("tokens: 6\nckpt_path: null\n", 0)
    resume("tokens: 6\nckpt_path: last\n", 3)  # a requeue
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    resume("tokens: 9\nckpt_path: last\n", 6)  # the decay made longer
    resume("tokens: 12\nckpt_path: last\n", 6)  # and again from the same step
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "config.yaml": "tokens: 12\nckpt_path: last\n",
        "config-before-step000000006.yaml": "tokens: 6\nckpt_path: last\n",
        "config-before-step000000006-2.yaml": "tokens: 9\nckpt_path: last\n",
    }


def test_a_rollback_keeps_the_config_that_trained_the_steps_before_it(tmp_path):
    """After a rollback the config.yaml beside the run is a later resume's: it was kept as config-before-stepS.yaml,
    the file `cpt export --run-config` takes for the steps up to S, which it never trained. The checkpoint's own
    record is the config that did."""
    from types import SimpleNamespace

    from cpt_lightning.training_cli import SaveConfigOnceTraining

    class Writes:
        def __init__(self, text):
            self.text = text

        def dump(self, config, **kwargs):
            return self.text

    def resume(text, step, trained=None):
        trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, global_step=step)
        callback = SaveConfigOnceTraining(Writes(text), config={})
        if trained is not None:  # what on_load_checkpoint reads from the checkpoint resumed from
            callback.restored = {"run_config": trained, "data_digests": {}, "config_history": None, "global_step": step}
        callback.on_before_backward(trainer, None, None)

    a, b, c = "learning_rate: 0.001\n", "learning_rate: 0.0005\n", "learning_rate: 0.0002\n"
    resume(a, 0)
    resume(b, 10, trained=a)  # steps 10 on under B
    resume(a, 5, trained=a)  # back to step 5, which A trained, under A: nothing to keep
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "config.yaml": a, "config-before-step000000010.yaml": a}
    resume(b, 10, trained=a)
    resume(c, 5, trained=a)  # back to step 5 under C: A trained the steps before it, not B
    resume(c, 5, trained=a)  # and again: kept already
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "config.yaml": c, "config-before-step000000010.yaml": a, "config-before-step000000005.yaml": a}


def test_the_run_config_is_written_once_not_at_every_backward(tmp_path):
    """on_before_backward runs for every micro-batch: only the first writes config.yaml."""
    from types import SimpleNamespace

    from cpt_lightning.training_cli import SaveConfigOnceTraining

    class Parser:
        def dump(self, config, **kwargs):
            return "tokens: 6\n"

    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, global_step=0)
    callback = SaveConfigOnceTraining(Parser(), config={})
    callback.on_before_backward(trainer, None, None)
    (tmp_path / "config.yaml").unlink()
    callback.on_before_backward(trainer, None, None)
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_config_that_is_not_yaml_is_kept_when_it_differs(tmp_path):
    """A config.yaml edited by hand into invalid YAML cannot be compared key by key: any change keeps it."""
    from cpt_lightning.training_cli import keep_replaced_config

    previous, new = tmp_path / "config.yaml", tmp_path / ".config.yaml.partial"
    previous.write_text("tokens: [6\n")
    new.write_text("tokens: [6\n")
    keep_replaced_config(previous, new, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.yaml.partial", "config.yaml"]
    new.write_text("tokens: 9\n")
    keep_replaced_config(previous, new, 3)
    assert (tmp_path / "config-before-step000000003.yaml").read_text() == "tokens: [6\n"


def test_a_tool_reports_its_user_error_in_one_line_and_keeps_a_bugs_traceback(capsys):
    """A bug raised while handling a UserError was printed as that UserError (exit 2), hiding the bug."""
    import pytest

    from cpt_lightning.errors import UserError, command

    @command
    def tool(argv):
        if argv == ["bad"]:
            raise UserError("--input bad: no such file")
        try:
            raise UserError("handled")
        except UserError:
            return {}["missing"]

    assert tool(["bad"]) == 2 and capsys.readouterr().err == "error: --input bad: no such file\n"
    with pytest.raises(KeyError):
        tool(["bug"])


def test_a_ctrl_c_while_a_command_is_imported_is_one_line(monkeypatch, capsys):
    """torch and transformers take seconds to import: a Ctrl-C then ended in a traceback of the import machinery."""
    import cpt_lightning.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "import_module", interrupted)
    monkeypatch.setattr(cli, "run_training", interrupted)
    for command in ("evaluate", "fit"):
        assert cli.main([command, "--help"]) == 130
        assert capsys.readouterr().err == "error: interrupted\n"


@pytest.mark.parametrize("ends", ["returns", "KeyboardInterrupt"])
def test_the_command_shuts_down_the_process_group_its_run_started(monkeypatch, tmp_path, ends):
    """A gloo group left to interpreter teardown made a finished 2-process fit abort now and then (exit -6,
    "terminate called without an active exception"): Lightning destroys the group at exit for NCCL only."""
    import torch.distributed

    import cpt_lightning.cli as cli

    def multi_device_run(argv):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if ends == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(cli, "run_training", multi_device_run)
    assert cli.main(["fit"]) == (0 if ends == "returns" else 130)
    assert not torch.distributed.is_initialized()


def test_a_sigterm_to_a_tool_cleans_up_as_a_ctrl_c_does_and_exits_143(tmp_path):
    """A tool died of SIGTERM at once: a preempted export left its staging folder of weights (gigabytes, every
    retry), a data sample its pool workers running. The tool's process raises it as Ctrl-C's kin; a forked worker
    still dies of it, as a pool's terminate() expects. Run as a process of its own, as a tool runs (the main thread)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from cpt_lightning.errors import command

        @command
        def tool(argv):
            staging = Path({str(tmp_path)!r}) / ".out.tmp"
            staging.mkdir()
            try:
                started, ready = os.pipe()
                worker = os.fork()
                if worker == 0:  # past the fork (a signal in it is dropped): a pool worker at work
                    os.write(ready, b"1")
                    time.sleep(30)
                    os._exit(0)
                os.read(started, 1)
                os.kill(worker, signal.SIGTERM)
                print("worker status", os.waitpid(worker, 0)[1], flush=True)  # killed by it, not raising there
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises before this ends
            finally:
                staging.rmdir()
            return 0

        sys.exit(tool([]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143 and done.stderr == "error: terminated (SIGTERM)\n", done.stderr
    assert done.stdout == f"worker status {int(signal.SIGTERM)}\n" and not list(tmp_path.iterdir())


def test_a_sigterm_python_drops_is_recorded_for_the_tool_and_not_printed(monkeypatch):
    """A SIGTERM landing in logging's at-fork hook (a pool forking a worker) raised its Terminated where Python
    only prints "Exception ignored": `cpt prepare` ran on, replaced its output and exited 0 (seen in CI). The
    signal is recorded for the tool to raise again, and the dropped exception is not printed as a traceback.
    A tool run by another's main shares the record; the next tool starts without it."""
    import sys

    from cpt_lightning.errors import sigterm_raises, sigterm_received
    from helpers import in_a_finalizer

    reported = []  # what Python's hook would print on stderr

    def report(unraisable):
        reported.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", report)

    def broken():
        raise ValueError("not a SIGTERM")

    handler = signal.getsignal(signal.SIGTERM)
    with sigterm_raises():
        with sigterm_raises():  # `cpt evaluate` running `cpt pubmed-tasks`' main
            assert not sigterm_received()
            in_a_finalizer(lambda: signal.raise_signal(signal.SIGTERM))
        assert sigterm_received()
        in_a_finalizer(broken)  # other ignored exceptions are still reported
    assert not sigterm_received() and signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is report
    assert [repr(error) for error in reported] == ["ValueError('not a SIGTERM')"]


def test_a_tool_run_in_a_thread_installs_no_sigterm_handler():
    """Signal handlers are the main thread's: a tool's main run in a thread (a notebook's worker, a test runner's)
    raised "signal only works in main thread"."""
    import threading

    from cpt_lightning.errors import sigterm_raises, sigterm_received

    failures = []

    def tool():
        try:
            with sigterm_raises():
                assert not sigterm_received()
        except BaseException as err:
            failures.append(err)

    worker = threading.Thread(target=tool)
    worker.start()
    worker.join()
    assert failures == []


def test_a_ctrl_c_in_a_command_is_one_line_without_cpts_main(capsys):
    """`python -m cpt_lightning.data.prepare` runs a tool without `cpt`'s main around it: a Ctrl-C is still one
    line and 130."""
    from cpt_lightning.errors import command

    @command
    def tool(argv):
        raise KeyboardInterrupt

    try:
        code = tool([])
    except KeyboardInterrupt:  # raised on, it would stop pytest itself
        pytest.fail("a Ctrl-C escaped the command: a traceback, not one line")
    assert code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_a_user_error_spanning_lines_is_reported_in_one(capsys):
    from cpt_lightning.errors import UserError, report_user_error

    failed = RuntimeError("could not instantiate")
    failed.__cause__ = UserError("model.init_args.tokenizer: cannot load\n  'x'")
    assert report_user_error(failed) == 2
    assert capsys.readouterr().err == "error: model.init_args.tokenizer: cannot load 'x'\n"


def test_each_file_system_refusal_names_its_fix():
    import errno
    import os

    from cpt_lightning.errors import file_system_refusal

    for code, fix in ((errno.EDQUOT, "free space within the quota"), (errno.EACCES, "give this user access to it"),
                      (errno.EIO, "check that disk or network mount, then retry"),
                      (errno.EFBIG, "lift the file size limit (ulimit -f)")):
        failed = RuntimeError("a library's wrapper")
        failed.__cause__ = OSError(code, os.strerror(code), "runs/demo/x")
        assert file_system_refusal(failed) == f"{os.strerror(code)}: runs/demo/x ({fix})"


def test_only_a_folder_without_any_tokenizer_file_is_said_to_hold_none(tmp_path):
    """A hub id, or a SentencePiece folder (spiece.model), keeps transformers' own reason."""
    from cpt_lightning.errors import tokenizer_load_reason

    failed = OSError("We couldn't connect to\n'https://huggingface.co' to load this file")
    said = "We couldn't connect to 'https://huggingface.co' to load this file"
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert tokenizer_load_reason(str(tmp_path / "spm"), failed) == said
    assert tokenizer_load_reason("no-such-org/no-such-model", failed) == said
    assert tokenizer_load_reason(str(tmp_path / "empty"), failed).startswith("the folder holds no tokenizer files")


def test_a_tokenizer_json_file_given_for_its_folder_is_named_so(tmp_path, tokenizer_dir, capsys):
    """Its error was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    from cpt_lightning.cli import main

    (tmp_path / "a.txt").write_text("Aspirin reduces fever.")
    assert main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--quiet",
                 "--tokenizer", str(tokenizer_dir / "tokenizer.json")]) == 2
    assert capsys.readouterr().err == (f"error: cannot load tokenizer '{tokenizer_dir / 'tokenizer.json'}': a file, not a "
                                       f"tokenizer folder: give the folder that holds it ({tokenizer_dir})\n")


def test_the_preemption_message_resumes_only_from_what_was_saved():
    """Without callbacks.PreemptionCheckpoint nothing is saved at the stop, and the hint to resume from
    last.ckpt sent the user to a checkpoint that might not exist (a silent restart from step 0)."""
    from cpt_lightning.cli import preempted_message

    assert preempted_message("runs/demo/checkpoints/last.ckpt").endswith(
        "--ckpt_path last to resume (saved runs/demo/checkpoints/last.ckpt)")
    unsaved = preempted_message(None)
    assert "without a checkpoint of this step" in unsaved and "PreemptionCheckpoint" in unsaved


def test_a_preempted_training_exits_143_with_what_it_saved(monkeypatch, capsys):
    """A requeue script tests for 128 + SIGTERM; the last line says what to resume from."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import cpt_lightning.training_cli
    from cpt_lightning.cli import main

    class PreemptedTraining:  # what CptCLI raises once callbacks.PreemptionCheckpoint has saved the step
        def __init__(self, args):
            self.args = args
            stopped = SIGTERMException()
            stopped.saved_checkpoint = "runs/demo/checkpoints/last.ckpt"
            raise stopped

    monkeypatch.setattr(cpt_lightning.training_cli, "CptCLI", PreemptedTraining)
    assert main(["fit", "--config", "demo.yaml"]) == 143
    assert capsys.readouterr().err.strip().endswith("(saved runs/demo/checkpoints/last.ckpt)")


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    """PyYAML's message spans five lines (an excerpt and a caret under it); a config or task file with a
    syntax error printed them all after `error:`."""
    import pytest

    from cpt_lightning.errors import UserError
    from cpt_lightning.evaluate.tasks import load_task

    bad = tmp_path / "task.yaml"
    bad.write_text("name: x\nlabels: [a, b\n")
    with pytest.raises(UserError) as caught:
        load_task(bad)
    assert str(caught.value) == f"{bad}: cannot read task YAML (line 3, column 1: expected ',' or ']', but got '<stream end>')"
    from cpt_lightning.analysis.probe import config_sources
    from cpt_lightning.model_card import RunConfig

    position = r"\(line 3, column 1: expected ',' or '\]', but got '<stream end>'\)$"
    with pytest.raises(UserError, match=f"^run config {bad}: unreadable {position}"):
        RunConfig.read(bad).parsed()  # cpt export --run-config
    with pytest.raises(UserError, match=f"^run config saved in the checkpoint: unreadable {position}"):
        RunConfig(bad.read_text()).parsed()
    with pytest.raises(UserError, match=f"^probe {bad}: not a readable run config {position}"):
        config_sources(RunConfig.read(bad), str(bad))  # cpt analyze --probe
    with pytest.raises(UserError, match=r"run config .*missing.yaml: unreadable \(\[Errno 2\] No such file"):
        RunConfig.read(tmp_path / "missing.yaml")
    (tmp_path / "folder.yaml").mkdir()  # not a file: one line, not IsADirectoryError's traceback
    with pytest.raises(UserError, match=r"folder\.yaml: cannot read task YAML \(.*Is a directory"):
        load_task(tmp_path / "folder.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: café\ntype: classification\n".encode("latin-1"))  # a UnicodeDecodeError traceback
    not_utf8 = r"\(invalid UTF-8: byte 0xe9 at offset 9; save the file as UTF-8\)$"
    with pytest.raises(UserError, match=f"latin1.yaml: cannot read task YAML {not_utf8}"):
        load_task(latin1)
    with pytest.raises(UserError, match=f"^run config {latin1}: unreadable {not_utf8}"):
        RunConfig.read(latin1)  # cpt export --run-config
    jsonargparse_message = ("Problems parsing config: while parsing a flow sequence\n  in \"<unicode string>\", line 2, "
                            "column 15\ndid not find expected ',' or ']'\n  in \"<unicode string>\", line 3, column 1")
    assert condense_parse_error(jsonargparse_message) == " ".join(jsonargparse_message.split())  # every line's words


def test_cpt_alone_prints_its_usage_and_fails(capsys):
    """A script calling ``cpt`` with an empty argument list must not take the usage text for success, and its
    error log must say why it failed (the usage was on stdout)."""
    from cpt_lightning.cli import main

    assert main([]) == 2 and "cpt fit" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert main(["-h"]) == 0 and "cpt fit" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_training_commands_usage_starts_with_the_command_cpt_takes_first(command, capsys):
    """It read ``usage: cpt [options] fit``: ``cpt --config X fit`` is an unknown command."""
    from cpt_lightning.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: cpt {command} [-c CONFIG]")


def test_a_mistyped_command_fails_and_names_it(capsys):
    from cpt_lightning.cli import main

    assert main(["fti", "--config", "demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'fti'") and "cpt COMMAND" in err


JSONARGPARSE_BAD_PRECISION = """Parser key "trainer.precision":
  Does not validate against any of the Union subtypes
  Subtypes: [typing.Literal[64, 32, 16], typing.Literal['16-mixed', 'bf16-mixed', '32-true'], <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>
    - Expected a typing.Literal['16-mixed', 'bf16-mixed', '32-true']
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: bf17"""


def test_a_value_no_type_of_a_union_takes_names_the_value_and_the_choices():
    """It read "trainer.precision: Expected a <class 'int'>": neither the typo nor the strings precision takes."""
    assert condense_parse_error(JSONARGPARSE_BAD_PRECISION) == (
        "trainer.precision: got bf17; expected int | Literal['16-mixed', 'bf16-mixed', '32-true'] | NoneType"
    )


def packed_data_module_error(field_error: str, given: str) -> str:
    """jsonargparse's message for a ``data.init_args`` field no type takes (data is a DataModule or None)."""
    return f"""Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'cpt_lightning.data.PackedDataModule':
{field_error}
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: {given}"""


JSONARGPARSE_FOLDER_AS_SOURCES = packed_data_module_error("""        Parser key "sources":

          - Expected a path but data/prepared/pubmed either not accessible or invalid
          - Expected a <class 'list'>. Got value: data/prepared/pubmed""",
                                                          "NestedArg(key='sources', val='data/prepared/pubmed')")
JSONARGPARSE_FOLDERS_AS_VAL_SOURCES = packed_data_module_error("""        Parser key "val_sources":
          Expected a dot import path string: data/prepared/pubmed/holdout""",
                                                               "NestedArg(key='val_sources', val=['data/prepared/pubmed/holdout'])")


JSONARGPARSE_MISSING_SOURCES_FILE = packed_data_module_error("""        Parser key "sources":

          - Expected a path but recipe/data/en_mix.yaml either not accessible or invalid
          - Expected a <class 'list'>. Got value: recipe/data/en_mix.yaml""",
                                                               "NestedArg(key='sources', val='recipe/data/en_mix.yaml')")


def test_a_sources_file_that_is_not_there_is_named_as_missing():
    """A recipe copied to another folder without its parts read "got recipe/data/en_mix.yaml; expected the path of a
    file holding it | list; sources is a list of mappings": a missing callback or phase file says no such file."""
    assert condense_parse_error(JSONARGPARSE_MISSING_SOURCES_FILE) == (
        "data → cpt_lightning.data.PackedDataModule → sources: no such file: recipe/data/en_mix.yaml (a relative path "
        "is read from the folder of the file naming it)")


def test_a_folder_where_the_sources_list_goes_shows_a_list_of_mappings():
    """``--data.init_args.sources=FOLDER`` read "got NestedArg(key='sources', val=…); expected path but FOLDER either
    not accessible or invalid | list. Got value: … | NoneType": the enclosing union's NoneType among the choices,
    and no word of what a source is."""
    example = "'[{name: pubmed, path: data/prepared/pubmed, weight: 0.6}]'"
    assert condense_parse_error(JSONARGPARSE_FOLDER_AS_SOURCES) == (
        "data → cpt_lightning.data.PackedDataModule → sources: got data/prepared/pubmed; expected the path of a file "
        f"holding it | list; sources is a list of mappings, e.g. --data.init_args.sources={example}")
    assert condense_parse_error(JSONARGPARSE_FOLDERS_AS_VAL_SOURCES) == (
        "data → cpt_lightning.data.PackedDataModule → val_sources: Expected a dot import path string: "
        f"data/prepared/pubmed/holdout; val_sources is a list of mappings, e.g. --data.init_args.val_sources={example}")


@pytest.mark.parametrize("settings, expected", [
    ("trainer.strategy.init_args.activation_checkpoint: true\n",
     "trainer.strategy → cpt_lightning.parallel.FSDP2: Option 'activation_checkpoint' is not accepted; did you mean "
     "activation_checkpointing?"),
    ("trainer.strategy.class_path: cpt_lightning.parallel.FSDP\n",
     "trainer.strategy → cpt_lightning.parallel.FSDP: module 'cpt_lightning.parallel' has no attribute 'FSDP'"),
    ("trainer.plugins:\n  - class_path: cpt_lightning.checkpointing.AtomicCheckpointI0\n",
     "trainer.plugins → cpt_lightning.checkpointing.AtomicCheckpointI0: module 'cpt_lightning.checkpointing' has no "
     "attribute 'AtomicCheckpointI0'"),
    ("trainer.callbacks:\n  - recipe/callbacks/checkpoints.yaml\n",  # "Unexpected import path format: …"
     "trainer.callbacks: no such file: recipe/callbacks/checkpoints.yaml (a relative path is read from the folder "
     "of the file naming it)"),
    ("trainer.callbacks:\n  - checkpoints.yaml\n",  # "→ checkpoints.yaml: No module named 'checkpoints'"
     "trainer.callbacks: no such file: checkpoints.yaml (a relative path is read from the folder of the file naming "
     "it)"),
], ids=["strategy-option", "strategy-class", "plugin-class", "callback-file", "callback-file-here"])
def test_a_mistake_in_the_strategy_or_a_plugin_is_named(tmp_path, capsys, settings, expected):
    """The union's first branch was kept: "trainer.strategy: Expected a <class 'str'>" for a mistyped FSDP2 option
    (recipes.md tells users to set them), "Not a valid subclass of Precision" for a mistyped plugin."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    (tmp_path / "typo.yaml").write_text(f"config: {ROOT / 'configs/en_detour.yaml'}\n{settings}")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "typo.yaml"), "--print_config"])
    assert capsys.readouterr().err.strip() == f"error: {expected}"


def test_fit_without_a_config_says_to_give_one(tmp_path, capsys):
    """jsonargparse only said "the following arguments are required: fit.model"."""
    from cpt_lightning.cli import main

    (tmp_path / "no_model.yaml").write_text("trainer:\n  max_steps: 1\n")
    for args in (["fit"], ["fit", "--config", str(tmp_path / "no_model.yaml")]):
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err
        assert err.startswith("error: the following arguments are required: ") and "model" in err
        assert "cpt fit --config configs/demo_cpu.yaml" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["validate"])
    assert "e.g. cpt validate --config runs/demo/config.yaml --ckpt_path " in capsys.readouterr().err


def test_a_list_append_inside_a_chain_of_included_files_is_refused(tmp_path, capsys):
    """jsonargparse appends (``callbacks+:``) only in a --config file that neither includes another nor is included:
    in such a chain it replaced the recipe's callbacks, even those of an earlier --config, and the run trained the
    module's MaskedLM without a schedule, with no end. The same file given as a --config of its own appends."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    recipe = ROOT / "configs" / "demo_cpu.yaml"
    appended = "  - class_path: callbacks.StepTimer\n    init_args: {duration: '00:01:00:00'}\n"
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "milestones.yaml").write_text(f"config: {recipe}\ntrainer.callbacks+:\n{appended}")
    (tmp_path / "branch.yaml").write_text("config: nested/milestones.yaml\nseed_everything: 3\n")  # read beside it
    (tmp_path / "second.yaml").write_text(f"trainer:\n  callbacks+:\n{appended}")
    (tmp_path / "includes_second.yaml").write_text("config: second.yaml\nseed_everything: 3\n")
    milestones, branch, second = tmp_path / "nested" / "milestones.yaml", tmp_path / "branch.yaml", tmp_path / "second.yaml"
    for args, appender, chain in [
        (["--config", str(milestones)], milestones, [milestones, recipe]),
        (["-c", str(branch)], milestones, [branch, milestones, recipe]),  # included by another file
        (["--config", str(recipe), f"--config={tmp_path / 'includes_second.yaml'}"], second,  # it includes nothing
         [tmp_path / "includes_second.yaml", second]),
    ]:
        assert main(["fit", *args, "--print_config"]) == 2  # printed, without the refusal
        assert capsys.readouterr().err == (
            f"error: {appender}: `trainer.callbacks+` replaces that list instead of appending to it, in a file that "
            f"includes another or is included ({' → '.join(map(str, chain))}); jsonargparse appends only in a file "
            "that --config names and that includes no other: put it in such a file, given after the others (e.g. "
            "cpt fit --config configs/en_detour.yaml --config milestones.yaml)\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe), "--config", str(tmp_path / "second.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert printed[0]["class_path"] == "callbacks.ObjectiveSchedule" and printed[-1]["init_args"]["duration"]


def test_a_sources_list_over_the_configs_needs_every_name_path_and_weight(tmp_path, capsys):
    """jsonargparse merges it entry by entry into the config's list of as many entries: a reordered mix without
    weights read each source at the weight of the config's entry in its place (case_reports at PubMed's 60%). Given
    on the command line, in a file named as its value, or in a later --config."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    reordered = "[{name: case_reports, path: a}, {name: medical_qa, path: b}, {name: pubmed, path: c}]"
    (tmp_path / "mix.yaml").write_text(reordered)
    (tmp_path / "later.yaml").write_text("data:\n  init_args:\n    sources: mix.yaml\n")  # read beside it
    (tmp_path / "dotted.yaml").write_text("data.init_args.sources: mix.yaml\n")
    (tmp_path / "half_dotted.yaml").write_text("data:\n  init_args.sources: mix.yaml\n")
    two = "[{name: medical_qa, path: b}, {name: pubmed, path: c}]"  # two sources too: weights swapped, not only moved
    for args, where in [(["--data.init_args.sources", reordered], "--data.init_args.sources"),
                        ([f"--data.sources={reordered}"], "--data.sources"),
                        (["--data.init_args.sources", two], "--data.init_args.sources"),
                        (["--data.init_args.sources", str(tmp_path / "mix.yaml")], "--data.init_args.sources"),
                        *[(["--config", str(tmp_path / name)], f"{tmp_path / name}: data.init_args.sources")
                          for name in ("later.yaml", "dotted.yaml", "half_dotted.yaml")]]:
        assert main(["fit", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), *args, "--print_config"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {where}: give every entry its weight (over the config's "
                                                  "list of as many entries, jsonargparse takes a missing one")
    # a holdout's curve drawn under another's name, or a source read from another's folder
    for option, entries, missing in [("--data.init_args.val_sources", "[{path: a}, {path: b}, {path: c}]", "name"),
                                     ("--data.val_sources", "[{name: a}]", "path"),
                                     ("--data.init_args.sources", "[{name: a, weight: 1}, {name: b, weight: 2}]", "path")]:
        assert main(["fit", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), option, entries, "--print_config"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {option}: give every entry its {missing} (over the config's "
                                                  "list of as many entries, jsonargparse takes a missing one from the "
                                                  "entry at the same place), e.g. '[{name: ")
    for option, entries in [("--data.init_args.sources", "[{name: a, path: x}]"),  # one source: its weight is all
                            ("--data.init_args.val_sources", "[{name: a, path: x}, {name: b, path: y}]")]:  # unweighed
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), option, entries, "--print_config"])
        assert "error:" not in capsys.readouterr().err


def test_an_objective_that_leaves_build_inputs_undefined_is_told_what_to_define(capsys):
    """jsonargparse said only "Expected an instantiatable class, but … is abstract" of a misspelt build_inputs."""
    from cpt_lightning.cli import main
    from test_cli import ROOT

    spec = "{misspelt: {class_path: custom_objectives.MisspeltObjective}}"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--model.init_args.val_objectives", spec])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: model → cpt_lightning.EncoderPretraining → val_objectives: Expected an instantiatable class, but "
        "custom_objectives.MisspeltObjective is abstract: it does not define build_inputs(input_ids, position_ids, "
        "generator) (see docs/objectives.md)\n")
