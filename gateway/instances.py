"""What the gateway knows about each Triton instance, and when it may route to it.

An ``Instance`` is written by two sources and read by the router without awaiting:

* **active health** (``upstream.fleet``): each probe round sets ``live`` (``/v2/health/live``),
  ``ready`` (``/v2/health/ready``, shown, not routed on: Triton says "not ready" while it loads
  a new version yet serves the loaded ones) and ``loaded``, the model versions the instance
  has READY (its repository index);
* **repository sync** (``upstream.repository``, when the gateway drives loading) withholds
  versions that are READY but must not be routed yet or any more: warming up, draining before
  an unload, failed. ``models``, what the router reads, is ``loaded`` less ``withheld``; in a
  worker process that follows another worker driving the repository
  (``upstream.repository_workers``), it is what that worker routes (``follow``);
* **passive outcomes** (the router): every upstream request ends in ``record_success`` or
  ``record_failure``. ``eject_after`` consecutive failures (no answer, a timeout, a 5xx) eject
  the instance for ``base × k`` seconds, capped at ``max``, where k counts its ejections since
  it last stayed healthy for ``max`` seconds: a flapping instance stays out longer each time.
  At most ``max_share`` of the fleet is ejected at once (one instance of two), and never all of
  it, whatever the share (1.0 included): ejection always leaves one instance. Down instances
  count as out. When the limit is reached the instance stays in, as Envoy does, since ejecting
  everything serves no one. An ejected instance comes back on the first successful probe after
  its ejection time.

A connection refused is different from a failed request: nothing listens, so the instance is
marked down at once (``live = False``) and the next successful probe brings it back.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.metrics import count_latency, latency_row

RECENT_ERRORS = 10  # kept per instance for the fleet view
LOAD_WINDOW_S = 1.0  # time constant of the averaged load


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    after_failures: int = 5
    base_s: float = 5.0
    max_s: float = 60.0
    max_share: float = 0.5

    def max_ejected(self, fleet_size: int) -> int:
        """The most of ``fleet_size`` instances that may be out (ejected or down) after an
        ejection: ``max_share`` of them, at least one, and never all (a share of 1 included)."""
        if fleet_size < 2 or not self.max_share > 0:
            return 0
        return min(fleet_size - 1, max(1, int(self.max_share * fleet_size)))


@dataclass(slots=True, eq=False)
class Instance:
    url: str
    weight: float = 1.0
    grpc: str = ""  # host:port of its gRPC endpoint, when known (repository loading uses it)
    live: bool = True
    ready: bool = True
    # model name -> versions READY on this instance; None until the first repository index.
    loaded: dict[str, frozenset[str]] | None = None
    # (model, version) -> why it is not routed although READY: "warming up", "draining", ...
    withheld: dict[tuple[str, str], str] = field(default_factory=dict)
    # What the router routes to: ``loaded`` less ``withheld`` (or ``led``).
    models: dict[str, frozenset[str]] | None = None
    # In a worker following the worker that drives the repository: what that one routes here.
    led: dict[str, frozenset[str]] | None = None
    # Requests in flight per (model, version): what draining a version waits for.
    active: dict[tuple[str, str], int] = field(default_factory=dict)
    # Sequences of a stateful model under way here per (model, version), each with the time
    # (monotonic) at which Triton forgets it if no request comes (``gateway.sequences``) and
    # the time its last request was answered, the soonest forgotten first: what a draining or
    # reloading version waits for.
    sequences: dict[tuple[str, str], OrderedDict[bytes, tuple[float, float]]] = field(default_factory=dict)
    # Sequences whose end (``sequence_end``) this process answered here, per (model, version),
    # kept as long as another worker process that answered their earlier requests may still
    # count them under way (the same times as ``sequences``): see ``ended_elsewhere``.
    ended: dict[tuple[str, str], OrderedDict[bytes, tuple[float, float]]] = field(default_factory=dict)
    # Stateful models about to be reloaded here (any version change makes Triton reload the
    # model, dropping its sequences under way): new sequences start elsewhere meanwhile.
    quiescing: frozenset[str] = frozenset()
    # Of those, the ones whose load call is in flight here: a sequence started now would be
    # dropped by the reload, unnoticed, so none starts here (``Router.pick``).
    reloading: frozenset[str] = frozenset()
    # Bumped whenever the repository sync sets ``loaded`` itself: a repository index asked for
    # before that is stale, and the health probe drops it (see ``set_index``).
    index_epoch: int = 0
    outstanding: int = 0
    # Requests in flight averaged over about LOAD_WINDOW_S (time-weighted): the balancer's
    # measure of how loaded the instance is, steadier than the instant count (see balancer.py).
    load: float = 0.0
    load_at: float = 0.0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    ejected_until: float | None = None  # set while ejected, cleared when re-admitted
    ejections: int = 0  # all ejections, for the fleet view
    streak: int = 0  # ejections that count towards the next one's length
    admitted_at: float = 0.0
    recent_errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))
    # How long its answered infer requests took, as a row of metrics.latency_row's shape.
    answer_times: list[float] = field(default_factory=latency_row, repr=False)
    # Smooth weighted round-robin credit (see balancer.py).
    credit: float = 0.0
    # Newest READY version per model, derived from `models` (recomputed when it is replaced).
    _newest: dict[str, int] = field(default_factory=dict, repr=False)
    _newest_of: object = field(default=None, repr=False)

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    @property
    def routable(self) -> bool:
        return self.live and self.ejected_until is None

    @property
    def state(self) -> str:
        return "ejected" if self.ejected else "up" if self.live else "down"

    def holds(self, model: str, version: str) -> bool | None:
        """Whether the instance has the model version READY; None when it is not known yet."""
        if self.models is None:
            return None
        versions = self.models.get(model)
        if versions is None:
            return False
        return bool(versions) if not version else version in versions

    def newest(self, model: str) -> int | None:
        """The highest version of ``model`` READY here (what Triton serves for no version)."""
        if self._newest_of is not self.models:
            self._newest = {
                name: max(int(v) for v in versions if v.isdigit())
                for name, versions in (self.models or {}).items()
                if any(v.isdigit() for v in versions)
            }
            self._newest_of = self.models
        return self._newest.get(model)

    def set_index(self, ready: dict[str, frozenset[str]], epoch: int | None = None) -> None:
        """What the repository index says is READY here; ``epoch``: ``index_epoch`` when the
        index was asked for (an index older than the sync's last change is not applied)."""
        if epoch is not None and epoch != self.index_epoch:
            return
        self.loaded = ready
        self._refresh()

    def sync_index(self, loaded: dict[str, frozenset[str]]) -> None:
        """What the repository sync just loaded here (newer than any index in flight)."""
        self.index_epoch += 1
        self.set_index(loaded)

    def withhold(self, model: str, version: str, why: str) -> None:
        """Stop routing this version here (it stays loaded), saying why."""
        self.withheld[(model, version)] = why
        self._refresh()

    def withholds(self, model: str, version: str) -> str | None:
        """Why this version (any version, for "") of the model is held back here, if it is."""
        if version:
            return self.withheld.get((model, version))
        return next((why for (m, _), why in self.withheld.items() if m == model), None)

    def release(self, model: str, version: str) -> None:
        """Forget a withheld version that is no longer loaded here (nothing left to hold back)."""
        if self.withheld.pop((model, version), None) is not None:
            self._refresh()

    def admit(self, model: str, version: str) -> None:
        """Route this version here: it is loaded and warm (the next index confirms it)."""
        self.withheld.pop((model, version), None)
        loaded = dict(self.loaded or {})
        loaded[model] = loaded.get(model, frozenset()) | {version}
        self.sync_index(loaded)

    def follow(
        self,
        routed: dict[str, frozenset[str]] | None,
        withheld: dict[tuple[str, str], str],
        quiescing: frozenset[str] = frozenset(),
        reloading: frozenset[str] = frozenset(),
    ) -> None:
        """Route what the worker driving the repository routes here, hold back what it
        withholds, and start no sequence of a model it quiesces or reloads
        (``upstream.repository_workers``); ``routed`` None: this worker's own index less
        ``withheld``."""
        self.led = routed
        self.withheld = withheld
        self.quiescing = quiescing
        self.reloading = reloading
        self._refresh()

    def _refresh(self) -> None:
        if self.led is not None:
            self.models = self.led
            return
        if self.loaded is None:
            return
        if not self.withheld:
            self.models = self.loaded
            return
        models = {}  # a new map: never change one another reader holds
        for model, versions in self.loaded.items():
            routable = frozenset(v for v in versions if (model, v) not in self.withheld)
            if routable:
                models[model] = routable
        self.models = models

    def forget(self, model: str, version: str) -> None:
        """The instance said it does not hold this version: stop routing it there until the next
        repository index says otherwise."""
        loaded = _without(self.loaded if self.loaded is not None else self.models or {}, model, version)
        if self.led is not None:
            self.led = _without(self.led, model, version)  # until the driver says otherwise
        self.set_index(loaded)

    def started(self, model: str, version: str) -> None:
        key = (model, version)
        self.active[key] = self.active.get(key, 0) + 1

    def finished(self, model: str, version: str) -> None:
        key = (model, version)
        left = self.active.get(key, 0) - 1
        if left > 0:
            self.active[key] = left
        else:
            self.active.pop(key, None)

    def sequence_answered(self, model: str, version: str, sequence: bytes, ended: bool, now: float, idle_s: float) -> None:
        """A request of ``sequence`` was answered here at ``now``: the sequence is under way
        for ``idle_s`` more unless another request comes, or over when it ``ended``."""
        key = (model, version)
        book = self.ended if ended else self.sequences
        if ended:
            self._drop_sequence(key, sequence)
        times = book.get(key)
        if times is None:
            times = book[key] = OrderedDict()
        times[sequence] = (now + idle_s, now)
        times.move_to_end(sequence)  # one idle time per model: in order of expiry
        self._expire(book, key, now)

    def ended_elsewhere(self, model: str, version: str, ends: Iterable[tuple[bytes, float]]) -> None:
        """Sequences whose end another worker process answered, each with the time it did: with
        several workers, a sequence's requests reach whichever reads them, and the one that
        answered its start would otherwise count it under way until its idle time ran out,
        holding up a drain or a reload that long. A sequence whose last request here was
        answered after that end (its id used again since) stays under way."""
        open_ = self.sequences.get((model, version))
        for sequence, at in ends:
            if open_ is not None and (times := open_.get(sequence)) is not None and times[1] <= at:
                self._drop_sequence((model, version), sequence)

    def recent_ends(self, model: str, version: str, now: float) -> list[tuple[bytes, float]]:
        """The sequences of the version whose end this process answered here within their idle
        time, with when: what another worker may still count under way."""
        key = (model, version)
        if key not in self.ended:
            return []
        self._expire(self.ended, key, now)
        return [(sequence, at) for sequence, (_, at) in self.ended.get(key, {}).items()]

    def forget_sequences(self, model: str) -> None:
        """The model was reloaded here: Triton holds none of its sequences any more."""
        for book in (self.sequences, self.ended):
            for key in [k for k in book if k[0] == model]:
                del book[key]

    def open_sequences(self, model: str, version: str, now: float) -> int:
        """How many sequences are under way here on the version at ``now``."""
        key = (model, version)
        if key not in self.sequences:
            return 0
        self._expire(self.sequences, key, now)
        return len(self.sequences.get(key, ()))

    def drains(self, model: str, version: str) -> bool:
        """Whether the version is loaded here but drained before it is unloaded: not routed,
        except for the later requests of sequences, which may be under way on it (if one is
        not, Triton says so, as any instance does that does not hold a sequence).
        """
        return self.withheld.get((model, version)) == "draining" and version in (self.loaded or {}).get(model, ())

    def _drop_sequence(self, key: tuple[str, str], sequence: bytes) -> None:
        open_ = self.sequences.get(key)
        if open_ is not None and open_.pop(sequence, None) is not None and not open_:
            del self.sequences[key]

    @staticmethod
    def _expire(book: dict[tuple[str, str], OrderedDict[bytes, tuple[float, float]]], key: tuple[str, str], now: float) -> None:
        """Forget the sequences of ``book[key]`` whose idle time is over at ``now``."""
        times = book[key]
        while times:
            sequence, (until, _) = next(iter(times.items()))
            if until > now:
                return
            del times[sequence]
        del book[key]

    def settle(self, now: float) -> None:
        """Bring ``load`` up to ``now``: the count in flight since the last change decays in."""
        dt = now - self.load_at
        if dt > 0:
            self.load = self.outstanding + (self.load - self.outstanding) * math.exp(-dt / LOAD_WINDOW_S)
            self.load_at = now

    def begin(self, now: float) -> None:
        self.settle(now)
        self.outstanding += 1
        self.requests += 1

    def end(self, now: float) -> None:
        self.settle(now)
        self.outstanding -= 1

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_answer(self, seconds: float) -> None:
        """An infer request it answered with a result, ``seconds`` after the gateway began sending it."""
        self.record_success()
        count_latency(self.answer_times, seconds)

    def record_failure(self, error: str, now: float, fleet: Sequence[Instance], policy: EjectionPolicy) -> bool:
        """Count a failed request; return True if it ejected the instance."""
        self.failures += 1
        self.consecutive_failures += 1
        self.recent_errors.append((now, error))
        if self.ejected or self.consecutive_failures < policy.after_failures:
            return False
        # Down instances count as out: ejecting beside them could leave no instance at all.
        if sum(1 for i in fleet if i.ejected or not i.live) >= policy.max_ejected(len(fleet)):
            return False
        if now - self.admitted_at >= policy.max_s:
            self.streak = 0  # it behaved for long enough: start the back-off again
        self.streak += 1
        self.ejections += 1
        self.ejected_until = now + min(policy.base_s * self.streak, policy.max_s)
        return True

    def mark_down(self, error: str, now: float) -> None:
        self.failures += 1
        self.live = False
        self.recent_errors.append((now, error))

    def probed(self, live: bool, now: float) -> None:
        """The result of an active health probe: it re-admits an ejected instance once its time
        is over, and brings a down one back up."""
        self.live = live
        if live and self.ejected_until is not None and now >= self.ejected_until:
            self.ejected_until = None
            self.consecutive_failures = 0
            self.admitted_at = now

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "weight": self.weight,
            "state": self.state,
            "live": self.live,
            "ready": self.ready,
            "inflight": self.outstanding,
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "ejections": self.ejections,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3) if self.ejected_until is not None else 0.0,
            "recent_errors": [{"age_s": round(now - t, 3), "error": e} for t, e in reversed(self.recent_errors)],
            "models": None if self.models is None else {m: sorted(v, key=_version_key) for m, v in sorted(self.models.items())},
            "withheld": [
                {"model": m, "version": v, "why": why} for (m, v), why in sorted(self.withheld.items()) if v in (self.loaded or {}).get(m, ())
            ],
            "sequences": {f"{m}/{v}": n for m, v in sorted(self.sequences) if (n := self.open_sequences(m, v, now))},
            "quiescing": sorted(self.quiescing),
            "reloading": sorted(self.reloading),
        }


def _without(models: dict[str, frozenset[str]], model: str, version: str) -> dict[str, frozenset[str]]:
    """A copy of ``models`` without one version of ``model`` (without the model, for "")."""
    copy = dict(models)
    remaining = frozenset() if not version else copy.get(model, frozenset()) - {version}
    if remaining:
        copy[model] = remaining
    else:
        copy.pop(model, None)
    return copy


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (1 << 62, version)
