"""The process that runs the gateway's workers (``server.workers`` > 1): uvicorn's supervisor
(``uvicorn.supervisors.Multiprocess``: restarts, signals, health checks) on one listening socket
that every worker shares, with each worker a ``BalancedServer`` (``accept_balance.py``) where
connections are balanced.

Told to stop (SIGINT, SIGTERM), it stops the shared socket listening at once, for every worker
(``shutdown`` on a listening socket; closing one process's descriptor would leave it listening
while the others hold theirs), and a balanced worker does not make it listen again
(``accept_balance.still_listening``; one caught between that check and its ``listen`` sees the
mark the supervisor leaves in the workers' folder first, ``accept_balance.mark_stopping``, and
stops the socket again). New connections are then refused, which a client can always retry,
while the workers finish the requests they hold. Left listening, the socket kept accepting
connections into the kernel's queue through the workers' grace period; no worker took them any
more, and when the last process exited the kernel reset them, after their requests had been
sent: a client cannot tell whether such a request was served.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.supervisors import multiprocess

from gateway.accept_balance import BalancedProcess, mark_stopping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_listening(sockets: list[socket.socket]) -> None:
    """Refuse new connections on ``sockets`` in every process sharing them; those already
    accepted are untouched."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not listening (any more)
            pass


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
        stop_listening(self.sockets)
        self.signal_queue.append(sig)

    def terminate_all(self) -> None:
        # Again: a balanced worker that was starting to listen again at the signal (its check of
        # the socket, then ``listen``) would have made it listen again.
        stop_listening(self.sockets)
        super().terminate_all()


def run_workers(config: uvicorn.Config, workers_folder: str) -> None:
    """Serve ``config`` (``workers`` > 1, the app an import string) as ``uvicorn.run`` does;
    with a ``workers_folder``, each worker a ``BalancedServer`` balancing through it."""
    sock = config.bind_socket()
    original = multiprocess.Process
    if workers_folder:
        # uvicorn's supervisor makes each worker with its module's ``Process``; this process
        # runs nothing else of that module.
        multiprocess.Process = BalancedProcess  # type: ignore[misc]
    try:
        Supervisor(config, [sock], workers_folder).run()
    except KeyboardInterrupt:
        pass
    finally:
        multiprocess.Process = original  # type: ignore[misc]
        sock.close()
