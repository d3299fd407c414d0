"""Stateful models: every request of a sequence reaches the version and the Triton instance that
hold its state.

A model with ``sequence_batching`` in its config keeps each sequence's state (the sequence
batcher's slot, the model's own state) in the instance, and the version, that served its first
request (``sequence_start``). Balanced like other requests, the sequence's later requests would
land on other instances, or on a newer version after a drop-in update, and Triton refuses them
there (400 "must specify the START flag"). So a request carrying a ``sequence_id`` (not 0, not
"") is routed by its sequence:

* **Instance** (for a model with ``sequence_batching``): the instances holding the version are
  ranked by a hash of (sequence, instance) (rendezvous hashing), the same ranking in every worker
  process and gateway replica, whatever each thinks of the instances' health. A start goes to
  the first that is up; if nothing could be sent there (connection refused), to the next; any
  other failure of a start is the client's answer, since Triton may have started the sequence.
  A start avoids an instance where the model is about to be reloaded (``Instance.quiescing``)
  if another can take it, and never goes where the reload is under way (``Instance.reloading``:
  503 if every instance is). A later request goes to the instance this process pinned the
  sequence to (at each answer), else to the first up in the ranking; Triton's "must specify the START flag" there (the
  sequence is not on that instance: it started on another, which was down then, or before an
  instance joined) sends it on to the next, which changes nothing where it is refused. Where
  an instance that may hold the sequence is down or ejected, or no instance holds the version
  any more, the request fails with 503 naming the sequence: the client starts it again.
* **Version**, for a request naming none: the rollout's draw is made from the sequence id (a
  canary split moves whole sequences) and the answer pins the version in this process. When the
  version leaves (a newer one arrived, or it was removed), the repository sync waits for the
  sequences under way on it, which keep reaching it (``Instance.drains``), and reloads no
  instance under its sequences (``upstream.repository``); a later request whose pinned version
  the fleet no longer serves fails with 503 naming the sequence. The pin is this process's: with
  several worker processes or replicas, a sequence under way when the version a request naming
  none resolves to changes (a new version is routed, the rollout's share moves) can reach the
  new version in another process, which refuses it. Clients whose sequences must outlive such
  changes name the version (the start's answer gives it: ``model_version``, the
  ``Model-Version`` header).
* **Under way.** Each instance counts the sequences it answered that have not ended nor gone
  idle for longer than Triton keeps them (the model's ``max_sequence_idle_microseconds``):
  ``Instance.sequences``, what those waits are for. With several worker processes, the ends
  another worker answered count too (``upstream.repository_workers``).
* ``sequence_end`` forgets the sequence. Pins not used for ``IDLE_S`` are forgotten (Triton
  frees an idle sequence's slot much sooner: ``max_sequence_idle_microseconds``, 1 s by
  default), and at most ``MAX_PINS`` are kept, the least recently used dropped first.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway import errors
from gateway.errors import Unavailable, UpstreamError
from gateway.instances import Instance
from gateway.upstream.client import InstanceUnreachable

IDLE_S = 600.0
MAX_PINS = 65536
MAX_KEY_BYTES = 64  # longer string ids are keyed by a hash

V = TypeVar("V")


def sequence_of(parameters: dict[str, Any] | None) -> bytes | None:
    """The request's sequence as a key (from its ``sequence_id``), or None when it belongs to
    none. Integer and string ids differ (7 and "7"); long string ids are hashed."""
    if not parameters:
        return None
    sid = parameters.get("sequence_id")
    if sid is None or sid == 0 or sid == "":
        return None
    if type(sid) is int:
        return b"%d" % sid
    raw = str(sid).encode()
    return b"s" + raw if len(raw) <= MAX_KEY_BYTES else b"h" + hashlib.blake2b(raw, digest_size=16).digest()


def shown(parameters: dict[str, Any]) -> str:
    """The sequence id as a message names it."""
    sid = parameters.get("sequence_id")
    return str(sid) if type(sid) is int else errors.shown(str(sid)[:MAX_KEY_BYTES])


def starts(parameters: dict[str, Any]) -> bool:
    return parameters.get("sequence_start") is True


def ends(parameters: dict[str, Any]) -> bool:
    return parameters.get("sequence_end") is True


def not_here(error: BaseException) -> bool:
    """Triton's answer for a later request of a sequence it does not hold."""
    return isinstance(error, UpstreamError) and error.status == 400 and "must specify the START flag" in error.message


def ranked(key: bytes, instances: Sequence[Instance]) -> list[Instance]:
    """``instances`` in the sequence's order (rendezvous hashing): the same in any process that
    knows them, and when one leaves, only the sequences it led move."""
    return sorted(instances, key=lambda i: hashlib.blake2b(key + b"\0" + i.url.encode(), digest_size=8).digest(), reverse=True)


def gone(name: str, why: str) -> Unavailable:
    return Unavailable(f"sequence {name}: {why}; start the sequence again (sequence_start)")


@dataclass(slots=True)
class Affinity:
    """How the router picks the instance for one request of a sequence (``Router.infer``)."""

    key: bytes  # the sequence
    name: str  # its id, for messages
    pinned: str | None  # a later request: the instance this process pinned it to (URL), if any
    strict: bool  # not a start: only the instance holding the state may take it
    ends: bool = False  # the sequence's last request (``sequence_end``)
    idle_s: float = 1.0  # how long Triton keeps the sequence without a request
    served: str | None = None  # set by the router: the instance that answered
    unreachable: bool = False  # an instance that may hold the state was down or ejected

    def next(self, routable: Sequence[Instance], holders: Sequence[Instance], tried: Sequence[Instance]) -> Instance | None:
        """The instance to try next: of ``holders`` (the instances holding the version, up or
        not), the pinned one, else the first in the sequence's ranking not ``tried`` that is
        in ``routable``; None when none is left (``unreachable`` says whether one that may
        hold the sequence was skipped, being down)."""
        if self.pinned is not None:
            pinned = next((i for i in holders if i.url == self.pinned), None)
            if pinned is not None and pinned not in tried:
                if pinned in routable:
                    return pinned
                self.unreachable = True  # the sequence is there, and that instance is down
                return None
        for instance in ranked(self.key, holders):
            if instance in tried:
                continue
            if instance in routable:
                return instance
            if self.strict:
                self.unreachable = True
        return None

    def narrow(self, routable: Sequence[Instance], holders: Sequence[Instance], tried: Sequence[Instance]) -> list[Instance]:
        instance = self.next(routable, holders, tried)
        if instance is not None:
            return [instance]
        if self.strict and (self.unreachable or self.pinned is not None):
            raise gone(self.name, "the Triton instance holding its state is unavailable")
        return []

    def retries(self, error: BaseException) -> bool:
        """Whether another instance may take the request after ``error``: a start only when
        nothing was sent; a later request when the sequence is not where it was sent."""
        if self.strict:
            return not_here(error)
        return isinstance(error, InstanceUnreachable) and error.connect_failed


class Pins(Generic[V]):
    """What each sequence is pinned to, by (model, version asked for, sequence): least recently
    used first, forgotten after ``idle_s`` unused or beyond ``max_pins``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, idle_s: float = IDLE_S, max_pins: int = MAX_PINS) -> None:
        self._clock = clock
        self._idle_s = idle_s
        self._max = max_pins
        self._pins: OrderedDict[tuple[str, str, bytes], tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, model: str, version: str, key: bytes) -> V | None:
        self._expire()
        pin = self._pins.get((model, version, key))
        return None if pin is None else pin[0]

    def pin(self, model: str, version: str, key: bytes, value: V) -> None:
        k = (model, version, key)
        self._pins[k] = (value, self._clock())
        self._pins.move_to_end(k)
        while len(self._pins) > self._max:
            self._pins.popitem(last=False)

    def forget(self, model: str, version: str, key: bytes) -> None:
        self._pins.pop((model, version, key), None)

    def _expire(self) -> None:
        oldest = self._clock() - self._idle_s
        while self._pins:
            k, (_, used) = next(iter(self._pins.items()))
            if used >= oldest:
                return
            del self._pins[k]
