"""scripts/torchrun/train.sh's own behaviour, with a stand-in for ``cpt fit`` (the real one trains under the script in
tests/test_distributed.py): a worker whose save after SIGTERM takes seconds, and a machine without a working nvidia-smi."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torchrun" / "train.sh"
SAVE_SECONDS = 3

# Found first on sys.path (python -m puts the working directory there): notes SIGTERM, "saves" for SAVE_SECONDS as
# PreemptionCheckpoint finishes a step and writes last.ckpt, then exits 143 as cpt fit does.
STAND_IN_CLI = f"""
import signal, sys, time
from pathlib import Path
signalled = []
signal.signal(signal.SIGTERM, lambda *args: signalled.append(1))
Path("started").touch()
while not signalled:
    time.sleep(0.05)
time.sleep({SAVE_SECONDS})
Path("last.ckpt").touch()
sys.exit(143)
"""


@pytest.fixture
def stand_in(tmp_path) -> Path:
    package = tmp_path / "cpt_lightning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(STAND_IN_CLI)
    return tmp_path


@pytest.mark.parametrize("shutdown_timeout, saved", [(None, True), ("1", False)], ids=["default", "1s"])
def test_a_sigterm_leaves_the_workers_the_shutdown_timeout_to_save(stand_in, shutdown_timeout, saved):
    """torchrun's own 30 s before it kills a signalled worker cut a step plus a sharded save short; the script's
    default leaves 600 (SHUTDOWN_TIMEOUT). torchrun then exits 1, as the script says, whatever the workers did."""
    env = {**os.environ, "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    if shutdown_timeout is not None:
        env["SHUTDOWN_TIMEOUT"] = shutdown_timeout
    launcher = subprocess.Popen(["bash", str(SCRIPT), "config.yaml"], cwd=stand_in, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (stand_in / "started").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler signals the job's main process
        log = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert (stand_in / "last.ckpt").exists() == saved, log[-3000:]
    assert launcher.returncode == 1, log[-3000:]


@pytest.mark.parametrize("nvidia_smi", ["missing", "failing"])
def test_no_gpu_to_count_says_to_set_nproc_per_node(tmp_path, nvidia_smi):
    """Under ``set -euo pipefail`` a missing or failing nvidia-smi ended the script at once, with its exit code
    (127, 9) and nothing said; the message the script has for it never printed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    if nvidia_smi == "failing":
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "NPROC_PER_NODE"}
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), "config.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, env={**env, "PATH": str(bin_dir), "PYTHON": sys.executable}, timeout=60)
    assert (result.returncode, result.stderr) == (2, "error: no GPU found; set NPROC_PER_NODE\n")


LISTINGS = {"4 GPUs": "for i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100\"; done",
            "1 GPU in MIG mode": "echo 'GPU 0: NVIDIA A100'; echo '  MIG 3g.40gb Device 0:'; echo '  MIG 3g.40gb Device 1:'"}


@pytest.mark.parametrize("visible, processes, listing", [
    (None, "4", "4 GPUs"), ("0,2", "2", "4 GPUs"), ("3", "1", "4 GPUs"), ("GPU-a1,GPU-b2", "2", "4 GPUs"),
    ("", None, "4 GPUs"), ("-1", None, "4 GPUs"), ("0,-1,2", "1", "4 GPUs"), (None, "1", "1 GPU in MIG mode")])
def test_the_default_process_count_is_the_gpus_this_job_sees(tmp_path, visible, processes, listing):
    """nvidia-smi lists every GPU of the node: a job given two of four by CUDA_VISIBLE_DEVICES started four workers.
    CUDA sees none from a negative index on (``-1`` hides them all), and a GPU in MIG mode lists its instances under
    it: both started a worker too many."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{LISTINGS[listing]}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')  # shows what torchrun would be given
    (tmp_path / "python").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=str(bin_dir), PYTHON=str(tmp_path / "python"),
               **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}))
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), "config.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=60)
    if processes is None:  # the job sees no GPU
        assert (result.returncode, result.stderr) == (2, "error: no GPU found; set NPROC_PER_NODE\n")
        return
    assert result.returncode == 0, result.stderr
    assert f"--nproc-per-node {processes} " in result.stdout and f"--trainer.devices {processes}" in result.stdout
