"""A request's Cache-Control (and Pragma) directives, read into what it allows of a stored answer."""

from __future__ import annotations

import pytest

from gateway.cache.freshness import ANY, FRESH, Freshness, freshness


@pytest.mark.parametrize(
    ("values", "pragma", "expected"),
    [
        ([], False, ANY),
        ([b"no-cache"], False, FRESH),
        ([b"No-Store"], False, FRESH),
        ([b"max-age=0"], False, FRESH),
        ([b'max-age="0"'], False, FRESH),
        ([b"max-age=30"], False, Freshness(max_age=30.0)),
        ([b"max-age=30, max-age=10"], False, Freshness(max_age=10.0)),  # the stricter of two
        ([b"max-age=10", b"max-age=30"], False, Freshness(max_age=10.0)),  # repeated lines: one list
        ([b"max-age=soon"], False, ANY),  # malformed: ignored
        ([b"max-age=-5"], False, ANY),
        ([b"max-age"], False, ANY),
        ([b"max-age=" + b"9" * 400], False, Freshness(max_age=2.0**31)),  # too large: 2**31 (RFC 9111 1.2.2)
        ([b"max-age=" + b"1" * 5000], False, Freshness(max_age=2.0**31)),  # beyond int()'s digit limit
        ([b"min-fresh=99999999999"], False, Freshness(min_fresh=2.0**31)),
        ([b"max-age=2147483647"], False, Freshness(max_age=2147483647.0)),
        ([b"max-age=" + b"0" * 20], False, FRESH),  # leading zeros: still 0
        ([b"max-age=" + b"0" * 20 + b"30"], False, Freshness(max_age=30.0)),
        ([b"min-fresh=20"], False, Freshness(min_fresh=20.0)),
        ([b"min-fresh=20, min-fresh=5"], False, Freshness(min_fresh=20.0)),
        ([b"only-if-cached"], False, Freshness(only_if_cached=True)),
        ([b"only-if-cached, max-age=5"], False, Freshness(max_age=5.0, only_if_cached=True)),
        ([b"no-cache, only-if-cached"], False, Freshness(use=False, only_if_cached=True)),
        ([b"max-stale=100, no-transform, x-extension=1"], False, ANY),  # change nothing here
        ([], True, FRESH),  # Pragma: no-cache, HTTP/1.0's way
        ([b"max-age=60"], True, Freshness(max_age=60.0)),  # Cache-Control overrides Pragma
    ],
)
def test_directives_read(values: list[bytes], pragma: bool, expected: Freshness) -> None:
    assert freshness(values, pragma) == expected


def test_a_request_without_limits_is_the_shared_default() -> None:
    assert freshness([b"max-stale"]) is ANY and not ANY.limited
    assert Freshness(max_age=5.0).limited and Freshness(min_fresh=1.0).limited and not FRESH.limited


@pytest.mark.parametrize(
    ("wants", "age", "accepted"),
    [
        (ANY, 59.0, True),
        (Freshness(max_age=10.0), 10.0, True),
        (Freshness(max_age=10.0), 10.5, False),
        (Freshness(min_fresh=20.0), 40.0, True),  # 20 s of its 60 s TTL left
        (Freshness(min_fresh=20.0), 40.5, False),
        (Freshness(max_age=50.0, min_fresh=20.0), 45.0, False),  # both must hold
    ],
)
def test_an_answer_is_accepted_when_young_enough_for_every_directive(wants: Freshness, age: float, accepted: bool) -> None:
    assert wants.accepts(age, ttl_s=60.0) is accepted


@pytest.mark.parametrize("wants", [Freshness(max_age=10.0), Freshness(min_fresh=50.0), Freshness(max_age=40.0, min_fresh=25.0), ANY])
def test_the_earliest_expiry_takes_exactly_the_entries_the_directives_accept(wants: Freshness) -> None:
    """The host tier's entries say only when they expire: an entry kept 60 s expiring at
    ``expires`` is ``60 - (expires - now)`` seconds old."""
    now, ttl = 1000.0, 60.0
    earliest = wants.earliest_expiry(now, ttl)
    for left in range(1, 61):
        expires = now + left
        assert (expires >= earliest) == wants.accepts(ttl - left, ttl), (left, earliest)
