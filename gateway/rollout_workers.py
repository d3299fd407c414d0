"""Rollout decisions shared by the worker processes of one gateway (``server.workers`` > 1).

Each worker chooses the version of its own requests and records how they end, in its own
``Rollouts``. A decision moves a model's rollout: an operator's promote, rollback or set_share
(the admin API reaches the one worker that took the connection), or an automatic rollback, ramp
step or promotion (made by the worker whose window or count gets there first). Kept to one
worker, a decision would leave the others on the old split: a canary rolled back in one worker
still served by the rest.

So the worker that makes a decision writes it to ``rollout/decisions.json`` in the workers'
folder (``host_files.create_workers_folder``), and every worker reads that file within ``POLL_S``
of a change and takes the decision over (``RolloutState.adopt``):

* **One record per trial.** A record holds the trial it belongs to (``rollout.trial_key``: the
  model and its table, or under ``[defaults]`` its stable and canary versions: the same in every
  worker, whichever version of the file it read and whenever it started), where the rollout
  stands (stable version, share, status, ramp step), the event with its evidence, the worker
  that made it, and a sequence number. A worker takes over only records of the trial it runs: a
  worker that has not yet read an edited rollout file neither applies the new trial's decisions
  nor overwrites them with its old trial's.
* **A trial that ends is forgotten.** Its table edited or removed, or (under ``[defaults]``) its
  canary or stable version gone from the fleet: the worker that sees it first removes its
  record, so the same table, or a version published again under the same number, starts a
  trial anew everywhere.
* **Trials are recorded from their start** (automatic ones, with their versions and the
  model's rolled-back canaries still in the fleet; a table started afresh while the gateway
  runs), so that a worker starting later (a replacement after a crash, a SIGHUP restart) joins
  the model's trial (``remembered``) rather than making the fleet's newest version, which may
  be a canary the others rolled back, its stable one; and so that workers of which only some
  saw a table edited and put back (one trial key, started afresh in some) agree. A starting
  worker takes over where the others stand before it serves.
* **Written under a lock.** A decision is merged into the file under an exclusive ``flock`` on
  ``decisions.lock`` and the file is replaced in one step. An automatic decision made by a
  worker that had not yet taken over its trial's latest record is written only if it goes
  further: a rollback or promotion over a ramp step, a later step over an earlier one; else the
  worker takes the record instead. An operator's action always wins.
* **Evidence stays per worker.** Windows, request counts and shadow comparisons are each
  worker's own (its part of the traffic), and so is ``GET /v2/gateway/rollout``'s view of them;
  the events of decisions another worker made say which (``worker``).

A new gateway starts with a new folder: decisions live until the gateway restarts, as in a
one-process gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from gateway.host_files import file_stamp, replace_file
from gateway.rollout import Rollouts, RolloutState

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a worker looks for the others' decisions
FOLDER = "rollout"
DECISIONS = "decisions.json"
# Past this many records, those a newer record of the same model supersedes go. A trial's record
# goes when the trial ends, so the file holds the trials under way; the latest record of each
# model always stays (evicting live records let a replacement worker serve a canary the others
# had rolled back).
TRIALS_KEPT = 64
TERMINAL = ("rolled_back", "promoted")


def goes_further(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether an automatic decision ``new`` moves the trial on from the record ``old``."""
    if old["by"] == "operator" or old["status"] in TERMINAL:
        return False
    return new["status"] in TERMINAL or new["step"] > old["step"]


def kept(trials: dict[str, Any]) -> dict[str, Any]:
    """``trials`` less, past ``TRIALS_KEPT``, the records a newer one of their model supersedes."""
    if len(trials) <= TRIALS_KEPT:
        return trials
    latest: dict[str, int] = {}
    for record in trials.values():
        latest[record["model"]] = max(latest.get(record["model"], 0), record["seq"])
    return {key: r for key, r in trials.items() if r["seq"] == latest[r["model"]]}


class SharedDecisions:
    """One worker's end of the shared decisions: ``decided`` (``Rollouts.on_decision``) writes
    this worker's, ``poll`` takes over the others'."""

    def __init__(self, folder: str | Path, rollouts: Rollouts, clock: Callable[[], float] = time.monotonic, pid: int | None = None) -> None:
        self._dir = Path(folder) / FOLDER
        self._dir.mkdir(exist_ok=True)
        self._path = self._dir / DECISIONS
        self._lock_path = self._dir / "decisions.lock"
        self._rollouts = rollouts
        self._clock = clock
        self.pid = pid or os.getpid()
        self._seen: tuple[int, int, int] | None = None
        self._records: dict[str, Any] = {}  # the file's records, by trial, as last read
        self._applied: dict[str, int] = {}  # trial -> the sequence number of its record in force here
        rollouts.on_decision = self.decided
        rollouts.on_trial_over = self.trial_over
        rollouts.on_trial_started = self.started
        rollouts.recall = self.remembered
        self.poll()  # a worker starting (a replacement, a restart) takes over where the others stand

    def _read(self) -> dict[str, Any]:
        """The file's records; none where it is missing or was spoilt (logged: the next decision
        writes it anew)."""
        try:
            data = orjson.loads(self._path.read_bytes())
        except FileNotFoundError:
            data = None
        except orjson.JSONDecodeError as exc:
            log.error("rollout: the workers' decisions in %s do not parse (%s); the next decision replaces them", self._path, exc)
            data = None
        if isinstance(data, dict) and isinstance(data.get("seq"), int) and isinstance(data.get("trials"), dict):
            return data
        return {"seq": 0, "trials": {}}

    def decided(self, model: str, state: RolloutState, by: str) -> None:
        """This worker's decision on ``model`` (its ``state`` moved): written for the others, or,
        where another worker's record of the trial goes further, that record taken over."""
        stable, share, status, step = state.position
        record = {
            "model": model, "stable": stable, "share": share, "status": status, "step": step,
            "event": state.events[-1] if state.events else {}, "by": by, "pid": self.pid,
            "automatic": self._rollouts.auto.get(model) is state, "versions": [state.config.stable, state.config.canary],
            "rejected": sorted(self._rollouts.rejected.get(model, ())),
        }  # fmt: skip
        try:
            with self._locked() as data:
                old = data["trials"].get(state.trial)
                if old is not None and old["seq"] != self._applied.get(state.trial) and by != "operator":
                    if not goes_further(record, old):
                        self._adopt(state, old)
                        return
                data["seq"] += 1
                data["trials"][state.trial] = {**record, "seq": data["seq"]}
                data["trials"] = kept(data["trials"])
                replace_file(self._path, orjson.dumps(data))
                self._applied[state.trial] = data["seq"]
        except (OSError, KeyError, TypeError) as exc:
            log.error("rollout: could not share the %s decision on %s with the other workers: %s", status, model, exc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The file's records, read under the exclusive lock, held until the block ends."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while a few hundred bytes are read and written
            yield self._read()
        finally:
            os.close(fd)  # lets go of the lock

    def trial_over(self, trial: str) -> None:
        """A trial ended in this worker (its table edited or removed, its canary or stable gone):
        its record goes, so that the same table or versions again start a new trial everywhere.
        (A worker still running the trial may write it again; it forgets it in turn once it sees
        the trial end.)"""
        self._applied.pop(trial, None)
        try:
            with self._locked() as data:
                if data["trials"].pop(trial, None) is None:
                    return
                data["seq"] += 1
                replace_file(self._path, orjson.dumps(data))
        except (OSError, KeyError, TypeError) as exc:
            log.error("rollout: could not tell the other workers that a trial ended: %s", exc)

    def remembered(self, model: str) -> tuple[str, str, tuple[str, ...]] | None:
        """The stable and canary versions of the other workers' latest automatic trial of
        ``model`` (under ``[defaults]``), and the canaries they rolled back that are not to be
        tried again, or None: a worker that starts (a replacement, after a crash or a SIGHUP)
        joins it rather than starting its own from the fleet's newest version, which may be a
        canary they rolled back."""
        self._refresh()
        found = [r for r in self._records.values() if r.get("model") == model and r.get("automatic")]
        if not found:
            return None
        latest = max(found, key=lambda r: r["seq"])
        stable, canary = latest["versions"]
        return str(stable), str(canary), tuple(str(v) for v in latest.get("rejected", ()))

    def started(self, state: RolloutState) -> bool:
        """A trial started in this worker: where the others stand in it, taken over at once;
        False if none of them runs it yet."""
        self._refresh()
        record = self._records.get(state.trial)
        if record is None:
            return False
        self._adopt(state, record)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.poll()
            except Exception:
                log.exception("rollout: taking over the other workers' decisions failed")

    def poll(self) -> None:
        """Take over the decisions other workers wrote that this worker has not applied: the
        file is read again when it changed, and its records are held to every trial this worker
        runs, including one it started since the file last changed (a rollout file read late)."""
        if not self._refresh():
            return
        for state in self._rollouts.all_states().values():
            record = self._records.get(state.trial)
            if record is not None and record["seq"] != self._applied.get(state.trial):
                self._adopt(state, record)

    def _refresh(self) -> bool:
        """Read the file again if it changed; False if it cannot be read."""
        seen = file_stamp(self._path)
        if seen is not None and seen != self._seen:
            try:
                self._records = self._read()["trials"]
            except OSError as exc:
                log.warning("rollout: cannot read the workers' decisions in %s: %s", self._path, exc)
                return False
            self._seen = seen
        elif seen is None:
            self._records = {}
        return True

    def _adopt(self, state: RolloutState, record: dict[str, Any]) -> None:
        self._applied[state.trial] = record["seq"]
        position = (record["stable"], record["share"], record["status"], record["step"])
        if position != state.position:
            state.adopt(position, {**record["event"], "worker": record["pid"]}, self._clock())


def shared_decisions(folder: str | Path, rollouts: Rollouts) -> SharedDecisions | None:
    """This worker's ``SharedDecisions`` in ``folder``, or None where the folder cannot be used
    (logged: the worker's decisions then stay its own)."""
    try:
        return SharedDecisions(folder, rollouts)
    except OSError as exc:
        log.error("rollout: this worker's decisions stay its own, unseen by the other workers: %s", exc)
        return None
