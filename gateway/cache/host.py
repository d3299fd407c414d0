"""The host tier: one store the gateway's worker processes on a host share, in shared memory.

With ``server.workers`` > 1 each worker has its own in-process store; without this tier every
worker would compute each distinct request once more for itself. Here, an answer one worker
computed answers the others' clients, at the cost of a local lookup (no network hop, no
syscall on a hit).

The segment is a file in ``/dev/shm`` that the serving command creates before it starts the
workers (``create_segment``) and removes when they have stopped; each worker maps it
(``HostStore``). It holds:

- a header: sizes, the write cursor (bytes ever written to the log) and a count of writes;
- a table of generations: one counter per slot, a model version hashing to a slot;
  ``bump`` (a version dropped) makes every entry of that slot's versions written before it
  invisible;
- a table of claims: which worker is computing which key now, or how its computation failed
  (``claim``, ``look``, ``renew``, ``release``, ``fail``; what ``host_flight.py`` builds single flight
  across the workers on);
- an index: buckets of 8 ways, each the log position of an entry whose key falls in it;
- the log, a ring of ``capacity`` bytes: entries are appended, and the oldest are overwritten
  as it wraps around (bounded in bytes; first in, first out).

Writers serialise on a record lock of the file's first byte (``lockf``: only misses write; a
writer that finds it taken skips its write rather than wait, unless it holds the key's claim,
whose followers look for its answer here). Claims are changed under a lock of the second byte
(a claim is tried without waiting for it; ending or renewing one waits, for microseconds) and
read without one, a slot copied until two copies agree. A lock is held for microseconds, by
code that never awaits; but a worker stopped while it holds one (a debugger, SIGSTOP) must not
stop the others: no wait for a lock blocks, and none lasts beyond ``LOCK_WAIT_S``. A write
that gives up is skipped, a renewal waits for the next, and a claim that could not be ended
lapses with its lease (``host_flight.py``); only a ``bump`` (a version dropped) waits for as
long as it takes. Readers of entries take no lock: an entry is
used only if its key matches, its generation is current, it has not expired (the system-wide
monotonic clock), the CRC32 over the whole entry (key, generation, expiry, length, bytes)
matches, and the write cursor shows that the log had not wrapped over it by the time it was
copied (a writer moves the cursor before it writes). Anything else reads as a miss, never as
another entry's answer.

Every process using a segment holds a shared ``flock`` on it for as long as it does; a segment
nobody holds (its server was killed) is removed by the next ``create_segment`` in that folder
(``gateway/host_files.py``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.host_files import Made, default_directory, hold, serialized, sweep_unheld

log = logging.getLogger(__name__)

LOCK_WAIT_S = 0.005  # the longest a worker waits for a lock another worker holds (not bump's)
MAGIC = b"GWHOST02"
HEADER_BYTES = 4096
WAYS = 8
GENERATIONS = 4096
AVERAGE_ENTRY = 512  # bytes per entry the index is sized for (one way per AVERAGE_ENTRY bytes)

# magic, capacity, buckets, generations; the cursor and the write count on a line of their own.
_HEADER = struct.Struct("<8sQQQ")
_CURSOR = 64
_WRITES = 72
_U64 = struct.Struct("<Q")
_BUCKET = struct.Struct(f"<{WAYS}Q")
# key, generation, expiry (monotonic seconds), value length; then the CRC32 of those and the value.
_ENTRY_HEAD = struct.Struct("<16sQdI")
_CRC = struct.Struct("<I")
ENTRY_BYTES = _ENTRY_HEAD.size + _CRC.size

# A claim: key, owner's pid, owner's token (one per HostStore: several views in one process
# are distinct owners), state, until (monotonic seconds), then a failure's HTTP status, error
# class name and message length; the message fills the rest of the slot.
_CLAIM = struct.Struct("<16sIIIdI24sH")
CLAIM_BYTES = 256
CLAIM_SLOTS = 2048
CLAIM_WAYS = 8
MESSAGE_BYTES = CLAIM_BYTES - _CLAIM.size
_CLAIM_HEAD = struct.Struct("<16sIII")  # a claim up to its until
_UNTIL = struct.Struct("<d")
FREE, COMPUTING, FAILED, ENDED = 0, 1, 2, 3


class Unclaimed:
    """What ``HostStore.claim`` gives where no claim could be taken: nobody holds the key."""

    def __repr__(self) -> str:
        return "UNCLAIMED"


UNCLAIMED = Unclaimed()

PREFIX = "gateway-cache-"
SEGMENT_ENV = "GATEWAY_CACHE_SEGMENT"  # how the serving command tells its workers the segment


def _align(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


CLAIMS_AT = HEADER_BYTES + GENERATIONS * 8


def _layout(capacity: int) -> tuple[int, int, int, int]:
    """(buckets, index offset, log offset, file size) for a log of ``capacity`` bytes."""
    buckets = 1
    while buckets * WAYS * AVERAGE_ENTRY < capacity:
        buckets *= 2
    index = CLAIMS_AT + CLAIM_SLOTS * CLAIM_BYTES
    log_at = _align(index + buckets * WAYS * 8, 4096)
    return buckets, index, log_at, log_at + capacity


MIN_CAPACITY = 1024 * 1024


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def create_segment(capacity: int, directory: str | None = None) -> Made | None:
    """A new, empty segment whose log holds ``capacity`` bytes (rounded up to 4 KiB), named
    after this process; segments nobody holds any more are removed first.

    Its memory is reserved at once: a page of a shared-memory file that cannot be had when it
    is first written kills the writer (SIGBUS). Where the folder has less than twice the
    segment's size free (Docker gives containers 64 MiB of /dev/shm), the log is made smaller,
    but not below ``MIN_CAPACITY``; if even that does not fit, or the reservation fails, there
    is no segment (None), and the reason is logged. Other failures (the folder not writable)
    raise OSError."""
    folder = Path(directory or default_directory())
    sweep_unheld(folder, PREFIX, lambda path: path, os.unlink, "a cache segment")
    asked = capacity = _align(max(capacity, 65536), 4096)
    room = free_bytes(folder) // 2
    while _layout(capacity)[3] > room and capacity > MIN_CAPACITY:
        capacity = max(MIN_CAPACITY, _align(capacity // 2, 4096))
    buckets, _, _, size = _layout(capacity)
    if size > room:
        log.error("no cache shared between workers: %s has %d bytes free, too few", folder, room * 2)
        return None
    if capacity < asked:
        log.warning(
            "cache shared between workers: %d bytes instead of the %d asked for (cache.host_max_bytes): %s has %d bytes "
            "free, and the segment takes at most half", capacity, asked, folder, room * 2,
        )  # fmt: skip
    path = folder / f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    with serialized(folder):  # held before another server's sweep can see it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held until remove(): the segment is in use
        except BaseException:
            Made(path, fd, _unlink).remove()
            raise
    try:
        os.ftruncate(fd, size)  # zeros: no entries, generations 0
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                log.error("no cache shared between workers: %s could not reserve %d bytes: %s", folder, size, exc)
                Made(path, fd, _unlink).remove()
                return None
        os.pwrite(fd, _HEADER.pack(MAGIC, capacity, buckets, GENERATIONS), 0)
    except BaseException:
        Made(path, fd, _unlink).remove()
        raise
    log.info("cache shared between workers: %s, %d bytes", path, capacity)
    return Made(path, fd, _unlink)


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True, slots=True)
class Claim:
    """Another worker's claim on a key: computing it (``COMPUTING``), how that failed
    (``FAILED``: the error's HTTP status, class name and message, for its followers), or that
    it ended without an answer in the log (``ENDED``)."""

    pid: int
    state: int
    until: float
    status: int = 0
    kind: str = ""
    message: str = ""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class HostStore:
    """One process's view of a segment: ``get``, ``put``, ``generation`` and ``bump``; and the
    claims: ``claim``, ``look``, ``renew``, ``release``, ``end``, ``fail``.

    Synchronous; readers take no lock, and ``put`` skips its write rather than wait for
    another writer (unless told to wait; ``bump`` and the claims wait, for microseconds)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd = hold(self.path)  # in use: no sweep removes it
        try:
            size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, capacity, buckets, generations = _HEADER.unpack_from(self._mm, 0)
        expected = _layout(capacity)
        if magic != MAGIC or buckets != expected[0] or generations != GENERATIONS or size != expected[3]:
            self.close()
            raise ValueError(f"{self.path} is not a gateway cache segment of this version")
        self.capacity = capacity
        self._mask = buckets - 1
        _, self._index, self._log, _ = expected
        self._max_entry = min(capacity // 8, 2**32 - 1)  # an entry takes an eighth of the log at most
        self._slots: dict[tuple[str, str], int] = {}
        self._pid = os.getpid()
        self._token = int.from_bytes(os.urandom(4), "little") | 1  # never 0, a free slot's
        self.hits = 0
        self.stale = 0  # found but unusable: expired, dropped, overwritten or torn
        self.busy = 0  # writes skipped: another worker was writing
        self.gave_up = 0  # claims not renewed or not ended: another worker held their lock too long
        self.claims = 0  # keys this view claimed, to compute them for every worker
        self.unclaimed = 0  # keys computed without a claim: every way of their bucket taken, or the claims busy

    def _slot(self, model: str, version: str) -> int:
        slot = self._slots.get((model, version))
        if slot is None:
            digest = hashlib.blake2b(f"{model}\0{version}".encode(), digest_size=8).digest()
            slot = HEADER_BYTES + (int.from_bytes(digest, "little") % GENERATIONS) * 8
            if len(self._slots) < 4096:
                self._slots[(model, version)] = slot
        return slot

    def generation(self, model: str, version: str) -> int:
        """The current generation of a model version: read it before computing an answer, and
        give it to ``put``: a ``bump`` in between makes that answer invisible. It is also when
        the version was last dropped on this host, in wall-clock nanoseconds (0: never; another
        version sharing its slot may have been, later)."""
        return _U64.unpack_from(self._mm, self._slot(model, version))[0]

    def bump(self, model: str, version: str) -> None:
        """Every entry of this model version written so far is dropped (for every worker); the
        generation becomes the time of the drop (``generation``)."""
        slot = self._slot(model, version)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        try:
            _U64.pack_into(self._mm, slot, max(_U64.unpack_from(self._mm, slot)[0] + 1, time.time_ns()))
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def get(
        self, key: bytes, model: str, version: str, now: float, counted: bool = True, min_expires: float = 0.0
    ) -> tuple[bytes, float] | None:
        """(the value stored for ``key``, its expiry), or None. ``counted``: in ``hits`` and
        ``stale`` (not for a worker polling for another's answer). ``min_expires``: an entry
        expiring before it is too old for the reader (``Freshness.earliest_expiry``): None, and
        neither a hit nor stale."""
        if self._fd < 0:  # closed (the worker is stopping)
            return None
        mm = self._mm
        capacity = self.capacity
        for p in _BUCKET.unpack_from(mm, self._bucket(key)):
            if not p:
                continue
            pos = p - 1
            at = self._log + pos % capacity
            if at + ENTRY_BYTES > self._log + capacity:
                continue  # a torn position
            head = mm[at : at + _ENTRY_HEAD.size]
            if head[:16] != key:
                continue
            _, gen, expires, length = _ENTRY_HEAD.unpack(head)
            (crc,) = _CRC.unpack_from(mm, at + _ENTRY_HEAD.size)
            start = at + ENTRY_BYTES
            value = mm[start : start + length]
            if (
                expires <= now
                or gen != self.generation(model, version)
                or zlib.crc32(value, zlib.crc32(head)) != crc
                or _U64.unpack_from(mm, _CURSOR)[0] > pos + capacity  # wrapped over while copied
            ):
                self.stale += counted
                return None
            if expires < min_expires:
                return None
            self.hits += counted
            return value, expires
        return None

    def put(
        self, key: bytes, model: str, version: str, gen: int, value: bytes, expires: float, wait: bool = False
    ) -> bool:
        """Append an entry (``gen``: the model version's ``generation`` read before computing
        ``value``). False if it is not written: too large for the log, its generation already
        past (it would never be read), or another worker writing at this moment (unless
        ``wait``: the writer holds the key's claim, and other workers wait for this entry)."""
        if self._fd < 0 or not self.fits(len(value)):
            return False
        size = _align(ENTRY_BYTES + len(value))
        head = _ENTRY_HEAD.pack(key, gen, expires, len(value))
        crc = _CRC.pack(zlib.crc32(value, zlib.crc32(head)))
        mm, capacity = self._mm, self.capacity
        bucket = self._bucket(key)
        if not self._lock(0, LOCK_WAIT_S if wait else 0.0):  # another worker is writing
            self.busy += 1
            return False
        try:
            if gen != self.generation(model, version):
                return False
            cursor = _U64.unpack_from(mm, _CURSOR)[0]
            offset = cursor % capacity
            if offset + size > capacity:  # no entry wraps: start the next lap
                cursor += capacity - offset
                offset = 0
            _U64.pack_into(mm, _CURSOR, cursor + size)  # before the bytes it makes stale change
            at = self._log + offset
            mm[at : at + ENTRY_BYTES + len(value)] = head + crc + value
            ways = _BUCKET.unpack_from(mm, bucket)
            _U64.pack_into(mm, bucket + 8 * self._way(ways, key, cursor + size), cursor + 1)
            _U64.pack_into(mm, _WRITES, _U64.unpack_from(mm, _WRITES)[0] + 1)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
        return True

    def _bucket(self, key: bytes) -> int:
        """Where the index's bucket for ``key`` starts."""
        return self._index + (int.from_bytes(key[:8], "little") & self._mask) * WAYS * 8

    def _way(self, ways: tuple[int, ...], key: bytes, cursor: int) -> int:
        """Where a new entry for ``key`` goes in its bucket: the way holding that key, else an
        empty or overwritten one, else the oldest."""
        capacity = self.capacity
        free = oldest = -1
        for i, p in enumerate(ways):
            if not p or p - 1 + capacity < cursor:
                if free < 0:
                    free = i
                continue
            if self._mm[self._log + (p - 1) % capacity : self._log + (p - 1) % capacity + 16] == key:
                return i
            if oldest < 0 or p < ways[oldest]:
                oldest = i
        return free if free >= 0 else oldest

    # -- claims: which worker computes a key ----------------------------------------------

    def claim(self, key: bytes, until: float, now: float) -> Claim | Unclaimed | None:
        """Claim ``key`` for this view until ``until``: None when this view now holds the claim
        and is to compute it; ``UNCLAIMED`` when no claim could be taken (no room for one in its
        bucket, or the segment is closed: this view is to compute it, and nobody holds it);
        else the live claim of the worker computing it. A claim whose
        owner's process is gone or that is past its ``until`` is taken over; so is an ended
        one (``FAILED``, ``ENDED``): errors are not cached, and a new request computes anew.
        BlockingIOError when another worker is changing the claims (try again)."""
        if self._fd < 0:
            return UNCLAIMED
        base = self._claim_bucket(key)
        if not self._lock(1, 0.0):
            raise BlockingIOError(errno.EAGAIN, "another worker is changing the claims")
        try:
            way = -1
            for i in range(CLAIM_WAYS):
                at = base + i * CLAIM_BYTES
                held, pid, token, state, until_, *_ = _CLAIM.unpack_from(self._mm, at)
                if held == key:
                    if state == COMPUTING and until_ > now and token != self._token and _alive(pid):
                        return Claim(pid, state, until_)
                    way = i
                    break
                if way < 0 and (state == FREE or until_ <= now or (state == COMPUTING and not _alive(pid))):
                    way = i
            if way < 0:
                self.unclaimed += 1
                return UNCLAIMED
            _CLAIM.pack_into(self._mm, base + way * CLAIM_BYTES, key, self._pid, self._token, COMPUTING, until, 0, b"", 0)
            self.claims += 1
            return None
        finally:
            self._unlock_claims()

    def look(self, key: bytes, now: float) -> Claim | None:
        """The claim on ``key``: another worker computing it, its failure, its end without an
        answer in the log; or None: nobody claims it (done, its worker gone, past its time).
        Takes no lock: a slot is copied until two copies agree (a writer changing it meanwhile)."""
        if self._fd < 0:
            return None
        base = self._claim_bucket(key)
        for i in range(CLAIM_WAYS):
            at = base + i * CLAIM_BYTES
            if self._mm[at : at + 16] != key:
                continue
            for _ in range(3):
                slot = self._mm[at : at + CLAIM_BYTES]
                if slot == self._mm[at : at + CLAIM_BYTES]:
                    break
            else:
                return None  # changing under this read: as good as gone, the caller looks again
            held, pid, _, state, until, status, kind, length = _CLAIM.unpack_from(slot)
            if held != key or until <= now or state == FREE:
                return None
            if state == COMPUTING:
                return Claim(pid, state, until) if _alive(pid) else None
            message = slot[_CLAIM.size : _CLAIM.size + min(length, MESSAGE_BYTES)]
            return Claim(pid, state, until, status, kind.rstrip(b"\0").decode("ascii", "replace"), message.decode("utf-8", "replace"))
        return None

    def renew(self, until: dict[bytes, float]) -> None:
        """Extend this view's live claims: each key of ``until`` to its time (the claims this
        view still holds; one another worker took over stays that worker's). Waits for the
        claims' lock, once for them all."""
        if self._fd < 0 or not until:
            return
        if not self._lock(1, LOCK_WAIT_S):  # the next renewal will do, well within the lease
            self.gave_up += 1
            return
        try:
            for key, time in until.items():
                at = self._own_claim(key)
                if at >= 0:
                    _UNTIL.pack_into(self._mm, at + _CLAIM_HEAD.size, time)
        finally:
            self._unlock_claims()

    def release(self, key: bytes) -> None:
        """This view's claim on ``key`` ends: its answer is in the log."""
        self._finish(key, None)

    def end(self, key: bytes, until: float) -> None:
        """This view's claim on ``key`` ends without an answer in the log: the workers waiting
        for it compute the key themselves at once (the end is readable until ``until``)."""
        self._finish(key, (ENDED, until, 0, b"", b""))

    def fail(self, key: bytes, until: float, status: int, kind: str, message: str) -> None:
        """This view's computation of ``key`` failed: the workers following it read the error
        (HTTP status, error class name, message) until ``until``."""
        text = message.encode()[:MESSAGE_BYTES].decode("utf-8", "ignore").encode()  # not cut inside a character
        self._finish(key, (FAILED, until, status, kind.encode("ascii", "replace")[:24], text))

    def _finish(self, key: bytes, record: tuple[int, float, int, bytes, bytes] | None) -> None:
        """Replace this view's live claim on ``key`` (if it still holds it) with ``record``
        (state, until, status, kind, message), or free it. Waits for the claims' lock (held
        for microseconds; the followers wait for this) at most ``LOCK_WAIT_S``: past that, the
        claim is left to lapse with its lease, which is no longer renewed."""
        if self._fd < 0:
            return
        if not self._lock(1, LOCK_WAIT_S):
            self.gave_up += 1
            return
        try:
            at = self._own_claim(key)
            if at < 0:
                return
            if record is None:
                self._mm[at : at + CLAIM_BYTES] = bytes(CLAIM_BYTES)
            else:
                state, until, status, kind, text = record
                slot = _CLAIM.pack(key, self._pid, self._token, state, until, status, kind, len(text)) + text
                self._mm[at : at + CLAIM_BYTES] = slot.ljust(CLAIM_BYTES, b"\0")
        finally:
            self._unlock_claims()

    def _own_claim(self, key: bytes) -> int:
        """Where this view's live claim on ``key`` is in the segment, or -1 (never claimed, or
        taken over by another worker). The caller holds the claims' lock."""
        base = self._claim_bucket(key)
        for i in range(CLAIM_WAYS):
            at = base + i * CLAIM_BYTES
            held, _, token, state = _CLAIM_HEAD.unpack_from(self._mm, at)
            if held == key and token == self._token and state == COMPUTING:
                return at
        return -1

    def fits(self, nbytes: int) -> bool:
        """Whether a value of ``nbytes`` can be stored in the log at all."""
        return _align(ENTRY_BYTES + nbytes) <= self._max_entry

    def _claim_bucket(self, key: bytes) -> int:
        return CLAIMS_AT + (int.from_bytes(key[8:12], "little") % (CLAIM_SLOTS // CLAIM_WAYS)) * CLAIM_WAYS * CLAIM_BYTES

    def _lock(self, byte: int, wait_s: float) -> bool:
        """Take the record lock of the segment's ``byte`` (0: the log, 1: the claims): at once,
        or trying again for at most ``wait_s``, never blocking. False if it stayed taken."""
        deadline, pause = 0.0, 20e-6
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if not wait_s:
                return False
            now = time.monotonic()
            deadline = deadline or now + wait_s  # from the first refusal
            if now >= deadline:
                return False
            time.sleep(pause)  # its holder is microseconds from letting go, unless stopped there
            pause = min(2 * pause, 0.001)

    def _unlock_claims(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 1)

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "capacity": self.capacity,
            "bytes_written": _U64.unpack_from(self._mm, _CURSOR)[0],
            "writes": _U64.unpack_from(self._mm, _WRITES)[0],
            "hits": self.hits,
            "stale": self.stale,
            "busy": self.busy,
            "gave_up": self.gave_up,
            "claims": self.claims,
            "unclaimed": self.unclaimed,
        }

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
