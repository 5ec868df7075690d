"""A rank a cpt process started ends soon after it (``cpt_lightning.launched_ranks``), and only such a rank watches.

Plain processes stand in for Lightning's: the starter names itself in ``CPT_STARTER_PID`` and sets ``LOCAL_RANK`` as
Lightning's launcher does for ranks 1…N-1. ``cpt fit`` itself: ``tests/test_distributed.py``.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from cpt_lightning.launched_ranks import STARTER_ENV

RANK = """
import os, sys, threading, time
from cpt_lightning import launched_ranks
launched_ranks.GRACE_S = 0.5
launched_ranks.follow_the_starting_rank()
watching = any(thread.name == "cpt-starter-watch" for thread in threading.enumerate())
print(os.getpid(), os.environ[launched_ranks.STARTER_ENV], watching, flush=True)
time.sleep(float(sys.argv[1]))
"""

STARTER = """
import os, signal, subprocess, sys
env = {**os.environ, "CPT_STARTER_PID": str(os.getpid()), "LOCAL_RANK": "1"}
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], "60"], env=env, stdout=subprocess.PIPE, text=True)
print(rank.stdout.readline().strip(), flush=True)  # its stderr is this one's: the test reads it
os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way: no Python code of this process runs after it
"""


def test_a_started_rank_ends_soon_after_its_starter_is_killed():
    """Before, the rank outlived its SIGKILLed starter for as long as it waited (NCCL: until its timeout)."""
    began = time.monotonic()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, RANK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = starter.communicate(timeout=20)  # returns once the rank, which shares the pipes, has ended
    except subprocess.TimeoutExpired:
        os.killpg(starter.pid, signal.SIGKILL)
        pytest.fail("the started rank was still running 20 s after its starter was killed")
    _, named_starter, watching = stdout.split()
    assert starter.returncode == -signal.SIGKILL and (named_starter, watching) == (str(starter.pid), "True")
    assert stderr.strip() == "local rank 1 stopped: the rank 0 process that started it ended 0.5 s before, and this " \
                             "rank was still running (waiting for it in a collective)"
    assert time.monotonic() - began < 15


@pytest.mark.parametrize("local_rank, starter", [
    (None, "parent"),  # a command typed by the user: starts ranks 1…N-1 itself if any
    ("0", "parent"),  # rank 0 of a launcher
    ("1", "other"),  # a torchrun or srun rank in an environment a cpt process once named itself in
], ids=["no-local-rank", "local-rank-0", "another-starter"])
def test_a_process_no_cpt_process_started_as_a_rank_names_itself_and_watches_nothing(local_rank, starter):
    env = {key: value for key, value in os.environ.items() if key != "LOCAL_RANK"}
    env[STARTER_ENV] = str(os.getpid() if starter == "parent" else os.getppid())
    if local_rank is not None:
        env["LOCAL_RANK"] = local_rank
    done = subprocess.run([sys.executable, "-c", RANK, "0"], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    pid, named, watching = done.stdout.split()
    assert named == pid and watching == "False"
