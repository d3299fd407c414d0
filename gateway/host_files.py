"""Files the serving command makes for its worker processes on one host: the cache's host tier
(``cache/host.py``) and the workers' folder (``create_workers_folder``), where they publish their
metrics (``worker_metrics.py``) and share the driving of the model repository
(``upstream/repository_workers.py``).

Each is in use while some process holds a shared ``flock`` on it (on a lock file inside, for a
folder): the serving command from making it until it removes it, and every worker using it. One
that nobody holds was left by a server that was killed, and is removed (``sweep_unheld``) when
the next one is made; one that is held is never removed, whatever pids or namespaces do.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MEMORY_DIR = "/dev/shm"
WORKERS_ENV = "GATEWAY_WORKERS_FOLDER"  # how the serving command tells its workers their folder
WORKERS_PREFIX = "gateway-workers-"
HELD = "held"  # the file in the workers' folder every process using it holds a shared lock on
# In a folder where servers make what they hold (``Made``) and sweep what nobody holds: taken
# by each around either, so that a sweep never finds a file made but not held yet.
SWEEP_LOCK = ".gateway-sweep.lock"


def default_directory() -> str:
    """Where they go by default: in memory (``/dev/shm``) where there is one, else the system's
    temporary folder."""
    return MEMORY_DIR if os.path.isdir(MEMORY_DIR) else tempfile.gettempdir()


def hold(path: str | Path, create: bool = False) -> int:
    """An open descriptor of ``path`` with a shared flock on it: in use until it is closed."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim(path: str | Path) -> int:
    """An open descriptor of ``path`` (made if need be) with an exclusive flock on it, taken
    without waiting (OSError if another process holds it): how a worker says it runs, to
    ``held_exclusively``, until it closes it or exits."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def held_exclusively(path: str | Path) -> bool:
    """Whether some process holds an exclusive flock on ``path`` (how a worker says it runs)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when ``replace_file`` writes ``path`` anew (None: there is none): how a
    reader tells whether to read it again."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def replace_file(path: Path, body: bytes) -> None:
    """Write ``path`` in one step: readers see the old file or the new one, never a part. The
    temporary file is this process's, so several may write the same file at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


async def publish_every(interval: float, publish: Callable[[], object], what: str) -> None:
    """Call ``publish`` every ``interval`` seconds until cancelled; a failure (a full folder, or a
    bug) is logged, and the next round tries again."""
    while True:
        await asyncio.sleep(interval)
        try:
            publish()
        except Exception:
            log.exception("could not publish %s", what)


class Made:
    """A file or folder this process made: it holds it (so no other server's sweep removes it)
    until ``remove``."""

    def __init__(self, path: Path, fd: int, delete: Callable[[Path], None]) -> None:
        self.path = path
        self._fd = fd
        self._delete = delete

    def remove(self) -> None:
        if self._fd >= 0:
            self._delete(self.path)
            os.close(self._fd)
            self._fd = -1

    def __str__(self) -> str:
        return str(self.path)


@contextlib.contextmanager
def serialized(base: Path) -> Iterator[None]:
    """Exclusive use of ``base`` among the servers sweeping and making files there (in turn:
    a process must not nest it). A folder where the lock cannot be made goes unserialized."""
    try:
        fd = os.open(base / SWEEP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a directory scan, or for one file's making
        yield
    finally:
        os.close(fd)


def sweep_unheld(
    base: Path, prefix: str, lock_of: Callable[[Path], Path], delete: Callable[[Path], None], what: str
) -> None:
    """Remove what in ``base`` is named ``prefix``... and that no process holds (the lock file
    ``lock_of(path)``). One that cannot be opened or removed (another user's) is left alone."""
    with serialized(base):
        _sweep_unheld(base, prefix, lock_of, delete, what)


def _sweep_unheld(base: Path, prefix: str, lock_of: Callable[[Path], Path], delete: Callable[[Path], None], what: str) -> None:
    try:
        paths = [p for p in base.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in paths:
        try:
            fd = os.open(lock_of(path), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: in use
            os.close(fd)
            continue
        try:
            log.warning("removing %s, %s no process holds", path, what)
            delete(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
        finally:
            os.close(fd)


def create_workers_folder(directory: str | None = None) -> Made:
    """A new folder for the workers of one server, in ``directory`` (``default_directory()``
    if None), after removing the folders left there by servers that were killed."""
    base = Path(directory or default_directory())
    sweep_workers_folders(base)
    with serialized(base):
        path = Path(tempfile.mkdtemp(prefix=f"{WORKERS_PREFIX}{os.getpid()}-", dir=base))
        try:
            return Made(path, hold(path / HELD, create=True), _rmtree)
        except BaseException:
            _rmtree(path)
            raise


def sweep_workers_folders(base: Path) -> None:
    """Remove the workers' folders in ``base`` that no process holds."""
    sweep_unheld(base, WORKERS_PREFIX, lambda path: path / HELD, shutil.rmtree, "a workers' folder")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
