"""A rank that a ``cpt`` command started itself ends soon after the process that started it.

With ``trainer.devices`` above 1 and no launcher of its own (torchrun and srun start every rank themselves), Lightning's
rank 0 starts the node's other ranks as its child processes, each running the same command. Lightning stops them all
when a child dies, and when rank 0 gets a Ctrl-C, but not when rank 0 ends any other way: an error in code only rank 0
runs (its logger, an export's write), or the kernel's OOM killer. The others waited for it in their next collective, on
GPUs until NCCL's timeout (30 minutes as Lightning sets it), holding their GPUs. Each started rank now watches its
starter and ends ``GRACE_S`` after it, unless it ended first (an error every rank shares prints its own line on each).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTER_ENV = "CPT_STARTER"  # "pid:start time" of the cpt command running now, for the ranks its Lightning may start
GRACE_S = 30.0  # seconds a started rank outlives its starter (enough to end on its own after a shared error)


@contextmanager
def ranks_follow_their_starter() -> Iterator[None]:
    """Around a ``cpt`` command. A process no launcher started (no ``LOCAL_RANK``), the only kind whose Lightning
    starts ranks, names itself in ``STARTER_ENV`` while its command runs. A process Lightning started as a rank
    (``LOCAL_RANK`` 1…, the name inherited) watches that process, even one already gone: rank 0 may fail in the seconds
    a rank takes to import torch. Any other rank (torchrun's, srun's), and every process these start, sees no name.
    (A rank that another launcher, started by a cpt command's process, starts after that command has ended would be
    taken for one of its ranks: no cpt code starts a launcher.)"""
    starter = os.environ.pop(STARTER_ENV, None)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None and (myself := _identity(os.getpid())) is not None:  # None without /proc: nothing watched
        os.environ[STARTER_ENV] = myself
    elif local_rank not in (None, "0") and starter is not None and (pid := _starter_of_this_process(starter)):
        threading.Thread(target=_end_after, args=(pid,), name="cpt-starter-watch", daemon=True).start()
    try:
        yield
    finally:
        os.environ.pop(STARTER_ENV, None)
        if starter is not None:  # as it was: an in-process caller of cpt's main
            os.environ[STARTER_ENV] = starter


def _identity(pid: int) -> str | None:
    """``pid:start time`` of a live process (its start in clock ticks since boot, from ``/proc``: a pid reused later is
    another process), or None where it has ended (a zombie too) or there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return None if fields[0] == "Z" else f"{pid}:{fields[19]}"  # fields 3 (state) and 22 (start time) of proc(5)


def _starter_of_this_process(starter: str) -> int | None:
    """The named starter's pid where it is this process's parent or has ended (this process then was handed to another
    parent); None where it runs elsewhere (it did not start this process) or the name is no ``pid:start time``."""
    pid = starter.split(":")[0]
    if not pid.isdigit():
        return None
    return int(pid) if str(os.getppid()) == pid or _identity(int(pid)) != starter else None


def _end_after(starter: int) -> None:
    """Once the starter has gone (this process was handed to another parent), wait ``GRACE_S``, then exit whatever
    the main thread is doing: a collective that waits for a rank that has gone returns only at its timeout."""
    while os.getppid() == starter:
        time.sleep(1)
    time.sleep(GRACE_S)
    print(f"local rank {os.environ['LOCAL_RANK']} stopped: the local rank 0 process that started it ended "
          f"{GRACE_S:g} s before, and this rank was still running (waiting for it in a collective)", file=sys.stderr,
          flush=True)
    os._exit(1)
