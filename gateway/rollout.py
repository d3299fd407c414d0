"""Traffic split between model versions: which version serves a request that names none.

The rollout file (TOML, ``[rollout] file`` in the gateway config) holds one table per model:

    [models.digits_cnn]
    stable = "1"                  # the version that serves by default
    canary = "2"                  # optional: a version under trial...
    canary_share = 0.1            # ...and its share of requests, 0..1 (not with a ramp)
    sticky_header = "x-user"      # optional: a header whose value pins a client to a version
    # ramp = [0.05, 0.25, 0.5, 1.0] # or, instead of canary_share: rising shares to step through
                                  # while the canary behaves (the first is the starting share)...
    ramp_min_requests = 200       # ...each step lasting at least this many canary requests
    ramp_min_seconds = 30.0       # ...and this long; after the last step the canary is promoted
    rollback_error_rate = 0.02    # optional: roll back when the canary's error rate exceeds
                                  # stable's by more than this, significantly...
    rollback_latency_ratio = 2.0  # ...or more of its requests than chance allows take over
                                  # this many times stable's p99...
    rollback_window = 200         # ...over the last this-many computed answers of each
    shadow = "3"                  # optional: a candidate that also gets a copy of requests...
    shadow_share = 0.1            # ...this share of them; clients never see its answers

A ``[defaults]`` table (the same keys but ``stable``, ``canary`` and ``shadow``) makes every
version dropped into the repository a canary by itself: for a model without a table of its own,
the version serving when the gateway first sees the model is stable, and each newer version that
becomes routable on every instance starts as a canary of it at ``canary_share`` (or the first ramp
step), ramps, and is promoted or rolled back by these rules. Its state lives in memory, like
operator actions (shared by a gateway's workers, a replacement joining them:
``rollout_workers.py``): after a restart of the gateway the newest version serves again, so
remove a rolled-back version's folder (or give the model a table). A canary that leaves the
fleet ends its trial: a version published again under its number is a canary anew.

A request naming a version (``/v2/models/{m}/versions/{v}/infer``) bypasses the rollout; a model
without a table (and no ``[defaults]``) is served by the newest version READY on every instance. With a sticky header, the
choice is a hash of the model and the header's value: the same client always gets the same
version for a given share, and raising the share only moves clients from stable to canary. A
request of a sequence (``sequence_id``) is drawn from its id instead, so the split moves whole
sequences (``gateway.sequences``). Any other request without the header is drawn at random.

Automatic decisions (``RolloutState``): every request served through the rollout is recorded
(its version, whether it failed with a 5xx or timeout, its latency); answers from the cache
count for the ramp but not in the rollback windows, which compare the versions' computations.
The rollback rules are checked over the canary's full window every ``EVALUATE_EVERY`` canary
answers, and again right before each ramp step: with a rule set, a step (and the promotion)
waits, however many answers it has counted, until the canary's window is full (with the latency
rule, stable's too) and the rules hold then. Without a rule, the ramp steps on its counts alone.
Each rule fires on evidence, not on a chance difference between two samples: a canary no worse
than stable trips a rule in about 1 check in 1000 (one-sided tests):

- errors: the canary's error rate is above stable's by more than ``rollback_error_rate`` and a
  pooled two-proportion z-test finds it worse (z > 3.09); a stable version with fewer computed
  answers in its window than the canary (its others served from the cache) counts as many at
  its own error rate, one without any as a clean one.
- latency, once stable's window is full: the count of the canary's requests that took over
  ``rollback_latency_ratio`` x stable's p99 is more than a version like stable gives (at most 1%
  of its requests are above its p99): P(Binomial(n, 0.01) >= count) < 0.001. With a ratio of 1
  the reference is stable's p99 as estimated from its window, which chance alone beats in about
  1 check in 100; from a ratio of 1.5 up, far less than 1 in 1000. A canary starting at a
  share of 1.0 would leave stable nothing to measure: with this rule, the file is refused.

A setting that could not take effect is refused (``RolloutError``) rather than left silently off:
a ramp beside a ``canary_share``, shares that do not rise strictly, a ``rollback_error_rate`` of 1
or more (a difference of error rates), a ``rollback_window`` above ``MAX_WINDOW``, a ramp step
longer than ``MAX_STEP_REQUESTS`` or ``MAX_STEP_SECONDS``, a canary's settings in a table without
a canary, a shadow that is the stable or the canary version.

A small window detects only large regressions (what windows of 200 catch, simulated: README,
"Canary rollouts").

When the canary breaches a rule, its share goes to 0 at once and a ``rollback`` event is
recorded with the evidence: the rule, the window, both error rates, and the error rule's z, or
the latency rule's p99s, count of slow requests and their probability (``p_value``). When the
canary has completed every ramp step in good health, it is promoted: it becomes the stable
version.

Shadow mode mirrors a share of the requests the rollout serves to a candidate version, in the
background: the client's answer never waits for it nor depends on it. Each shadow answer is
compared with the answer the client got: the largest absolute difference over every output,
and, for classifiers (a 2-D output), how often both pick the same class (argmax agreement).

Operators act through the admin API (``promote``, ``rollback``, ``set_share``). Operator actions
and automatic decisions live in memory: the file stays the source of truth. They last until the
model's table in the file changes (then the file's table starts afresh) or the gateway restarts;
to make one permanent, write it into the file. With several worker processes, a decision made in
one reaches the others (``rollout_workers.py``).

The file is read at start and again whenever it changes (``Rollouts.reload_if_changed``). A file
that does not parse or validate is rejected with a message naming the problem, and the rollout
in force stays.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import shown
from gateway.host_files import replace_file
from gateway.protocol.v2 import canonical_version

log = logging.getLogger(__name__)

_KEYS = {
    "stable", "canary", "canary_share", "sticky_header", "ramp", "ramp_min_requests", "ramp_min_seconds",
    "rollback_error_rate", "rollback_latency_ratio", "rollback_window", "shadow", "shadow_share",
}  # fmt: skip
EVALUATE_EVERY = 10  # canary outcomes between two checks of the rollback rule (and one before each step)
# The rollback rules' false alarms: about 1 in 1000 checks of a canary no worse than stable.
Z_WORSE = 3.09  # the error rule: a one-sided z of 3.09 (P(Z > 3.09) = 0.001)
SLOW_SHARE = 0.01  # the latency rule: at most this share of a version's latencies is above its p99...
P_SLOWER = 0.001  # ...so more canary requests above it than Binomial(n, 0.01) gives with P < 0.001
MAX_EVENTS = 50
# The largest settings a rollout file may give: beyond them, a setting only switches its rule off.
MAX_WINDOW = 100_000  # rollback_window: each check goes over both windows (about 60 ms at this size)
MAX_STEP_REQUESTS = 1_000_000_000  # ramp_min_requests
MAX_STEP_SECONDS = 30 * 24 * 3600.0  # ramp_min_seconds: 30 days


class RolloutConflict(ValueError):
    """An operator's action that the rollout's state makes meaningless (HTTP 409)."""


class RolloutError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelRollout:
    """A model's table in the rollout file."""

    stable: str
    canary: str = ""
    canary_share: float = 0.0
    sticky_header: bytes = b""  # lower-case, as ASGI gives header names
    ramp: tuple[float, ...] = ()
    ramp_min_requests: int = 100
    ramp_min_seconds: float = 0.0
    rollback_error_rate: float | None = None
    rollback_latency_ratio: float | None = None
    rollback_window: int = 100
    shadow: str = ""
    shadow_share: float = 0.0

    def choose(self, model: str, sticky: bytes | None, rng: random.Random) -> str:
        return pick(model, self.stable, self.canary, self.canary_share, sticky, rng)


def pick(model: str, stable: str, canary: str, share: float, sticky: bytes | None, rng: random.Random) -> str:
    if not canary or share <= 0.0:
        return stable
    if sticky is not None:
        digest = hashlib.blake2b(model.encode() + b"\0" + sticky, digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64
    else:
        point = rng.random()
    return canary if point < share else stable


class Window:
    """The outcomes of a version's last ``size`` requests: failures and latencies."""

    def __init__(self, size: int) -> None:
        self.items: deque[tuple[bool, float]] = deque(maxlen=size)
        self.failures = 0

    def add(self, ok: bool, latency: float) -> None:
        if len(self.items) == self.items.maxlen and not self.items[0][0]:
            self.failures -= 1
        self.items.append((ok, latency))
        if not ok:
            self.failures += 1

    @property
    def full(self) -> bool:
        return len(self.items) == self.items.maxlen

    def error_rate(self) -> float:
        return self.failures / len(self.items) if self.items else 0.0

    def p99(self) -> float:
        latencies = sorted(lat for _, lat in self.items)
        return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0

    def resized(self, size: int) -> Window:
        """A window of ``size`` holding this one's latest outcomes."""
        window = Window(size)
        for ok, latency in list(self.items)[-size:]:
            window.add(ok, latency)
        return window


def worse_z(x1: float, n1: float, x2: float, n2: float) -> float:
    """The pooled two-proportion z of ``x1`` failures in ``n1`` requests against ``x2`` in
    ``n2``: how many standard errors the first rate is above the second, were both the same."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (x1 / n1 - x2 / n2) / se if se > 0 else 0.0


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), 0 < p < 1: summed in logs (math.lgamma), so that a
    large window neither overflows nor underflows a term."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
        total += term
        if i > n * p and term < total * 1e-17:  # past the mode, the terms only shrink
            break
    return min(total, 1.0)


@dataclass(slots=True)
class ShadowStats:
    """How a shadow version's answers compare with the answers clients got."""

    sent: int = 0
    failed: int = 0
    compared: int = 0
    max_abs_diff: float = 0.0
    argmax_rows: int = 0
    argmax_agree: int = 0

    def compare(self, served: dict[str, Any], shadow: dict[str, Any]) -> None:
        """Outputs by name (numpy arrays) of the client's answer and of the shadow's."""
        self.compared += 1
        for name, a in served.items():
            b = shadow.get(name)
            if b is None or a.shape != b.shape or a.dtype.kind not in "fiu":
                continue
            if a.size:
                self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(a.astype(np.float64) - b))))
            if a.ndim == 2 and a.shape[1] > 1 and a.dtype.kind == "f":
                self.argmax_rows += a.shape[0]
                self.argmax_agree += int(np.sum(a.argmax(axis=1) == b.argmax(axis=1)))

    def snapshot(self, version: str, share: float) -> dict[str, Any]:
        return {
            "version": version,
            "share": share,
            "sent": self.sent,
            "failed": self.failed,
            "compared": self.compared,
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": round(self.argmax_agree / self.argmax_rows, 6) if self.argmax_rows else None,
        }


@dataclass(slots=True)
class RolloutState:
    """Where a model's rollout stands now: the file's table, moved on by automatic decisions
    and operator actions."""

    config: ModelRollout
    stable: str
    canary: str
    share: float
    status: str  # "stable" (no canary), "canary", "rolled_back", "promoted"
    step: int = -1  # index into config.ramp, -1 before the ramp (or without one)
    step_started: float = 0.0
    step_requests: int = 0
    windows: dict[str, Window] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    since_check: int = 0
    waiting: bool = False  # the step is due, but waits for full windows to be judged on
    shadow: ShadowStats = field(default_factory=lambda: ShadowStats())
    trial: str = ""  # which trial this is, the same in every worker (``trial_key``)

    @classmethod
    def start(cls, config: ModelRollout, now: float) -> RolloutState:
        share = config.canary_share if config.canary else 0.0
        step = -1
        if config.canary and config.ramp:
            step, share = 0, config.ramp[0]
        status = "canary" if config.canary and share > 0 else "stable"
        return cls(config, config.stable, config.canary, share, status, step, now)

    def reconfigure(self, config: ModelRollout, now: float) -> None:
        """New rules (edited ``[defaults]``) for the trial under way, which stays where it
        stands: a canary on a ramp goes on from the first step of the new ramp at or above its
        share (without a ramp now: stays at its share, and is not promoted), the windows take
        the new size; a canary an operator took off the ramp stays off it."""
        old, self.config = self.config, config
        if config.rollback_window != old.rollback_window:
            self.windows = {v: w.resized(config.rollback_window) for v, w in self.windows.items()}
        if self.status != "canary" or config.ramp == old.ramp or (old.ramp and self.step < 0):
            return
        if not config.ramp:
            self.step = -1
            return
        step = next((i for i, share in enumerate(config.ramp) if share >= self.share), len(config.ramp) - 1)
        share, self.step = config.ramp[step], step
        if share != self.share:  # a new share is a new step, which lasts its own time
            self.share, self.step_started, self.step_requests, self.waiting = share, now, 0, False
            self.event("ramp", now, share=share, step=step, reason="the defaults' ramp changed")

    def window(self, version: str) -> Window:
        w = self.windows.get(version)
        if w is None:
            w = self.windows[version] = Window(self.config.rollback_window)
        return w

    def event(self, kind: str, now: float, **evidence: Any) -> None:
        self.events.append({"event": kind, "at": time.time(), "uptime_s": round(now, 3), **evidence})
        del self.events[:-MAX_EVENTS]
        log.warning("rollout %s: %s %s", kind, self.canary or self.stable, evidence)

    def record(self, version: str, ok: bool, latency: float, now: float, computed: bool = True) -> None:
        """``computed`` False: an answer the version did not compute for this request (a cache
        hit, or a share of an identical request's computation): it counts for the ramp, but
        leaves the rollback windows alone, which compare what each version's computations cost
        and how often they fail (a stable version's cached answers are not faster inference)."""
        if computed:
            self.window(version).add(ok, latency)
        if self.status != "canary" or version != self.canary:
            return
        self.step_requests += 1
        self.since_check += 1
        if self.since_check >= EVALUATE_EVERY:
            self.since_check = 0
            breach = self.breach()
            if breach is not None:
                self.rollback(now, "automatic", **breach)
                return
        self.advance(now)

    @property
    def has_rules(self) -> bool:
        return self.config.rollback_error_rate is not None or self.config.rollback_latency_ratio is not None

    def judged(self) -> bool:
        """Whether the rollback rules can be evaluated now: the canary's window is full and, for
        the latency rule (which compares with stable's p99), stable's is too."""
        c = self.config
        if not self.window(self.canary).full:
            return False
        return c.rollback_latency_ratio is None or self.window(self.stable).full

    def breach(self) -> dict[str, Any] | None:
        """The evidence of a rollback rule broken over full windows, or None.

        Each rule fires on evidence, not on a chance difference between two samples: about once
        in 1000 checks of a canary that is no worse than stable (one-sided), and only for a
        regression large enough to show in a window of that size."""
        c = self.config
        canary, stable = self.window(self.canary), self.window(self.stable)
        if not canary.full or not self.has_rules:
            return None
        evidence = {
            "window": len(canary.items),
            "canary_error_rate": round(canary.error_rate(), 4),
            "stable_error_rate": round(stable.error_rate(), 4),
            "stable_requests": len(stable.items),
        }
        if c.rollback_error_rate is not None:
            n1, x1 = len(canary.items), canary.failures
            # A stable version computing fewer answers than the canary (most of its answers came
            # from the cache) counts as many at its own rate: its few samples do not blur the
            # comparison; without any, it counts as a clean one.
            n2 = max(len(stable.items), n1)
            x2 = stable.failures * n2 / len(stable.items) if stable.items else 0.0
            z = worse_z(x1, n1, x2, n2)
            if x1 / n1 > x2 / n2 + c.rollback_error_rate and z > Z_WORSE:
                rule = f"error rate above stable's by more than {c.rollback_error_rate}, significantly (z > {Z_WORSE})"
                return {"rule": rule, **evidence, "z": round(z, 3)}
        if c.rollback_latency_ratio is not None and stable.full:
            cp99, sp99 = canary.p99(), stable.p99()
            if sp99 > 0:
                limit = c.rollback_latency_ratio * sp99
                slow = sum(1 for _, latency in canary.items if latency > limit)
                p_value = binomial_tail(slow, len(canary.items), SLOW_SHARE)
                if p_value < P_SLOWER:
                    rule = (f"latency above {c.rollback_latency_ratio} x stable's p99 in more of the canary's requests "
                            f"than 1% could give by chance (p < {P_SLOWER})")  # fmt: skip
                    return {"rule": rule, "canary_p99_ms": round(cp99 * 1000, 3), "stable_p99_ms": round(sp99 * 1000, 3),
                            "slow_requests": slow, "p_value": float(f"{p_value:.3g}"), **evidence}  # fmt: skip
        return None

    def advance(self, now: float) -> None:
        """A ramp step (or, after the last, the promotion) once the step has lasted: with a
        rollback rule, only when the canary's window is full and the rule, evaluated then,
        holds; a canary whose window is not full yet waits (cache hits count for the step, not
        for the window)."""
        c = self.config
        if self.step < 0 or self.step_requests < c.ramp_min_requests or now - self.step_started < c.ramp_min_seconds:
            return
        if self.has_rules:
            if not self.judged():
                if not self.waiting:  # said once a step: a mostly cached version fills its window slowly
                    self.waiting = True
                    log.warning(
                        "rollout: canary %s's step is due but waits for full windows to judge it on "
                        "(computed answers: canary %d, stable %d, of %d)", self.canary,
                        len(self.window(self.canary).items), len(self.window(self.stable).items), c.rollback_window,
                    )  # fmt: skip
                return
            self.waiting = False
            self.since_check = 0
            breach = self.breach()
            if breach is not None:
                self.rollback(now, "automatic", **breach)
                return
        if self.step + 1 < len(c.ramp):
            self.step += 1
            self.share = c.ramp[self.step]
            self.step_started, self.step_requests = now, 0
            self.event("ramp", now, share=self.share, step=self.step)
        else:
            self.promote(now, "automatic")

    def rollback(self, now: float, by: str, **evidence: Any) -> None:
        self.share, self.status = 0.0, "rolled_back"
        self.event("rollback", now, by=by, canary=self.canary, stable=self.stable, **evidence)

    def promote(self, now: float, by: str) -> None:
        old = self.stable
        self.stable, self.share, self.status = self.canary, 0.0, "promoted"
        self.event("promote", now, by=by, canary=self.canary, previous_stable=old)

    def set_share(self, share: float, now: float) -> None:
        self.share = share
        self.status = "canary" if share > 0 else "rolled_back"
        self.step = -1  # the operator took over: no more ramp steps
        self.event("set_share", now, by="operator", share=share)

    @property
    def position(self) -> tuple[str, float, str, int]:
        """Where the rollout stands: what a decision changes (and ``adopt`` takes over)."""
        return self.stable, self.share, self.status, self.step

    def adopt(self, position: tuple[str, float, str, int], event: dict[str, Any], now: float) -> None:
        """Take over a decision another worker made in the same trial (``rollout_workers.py``):
        its position, and its event."""
        step = self.step
        self.stable, self.share, self.status, self.step = position
        if self.step != step:
            self.step_started, self.step_requests = now, 0
        self.since_check = 0
        self.events.append(event)
        del self.events[:-MAX_EVENTS]
        log.warning("rollout %s: %s, as another worker decided", event.get("event"), self.canary or self.stable)

    @property
    def share_in_force(self) -> float:
        """The canary's share of the requests naming no version, as the rollout sends them now:
        its share while the status is "canary", else 0 (no canary, rolled back, promoted)."""
        return self.share if self.status == "canary" and self.canary and self.canary != self.stable else 0.0

    def choose(self, model: str, sticky: bytes | None, rng: random.Random) -> str:
        return pick(model, self.stable, self.canary, self.share_in_force, sticky, rng)

    def snapshot(self) -> dict[str, Any]:
        c = self.config
        return {
            "stable": self.stable,
            "canary": self.canary or None,
            "canary_share": self.share,
            "status": self.status,
            "sticky_header": c.sticky_header.decode() or None,
            "ramp": list(c.ramp) or None,
            "ramp_step": self.step if self.step >= 0 else None,
            "waiting_for_windows": self.waiting,
            "windows": {
                v: {"requests": len(w.items), "error_rate": round(w.error_rate(), 4), "p99_ms": round(w.p99() * 1000, 3)}
                for v, w in sorted(self.windows.items())
            },
            "events": self.events,
            "shadow": self.shadow.snapshot(c.shadow, c.shadow_share) if c.shadow else None,
        }


def trial_key(model: str, config: ModelRollout, automatic: bool = False) -> str:
    """What names a trial the same way in every worker, whenever it started and whichever
    versions of the file it read: the model and its table, or, for an ``automatic`` trial (under
    ``[defaults]``), its stable and canary versions (the rules may be edited meanwhile). A trial
    that ends (its table edited or removed, its canary or stable gone) is forgotten by every
    worker (``Rollouts.on_trial_over``), so the same table or versions again are a new trial."""
    text = repr((model, config.stable, config.canary) if automatic else (model, config))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _version(value: Any, where: str) -> str:
    """A version as requests name it (``v2.canonical_version``: "02" is "2", as Triton reads it)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    number = canonical_version(text) if isinstance(text, str) else None
    if number is None:
        raise RolloutError(f"{where} must be a version number such as \"2\", got {shown(value)}")
    return number


@dataclass(frozen=True, slots=True)
class RolloutFile:
    models: dict[str, ModelRollout]
    defaults: ModelRollout | None = None  # the rules for versions dropped in (stable left "")


def parse_rollout_file(data: dict[str, Any]) -> RolloutFile:
    unknown = sorted(set(data) - {"models", "defaults"})
    if unknown:
        raise RolloutError(f"unknown section(s): {', '.join(unknown)} (expected [models.<name>] tables and [defaults])")
    defaults = None
    if "defaults" in data:
        table = data["defaults"]
        if not isinstance(table, dict):
            raise RolloutError("[defaults] must be a table")
        bad = sorted(set(table) & {"stable", "canary", "shadow", "shadow_share"})
        if bad:
            raise RolloutError(f"[defaults] cannot set {', '.join(bad)}: versions are chosen as they arrive")
        defaults = _table("defaults", {**table, "stable": "0", "canary": "1"})
        defaults = replace(defaults, stable="", canary="")
        if not defaults.ramp and not defaults.canary_share:
            raise RolloutError("[defaults] needs a canary_share or a ramp: the share a new version starts with")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise RolloutError("'models' must hold one table per model: [models.<name>]")
    return RolloutFile({name: _table(f"models.{name}", table) for name, table in models.items()}, defaults)


def parse_rollouts(data: dict[str, Any]) -> dict[str, ModelRollout]:
    return parse_rollout_file(data).models


def _table(where: str, table: Any) -> ModelRollout:
    if not isinstance(table, dict):
        raise RolloutError(f"[{where}] must be a table")
    bad = sorted(set(table) - _KEYS)
    if bad:
        raise RolloutError(f"unknown key(s) in [{where}]: {', '.join(bad)}")
    if "stable" not in table:
        raise RolloutError(f"[{where}] needs a stable version")
    stable = _version(table["stable"], f"{where}.stable")
    canary = _version(table["canary"], f"{where}.canary") if "canary" in table else ""
    share = table.get("canary_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
        raise RolloutError(f"{where}.canary_share must be a number in 0..1, got {shown(share)}")
    if share and not canary:
        raise RolloutError(f"{where}.canary_share is set but there is no canary version")
    if canary == stable:
        raise RolloutError(f"{where}: the canary is the stable version ({stable})")
    sticky = table.get("sticky_header", "")
    if not isinstance(sticky, str) or (sticky and not sticky.replace("-", "").isalnum()):
        raise RolloutError(f"{where}.sticky_header must be a header name, got {shown(sticky)}")
    ramp = table.get("ramp", [])
    if (
        not isinstance(ramp, list) or not all(_share(x) for x in ramp) or any(a >= b for a, b in zip(ramp, ramp[1:]))
        or (ramp and ramp[-1] != 1)
    ):  # fmt: skip
        raise RolloutError(f"{where}.ramp must be rising shares in 0..1 ending with 1.0, got {shown(ramp)}")
    if ramp and not canary:
        raise RolloutError(f"{where}.ramp is set but there is no canary version")
    if ramp and "canary_share" in table:
        # The canary starts at the ramp's first step: a canary_share beside it would be ignored.
        raise RolloutError(
            f"{where}: canary_share and ramp are both set, but the ramp's first step is the starting share "
            f"({shown(ramp[0])}); remove canary_share (or the ramp)"
        )
    numbers = {}
    for key, kind, low, high, why in (
        ("ramp_min_requests", int, 1, MAX_STEP_REQUESTS, "requests"),
        ("ramp_min_seconds", float, 0.0, MAX_STEP_SECONDS, "seconds (30 days)"),
        ("rollback_error_rate", float, 0.0, None, ""),
        ("rollback_latency_ratio", float, 1.0, None, ""),
        ("rollback_window", int, 10, MAX_WINDOW, "computed answers (each check of the rules goes over the whole window)"),
    ):  # fmt: skip
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
                raise RolloutError(f"{where}.{key} must be {'an integer' if kind is int else 'a number'}, got {shown(value)}")
            if not (math.isfinite(value) and value >= low):  # NaN compares false: it would never roll back
                raise RolloutError(f"{where}.{key} must be a finite number >= {low}, got {shown(value)}")
            if high is not None and value > high:  # a step that never ends, a window that never fills
                raise RolloutError(f"{where}.{key} must be at most {high:,.0f} {why}, got {shown(value)}")
            numbers[key] = kind(value)
    if numbers.get("rollback_error_rate", 0.0) >= 1:
        # A difference of two error rates (each in 0..1): the canary's would have to exceed 1.
        raise RolloutError(
            f"{where}.rollback_error_rate must be below 1: it is how far the canary's error rate may exceed "
            f"stable's, and from 1 up the rule can never fire; got {shown(table['rollback_error_rate'])}"
        )
    unused = [] if canary else [key for key in ("sticky_header", *numbers) if table.get(key, "") != ""]
    if unused:
        # Each of these acts on a canary only: without one, it would be silently ignored.
        raise RolloutError(f"{where}.{unused[0]} is set but there is no canary version")
    first = ramp[0] if ramp else share
    if "rollback_latency_ratio" in numbers and first == 1:
        # The latency rule compares the canary with stable's p99: a canary taking every request
        # from the start leaves stable none to measure, and the rule would wait forever.
        raise RolloutError(
            f"{where}: rollback_latency_ratio compares the canary with stable's latencies, but a canary "
            f"starting at share 1.0 leaves stable no requests; start below 1.0 (e.g. ramp = [0.1, 1.0])"
        )
    shadow = _version(table["shadow"], f"{where}.shadow") if "shadow" in table else ""
    shadow_share = table.get("shadow_share", 0.1 if shadow else 0.0)
    if not (shadow_share == 0 or _share(shadow_share)):
        raise RolloutError(f"{where}.shadow_share must be a number in 0..1, got {shown(shadow_share)}")
    if shadow_share and not shadow:
        raise RolloutError(f"{where}.shadow_share is set but there is no shadow version")
    if shadow and shadow == stable:
        raise RolloutError(f"{where}: the shadow is the stable version ({stable})")
    if shadow and shadow == canary:
        raise RolloutError(f"{where}: the shadow is the canary version ({canary}); a shadow must be a third version")
    return ModelRollout(
        stable, canary, float(share) + 0.0, sticky.lower().encode(), tuple(float(x) for x in ramp), **numbers,
        shadow=shadow, shadow_share=float(shadow_share),
    )  # fmt: skip


def _share(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 < value <= 1.0


def load_rollout_file(path: Path) -> RolloutFile:
    return read_rollout_file(path)[0]


def read_rollout_file(path: Path) -> tuple[RolloutFile, str]:
    """The rollout of ``path`` and the text it was read from; RolloutError if it is missing or
    invalid."""
    try:
        text = path.read_text()
        return parse_rollout_file(tomllib.loads(text)), text
    except FileNotFoundError:
        raise RolloutError(f"rollout file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RolloutError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise RolloutError(f"cannot read rollout file {path}: {exc.strerror or exc}") from None


def load_rollouts(path: Path) -> dict[str, ModelRollout]:
    return load_rollout_file(path).models


class Rollouts:
    """The rollout in force: the file's tables, each with its live state; reloaded when the
    file changes (a bad file keeps the old one)."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self.path = path
        self.states: dict[str, RolloutState] = {}
        self.defaults: ModelRollout | None = None
        self.auto: dict[str, RolloutState] = {}  # models without a table, under [defaults]
        # Under [defaults]: each model's canaries rolled back that are still in the fleet, never
        # tried again (a trial that ends, a newer canary's, must not bring one back).
        self.rejected: dict[str, frozenset[str]] = {}
        self.error = ""  # why the file on disk is not the rollout in force, if it is not
        self._stamp: tuple[int, int] | None = None
        self._changing: tuple[int, int] | None = None  # a new stamp, seen once
        self._kept: Path | None = None  # ``from_file``
        self._rng = random.Random(seed)
        self._clock = clock
        self.served: dict[tuple[str, str], int] = {}  # (model, version) -> requests
        # The header names any rollout pins clients by: the infer endpoint keeps only these.
        self.pin_headers: frozenset[bytes] = frozenset()
        # With several workers (rollout_workers.py): told of every decision this process makes
        # (model, state, "automatic" | "operator"), for the others to take over; of every trial
        # that ended here (its key), for them to forget it; told of every trial started here,
        # to take over where the others stand in it; and asked, for a model without a table
        # seen for the first time, which versions the others' automatic trial of it runs (and
        # which canaries they rolled back).
        self.on_decision: Callable[[str, RolloutState, str], None] | None = None
        self.on_trial_over: Callable[[str], None] | None = None
        self.on_trial_started: Callable[[RolloutState], bool] | None = None
        self.recall: Callable[[str], tuple[str, str, tuple[str, ...]] | None] | None = None

    @property
    def models(self) -> dict[str, ModelRollout]:
        return {name: state.config for name, state in self.states.items()}

    def set_models(self, models: dict[str, ModelRollout]) -> None:
        """A new set of tables: unchanged tables keep their state, changed ones start afresh
        (announced to the other workers, as automatic trials are: a table edited and put back
        before some worker saw the edit is one trial key in all of them, started afresh in
        some, and they are to agree)."""
        now = self._clock()
        before = self.states
        self.states = {
            name: state if (state := before.get(name)) is not None and state.config == config
            else self._start(name, config, now)
            for name, config in models.items()
        }  # fmt: skip
        for name, state in before.items():
            if self.states.get(name) is not state:
                self._over(state)
        for name, state in self.states.items():
            if before.get(name) is not state:
                self._announce(name, state)
        self.pin_headers = frozenset(r.sticky_header for r in models.values() if r.sticky_header)

    def set_file(self, rollout: RolloutFile) -> None:
        now = self._clock()
        before = self.states
        self.set_models(rollout.models)
        defaults = rollout.defaults
        if defaults is None:
            for state in self.auto.values():
                self._over(state)  # the same defaults again are trials anew, in every worker
            self.auto, self.rejected = {}, {}
        elif defaults != self.defaults:
            # New rules for the trials under way; where each stands (stable, canary, rolled
            # back) stays: a rolled-back version is not served because a share was edited.
            for state in self.auto.values():
                state.reconfigure(replace(defaults, stable=state.config.stable, canary=state.config.canary), now)
        self.defaults = defaults
        for name in rollout.models:
            if name in self.auto:
                self._over(self.auto.pop(name))  # a table of its own wins
        if defaults is not None:
            for name, state in before.items():
                if name not in rollout.models and name not in self.auto:
                    # Its table is gone: the version it served stays stable, under the defaults.
                    self._auto(name, replace(defaults, stable=state.stable), now)
        pins = {r.sticky_header for r in rollout.models.values() if r.sticky_header}
        if self.defaults is not None and self.defaults.sticky_header:
            pins.add(self.defaults.sticky_header)
        self.pin_headers = frozenset(pins)

    @classmethod
    def from_file(cls, path: Path, clock: Callable[[], float] = time.monotonic, kept: Path | None = None) -> Rollouts:
        """The rollout of ``path``; RolloutError if the file is missing or invalid. ``kept``
        (with several workers): where the text of every rollout put in force is kept, so that a
        worker starting while the file is bad (a replacement, after a crash) starts from the
        rollout in force in the others, with the file's error, instead of failing to start."""
        rollouts = cls(path, clock)
        rollouts._kept = kept
        stat = path.stat() if path.exists() else None
        rollouts._stamp = rollouts._changing = (stat.st_mtime_ns, stat.st_size) if stat else None
        try:
            rollout, text = read_rollout_file(path)
        except RolloutError as exc:
            if kept is None or not kept.exists():
                raise
            rollout, text = read_rollout_file(kept)
            rollouts.error = str(exc)
            log.error("rejected rollout file: %s; starting from the rollout in force in the other workers", exc)
        rollouts.set_file(rollout)
        rollouts._keep(text)
        return rollouts

    def _keep(self, text: str) -> None:
        if self._kept is None:
            return
        try:
            self._kept.parent.mkdir(exist_ok=True)
            replace_file(self._kept, text.encode())  # every worker writes it
        except OSError as exc:
            log.warning("rollout: cannot keep the rollout in force in %s for workers to come: %s", self._kept, exc)

    def _start(self, model: str, config: ModelRollout, now: float, automatic: bool = False) -> RolloutState:
        state = RolloutState.start(config, now)
        state.trial = trial_key(model, config, automatic)
        return state

    def _over(self, state: RolloutState) -> None:
        if self.on_trial_over is not None:
            self.on_trial_over(state.trial)

    def _auto(
        self, model: str, config: ModelRollout, now: float, old: RolloutState | None = None, kind: str = "", **event: Any
    ) -> None:
        """A new automatic trial of ``model`` in force here (``old``'s over), with an event of
        ``kind``. Where the other workers stand in it is taken over at once; a trial none of
        them runs yet is announced to them, so that a worker starting later joins it
        (``recall``) rather than starting its own from the fleet's newest version."""
        if old is not None:
            self._over(old)
        state = self.auto[model] = self._start(model, config, now, automatic=True)
        self._announce(model, state, kind, now, **event)

    def _announce(self, model: str, state: RolloutState, kind: str = "", now: float = 0.0, **event: Any) -> None:
        """A trial started here: where the other workers stand in it, taken over; a trial none
        of them runs yet, with an event of ``kind`` (if any), told to them."""
        if self.on_trial_started is not None and self.on_trial_started(state):
            return
        if kind:
            state.event(kind, now, by="automatic", **event)
        if self.on_decision is not None:
            self.on_decision(model, state, "automatic")

    def state(self, model: str) -> RolloutState | None:
        """The model's rollout state: its table's, else its automatic one, else None."""
        state = self.states.get(model)
        return state if state is not None else self.auto.get(model)

    def all_states(self) -> dict[str, RolloutState]:
        """Every model's state by name: the file's tables and, under ``[defaults]``, the models
        without one."""
        return dict(sorted({**self.auto, **self.states}.items()))

    def observe(self, model: str, newest: str, available: Callable[[str], bool]) -> None:
        """Under ``[defaults]``, for a model without a table: the fleet's newest version is
        ``newest``. The first one seen is stable (unless the other workers run a trial of the
        model: this worker joins it); a newer one starts a canary of the stable; a stable version
        that left the fleet gives way to the newest; a canary that left it (rolled back and
        removed, or removed while on trial) ends its trial, so that a version published again
        under its number is a canary anew; a rolled-back canary still in the fleet is not tried
        again, whatever trial follows."""
        defaults = self.defaults
        if defaults is None or not newest or model in self.states:
            return
        state = self.auto.get(model)
        now = self._clock()
        rejected = self.rejected.get(model, frozenset())
        if state is not None and state.status == "rolled_back" and state.canary:
            rejected |= {state.canary}
        stable_now = state.stable if state is not None else ""  # promoted by an operator after all
        rejected = self.rejected[model] = frozenset(v for v in rejected if v != stable_now and available(v))
        if state is None:
            recalled = self.recall(model) if self.recall is not None else None
            stable, canary, others = recalled if recalled is not None else (newest, "", ())
            self.rejected[model] = rejected | {v for v in others if available(v)}
            if canary and not available(canary):
                canary = ""  # the others' canary has left: they are to end its trial too
            if not available(stable):
                stable, canary = newest, ""
            self._auto(model, replace(defaults, stable=stable, canary=canary), now)
        elif not available(state.stable):
            self._auto(model, replace(defaults, stable=newest), now, state, "stable", stable=newest,
                       previous_stable=state.stable, reason="the stable version left the fleet")  # fmt: skip
        elif state.status in ("canary", "rolled_back") and state.canary and not available(state.canary):
            self._auto(model, replace(defaults, stable=state.stable), now, state, "canary_gone", canary=state.canary, stable=state.stable)
        elif int(newest) > max(int(state.stable), int(state.canary or 0)) and newest not in rejected:
            config = replace(defaults, stable=state.stable, canary=newest)
            share = RolloutState.start(config, now).share
            self._auto(model, config, now, state, "canary", canary=newest, stable=state.stable, share=share)

    def stable(self, model: str) -> str:
        state = self.state(model)
        return state.stable if state is not None else ""

    def choose(self, model: str, headers: dict[bytes, bytes] | None = None, key: bytes | None = None) -> str:
        """The version for a request that names none; "" when the model has no rollout.
        ``key``: what to draw from instead of the sticky header (a sequence's id, so that all
        its requests draw alike)."""
        state = self.state(model)
        if state is None:
            return ""
        header = state.config.sticky_header
        sticky = key if key is not None else headers.get(header) if headers and header else None
        return state.choose(model, sticky, self._rng)

    def shadow_for(self, model: str) -> str:
        """The shadow version to mirror this request to, or "" (by the model's shadow share)."""
        state = self.states.get(model)
        if state is None or not state.config.shadow or self._rng.random() >= state.config.shadow_share:
            return ""
        return state.config.shadow

    def shadow_stats(self, model: str) -> ShadowStats | None:
        state = self.states.get(model)
        return state.shadow if state is not None else None

    def count(self, model: str, version: str) -> None:
        """One request of ``model`` sent to ``version`` through the rollout."""
        key = (model, version)
        self.served[key] = self.served.get(key, 0) + 1

    def record(self, model: str, version: str, ok: bool, latency: float, computed: bool = True) -> None:
        """How a request sent through the rollout ended: ``ok`` False for a failure the
        version is to blame for (5xx, timeout), with its latency in seconds; ``computed`` False
        for an answer from the cache (``RolloutState.record``)."""
        state = self.state(model)
        if state is None:
            return
        decided = self.on_decision
        if decided is None:  # one worker: nobody to tell
            state.record(version, ok, latency, self._clock(), computed)
            return
        before = state.position
        state.record(version, ok, latency, self._clock(), computed)
        if state.position != before:
            decided(model, state, "automatic")

    def act(self, model: str, action: str, share: float | None = None) -> dict[str, Any]:
        """An operator's action: "promote", "rollback" or "set_share" (with ``share``)."""
        state = self.state(model)
        if state is None:
            raise KeyError(model)
        if not state.canary:
            raise ValueError(f"model '{model}' has no canary version")
        if state.status == "promoted" and action in ("rollback", "set_share"):
            # The canary is the stable version now: nothing is left to roll back or share.
            raise RolloutConflict(
                f"model '{model}': version {state.canary} was promoted and is the stable version; "
                "to go back, name the old version as stable in the rollout file"
            )
        now = self._clock()
        if action == "promote":
            state.promote(now, "operator")
        elif action == "rollback":
            state.rollback(now, "operator")
        elif action == "set_share":
            if share is None or isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
                raise ValueError(f"set_share needs a share in 0..1, got {shown(share)}")
            state.set_share(float(share) + 0.0, now)  # + 0.0: -0.0 is 0
        else:
            raise ValueError(f"unknown action {shown(action)}: use promote, rollback or set_share")
        if self.on_decision is not None:
            self.on_decision(model, state, "operator")
        return state.snapshot()

    def reload_if_changed(self) -> bool:
        """Read the file again once it has changed and two looks in a row agree on its size and
        time (a file read while being written could parse, cut at a line's end, and drop
        tables); True if a new rollout is now in force. An empty file does not replace a
        rollout (an editor or a shell redirection empties a file before writing it)."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            if self.error != str(exc):
                log.error("rollout file %s: %s; the rollout in force stays", self.path, exc)
                self.error = str(exc)
            self._stamp = self._changing = None  # read again once it is back, even unchanged
            return False
        if stamp == self._stamp:
            return False
        if stamp != self._changing:
            self._changing = stamp  # acted on once two looks agree: a file being written is not read half-way
            return False
        self._stamp = stamp
        try:
            rollout, text = read_rollout_file(self.path)
            if stamp[1] == 0 and (self.states or self.defaults is not None):
                raise RolloutError(
                    f"{self.path} is empty; the rollout in force stays (to end every rollout, leave a comment in the file)"
                )
        except RolloutError as exc:
            self.error = str(exc)
            log.error("rejected rollout file: %s; the rollout in force stays", exc)
            return False
        self.set_file(rollout)
        self._keep(text)
        self.error = ""
        log.warning("rollout loaded from %s: %s", self.path, ", ".join(sorted(rollout.models)) or "no models")
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "file": str(self.path) if self.path else None,
            "error": self.error or None,
            "defaults": _defaults_snapshot(self.defaults),
            "models": {
                name: {
                    **state.snapshot(),
                    "automatic": name not in self.states,
                    "served": {v: n for (m, v), n in sorted(self.served.items()) if m == name},
                }
                for name, state in self.all_states().items()
            },
        }


def _defaults_snapshot(defaults: ModelRollout | None) -> dict[str, Any] | None:
    if defaults is None:
        return None
    return {
        "canary_share": defaults.canary_share,
        "ramp": list(defaults.ramp) or None,
        "ramp_min_requests": defaults.ramp_min_requests,
        "ramp_min_seconds": defaults.ramp_min_seconds,
        "rollback_error_rate": defaults.rollback_error_rate,
        "rollback_latency_ratio": defaults.rollback_latency_ratio,
        "rollback_window": defaults.rollback_window,
    }
