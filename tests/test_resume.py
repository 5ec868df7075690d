"""A run killed (SIGKILL) or preempted (SIGTERM) and restarted continues exactly: same rows, same losses."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from test_cli import ROWS, demo_config, scalars

pytestmark = pytest.mark.slow
CLM_STEPS, MLM_STEPS = 6, 6


def resumable_config(tmp_path, prepared_mix, tokenizer_dir, log, accumulate=1, extra_callbacks=(), checkpoint_every=1):
    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=CLM_STEPS, mlm_steps=MLM_STEPS)
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"]["num_workers"] = 1
    config["trainer"]["accumulate_grad_batches"] = accumulate  # phases keep their tokens: fewer, larger steps
    kept = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith(("TokenCheckpoint", "PreemptionCheckpoint"))]
    config["trainer"]["callbacks"] = kept + [
        {"class_path": "callbacks.TokenCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": checkpoint_every}},
        {"class_path": "callbacks.PreemptionCheckpoint"},
        {"class_path": "recorders.BatchLog", "init_args": {"path": str(log)}},
        *extra_callbacks,
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def validate_every_step(config_path, prepared_mix):
    config = yaml.safe_load(config_path.read_text())
    holdout = str(prepared_mix.dirs["pubmed"] / "holdout")
    config["data"]["init_args"]["val_sources"] = [{"name": "pubmed_holdout", "path": holdout}]
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("TokenValidation"):
            callback["init_args"]["every_n_tokens"] = 1
    config["trainer"]["log_every_n_steps"] = 1
    config_path.write_text(yaml.safe_dump(config))


def start(config, *extra, cwd):
    """``cpt fit`` in its own process group (a job step of its own: SLURM signals every process in it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed run's lines too
    return subprocess.Popen([sys.executable, "-m", "cpt_lightning.cli", "fit", "--config", str(config), *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def records(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def wait_for_step(process, log, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any(r["step"] >= step for r in records(log)):
            return
        time.sleep(0.05)
    if process.poll() is None:  # hung: its output ends only with the process group (see start)
        os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"run never reached step {step} in {timeout} s: {process.communicate()[0][-2000:]}")


def trained_steps(log):
    """step → (rows, loss); a resumed run's records overwrite the killed run's for the steps it redoes."""
    by_step = {}
    for record in records(log):
        by_step[record["step"]] = (record["rows"], record["loss"])
    return by_step


def trained_micro_batches(log):
    """step → [(rows, loss) per micro-batch]; a run's records replace an earlier run's for the same step."""
    by_step, owner = {}, {}
    for run, lines in enumerate(log.read_text().split("# resumed\n")):
        for line in lines.splitlines():
            record = json.loads(line)
            if owner.get(record["step"]) != run:
                by_step[record["step"]], owner[record["step"]] = [], run
            by_step[record["step"]].append((record["rows"], record["loss"]))
    return by_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_mix, tokenizer_dir):
    """Both phases run to the end with a checkpoint every step: its folder, config and step → (rows, loss)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    log = folder / "batches.jsonl"
    config = resumable_config(folder, prepared_mix, tokenizer_dir, log)
    run = start(config, cwd=folder)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-3000:]
    steps = trained_steps(log)
    assert sorted(steps) == list(range(CLM_STEPS + MLM_STEPS))
    return SimpleNamespace(folder=folder, config=config, log=log, steps=steps)


@pytest.fixture(scope="module")
def reference(uninterrupted):
    return uninterrupted.steps


def test_sigkill_then_resume_is_exact_however_often_it_happens(tmp_path, prepared_mix, tokenizer_dir, reference):
    """Killed in CLM (after step 2), right after the switch (6) and in MLM (9), each time resumed with
    ``--ckpt_path last``: every step's rows and loss are the uninterrupted run's. One chain of runs rather
    than a run per kill: each start costs seconds of imports, and a resume of a resumed run is checked too."""
    log = tmp_path / "batches.jsonl"
    config = resumable_config(tmp_path, prepared_mix, tokenizer_dir, log)
    resume_from = None  # the step the killed run had logged: the next run resumes near it
    for kill_after_step in (2, CLM_STEPS, CLM_STEPS + 3, None):
        run = start(config, *(("--ckpt_path", "last") if resume_from is not None else ()), cwd=tmp_path)
        if kill_after_step is not None:
            wait_for_step(run, log, kill_after_step)
            run.send_signal(signal.SIGKILL)
        output = run.communicate(timeout=600)[0]
        assert run.returncode == (0 if kill_after_step is None else -signal.SIGKILL), output[-3000:]
        if resume_from is not None:
            # resumes in the phase it was killed in: never re-enters CLM after the switch
            assert ("resuming in phase 1 (" in output) == (resume_from >= CLM_STEPS), output[-3000:]
            assert "resumed with the config's" not in output  # the same config: no optimizer setting changed
        resume_from = kill_after_step
    assert trained_steps(log) == reference


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_checkpoint(uninterrupted):
    """A requeued job reruns --ckpt_path last after the end: no step past the budget, last.ckpt untouched."""
    last = uninterrupted.folder / "ckpt" / "last.ckpt"
    before = (last.read_bytes(), uninterrupted.log.read_text())
    resumed = start(uninterrupted.config, "--ckpt_path", "last", cwd=uninterrupted.folder)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"at step {CLM_STEPS + MLM_STEPS}): nothing left to train" in output
    assert (last.read_bytes(), uninterrupted.log.read_text()) == before


def files_in(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def shorter_positions(config):
    config["model"]["init_args"]["model_config"]["max_position_embeddings"] = 32  # refused at setup


def fewer_rows(config):
    config["data"]["init_args"]["micro_batch_size"] = 2  # refused when the loader state is restored


@pytest.mark.parametrize("change, refusal", [
    (shorter_positions, "exceeds the model's max_position_embeddings"), (fewer_rows, "micro_batch_size"),
], ids=["at-setup", "at-restore"])
def test_a_refused_rerun_changes_no_file_of_the_run(uninterrupted, tmp_path, change, refusal):
    """LightningCLI used to rewrite the run's config.yaml before these checks refused the rerun, so
    the next ``cpt export`` of the run's checkpoints described the refused config."""
    config = yaml.safe_load(uninterrupted.config.read_text())
    change(config)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    before = files_in(uninterrupted.folder)
    refused = start(changed, "--ckpt_path", "last", cwd=uninterrupted.folder)
    output = refused.communicate(timeout=600)[0]
    assert refused.returncode == 2 and refusal in output, output[-3000:]
    after = files_in(uninterrupted.folder)
    assert after == before  # nor a TensorBoard events file of the refused start


def test_sigterm_saves_and_exits_143_then_resumes_exactly(tmp_path, prepared_mix, tokenizer_dir, reference):
    """An operator may signal the main process (at step 3 here); SLURM signals the whole job step, loader
    workers included (at step 8, in the resumed run). Each run saves, exits 143, and the resumes together
    train the uninterrupted run's rows and losses (validation draws no training randomness), and log each
    TensorBoard point at its step, a validation at every one: the validation due at the stop was lost, and
    every point after a resume sat one step early."""
    log = tmp_path / "batches.jsonl"
    config = resumable_config(tmp_path, prepared_mix, tokenizer_dir, log)
    validate_every_step(config, prepared_mix)
    signallers = {"main-process": lambda run: run.send_signal(signal.SIGTERM),
                  "process-group": lambda run: os.killpg(run.pid, signal.SIGTERM)}
    resume = ()
    for signal_after_step, whom in ((3, "main-process"), (8, "process-group"), (None, None)):
        run = start(config, *resume, cwd=tmp_path)
        if whom is not None:
            wait_for_step(run, log, signal_after_step)
            signallers[whom](run)
        output = run.communicate(timeout=600)[0]
        if whom is None:
            assert run.returncode == 0, output[-3000:]
        else:
            assert run.returncode == 143, f"{whom}: {output[-3000:]}"
            assert re.search(r"rerun the same command with --ckpt_path last to resume \(saved .*/last.ckpt\)", output)
        resume = ("--ckpt_path", "last")
    assert trained_steps(log) == reference
    points = scalars(tmp_path)
    tokens_per_step = ROWS * prepared_mix.block_size
    assert dict(points["train/tokens_seen"]) == {step: step * tokens_per_step for step in reference}
    # one point per step: a resume from the SIGTERM's save (after its step's validation) validates it not again
    assert {tag: sorted(step for step, _ in points[tag]) for tag in points if tag.startswith("val/")} == \
        {tag: sorted(reference) for tag in points if tag.startswith("val/")}


def test_sigint_to_the_main_process_alone_ends_the_run(tmp_path, prepared_mix, tokenizer_dir):
    """As a terminal's Ctrl-C does for the process group, a SIGINT to the main process alone (``kill -INT``, a
    scheduler) stops the run with exit 1 and the resume hint. It hung at exit: multiprocessing stops loader workers
    with SIGTERM, which they ignore (SLURM's is the main process's to act on), and waited for them forever."""
    log = tmp_path / "batches.jsonl"
    path = resumable_config(tmp_path, prepared_mix, tokenizer_dir, log, checkpoint_every=1000)
    validate_every_step(path, prepared_mix)  # as the run that hung
    run = start(path, cwd=tmp_path)
    try:
        wait_for_step(run, log, 2)
        run.send_signal(signal.SIGINT)
        output = run.communicate(timeout=60)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 1, output[-3000:]
    assert "[PreemptionCheckpoint] Ctrl-C at step" in output


def test_sigterm_mid_accumulation_finishes_the_step_first(tmp_path_factory, prepared_mix, tokenizer_dir):
    """The signal arrives after micro-batch 1 of 2 of step 1: the step completes, then the checkpoint, which
    is the only one (no periodic checkpoint, and the phase-end save comes after step 2), so the resume
    starts exactly at step 2."""
    folder = tmp_path_factory.mktemp("accumulated_reference")
    log = folder / "batches.jsonl"
    run = start(resumable_config(folder, prepared_mix, tokenizer_dir, log, accumulate=2), cwd=folder)
    assert run.communicate(timeout=600)[0] is not None and run.returncode == 0
    reference = trained_micro_batches(log)

    folder = tmp_path_factory.mktemp("accumulated_preempted")
    log = folder / "batches.jsonl"
    signal_at_step_1 = {"class_path": "recorders.SigtermAt", "init_args": {"step": 1}}
    config = resumable_config(folder, prepared_mix, tokenizer_dir, log, accumulate=2, extra_callbacks=[signal_at_step_1],
                              checkpoint_every=1000)
    run = start(config, cwd=folder)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 143, output[-3000:]
    assert "SIGTERM at step 2" in output  # step 1 was completed before saving
    with log.open("a") as f:
        f.write("# resumed\n")
    resumed = start(config, "--ckpt_path", "last", cwd=folder)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert trained_micro_batches(log) == reference
    assert all(len(micro_batches) == 2 for micro_batches in reference.values())
    assert json.loads(log.read_text().split("# resumed\n")[1].splitlines()[0])["step"] == 2  # no step redone


def test_a_run_stopped_by_its_time_limit_or_last_phase_resumes_the_stream_where_it_stopped(
        tmp_path, prepared_mix, tokenizer_dir, reference):
    """A stop that Lightning takes for the end of the epoch (``max_time``, the last phase's end) marked the mix's
    one endless epoch finished, and a finished epoch's loader position is not restored: ``--ckpt_path last``
    trained on from the stream's first rows again, without a word (an extended last phase too)."""
    log = tmp_path / "batches.jsonl"
    config = resumable_config(tmp_path, prepared_mix, tokenizer_dir, log, checkpoint_every=1000)
    stopped = start(config, "--trainer.max_time=00:00:00:01", cwd=tmp_path)
    output = stopped.communicate(timeout=600)[0]
    assert stopped.returncode == 0 and "[ObjectiveSchedule] stopped in phase" in output, output[-3000:]
    assert 0 < len(trained_steps(log)) < CLM_STEPS + MLM_STEPS  # stopped mid-stream, where the resume goes on
    resumed = start(config, "--ckpt_path", "last", "--trainer.max_time=00:01:00:00", cwd=tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert trained_steps(log) == reference

    settings = yaml.safe_load(config.read_text())  # the finished run's last phase extended by 2 steps
    (schedule,) = [c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("ObjectiveSchedule")]
    schedule["init_args"]["phases"][-1]["tokens"] += 2 * ROWS * prepared_mix.block_size
    config.write_text(yaml.safe_dump(settings))
    extended = start(config, "--ckpt_path", "last", cwd=tmp_path)
    output = extended.communicate(timeout=600)[0]
    assert extended.returncode == 0, output[-3000:]
    steps = trained_steps(log)
    assert sorted(steps) == list(range(CLM_STEPS + MLM_STEPS + 2))
    assert not {steps[step][0] for step in (12, 13)} & {rows for rows, _ in reference.values()}  # new rows, not step 0's
