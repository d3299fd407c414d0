"""Stateful models: every request of a sequence reaches the version and the Triton instance that
hold its state.

A model with ``sequence_batching`` in its config keeps each sequence's state (the sequence
batcher's slot, the model's own state) in the instance, and the version, that served its first
request (``sequence_start``). Balanced like other requests, the sequence's later requests would
land on other instances, or on a newer version after a drop-in update, and Triton refuses them
there (400 "must specify the START flag"). So a request carrying a ``sequence_id`` (not 0, not
"") is routed by its sequence:

* **Instance** (for a model with ``sequence_batching``): the one this process pinned the
  sequence to, else the rendezvous choice: the instance whose hash of (sequence, instance) is
  highest among those holding the version. Every worker process and every gateway replica that
  sees the same fleet makes the same choice, without sharing anything; the pin, set by each
  answer, keeps a sequence where it is when instances join the fleet meanwhile.
* **Version**, for a request naming none: the one pinned, while the fleet still holds it, else
  the rollout's draw made from the sequence id (the same draw for all its requests) or the
  fleet's newest.
* A start may be sent to another instance when its own cannot take it: no state is lost. A later
  request never is: if its instance is down, or no longer holds the version, it fails with 503
  naming the sequence, and the client starts the sequence again.
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

from gateway.errors import Unavailable
from gateway.instances import Instance

IDLE_S = 600.0
MAX_PINS = 65536

V = TypeVar("V")


def sequence_of(parameters: dict[str, Any] | None) -> bytes | None:
    """The request's sequence as a key (its ``sequence_id``), or None when it belongs to none."""
    if not parameters:
        return None
    sid = parameters.get("sequence_id")
    if sid is None or sid == 0 or sid == "":
        return None
    return b"%d" % sid if type(sid) is int else b"s" + str(sid).encode()  # 7 and "7" differ


def starts(parameters: dict[str, Any]) -> bool:
    return parameters.get("sequence_start") is True


def ends(parameters: dict[str, Any]) -> bool:
    return parameters.get("sequence_end") is True


def rendezvous(key: bytes, instances: Sequence[Instance]) -> Instance:
    """The instance whose hash with ``key`` is highest: the same for any process that sees the
    same instances, and when one leaves only its own sequences move."""
    return max(instances, key=lambda i: hashlib.blake2b(key + b"\0" + i.url.encode(), digest_size=8).digest())


def shown(key: bytes) -> str:
    text = key.decode(errors="replace")
    return repr(text[1:]) if text.startswith("s") else text


@dataclass(slots=True)
class Affinity:
    """How the router picks the instance for one request of a sequence (``Router.infer``)."""

    key: bytes  # the sequence
    pinned: str | None  # the instance it is pinned to in this process (its URL), if any
    strict: bool  # not a start: only that instance holds the state, no other may take it
    served: str | None = None  # set by the router: the instance that answered

    def narrow(self, candidates: Sequence[Instance]) -> list[Instance]:
        """The instance of ``candidates`` (those holding the version) for this sequence."""
        if self.pinned is not None:
            held = [i for i in candidates if i.url == self.pinned]
            if held:
                return held
            if self.strict:
                raise Unavailable(
                    f"sequence {shown(self.key)}: the Triton instance holding its state is unavailable or no "
                    "longer holds the version; start the sequence again (sequence_start)"
                )
        return [rendezvous(self.key, candidates)] if candidates else []


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
