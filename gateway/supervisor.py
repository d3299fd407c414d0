"""The process that runs the gateway's workers (``server.workers`` > 1): uvicorn's supervisor
(``uvicorn.supervisors.Multiprocess``: restarts, signals, health checks) on one listening socket
that every worker shares, with each worker a ``BalancedServer`` (``accept_balance.py``) where
connections are balanced.

Told to stop (SIGINT, SIGTERM), it stops the shared socket listening at once, for every worker
(``shutdown`` on a listening socket; closing one process's descriptor would leave it listening
while the others hold theirs). New connections are then refused, which a client can always
retry, while the workers finish the requests they hold. A worker must not make the socket listen
again: a balanced one checks that it still listens before listening again
(``accept_balance.still_listening``), and one caught between that check and its ``listen``, or
still starting when the signal came (its startup listens), sees the mark the supervisor leaves in
the workers' folder first (``accept_balance.mark_stopping``) and stops the socket again; until
the last worker has exited, the supervisor also checks the socket every ``JOIN_POLL_S`` and
stops it again (workers not balanced). Left listening, the socket kept accepting connections
into the kernel's queue through the workers' grace period; no worker took them any more, and
when the last process exited the kernel reset them, after their requests had been sent: a
client cannot tell whether such a request was served.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.supervisors import multiprocess

from gateway.accept_balance import BalancedProcess, mark_stopping, still_listening, stop_sockets

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_POLL_S = 0.01  # while the workers finish: how often the socket is checked for listening again


class Supervisor(multiprocess.Multiprocess):
    """uvicorn's supervisor, refusing new connections from the moment it is told to stop."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], workers_folder: str = "") -> None:
        super().__init__(config, sockets=sockets)
        self.workers_folder = workers_folder
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        # At once, in the handler: the supervisor's loop reads its signals only every 0.5 s. The
        # mark first: a balanced worker listening again just after the stop sees it.
        if self.workers_folder:
            mark_stopping(self.workers_folder)
        stop_sockets(self.sockets)
        self.signal_queue.append(sig)

    def terminate_all(self) -> None:
        stop_sockets(self.sockets)  # again: a worker may have listened since the signal (join_all)
        super().terminate_all()

    def join_all(self) -> None:
        # A worker still starting when told to stop (every worker at the gateway's start, a
        # replacement, a restart) listens on the socket at the end of its startup. A balanced
        # one stops it again at once (the mark); any other is caught here within JOIN_POLL_S.
        for process in self.processes:
            while process.exitcode is None:
                process.process.join(JOIN_POLL_S)
                if any(still_listening(sock) for sock in self.sockets):
                    stop_sockets(self.sockets)


def run_workers(config: uvicorn.Config, workers_folder: str) -> int:
    """Serve ``config`` (``workers`` > 1, the app an import string) as ``uvicorn.run`` does;
    with a ``workers_folder``, each worker a ``BalancedServer`` balancing through it. Returns
    the exit status: uvicorn's 3 where a worker failed to start (which stops them all), else 0."""
    sock = config.bind_socket()
    original = multiprocess.Process
    if workers_folder:
        # uvicorn's supervisor makes each worker with its module's ``Process``; this process
        # runs nothing else of that module.
        multiprocess.Process = BalancedProcess  # type: ignore[misc]
    supervisor = Supervisor(config, [sock], workers_folder)
    try:
        supervisor.run()
    except KeyboardInterrupt:
        pass
    finally:
        multiprocess.Process = original  # type: ignore[misc]
        sock.close()
    failed = any(p.exitcode == multiprocess.STARTUP_FAILURE for p in supervisor.processes)
    return multiprocess.STARTUP_FAILURE if failed else 0
