"""The rollout file: parsing and validation, the traffic split, sticky clients, hot reload that
keeps the rollout in force when the new file is bad (no network, a seeded random generator)."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.rollout import (
    ModelRollout, RolloutConflict, RolloutError, Rollouts, RolloutState, binomial_tail, load_rollout_file, parse_rollout_file,
    parse_rollouts, worse_z,
)  # fmt: skip


def test_a_rollout_table_parses() -> None:
    models = parse_rollouts(
        {"models": {"digits_cnn": {"stable": "1", "canary": 2, "canary_share": 0.1, "sticky_header": "X-User"}}}
    )
    assert models == {"digits_cnn": ModelRollout("1", "2", 0.1, b"x-user")}


def test_versions_in_a_rollout_are_numbers_as_in_requests() -> None:
    """"02" is version 2, as Triton and the request paths read it: the rollout applies to it."""
    assert parse_rollouts({"models": {"m": {"stable": "01", "canary": "002"}}}) == {"m": ModelRollout("1", "2", 0.0)}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {}}, "unknown section(s): model"),
        ({"models": {"m": {"canary": "2"}}}, "[models.m] needs a stable version"),
        ({"models": {"m": {"stable": "one"}}}, "models.m.stable must be a version number"),
        ({"models": {"m": {"stable": "9" * 20}}}, "models.m.stable must be a version number"),
        ({"models": {"m": {"stable": "1", "canary": "2", "canary_share": 1.5}}}, "canary_share must be a number in 0..1"),
        ({"models": {"m": {"stable": "1", "canary_share": 0.2}}}, "there is no canary version"),
        ({"models": {"m": {"stable": "1", "canary": "1"}}}, "the canary is the stable version"),
        ({"models": {"m": {"stable": "1", "canry": "2"}}}, "unknown key(s) in [models.m]: canry"),
        ({"models": {"m": {"stable": "1", "sticky_header": "a b"}}}, "sticky_header must be a header name"),
        # Settings that act on a canary only, in a table without one: silently ignored otherwise.
        ({"models": {"m": {"stable": "1", "sticky_header": "x-user"}}}, "m.sticky_header is set but there is no canary"),
        ({"models": {"m": {"stable": "1", "rollback_error_rate": 0.02}}}, "m.rollback_error_rate is set but there is no canary"),
        ({"models": {"m": {"stable": "1", "rollback_latency_ratio": 2.0}}}, "m.rollback_latency_ratio is set but there is no canary"),
        ({"models": {"m": {"stable": "1", "rollback_window": 200}}}, "m.rollback_window is set but there is no canary"),
        ({"models": {"m": {"stable": "1", "ramp_min_requests": 200}}}, "m.ramp_min_requests is set but there is no canary"),
        ({"models": {"m": {"stable": "1", "shadow": "3", "ramp_min_seconds": 30.0}}}, "m.ramp_min_seconds is set but there is no canary"),
    ],
)
def test_bad_rollouts_are_rejected_with_a_message_naming_the_problem(data: dict, message: str) -> None:
    with pytest.raises(RolloutError) as err:
        parse_rollouts(data)
    assert message in str(err.value)


def test_a_ten_percent_canary_gets_ten_percent() -> None:
    rollout = ModelRollout("1", "2", 0.1)
    rng = random.Random(0)
    counts = Counter(rollout.choose("m", None, rng) for _ in range(20_000))
    assert abs(counts["2"] / 20_000 - 0.10) < 0.01


def test_a_sticky_header_pins_each_client_and_raising_the_share_only_moves_clients_to_canary() -> None:
    rng = random.Random(0)
    users = [f"user-{i}".encode() for i in range(2000)]
    at_10 = {u: ModelRollout("1", "2", 0.1, b"x-user").choose("m", u, rng) for u in users}
    again = {u: ModelRollout("1", "2", 0.1, b"x-user").choose("m", u, rng) for u in users}
    at_50 = {u: ModelRollout("1", "2", 0.5, b"x-user").choose("m", u, rng) for u in users}
    assert at_10 == again
    assert 0.07 < sum(v == "2" for v in at_10.values()) / len(users) < 0.13
    assert all(at_50[u] == "2" for u, v in at_10.items() if v == "2")


def test_no_rollout_means_no_choice() -> None:
    assert Rollouts().choose("m") == ""


def test_the_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_rollout_in_force(tmp_path: Path) -> None:
    path = tmp_path / "rollout.toml"
    path.write_text('[models.m]\nstable = "1"\n')
    rollouts = Rollouts.from_file(path)
    assert rollouts.choose("m") == "1" and not rollouts.reload_if_changed()
    path.write_text('[models.m]\nstable = "1"\ncanary = "2"\ncanary_share = 1.0\nsticky_header = "x-user"\n')
    os.utime(path, ns=(1, 10**18))  # a new stamp whatever the file system's clock resolution
    assert not rollouts.reload_if_changed() and rollouts.choose("m") == "1"  # changed: read once it stays so
    assert rollouts.reload_if_changed() and rollouts.choose("m") == "2" and rollouts.pin_headers == {b"x-user"}
    path.write_text("[models.m\nstable = ")
    os.utime(path, ns=(1, 2 * 10**18))
    assert not rollouts.reload_if_changed() and not rollouts.reload_if_changed()
    assert rollouts.choose("m") == "2" and "invalid TOML" in rollouts.error
    assert rollouts.snapshot()["error"] == rollouts.error


def test_a_file_being_written_is_read_once_it_stays_the_same_and_an_empty_one_keeps_the_rollout(tmp_path: Path) -> None:
    path = tmp_path / "rollout.toml"
    path.write_text('[models.m]\nstable = "1"\ncanary = "2"\ncanary_share = 0.5\n[models.n]\nstable = "3"\n')
    rollouts = Rollouts.from_file(path)
    rollouts.act("m", "rollback")
    path.write_text('[models.m]\nstable = "1"\ncanary = "2"\ncanary_share = 0.5\n')  # cut short mid-write...
    os.utime(path, ns=(1, 10**18))
    assert not rollouts.reload_if_changed()
    path.write_text('[models.m]\nstable = "1"\ncanary = "2"\ncanary_share = 0.5\n[models.n]\nstable = "3"\n# edited\n')
    os.utime(path, ns=(1, 2 * 10**18))  # ...then written whole: never read cut short
    assert not rollouts.reload_if_changed()
    assert set(rollouts.models) == {"m", "n"} and rollouts.choose("m") == "1"  # the rollback stays
    assert rollouts.reload_if_changed() and set(rollouts.models) == {"m", "n"} and rollouts.choose("m") == "1"
    path.write_text("")  # emptied before being written (an editor, a shell redirection)
    os.utime(path, ns=(1, 3 * 10**18))
    assert not rollouts.reload_if_changed() and not rollouts.reload_if_changed()
    assert set(rollouts.models) == {"m", "n"} and "empty" in rollouts.error
    path.write_text("# no rollouts\n")  # ending every rollout is said in so many words
    os.utime(path, ns=(1, 4 * 10**18))
    assert not rollouts.reload_if_changed() and rollouts.reload_if_changed()
    assert rollouts.models == {} and rollouts.error == ""


def test_a_worker_starting_while_the_file_is_bad_starts_from_the_rollout_in_force_in_the_others(tmp_path: Path) -> None:
    path, kept = tmp_path / "rollout.toml", tmp_path / "workers" / "rollout" / "in-force.toml"
    kept.parent.parent.mkdir()
    path.write_text('[models.m]\nstable = "1"\ncanary = "2"\ncanary_share = 0.5\n')
    Rollouts.from_file(path, kept=kept)  # the workers at the gateway's start keep what they put in force
    path.write_text('[models.m]\nstable = "x"\n')  # the file goes bad while the gateway runs
    os.utime(path, ns=(1, 10**18))
    replacement = Rollouts.from_file(path, kept=kept)  # a worker replaced meanwhile
    assert replacement.models == {"m": ModelRollout("1", "2", 0.5)} and "version number" in replacement.error
    assert not replacement.reload_if_changed() and not replacement.reload_if_changed()  # no news in the file
    path.write_text('[models.m]\nstable = "2"\n')
    os.utime(path, ns=(1, 2 * 10**18))
    assert not replacement.reload_if_changed() and replacement.reload_if_changed()
    assert replacement.choose("m") == "2" and replacement.error == ""
    assert "stable = \"2\"" in kept.read_text()  # for the next worker to come
    with pytest.raises(RolloutError):  # without a rollout in force elsewhere: the error, as at the start
        Rollouts.from_file(tmp_path / "missing.toml", kept=tmp_path / "none.toml")


def test_a_file_moved_away_and_back_is_in_force_again_without_an_error(tmp_path: Path) -> None:
    path, aside = tmp_path / "rollout.toml", tmp_path / "aside.toml"
    path.write_text('[models.m]\nstable = "1"\n')
    rollouts = Rollouts.from_file(path)
    path.rename(aside)
    assert not rollouts.reload_if_changed() and "No such file" in rollouts.error and rollouts.choose("m") == "1"
    aside.rename(path)  # the same size and time as the file in force
    assert not rollouts.reload_if_changed() and rollouts.reload_if_changed()
    assert rollouts.error == "" and rollouts.snapshot()["error"] is None and rollouts.choose("m") == "1"


def test_a_rollout_path_that_cannot_be_read_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "rollout.toml"
    folder.mkdir()  # what a container bind mount of a missing file makes
    with pytest.raises(RolloutError, match="cannot read rollout file .*rollout.toml: Is a directory"):
        Rollouts.from_file(folder)
    path = tmp_path / "r.toml"
    path.write_text('[models.m]\nstable = "1"\n')
    rollouts = Rollouts.from_file(path)
    path.unlink()
    path.mkdir()
    os.utime(path, ns=(1, 10**18))
    assert not rollouts.reload_if_changed() and not rollouts.reload_if_changed()  # no exception
    assert "Is a directory" in rollouts.error and rollouts.choose("m") == "1"


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rollout.toml"
    path.write_text('[models.m]\nstable = "x"\n')
    with pytest.raises(RolloutError, match="version number"):
        Rollouts.from_file(path)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rollouts_with(table: dict, clock: Clock) -> Rollouts:
    rollouts = Rollouts(clock=clock, seed=0)
    rollouts.set_models(parse_rollouts({"models": {"m": table}}))
    return rollouts


def serve(rollouts: Rollouts, n: int, fails: Callable[[str, int], bool] = lambda v, i: False, latency: float = 0.01) -> Counter[str]:
    """n requests through the rollout; ``fails(version, i)`` decides which fail."""
    counts: Counter[str] = Counter()
    for i in range(n):
        version = rollouts.choose("m")
        counts[version] += 1
        rollouts.record("m", version, not fails(version, i), latency)
    return counts


def test_a_failing_canary_is_rolled_back_within_its_window_with_the_evidence() -> None:
    clock = Clock()
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "canary_share": 0.1, "rollback_error_rate": 0.05, "rollback_window": 100}, clock
    )
    counts = serve(rollouts, 5000, fails=lambda v, i: v == "2" and i % 3 == 0)  # a third of the canary fails
    state = rollouts.states["m"]
    assert state.status == "rolled_back" and state.share == 0.0 and state.share_in_force == 0.0
    # The window fills after 100 canary requests; the rule is checked every 10: rolled back by 110.
    assert counts["2"] <= 100 + 10
    (event,) = [e for e in state.events if e["event"] == "rollback"]
    assert event["by"] == "automatic" and event["canary_error_rate"] > 0.3 and event["stable_error_rate"] == 0.0
    assert event["z"] > 3.09
    assert rollouts.choose("m") == "1"


def test_a_slow_canary_is_rolled_back_on_p99() -> None:
    clock = Clock()
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "canary_share": 0.5, "rollback_latency_ratio": 2.0, "rollback_window": 50}, clock
    )
    for _ in range(400):
        version = rollouts.choose("m")
        rollouts.record("m", version, True, 0.05 if version == "2" else 0.01)
    state = rollouts.states["m"]
    assert state.status == "rolled_back"
    event = state.events[-1]
    assert event["canary_p99_ms"] == 50.0 and event["stable_p99_ms"] == 10.0
    # Every one of its 50 requests took over twice stable's p99: 0.01 ** 50 by chance.
    assert event["slow_requests"] == 50 and event["p_value"] == pytest.approx(1e-100)


def test_cached_answers_count_for_the_ramp_but_not_against_the_canary() -> None:
    clock = Clock()
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "ramp": [0.25, 0.5, 1.0], "ramp_min_requests": 20, "ramp_min_seconds": 5.0,
         "rollback_latency_ratio": 2.0, "rollback_window": 20},
        clock,
    )  # fmt: skip
    state = rollouts.states["m"]
    clock.now = 5.0
    for _ in range(20):  # the canary's answers from the cache: requests it served
        rollouts.record("m", "2", True, 0.00002, computed=False)
    # Enough for the step, but nothing computed to judge: the step waits for a full window.
    assert state.step_requests == 20 and state.share == 0.25 and not state.window("2").items
    # Stable's answers mostly come from the cache (microseconds); its computations take 10 ms,
    # as the canary's do: no reason to roll the canary back. Once both windows are full, the
    # rule is evaluated, holds, and the canary steps on.
    for _ in range(200):
        for _ in range(9):
            rollouts.record("m", "1", True, 0.00002, computed=False)
        rollouts.record("m", "1", True, 0.01)
        rollouts.record("m", "2", True, 0.01)
    assert state.status == "canary" and state.share == 0.5
    assert [latency for _, latency in state.windows["1"].items] == [0.01] * 20
    # Counted as computed, the same hits make stable's p99 tiny, and the canary is rolled back.
    for _ in range(200):
        rollouts.record("m", "1", True, 0.00002)
        rollouts.record("m", "2", True, 0.01)
    assert state.status == "rolled_back"


def test_a_healthy_canary_ramps_step_by_step_and_is_promoted() -> None:
    clock = Clock()
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "ramp": [0.1, 0.5, 1.0], "ramp_min_requests": 20, "ramp_min_seconds": 5.0,
         "rollback_error_rate": 0.05, "rollback_window": 20},
        clock,
    )  # fmt: skip
    state = rollouts.states["m"]
    assert state.share == 0.1
    serve(rollouts, 1000)
    assert state.share == 0.1  # enough requests, not enough time
    for expected in (0.5, 1.0):
        clock.now += 5.0
        serve(rollouts, 200)
        assert state.share == expected and state.status == "canary" and state.share_in_force == expected
    clock.now += 5.0
    serve(rollouts, 100)
    assert state.status == "promoted" and state.stable == "2" and serve(rollouts, 50) == {"2": 50}
    assert state.share_in_force == 0.0
    assert [e["event"] for e in state.events] == ["ramp", "ramp", "promote"]



# -- the rollback rules decide before every step, and on evidence ----------------------------------

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "rollout.toml"


def shipped_trial(seed: int, draw: Callable[[str, random.Random], tuple[bool, float]]) -> tuple[RolloutState, int]:
    """Version 2 dropped in beside version 1 under configs/rollout.toml's [defaults], a request
    every 50 ms until it is promoted or rolled back; ``draw(version, rng)`` gives each request's
    (ok, latency). The state and the canary's requests."""
    clock = Clock()
    rollouts = Rollouts(clock=clock, seed=seed)
    rollouts.set_file(load_rollout_file(SHIPPED))
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    state = rollouts.auto["m"]
    rng = random.Random(1000 + seed)
    canary = 0
    while state.status == "canary" and canary < 20_000:
        clock.now += 0.05
        version = rollouts.choose("m")
        ok, latency = draw(version, rng)
        canary += version == "2"
        rollouts.record("m", version, ok, latency)
    return state, canary


def test_a_canary_failing_everything_is_rolled_back_before_any_step() -> None:
    """Each step needs 20 canary requests, but the window 100: the rule is evaluated when the
    window is full, before the step, and the canary is rolled back, never promoted."""
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "ramp": [0.5, 1.0], "ramp_min_requests": 20, "rollback_error_rate": 0.01,
         "rollback_window": 100},
        Clock(),
    )  # fmt: skip
    state = rollouts.states["m"]
    counts = serve(rollouts, 1000, fails=lambda v, i: v == "2")
    assert state.status == "rolled_back" and state.stable == "1" and counts["2"] == 100
    (event,) = state.events
    assert event["event"] == "rollback" and event["canary_error_rate"] == 1.0 and event["window"] == 100 and event["z"] > 3.09


def test_a_canary_failing_on_what_it_computes_is_judged_before_it_is_promoted() -> None:
    """Under configs/rollout.toml, a canary failing 9% of its requests while most of its good
    answers come from the cache: its steps count every answer, but each waits for a full window
    of computed ones, and the first evaluation rolls it back."""

    def draw(version: str, rng: random.Random) -> tuple[bool, float]:
        return (rng.random() >= 0.09, 0.01) if version == "2" else (True, 0.01)

    clock = Clock()
    rollouts = Rollouts(clock=clock, seed=0)
    rollouts.set_file(load_rollout_file(SHIPPED))
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    state = rollouts.auto["m"]
    rng = random.Random(1)
    while state.status == "canary":
        clock.now += 1.0
        version = rollouts.choose("m")
        ok, latency = draw(version, rng)
        # Its failures are computed; 2% of its good answers are (the rest are cache hits).
        rollouts.record("m", version, ok, latency, computed=not ok or version == "1" or rng.random() < 0.02)
    assert state.status == "rolled_back" and state.stable == "1"
    assert [e["event"] for e in state.events] == ["canary", "rollback"]
    assert state.events[-1]["window"] == 200 and state.events[-1]["stable_error_rate"] == 0.0


def test_with_a_latency_rule_a_step_waits_for_stables_window_too(caplog: pytest.LogCaptureFixture) -> None:
    rollouts = rollouts_with(
        {"stable": "1", "canary": "2", "ramp": [0.5, 1.0], "ramp_min_requests": 10, "rollback_latency_ratio": 2.0,
         "rollback_window": 20},
        Clock(),
    )  # fmt: skip
    state = rollouts.states["m"]
    for _ in range(19):
        rollouts.record("m", "1", True, 0.01)
    for _ in range(40):
        rollouts.record("m", "2", True, 0.01)
    assert state.share == 0.5 and state.window("2").full  # stable's p99 is not known yet
    assert state.snapshot()["waiting_for_windows"] is True  # said, in the view and once in the log
    assert caplog.text.count("waits for full windows") == 1 and "stable 19, of 20" in caplog.text
    rollouts.record("m", "1", True, 0.01)
    rollouts.record("m", "2", True, 0.01)
    assert state.share == 1.0 and [e["event"] for e in state.events] == ["ramp"]
    assert state.snapshot()["waiting_for_windows"] is False


def test_without_a_stable_request_the_canary_is_compared_with_a_clean_stable_of_its_size() -> None:
    """All requests go to the canary: 4 failures in 20 could be chance; 10 in 20 are not."""
    for failing, rolled_back in ((5, False), (2, True)):
        rollouts = rollouts_with({"stable": "1", "canary": "2", "canary_share": 1.0, "rollback_error_rate": 0.0,
                                  "rollback_window": 20}, Clock())  # fmt: skip
        counts = serve(rollouts, 20, fails=lambda v, i, failing=failing: i % failing == 0)
        state = rollouts.states["m"]
        assert counts == {"2": 20} and (state.status == "rolled_back") is rolled_back
        if rolled_back:
            assert state.events[-1]["stable_requests"] == 0 and state.events[-1]["z"] == pytest.approx(3.651, abs=1e-3)


def test_a_stable_version_answering_mostly_from_the_cache_does_not_shield_a_failing_canary() -> None:
    """Stable's answers come from the cache but for a few computed ones; the canary, whose
    failures are never cached, computes everything and fails a third of it: rolled back once its
    window is full, as against a stable that computed as many answers at its own rate."""
    rollouts = rollouts_with({"stable": "1", "canary": "2", "canary_share": 0.5, "rollback_error_rate": 0.05,
                              "rollback_window": 50}, Clock())  # fmt: skip
    state = rollouts.states["m"]
    for i in range(5):
        rollouts.record("m", "1", True, 0.01)  # stable: 5 computed answers...
    for i in range(200):
        rollouts.record("m", "1", True, 0.0001, computed=False)  # ...the rest from the cache
    for i in range(50):
        rollouts.record("m", "2", i % 3 != 0, 0.01)
    assert state.status == "rolled_back"
    assert state.events[-1]["stable_requests"] == 5 and state.events[-1]["z"] > 3.09


def test_a_canary_failing_as_often_as_a_mostly_cached_stable_is_not_rolled_back() -> None:
    rollouts = rollouts_with({"stable": "1", "canary": "2", "canary_share": 0.5, "rollback_error_rate": 0.0,
                              "rollback_window": 200}, Clock())  # fmt: skip
    for i in range(30):
        rollouts.record("m", "1", i % 10 != 0, 0.01)  # 3 failures in 30 computed answers: 10%
    for i in range(200):
        rollouts.record("m", "2", i % 10 != 0, 0.01)  # 20 in 200: 10% too
    assert rollouts.states["m"].status == "canary"



    """No rollback rule: nothing to wait for, every answer (cached or not) counts for the step."""
    clock = Clock()
    rollouts = rollouts_with({"stable": "1", "canary": "2", "ramp": [0.1, 0.5, 1.0], "ramp_min_requests": 20,
                              "ramp_min_seconds": 5.0}, clock)  # fmt: skip
    state = rollouts.states["m"]
    clock.now = 5.0
    for _ in range(20):
        rollouts.record("m", "2", True, 0.00002, computed=False)
    assert state.share == 0.5 and not state.window("2").items
    clock.now = 10.0
    for _ in range(19):
        rollouts.record("m", "2", False, 1.0)  # failing and slow: no rule to judge it by
    assert state.share == 0.5
    rollouts.record("m", "2", False, 1.0)
    assert state.share == 1.0
    clock.now = 15.0
    serve(rollouts, 20)
    assert state.status == "promoted" and [e["event"] for e in state.events] == ["ramp", "ramp", "promote"]


def test_identical_versions_are_seldom_rolled_back() -> None:
    """Both versions failing 5% of their requests, or with the same spread of latencies
    (log-normal, sigma 1): under configs/rollout.toml, the old rules rolled such a canary back
    in 85% and 45% of trials. Now each check trips about once in 1000 by chance; over a trial's
    checks, 2.5% and 0% of 1000 simulated trials: at most 6 and 2 of these 100."""
    errors = [shipped_trial(seed, lambda v, rng: (rng.random() >= 0.05, 0.01))[0].status for seed in range(100)]
    assert errors.count("rolled_back") <= 6 and errors.count("promoted") + errors.count("rolled_back") == 100
    latencies = [shipped_trial(seed, lambda v, rng: (True, 0.01 * rng.lognormvariate(0, 1.0)))[0].status for seed in range(100)]
    assert latencies.count("rolled_back") <= 2 and latencies.count("promoted") + latencies.count("rolled_back") == 100


def test_a_clearly_failing_or_slower_canary_is_rolled_back_within_a_few_windows() -> None:
    """Under configs/rollout.toml (a window of 200): a canary failing 10% against none, and one
    whose latencies are 3 times stable's (log-normal, sigma 0.25), are rolled back once their
    window is full (at most 220 and 200 canary requests in 300 and 200 simulated trials)."""
    for seed in range(20):
        state, canary = shipped_trial(seed, lambda v, rng: (v == "1" or rng.random() >= 0.10, 0.01))
        assert state.status == "rolled_back" and canary <= 300, (seed, canary)
        assert state.events[-1]["z"] > 3.09 and state.events[-1]["stable_error_rate"] == 0.0
        state, canary = shipped_trial(seed, lambda v, rng: (True, (3 if v == "2" else 1) * 0.01 * rng.lognormvariate(0, 0.25)))
        assert state.status == "rolled_back" and canary <= 300, (seed, canary)
        assert state.events[-1]["slow_requests"] >= 9 and state.events[-1]["p_value"] < 0.001


def test_the_statistics_of_the_rules() -> None:
    # P(X >= k), X ~ Binomial(200, 0.01): 8 slow requests of 200 could be chance (p = 0.001), 9 not.
    assert binomial_tail(0, 200, 0.01) == 1.0 and binomial_tail(201, 200, 0.01) == 0.0
    assert binomial_tail(1, 200, 0.01) == pytest.approx(1 - 0.99**200)
    assert binomial_tail(8, 200, 0.01) == pytest.approx(0.0010126, rel=1e-4) and binomial_tail(9, 200, 0.01) < 0.001
    assert 0 < binomial_tail(2000, 100_000, 0.01) < 1e-100  # a large window: no overflow
    # The pooled z: 10 failures of 200 against 0 of 200 is just significant; the same rate is not.
    assert worse_z(10, 200, 0, 200) == pytest.approx(3.2026, abs=1e-4) and worse_z(10, 200, 10, 200) == 0.0
    assert worse_z(0, 200, 0, 200) == 0.0 and worse_z(200, 200, 200, 200) == 0.0


def test_operator_actions_and_their_errors() -> None:
    clock = Clock()
    rollouts = rollouts_with({"stable": "1", "canary": "2", "canary_share": 0.1}, clock)
    assert rollouts.act("m", "set_share", 1.0)["canary_share"] == 1.0 and rollouts.choose("m") == "2"
    assert rollouts.act("m", "rollback")["status"] == "rolled_back" and rollouts.choose("m") == "1"
    with pytest.raises(ValueError, match="unknown action"):
        rollouts.act("m", "explode")
    with pytest.raises(ValueError, match="share in 0..1"):
        rollouts.act("m", "set_share", 3)
    assert rollouts.act("m", "promote")["stable"] == "2"
    # Promoted, the canary is the stable version: a rollback or a share would change nothing.
    for action, share in (("rollback", None), ("set_share", 0.5)):
        with pytest.raises(RolloutConflict, match="version 2 was promoted and is the stable version"):
            rollouts.act("m", action, share)
    assert rollouts.choose("m") == "2" and rollouts.states["m"].status == "promoted"
    with pytest.raises(KeyError):
        rollouts.act("other", "promote")
    assert [e["by"] for e in rollouts.states["m"].events] == ["operator"] * 3


def in_force(rollouts: Rollouts) -> tuple[str, float, float]:
    """Model m's status, its share in force, and the canary's share its JSON view shows."""
    state = rollouts.all_states()["m"]
    return state.status, state.share_in_force, rollouts.snapshot()["models"]["m"]["canary_share"]


def test_the_share_in_force_in_every_status_and_the_json_view_agrees() -> None:
    clock = Clock()
    assert in_force(rollouts_with({"stable": "1"}, clock)) == ("stable", 0.0, 0.0)
    rollouts = rollouts_with({"stable": "1", "canary": "2", "canary_share": 0.25}, clock)
    assert in_force(rollouts) == ("canary", 0.25, 0.25)
    rollouts.act("m", "set_share", 1.0)
    assert in_force(rollouts) == ("canary", 1.0, 1.0) and serve(rollouts, 20) == {"2": 20}
    rollouts.act("m", "rollback")
    assert in_force(rollouts) == ("rolled_back", 0.0, 0.0) and serve(rollouts, 20) == {"1": 20}
    rollouts.act("m", "set_share", 0.5)  # an operator restarts the trial...
    assert in_force(rollouts) == ("canary", 0.5, 0.5)
    rollouts.act("m", "set_share", 0.0)  # ...and stops it again: a rollback
    assert in_force(rollouts) == ("rolled_back", 0.0, 0.0)
    rollouts.act("m", "promote")
    assert in_force(rollouts) == ("promoted", 0.0, 0.0) and serve(rollouts, 20) == {"2": 20}
    assert rollouts.states["m"].config.canary_share == 0.25  # the file's share, for a fresh start


def test_a_share_outside_the_canary_status_is_not_in_force() -> None:
    config = ModelRollout(stable="1", canary="2", canary_share=0.5)
    for status in ("stable", "rolled_back", "promoted"):
        state = RolloutState(config, "1", "2", 0.5, status)
        assert state.share_in_force == 0.0
        assert {state.choose("m", None, random.Random(seed)) for seed in range(50)} == {"1"}
    state = RolloutState(config, "1", "2", 0.5, "canary")
    assert state.share_in_force == 0.5
    assert {state.choose("m", None, random.Random(seed)) for seed in range(50)} == {"1", "2"}


def test_an_unchanged_table_keeps_its_state_across_reloads_and_a_changed_one_starts_afresh() -> None:
    clock = Clock()
    table = {"stable": "1", "canary": "2", "canary_share": 0.1}
    rollouts = rollouts_with(table, clock)
    rollouts.act("m", "rollback")
    rollouts.set_models(parse_rollouts({"models": {"m": table}}))
    assert rollouts.states["m"].status == "rolled_back"
    rollouts.set_models(parse_rollouts({"models": {"m": {**table, "canary_share": 0.2}}}))
    assert rollouts.states["m"].status == "canary" and rollouts.states["m"].share == 0.2


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"ramp": [0.5, 0.1, 1.0]}, "ramp must be rising shares"),
        ({"ramp": [0.1, 0.5]}, "ending with 1.0"),
        ({"ramp_min_requests": 0}, "ramp_min_requests must be a finite number >= 1"),
        ({"rollback_window": 5}, "rollback_window must be a finite number >= 10"),
        ({"rollback_error_rate": float("nan")}, "rollback_error_rate must be a finite number >= 0.0, got nan"),
        ({"rollback_latency_ratio": float("nan")}, "rollback_latency_ratio must be a finite number"),
        ({"ramp_min_seconds": float("inf")}, "ramp_min_seconds must be a finite number >= 0.0, got inf"),
        ({"ramp": [0.1, float("nan"), 1.0]}, "ramp must be rising shares"),
        ({"canary_share": float("nan")}, "canary_share must be a number in 0..1"),
        ({"shadow": "3", "shadow_share": float("nan")}, "shadow_share must be a number in 0..1"),
        ({"rollback_latency_ratio": "2"}, "rollback_latency_ratio must be a number"),
        ({"shadow": "1"}, "the shadow is the stable version"),
        ({"shadow": "3", "shadow_share": 2.0}, "shadow_share must be a number in 0..1"),
        ({"shadow_share": 0.5}, "there is no shadow version"),
        ({"ramp": [1.0], "rollback_latency_ratio": 2.0}, "leaves stable no requests"),
        ({"canary_share": 1.0, "rollback_latency_ratio": 2.0}, "leaves stable no requests"),
        ({"ramp": [0.5, 0.5, 1.0]}, "ramp must be rising shares"),  # strictly: a repeated step is no step
        ({"ramp": [0.1, 1.0, 1.0]}, "ramp must be rising shares"),
        ({"canary_share": 0.5, "ramp": [0.1, 1.0]}, "m: canary_share and ramp are both set, but the ramp's first step is the starting share (0.1)"),
        ({"canary_share": 0.0, "ramp": [0.1, 1.0]}, "canary_share and ramp are both set"),
        ({"rollback_error_rate": 2}, "m.rollback_error_rate must be below 1"),  # a difference of rates: never fires
        ({"rollback_error_rate": 1.0}, "m.rollback_error_rate must be below 1"),
        ({"rollback_window": 100_000_000_000}, "m.rollback_window must be at most 100,000 computed answers"),
        ({"rollback_window": 100_001}, "m.rollback_window must be at most 100,000"),
        ({"ramp": [0.1, 1.0], "ramp_min_requests": 10**12}, "m.ramp_min_requests must be at most 1,000,000,000 requests"),
        ({"ramp": [0.1, 1.0], "ramp_min_seconds": 1e12}, "m.ramp_min_seconds must be at most 2,592,000 seconds (30 days)"),
        ({"shadow": "2"}, "m: the shadow is the canary version (2)"),
        ({"shadow": "02", "canary_share": 0.1}, "the shadow is the canary version (2)"),
    ],
)
def test_bad_ramp_and_rollback_settings_are_rejected(extra: dict, message: str) -> None:
    with pytest.raises(RolloutError) as err:
        parse_rollouts({"models": {"m": {"stable": "1", "canary": "2", **extra}}})
    assert message in str(err.value)


def test_settings_at_their_limits_are_accepted() -> None:
    """The bounds refuse only what cannot make sense: the values at them still parse."""
    table = {"stable": "1", "canary": "2", "ramp": [0.1, 0.2, 1.0], "ramp_min_requests": 1_000_000_000,
             "ramp_min_seconds": 30 * 24 * 3600, "rollback_error_rate": 0.99, "rollback_window": 100_000, "shadow": "3"}
    parsed = parse_rollouts({"models": {"m": table}})["m"]
    assert (parsed.rollback_window, parsed.rollback_error_rate, parsed.ramp_min_seconds) == (100_000, 0.99, 2_592_000.0)
    staged = parse_rollouts({"models": {"m": {"stable": "1", "sticky_header": ""}}})["m"]  # an empty header is none
    assert staged == ModelRollout("1")


# -- [defaults]: versions dropped into the repository become canaries by themselves --------------

DEFAULTS = {"ramp": [0.1, 0.5, 1.0], "ramp_min_requests": 50, "rollback_error_rate": 0.05, "rollback_window": 50}


def auto_rollouts(clock: Clock, defaults: dict = DEFAULTS, models: dict | None = None) -> Rollouts:
    rollouts = Rollouts(clock=clock, seed=0)
    rollouts.set_file(parse_rollout_file({"defaults": defaults, "models": models or {}}))
    return rollouts


@pytest.mark.parametrize(
    "defaults, message",
    [
        ({"stable": "1", "canary_share": 0.1}, "[defaults] cannot set stable"),
        ({"shadow": "2", "canary_share": 0.1}, "[defaults] cannot set shadow"),
        ({"rollback_error_rate": 0.05}, "[defaults] needs a canary_share or a ramp"),
        ({"ramp": [0.5, 0.2]}, "defaults.ramp must be rising shares"),
        ({"ramp": [1.0], "rollback_latency_ratio": 3.0}, "defaults: rollback_latency_ratio compares the canary"),
        ({"canary_share": 0.1, "rollback_windw": 50}, "unknown key(s) in [defaults]: rollback_windw"),
        ({"canary_share": 0.5, "ramp": [0.1, 1.0]}, "defaults: canary_share and ramp are both set, but the ramp's first step"),
        ({"ramp": [0.5, 0.5, 1.0]}, "defaults.ramp must be rising shares"),
        ({"canary_share": 0.1, "rollback_error_rate": 1}, "defaults.rollback_error_rate must be below 1"),
        ({"canary_share": 0.1, "rollback_window": 10**11}, "defaults.rollback_window must be at most 100,000"),
        ({"ramp": [0.1, 1.0], "ramp_min_seconds": 1e9}, "defaults.ramp_min_seconds must be at most 2,592,000"),
    ],
)
def test_bad_defaults_are_rejected_with_a_message_naming_the_problem(defaults: dict, message: str) -> None:
    with pytest.raises(RolloutError) as err:
        parse_rollout_file({"defaults": defaults})
    assert message in str(err.value)


def test_a_newer_version_starts_as_a_canary_of_the_serving_one_and_is_promoted_when_healthy() -> None:
    clock = Clock()
    rollouts = auto_rollouts(clock)
    everywhere = lambda v: True  # noqa: E731
    rollouts.observe("m", "1", everywhere)
    assert rollouts.choose("m") == "1"  # first sight: the serving version is stable
    assert serve(rollouts, 100) == Counter({"1": 100})
    rollouts.observe("m", "2", everywhere)  # version 2 dropped in, routable everywhere
    state = rollouts.auto["m"]
    assert (state.stable, state.canary, state.share, state.status) == ("1", "2", 0.1, "canary")
    counts = serve(rollouts, 2000)
    assert 0.05 < counts["2"] / 2000 < 0.15 or state.status == "promoted"
    serve(rollouts, 3000)
    assert state.status == "promoted" and rollouts.choose("m") == "2"
    rollouts.observe("m", "2", everywhere)
    assert rollouts.auto["m"] is state  # nothing new: the promoted version serves
    snapshot = rollouts.snapshot()
    assert snapshot["models"]["m"]["automatic"] is True and snapshot["defaults"]["ramp"] == [0.1, 0.5, 1.0]
    assert [e["event"] for e in snapshot["models"]["m"]["events"]] == ["canary", "ramp", "ramp", "promote"]


def test_a_faulty_dropped_in_version_is_rolled_back_and_stays_out() -> None:
    clock = Clock()
    rollouts = auto_rollouts(clock)
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    counts = serve(rollouts, 3000, fails=lambda v, i: v == "2" and i % 3 == 0)
    state = rollouts.auto["m"]
    assert state.status == "rolled_back" and counts["2"] <= 50 + 10
    rollouts.observe("m", "2", lambda v: True)  # still the newest: not tried again
    assert rollouts.auto["m"] is state and rollouts.choose("m") == "1"
    rollouts.observe("m", "3", lambda v: True)  # a fix: a new canary of the stable version
    assert (rollouts.auto["m"].stable, rollouts.auto["m"].canary) == ("1", "3")


def test_a_stable_version_that_left_the_fleet_gives_way_to_the_newest() -> None:
    rollouts = auto_rollouts(Clock())
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: v != "1")  # version 1 removed
    assert rollouts.choose("m") == "2" and rollouts.auto["m"].status == "stable"


def test_a_model_with_its_own_table_is_not_under_the_defaults() -> None:
    rollouts = auto_rollouts(Clock(), models={"m": {"stable": "1"}})
    rollouts.observe("m", "2", lambda v: True)
    assert "m" not in rollouts.auto and rollouts.choose("m") == "1"
    assert Rollouts(clock=Clock()).choose("m") == ""  # no file: no choice, the fleet's newest serves


def test_operators_act_on_automatic_canaries_too() -> None:
    rollouts = auto_rollouts(Clock())
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    assert rollouts.act("m", "rollback")["status"] == "rolled_back"
    assert rollouts.choose("m") == "1"


def test_editing_the_defaults_keeps_where_each_trial_stands() -> None:
    clock = Clock()
    rollouts = auto_rollouts(clock)
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    rollouts.act("m", "rollback")
    rollouts.set_file(parse_rollout_file({"defaults": {**DEFAULTS, "rollback_window": 80}}))
    rollouts.observe("m", "2", lambda v: True)
    state = rollouts.auto["m"]
    assert (state.stable, state.canary, state.status) == ("1", "2", "rolled_back")
    assert state.config.rollback_window == 80 and rollouts.choose("m") == "1"


def ramped_canary(clock: Clock, defaults: dict, answers: int) -> tuple[Rollouts, RolloutState]:
    rollouts = Rollouts(clock=clock, seed=0)
    rollouts.set_file(parse_rollout_file({"defaults": defaults}))
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    for _ in range(answers):
        rollouts.record("m", "2", True, 0.01)
    return rollouts, rollouts.auto["m"]


RAMPED = {"ramp": [0.05, 0.25, 0.5, 1.0], "ramp_min_requests": 5}


def test_a_ramp_edited_in_the_defaults_moves_a_canary_onto_the_new_ramp_where_its_share_is() -> None:
    clock = Clock()
    rollouts, state = ramped_canary(clock, RAMPED, 10)
    assert (state.share, state.step) == (0.5, 2)
    rollouts.set_file(parse_rollout_file({"defaults": {**RAMPED, "ramp": [0.5, 1.0]}}))
    assert (state.share, state.step, state.step_requests) == (0.5, 0, 0)  # the same share: the step goes on
    for _ in range(5):
        rollouts.record("m", "2", True, 0.01)
    assert (state.status, state.share) == ("canary", 1.0)  # served at 1.0 before it is promoted
    rollouts, state = ramped_canary(clock, RAMPED, 5)
    rollouts.set_file(parse_rollout_file({"defaults": {**RAMPED, "ramp": [0.1, 0.3, 1.0]}}))
    assert (state.share, state.step, state.events[-1]["event"]) == (0.3, 1, "ramp")  # the first step at or above 0.25


def test_a_ramp_removed_from_the_defaults_leaves_the_canary_at_its_share_unpromoted() -> None:
    rollouts, state = ramped_canary(Clock(), RAMPED, 5)
    rollouts.set_file(parse_rollout_file({"defaults": {"canary_share": 0.05, "ramp_min_requests": 5}}))
    for _ in range(100):
        rollouts.record("m", "2", True, 0.01)
    assert (state.status, state.share, state.step, state.stable) == ("canary", 0.25, -1, "1")


def test_a_ramp_added_to_the_defaults_ramps_a_fixed_share_canary_but_not_one_an_operator_set() -> None:
    clock = Clock()
    rollouts, state = ramped_canary(clock, {"canary_share": 0.05, "ramp_min_requests": 5}, 0)
    rollouts.set_file(parse_rollout_file({"defaults": RAMPED}))
    assert (state.share, state.step) == (0.05, 0)
    for _ in range(20):
        rollouts.record("m", "2", True, 0.01)
    assert state.status == "promoted" and rollouts.choose("m") == "2"
    rollouts, state = ramped_canary(clock, RAMPED, 0)
    rollouts.act("m", "set_share", 0.3)  # the operator took it off the ramp
    rollouts.set_file(parse_rollout_file({"defaults": {**RAMPED, "ramp": [0.1, 1.0]}}))
    assert (state.share, state.step) == (0.3, -1)


def test_a_rollback_window_edited_in_the_defaults_resizes_the_windows_under_way() -> None:
    rules = {"canary_share": 0.5, "rollback_error_rate": 0.02, "rollback_window": 20}
    rollouts, state = ramped_canary(Clock(), rules, 0)
    for i in range(20):
        rollouts.record("m", "2", i != 0, 0.01)
    rollouts.set_file(parse_rollout_file({"defaults": {**rules, "rollback_window": 1000}}))
    assert state.window("2").items.maxlen == 1000 and len(state.window("2").items) == 20 and state.window("2").failures == 1
    rollouts.set_file(parse_rollout_file({"defaults": {**rules, "rollback_window": 10}}))
    assert len(state.window("2").items) == 10 and state.window("2").failures == 0  # the latest ten


def test_a_model_whose_table_is_removed_keeps_its_stable_version_under_the_defaults() -> None:
    rollouts = auto_rollouts(Clock(), models={"m": {"stable": "1"}})
    rollouts.set_file(parse_rollout_file({"defaults": DEFAULTS}))
    rollouts.observe("m", "3", lambda v: True)  # version 3 is the newest: a canary, not stable
    state = rollouts.auto["m"]
    assert (state.stable, state.canary, state.status) == ("1", "3", "canary")


def test_a_canary_that_left_the_fleet_ends_its_trial() -> None:
    rollouts = auto_rollouts(Clock())
    rollouts.observe("m", "1", lambda v: True)
    rollouts.observe("m", "2", lambda v: True)
    rollouts.observe("m", "1", lambda v: v != "2")  # its folder was removed
    state = rollouts.auto["m"]
    assert (state.stable, state.canary, state.status) == ("1", "", "stable")
    assert [e["event"] for e in state.events] == ["canary_gone"]


def test_a_share_of_minus_zero_is_zero_in_the_file_and_from_an_operator() -> None:
    models = parse_rollouts({"models": {"m": {"stable": "1", "canary": "2", "canary_share": -0.0}}})
    assert str(models["m"].canary_share) == "0.0"
    rollouts = Rollouts()
    rollouts.set_models({"m": ModelRollout("1", "2", 0.5)})
    assert str(rollouts.act("m", "set_share", -0.0)["canary_share"]) == "0.0"
