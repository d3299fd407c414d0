"""Driving the model repository from several worker processes (``server.workers`` > 1).

Each worker has its own router and its own requests in flight, but the repository and the
Triton instances are the same for all. Left to themselves, every worker would make load calls
of its own, competing with the others' (a version pinned in by one, out by another), and a
version one worker drained and unloaded could still be routed to by the others: their requests
to it would fail. So one worker drives loading (``RepositorySync``, as a one-process gateway
does) and the others follow it, through files in the workers' folder
(``host_files.create_workers_folder``), under ``repository/``:

* **One driver.** The driver is the worker holding an exclusive ``flock`` on ``driver.lock``.
  The others try to take it every ``scan_interval_s``: when the driver exits (or is replaced),
  the kernel lets go of its lock and another worker takes over. Its first round is a starting
  gateway's: it reconciles every instance with the folder.
* **The driver publishes what it routes.** ``driver.json`` holds, per instance, the versions it
  routes there, those it withholds (loading, warming up, draining, failed) with why, and the
  stateful models it quiesces there before reloading them; and its repository view
  (``/v2/gateway/repository``), under a sequence number. It is rewritten (in one step) within
  ``POLL_S`` of a change, and at once when a drain starts. It also holds what the driver placed
  on each instance, from which files (``RepositorySync.placements``): a worker taking over
  does not load those again (a load call reloads the model, and drops a stateful model's
  sequences), only what changed since.
* **Followers route exactly that.** Each reads the file within ``POLL_S`` of a change and routes,
  per instance, what the driver routes (``Instance.follow``): a new version only once the driver
  has warmed it up, none the driver has withheld, and no new sequence where it quiesces the
  model. A follower answers the repository view with the driver's.
* **A drain covers every worker.** Each follower writes ``<pid>.json``: the last sequence it
  applied and what it has under way where the driver waits (``under_way``): its requests in
  flight and sequences under way on versions the driver withholds, and its sequences under way
  on a stateful model the driver quiesces before reloading it (a follower taking the driving
  over removes its own). Before it unloads a version (or reloads a stateful model), the driver
  waits (within ``drain_timeout_s``) until every follower still running (holding its
  ``<pid>.lock``) has applied the change and has nothing under way there.
* **Ends travel both ways.** A sequence's requests reach whichever worker reads them: the one
  that answered its start may not see its end, and would count it under way until its idle
  time ran out, holding the drain that long. Where the driver waits, each follower also writes
  the ends it answered (``ends_seen``; kept for their idle time), and the driver reads them,
  ends those sequences in its own instances and publishes them with its own in
  ``driver.json`` for the followers to do the same (``Instance.ended_elsewhere``).
* **Start.** A follower takes traffic once the driver has published the end of its first round
  (the repository loaded), as a one-process gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from gateway.config import RepositoryConfig
from gateway.host_files import claim, file_stamp, held_exclusively, publish_every, replace_file
from gateway.instances import Instance
from gateway.router import Router
from gateway.upstream.repository import RepositorySync

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the driver publishes a change, and followers read it
FOLDER = "repository"
DRIVER = "driver.json"

Routed = dict[str, frozenset[str]]
Withheld = dict[tuple[str, str], str]


def instance_state(instance: Instance) -> dict[str, Any]:
    """What the driver publishes for one instance: what it routes there (None: not known yet)
    and what it withholds, with why."""
    return {
        "routed": None if instance.models is None else {m: sorted(v) for m, v in sorted(instance.models.items())},
        "withheld": sorted([m, v, why] for (m, v), why in instance.withheld.items()),
        "quiescing": sorted(instance.quiescing),
        "reloading": sorted(instance.reloading),
    }


def watched(instance: Instance) -> set[tuple[str, str]]:
    """Where the driver waits on the instance: versions it withholds (a drain), and every
    version of a model it quiesces (a stateful model to be reloaded)."""
    quiesced = {key for book in (instance.sequences, instance.ended) for key in book if key[0] in instance.quiescing}
    return set(instance.withheld) | quiesced


def under_way(instances: Iterable[Instance], now: float) -> list[list[Any]]:
    """What a follower has under way where the driver waits (``watched``):
    [url, model, version, requests in flight, sequences under way]."""
    found = []
    for i in instances:
        for m, v in watched(i):
            requests, sequences = i.active.get((m, v), 0), i.open_sequences(m, v, now)
            if requests or sequences:
                found.append([i.url, m, v, requests, sequences])
    return sorted(found)


def ends_seen(instances: Iterable[Instance], now: float) -> list[list[Any]]:
    """The ends of sequences this worker answered where the driver waits (``watched``), which
    the other workers may still count under way: [url, model, version, [[sequence (hex),
    when], ...]]."""
    found = []
    for i in instances:
        for m, v in watched(i):
            if ends := i.recent_ends(m, v, now):
                found.append([i.url, m, v, sorted([seq.hex(), at] for seq, at in ends)])
    return sorted(found)


def merged_ends(*reports: Iterable[list[Any]]) -> list[list[Any]]:
    """``ends_seen`` reports of several workers as one (the latest end of each sequence)."""
    merged: dict[tuple[str, str, str], dict[str, float]] = {}
    for report in reports:
        for url, m, v, ends in report:
            latest = merged.setdefault((url, m, v), {})
            for seq, at in ends:
                latest[seq] = max(at, latest.get(seq, at))
    return [[*key, sorted([seq, at] for seq, at in ends.items())] for key, ends in sorted(merged.items())]


def apply_ends(instances: Iterable[Instance], report: Iterable[list[Any]]) -> None:
    """Another worker's ``ends_seen``: those sequences are over here too (``Instance.ended_elsewhere``)."""
    by_url = {i.url: i for i in instances}
    for url, m, v, ends in report:
        instance = by_url.get(url)
        if instance is not None:
            instance.ended_elsewhere(m, v, [(bytes.fromhex(seq), at) for seq, at in ends])


class WorkerRepository:
    """One worker's part in driving the repository: the driver's ``RepositorySync`` while this
    worker holds the lock, else following the driver. ``start``, ``run``, ``close`` and
    ``snapshot`` as ``RepositorySync``'s."""

    def __init__(
        self,
        folder: str | Path,
        config: RepositoryConfig,
        router: Router,
        make_sync: Callable[[WorkerRepository], RepositorySync],
        clock: Callable[[], float] = time.monotonic,
        pid: int | None = None,
    ) -> None:
        self._dir = Path(folder) / FOLDER
        self._dir.mkdir(exist_ok=True)
        self._config = config
        self._router = router
        self._make_sync = make_sync
        self._clock = clock
        self.pid = pid or os.getpid()
        self.sync: RepositorySync | None = None  # while this worker drives
        self._publishing: asyncio.Task[None] | None = None  # while this worker drives
        # Driving: the state last published and its sequence number.
        self._published: dict[str, Any] | None = None
        self._seq = 0
        self._started = False
        # Following: the driver's file as last read, and this worker's acknowledgement.
        self._seen: tuple[int, int, int] | None = None
        self._driver: dict[str, Any] | None = None
        self._acked: bytes | None = None
        self._ack_path = self._dir / f"{self.pid}.json"
        self._driver_lock = os.open(self._dir / "driver.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._alive = claim(self._dir / f"{self.pid}.lock")  # running, for the driver's drains
        except BaseException:
            os.close(self._driver_lock)
            raise

    @property
    def driving(self) -> bool:
        return self.sync is not None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Drive, or wait until the driver has loaded the repository (taking over if it goes)."""
        while True:
            if self._take_lead():
                await self._drive()
                return
            self._follow()
            if self._driver is not None and self._driver.get("started"):
                self._acknowledge()
                return
            await asyncio.sleep(POLL_S)

    async def run(self) -> None:
        """Follow the driver until this worker drives; then run the sync's rounds."""
        await self._follow_until_driving()
        assert self.sync is not None
        await self.sync.run()

    async def _follow_until_driving(self) -> None:
        next_try = self._clock() + self._config.scan_interval_s
        while self.sync is None:
            await asyncio.sleep(POLL_S)
            try:
                if self._clock() >= next_try:
                    next_try = self._clock() + self._config.scan_interval_s
                    if self._take_lead():
                        log.warning("repository: worker %d drives loading now (the driver left)", self.pid)
                        await self._drive(taking_over=True)
                        return
                    # Applied again even if unchanged: a version this worker stopped routing
                    # (an instance said it lacks it: ``Instance.forget``) is routed as the
                    # driver routes it again, as a one-process gateway's next index would.
                    self._seen = None
                self._follow()
                self._acknowledge()
            except Exception:  # the loop must outlive any one round
                log.exception("repository: sharing the driving between workers failed")

    async def close(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)
        if self.sync is not None:
            await self.sync.close()
        for fd in (self._alive, self._driver_lock):
            with contextlib.suppress(OSError):
                os.close(fd)  # lets go of the locks: another worker may drive
        self._alive = self._driver_lock = -1

    def _take_lead(self) -> bool:
        try:
            fcntl.flock(self._driver_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def _drive(self, taking_over: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._ack_path.unlink()  # a follower no more: its last acknowledgement would hold every drain
        for instance in self._router.instances:
            # Route by this worker's own index again; what the last driver withheld stays
            # withheld (a version it had not admitted is warmed up again).
            instance.follow(None, dict(instance.withheld))
        self.sync = self._make_sync(self)
        before = self._driver if self._driver is not None else self._read_driver()
        if before is not None:  # what the driver before placed is not loaded again
            self.sync.seed(before.get("placed") or {})
        self.publish()
        # Published while the first round runs too: a worker taking over mid-run has followers
        # already serving, who must see what it withholds as it loads.
        self._publishing = asyncio.create_task(publish_every(POLL_S, self.publish, "the driving worker's state"))
        try:
            await self.sync.start()
        except Exception:
            if not taking_over:
                self._publishing.cancel()
                raise  # the gateway does not start, as with one process
            log.exception("repository: the first round of driving failed; the next rounds go on")
        self._started = True
        self.publish()

    # -- the driver -----------------------------------------------------------------------------

    def publish(self, force: bool = False) -> int:
        """Write ``driver.json`` if the state changed (or ``force``); the sequence number in force.
        Where it waits on something (``watched``), the ends of sequences that any worker
        answered go both ways: the followers' (from their ``<pid>.json``) end them here, and
        the file carries them with the driver's own to every follower."""
        assert self.sync is not None
        instances = self._router.instances
        ends: list[list[Any]] = []
        if any(watched(i) for i in instances):
            followers = [ack.get("ended", ()) for ack in self._acks().values() if ack is not None]
            for report in followers:
                apply_ends(instances, report)
            ends = merged_ends(ends_seen(instances, self._clock()), *followers)
        state = {
            "pid": self.pid,
            "started": self._started,
            "instances": {i.url: instance_state(i) for i in instances},
            "view": self.sync.snapshot(),
            "ended": ends,
            "placed": self.sync.placements(),
        }
        if force or state != self._published:
            self._seq += 1
            replace_file(self._dir / DRIVER, orjson.dumps({"seq": self._seq, **state}))
            self._published = state
        return self._seq

    async def drained(self, url: str, model: str, versions: list[str], deadline: float, requests: bool = True) -> int:
        """Wait until no follower has requests in flight (unless not ``requests``) or sequences
        under way on ``versions`` of ``model`` on the instance at ``url`` (the driver has
        withheld them, or quiesces the model): 0, or how many were left at ``deadline`` (a
        follower that has not yet applied the driver's change counts as one)."""
        seq = self.publish(force=True)  # the withhold is out now
        wanted = set(versions)
        while True:
            left = 0
            for ack in self._acks().values():
                if ack is None or ack.get("driver") != self.pid or ack.get("seq", 0) < seq:
                    left += 1
                    continue
                for u, m, v, n, seqs in ack.get("under_way", ()):
                    if u == url and m == model and v in wanted:
                        left += (n if requests else 0) + seqs
            if not left or self._clock() >= deadline:
                return left
            await asyncio.sleep(POLL_S)

    def _acks(self) -> dict[Path, dict[str, Any] | None]:
        """Each running follower's ``<pid>.json`` (None where it cannot be read)."""
        acks: dict[Path, dict[str, Any] | None] = {}
        for path in self._dir.glob("*.json"):
            if path.name == DRIVER or path == self._ack_path or not held_exclusively(path.with_suffix(".lock")):
                continue  # the driver's own files, or a follower that exited
            try:
                ack = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                ack = None
            acks[path] = ack if isinstance(ack, dict) else None
        return acks

    # -- a follower -----------------------------------------------------------------------------

    def _read_driver(self) -> dict[str, Any] | None:
        """``driver.json`` as it is (None: missing, or unreadable: logged). A worker that never
        followed (the workers restarted together, on SIGHUP) finds the last driver's there."""
        path = self._dir / DRIVER
        try:
            driver = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("repository: cannot read the driving worker's %s: %s", path, exc)
            return None
        return driver if isinstance(driver, dict) else None

    def _follow(self) -> None:
        """Read ``driver.json`` if it changed, and route what it says."""
        seen = file_stamp(self._dir / DRIVER)
        if seen is None or seen == self._seen:
            return
        driver = self._read_driver()
        if driver is None:
            return
        self._seen = seen
        self._driver = driver
        apply_ends(self._router.instances, driver.get("ended", ()))
        states = driver.get("instances", {})
        for instance in self._router.instances:
            state = states.get(instance.url)
            if state is None:
                continue  # an instance the driver does not know (yet): this worker's own view
            routed = state["routed"]
            instance.follow(
                None if routed is None else {m: frozenset(v) for m, v in routed.items()},
                {(m, v): why for m, v, why in state["withheld"]},
                frozenset(state.get("quiescing", ())),
                frozenset(state.get("reloading", ())),
            )

    def _acknowledge(self) -> None:
        """Write this worker's ``<pid>.json`` if it changed."""
        if self._driver is None:
            return
        ack = orjson.dumps(
            {
                "driver": self._driver.get("pid"),
                "seq": self._driver.get("seq", 0),
                "under_way": under_way(self._router.instances, self._clock()),
                "ended": ends_seen(self._router.instances, self._clock()),
            }
        )
        if ack != self._acked:
            replace_file(self._ack_path, ack)
            self._acked = ack

    # -- the view -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        if self.sync is not None:
            return {**self.sync.snapshot(), "driver_pid": self.pid}
        if self._driver is not None:
            return {**self._driver["view"], "driver_pid": self._driver.get("pid")}
        return {"path": self._config.path, "scan_error": None, "models": {}, "events": [], "driver_pid": None}


def worker_repository(
    folder: str | Path, config: RepositoryConfig, router: Router, make_sync: Callable[[WorkerRepository], RepositorySync]
) -> WorkerRepository | None:
    """This worker's ``WorkerRepository`` in ``folder``, or None where the folder cannot be used
    (logged: the worker then drives loading alone, as if it were the only one)."""
    try:
        return WorkerRepository(folder, config, router, make_sync)
    except OSError as exc:
        log.error("repository: this worker drives loading on its own, unaware of the others: %s", exc)
        return None
