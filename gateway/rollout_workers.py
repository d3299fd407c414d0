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
  model, its table and when the table took effect, the same in every worker), where the rollout
  stands (stable version, share, status, ramp step), the event with its evidence, the worker
  that made it, and a sequence number. A worker takes over only records of the trial it runs: a
  worker that has not yet read an edited rollout file neither applies the new trial's decisions
  nor overwrites them with its old trial's.
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
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.host_files import file_stamp, replace_file
from gateway.rollout import Rollouts, RolloutState

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a worker looks for the others' decisions
FOLDER = "rollout"
DECISIONS = "decisions.json"
TRIALS_KEPT = 64  # records kept, the most recent; older trials are long over
TERMINAL = ("rolled_back", "promoted")


def goes_further(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether an automatic decision ``new`` moves the trial on from the record ``old``."""
    if old["by"] == "operator" or old["status"] in TERMINAL:
        return False
    return new["status"] in TERMINAL or new["step"] > old["step"]


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
        }  # fmt: skip
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held while a few hundred bytes are read and written
                data = self._read()
                old = data["trials"].get(state.trial)
                if old is not None and old["seq"] != self._applied.get(state.trial) and by != "operator":
                    if not goes_further(record, old):
                        self._adopt(state, old)
                        return
                data["seq"] += 1
                data["trials"][state.trial] = {**record, "seq": data["seq"]}
                kept = sorted(data["trials"].items(), key=lambda kv: kv[1]["seq"])[-TRIALS_KEPT:]
                data["trials"] = dict(kept)
                replace_file(self._path, orjson.dumps(data))
                self._applied[state.trial] = data["seq"]
            finally:
                os.close(fd)  # lets go of the lock
        except (OSError, KeyError, TypeError) as exc:
            log.error("rollout: could not share the %s decision on %s with the other workers: %s", status, model, exc)

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
        seen = file_stamp(self._path)
        if seen is not None and seen != self._seen:
            try:
                self._records = self._read()["trials"]
            except OSError as exc:
                log.warning("rollout: cannot read the workers' decisions in %s: %s", self._path, exc)
                return
            self._seen = seen
        for state in self._rollouts.all_states().values():
            record = self._records.get(state.trial)
            if record is not None and record["seq"] != self._applied.get(state.trial):
                self._adopt(state, record)

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
