"""What a request allows of a stored answer: its ``Cache-Control`` (and ``Pragma``) directives.

The response cache keeps an answer for its model's TTL. A client may ask for less (RFC 9111,
5.2.1), and an answer taken from the cache says how old it is (``Age``, whole seconds):

* ``no-cache``, ``no-store`` or ``max-age=0`` (or ``Pragma: no-cache`` without a
  ``Cache-Control``): computed afresh, not stored (``X-Cache: bypass``);
* ``max-age=N``: no stored answer older than N seconds;
* ``min-fresh=N``: no stored answer with less than N seconds of its TTL left;
* ``only-if-cached``: a stored answer or 504, never a computation.

An answer too old for ``max-age`` or ``min-fresh`` is computed afresh, or shared with an
identical request's computation in flight, and replaces the stored one (``X-Cache: miss`` or
``coalesced``). Other directives (``max-stale``, ``no-transform``, extensions) change
nothing: the gateway never serves an answer past its TTL and never transforms one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Freshness:
    use: bool = True  # False: computed afresh and not stored
    max_age: float | None = None  # seconds; None: the model's TTL decides alone
    min_fresh: float = 0.0  # seconds of its TTL a stored answer must still have
    only_if_cached: bool = False

    @property
    def limited(self) -> bool:
        """Whether an answer young enough for the cache may still be too old for the request."""
        return self.max_age is not None or self.min_fresh > 0

    def accepts(self, age: float, ttl_s: float) -> bool:
        """Whether a stored answer ``age`` seconds old, kept for ``ttl_s``, may answer."""
        if self.max_age is not None and age > self.max_age:
            return False
        return ttl_s - age >= self.min_fresh

    def earliest_expiry(self, now: float, ttl_s: float) -> float:
        """The earliest expiry of an entry kept ``ttl_s`` from its computation that ``accepts``
        at ``now`` (its age is ``ttl_s`` less the time it has left): for the host tier, whose
        entries say only when they expire."""
        earliest = now + self.min_fresh
        if self.max_age is not None:
            earliest = max(earliest, now + ttl_s - self.max_age)
        return earliest


ANY = Freshness()
FRESH = Freshness(use=False)


# RFC 9111 1.2.2: a delta-seconds too large to represent counts as 2**31.
MAX_SECONDS = 2**31


def _seconds(arg: bytes) -> float | None:
    """A directive's delta-seconds (RFC 9111 1.2.2: digits, maybe quoted, at most
    ``MAX_SECONDS``), or None."""
    arg = arg.strip().strip(b'"')
    if not arg.isdigit():
        return None
    arg = arg.lstrip(b"0") or b"0"  # leading zeros are allowed: "000" is 0
    return float(MAX_SECONDS if len(arg) > 10 else min(int(arg), MAX_SECONDS))


def freshness(cache_control: Iterable[bytes], pragma_no_cache: bool = False) -> Freshness:
    """The freshness the values of a request's ``Cache-Control`` lines ask for (repeated lines
    are one list, RFC 9110 5.3); ``pragma_no_cache``: a ``Pragma: no-cache`` line, which counts
    only without a ``Cache-Control``. A directive with a malformed argument is ignored."""
    use, seen, only = True, False, False
    max_age: float | None = None
    min_fresh = 0.0
    for value in cache_control:
        seen = True
        for directive in value.lower().split(b","):
            name, _, arg = directive.partition(b"=")
            name = name.strip()
            if name in (b"no-cache", b"no-store"):
                use = False
            elif name == b"only-if-cached":
                only = True
            elif name == b"max-age":
                seconds = _seconds(arg)
                if seconds == 0:
                    use = False
                elif seconds is not None:
                    max_age = seconds if max_age is None else min(max_age, seconds)
            elif name == b"min-fresh":
                seconds = _seconds(arg)
                if seconds is not None:
                    min_fresh = max(min_fresh, seconds)
    if pragma_no_cache and not seen:
        use = False
    if use and not only and max_age is None and min_fresh == 0:
        return ANY
    return Freshness(use, max_age, min_fresh, only)
