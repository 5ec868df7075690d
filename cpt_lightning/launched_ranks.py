"""A rank that ``cpt fit`` or ``cpt validate`` started itself ends soon after the process that started it.

With ``trainer.devices`` above 1 and no launcher of its own (torchrun and srun start every rank themselves), Lightning's
rank 0 starts ranks 1…N-1 as its child processes. Lightning stops them all when a child dies, and when rank 0 gets a
Ctrl-C, but not when rank 0 ends any other way: an error in code only rank 0 runs (its logger, an export's write), or
the kernel's OOM killer. The others waited for it in their next collective, on GPUs until NCCL's timeout (30 minutes
as Lightning sets it), holding their GPUs. Each started rank now watches its starter and ends ``GRACE_S`` after it, unless it
ended first (an error every rank shares prints its own line on each).
"""

from __future__ import annotations

import os
import sys
import threading
import time

STARTER_ENV = "CPT_STARTER_PID"  # the cpt process whose Lightning launcher starts ranks 1…N-1 as its children
GRACE_S = 30.0  # seconds a started rank outlives its starter (enough to end on its own after a shared error)


def follow_the_starting_rank() -> None:
    """Called first by every ``cpt fit`` and ``cpt validate``: a process that a cpt process started as a rank (Lightning
    sets ``LOCAL_RANK`` for it) watches that process; any other names itself for the ranks it may start."""
    starter = os.environ.get(STARTER_ENV)
    if starter == str(os.getppid()) and os.environ.get("LOCAL_RANK", "0") != "0":
        threading.Thread(target=_end_after, args=(int(starter),), name="cpt-starter-watch", daemon=True).start()
    else:
        os.environ[STARTER_ENV] = str(os.getpid())


def _end_after(starter: int) -> None:
    """Once the starter has gone (this process was handed to another parent), wait ``GRACE_S``, then exit whatever
    the main thread is doing: a collective that waits for a rank that has gone returns only at its timeout."""
    while os.getppid() == starter:
        time.sleep(1)
    time.sleep(GRACE_S)
    print(f"local rank {os.environ['LOCAL_RANK']} stopped: the rank 0 process that started it ended {GRACE_S:g} s "
          "before, and this rank was still running (waiting for it in a collective)", file=sys.stderr, flush=True)
    os._exit(1)
