"""A vLLM plugin: vLLM's engine processes end when the process that started them is killed.

vLLM runs its engine core (and, on CPU, a worker under it) in spawned processes. When the
server is SIGKILLed (an OOM kill, `kill -9`, a crashed container runtime), nothing tells them,
and they live on as orphans holding the model's memory. vLLM loads `vllm.general_plugins` in
every process it starts (entry point `moegi_orphan_guard` -> `vllm_plugins.orphans:register`), so in
each of its child processes this starts a daemon thread that watches the parent: once the
parent is gone (the process was re-parented), the child kills itself, and its own children
follow the same way. In the top-level process (the server) it does nothing.

A thread that polls `getppid()` rather than `prctl(PR_SET_PDEATHSIG)`: the death signal fires
when the parent *thread* that spawned the child exits, and the server starts its engine from a
worker thread.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

POLL_S = 0.5
_started = False


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    """Entry point (`vllm.general_plugins`); vLLM may call it more than once per process."""
    global _started
    if _started or multiprocessing.parent_process() is None:
        return
    _started = True
    threading.Thread(target=_watch, args=(os.getppid(),), name="moegi-orphan-guard",
                     daemon=True).start()
