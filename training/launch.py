"""Starting worker processes on this machine: spawn N, wait, and never leave one behind.

Kept free of heavy imports (no scikit-learn): every spawned worker imports the module that
holds its entry point, and start-up time counts on a small machine.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for the workers' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(fn: Any, nprocs: int, args: tuple[Any, ...]) -> None:
    """Run fn(rank, *args) in nprocs fresh processes and wait for all of them.

    A worker that fails makes the others stop at once (torch's process context terminates them)
    and its traceback is raised here; an interrupt here terminates every worker. Workers also
    die with this process (see die_with_parent), so none is ever left behind."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def die_with_parent() -> None:
    """Call first thing in a spawned worker: the kernel kills it when its parent dies, so a
    killed launcher does not leave workers waiting in a collective."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone
            os._exit(1)
