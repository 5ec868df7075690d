"""A rank a cpt command started ends soon after it (``cpt_lightning.launched_ranks``), and only such a rank watches.

Plain processes stand in for Lightning's: the starter runs ``ranks_follow_their_starter`` as ``cpt`` does and starts a
rank with ``LOCAL_RANK`` 1, as Lightning's launcher does. ``cpt fit`` itself: ``tests/test_distributed.py``.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from cpt_lightning.launched_ranks import STARTER_ENV, _identity

# argv: seconds to run, seconds before the check (a rank still importing torch), a descriptor to say "checked" on
RANK = """
import os, sys, threading, time
from cpt_lightning import launched_ranks
launched_ranks.GRACE_S = 0.5
time.sleep(float(sys.argv[2]))
with launched_ranks.ranks_follow_their_starter():
    watching = any(thread.name == "cpt-starter-watch" for thread in threading.enumerate())
    print(os.getpid(), os.environ.get(launched_ranks.STARTER_ENV), watching, flush=True)
    if len(sys.argv) > 3:
        os.write(int(sys.argv[3]), b"checked")
    time.sleep(float(sys.argv[1]))
print("after", os.environ.get(launched_ranks.STARTER_ENV), flush=True)
"""

STARTER = """
import os, signal, subprocess, sys
from cpt_lightning import launched_ranks
with launched_ranks.ranks_follow_their_starter():
    checked, say_checked = os.pipe()
    waits = sys.argv[2] == "after-the-check"
    told = [str(say_checked)] if waits else []  # a rank checking after this process has gone tells nobody
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], "60", "0" if waits else "1", *told],
                            env={**os.environ, "LOCAL_RANK": "1"}, pass_fds=[say_checked])
    print(os.environ[launched_ranks.STARTER_ENV], flush=True)
    if waits:
        os.read(checked, 7)
    os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way: no Python code of this process runs after it
"""


def typed_command_environment() -> dict:
    """This process's environment without what a launcher sets: an in-process multi-device run of an earlier test
    leaves Lightning's ``LOCAL_RANK`` 0 in it."""
    return {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", STARTER_ENV)}


@pytest.mark.parametrize("killed", ["after-the-check", "before-the-check"])
def test_a_started_rank_ends_soon_after_its_starter_is_killed(killed):
    """Before, the rank outlived its SIGKILLed starter for as long as it waited (NCCL: until its timeout). A rank
    checks its starter as the command starts, but Lightning's ranks take seconds to import torch before that, and a
    rank 0 failing at once (in the process group's setup) had gone: that rank watched nothing."""
    began = time.monotonic()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, RANK, killed], env=typed_command_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = starter.communicate(timeout=20)  # returns once the rank, which shares the pipes, has ended
    except subprocess.TimeoutExpired:
        os.killpg(starter.pid, signal.SIGKILL)
        pytest.fail("the started rank was still running 20 s after its starter was killed")
    starter_identity, _, named_starter, watching = stdout.split()
    assert starter.returncode == -signal.SIGKILL and starter_identity.startswith(f"{starter.pid}:")
    assert (named_starter, watching) == ("None", "True")  # read and taken out: the rank's own children start nothing
    assert stderr.strip() == "local rank 1 stopped: the local rank 0 process that started it ended 0.5 s before, " \
                             "and this rank was still running (waiting for it in a collective)"
    assert time.monotonic() - began < 15


@pytest.mark.parametrize("local_rank, starter, names_itself", [
    (None, None, True),  # a command typed by the user: Lightning may start ranks from it
    ("0", "parent", False),  # rank 0 of a launcher
    ("1", None, False),  # a torchrun rank, or any process it starts: it names nobody its ranks' processes would follow
    ("1", "alive-elsewhere", False),  # a rank whose environment a cpt command still running elsewhere named itself in
], ids=["no-local-rank", "local-rank-0", "torchrun-rank", "another-starter"])
def test_a_process_no_cpt_command_started_as_a_rank_watches_nothing(local_rank, starter, names_itself):
    """Before, a torchrun rank named itself, and a cpt command its process started (a callback's ``cpt evaluate``)
    took it for its starter: killed 30 s after the rank ended normally."""
    env = typed_command_environment()
    if starter is not None:
        env[STARTER_ENV] = _identity(os.getpid() if starter == "parent" else os.getppid())
    if local_rank is not None:
        env["LOCAL_RANK"] = local_rank
    done = subprocess.run([sys.executable, "-c", RANK, "0", "0"], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    (pid, named, watching), after = done.stdout.splitlines()[0].split(), done.stdout.splitlines()[1]
    assert watching == "False" and (named.startswith(f"{pid}:") if names_itself else named == "None")
    assert after == f"after {env.get(STARTER_ENV)}"  # as it was once the command has ended
