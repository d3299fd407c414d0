"""Instance state: readiness map, passive outlier ejection with back-off and a fleet share cap,
re-admission by probe (a fake clock: plain numbers)."""

from __future__ import annotations

from gateway.instances import EjectionPolicy, Instance

POLICY = EjectionPolicy(after_failures=3, base_s=5.0, max_s=30.0, max_share=0.5)


def fail(instance: Instance, fleet: list[Instance], now: float, times: int = 1) -> bool:
    return any([instance.record_failure("boom", now, fleet, POLICY) for _ in range(times)])


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    a, b = Instance("a"), Instance("b")
    fleet = [a, b]
    assert not fail(a, fleet, 0.0, 2)
    a.record_success()
    assert not fail(a, fleet, 0.0, 2) and a.state == "up" and a.routable
    assert fail(a, fleet, 1.0)
    assert a.state == "ejected" and not a.routable and a.ejections == 1 and a.ejected_until == 6.0
    assert [e for _, e in a.recent_errors] == ["boom"] * 5


def test_ejection_ends_only_with_a_successful_probe_after_its_time() -> None:
    a, b = Instance("a"), Instance("b")
    fail(a, [a, b], 0.0, 3)
    a.probed(True, 4.0)  # too early
    assert a.ejected
    a.probed(False, 6.0)  # time is over, but the probe failed
    assert a.ejected and not a.live
    a.probed(True, 7.0)
    assert a.state == "up" and a.consecutive_failures == 0


def test_repeat_ejections_last_longer_up_to_the_maximum_and_reset_after_good_behaviour() -> None:
    a, b = Instance("a"), Instance("b")
    lengths = []
    now = 0.0
    for _ in range(8):
        fail(a, [a, b], now, 3)
        lengths.append(a.ejected_until - now)
        now = a.ejected_until
        a.probed(True, now)
        now += 1.0  # misbehaves again soon after
    assert lengths == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 30.0, 30.0]
    fail(a, [a, b], now + 31.0, 3)  # a long healthy spell since re-admission: back to the base
    assert a.ejected_until - (now + 31.0) == 5.0


def test_at_most_the_allowed_share_of_the_fleet_is_ejected() -> None:
    fleet = [Instance(str(i)) for i in range(4)]
    for inst in fleet:
        fail(inst, fleet, 0.0, 3)
    assert sum(i.ejected for i in fleet) == 2
    single = Instance("only")
    assert not fail(single, [single], 0.0, 10) and single.routable  # ejecting it would serve no one


def test_down_instances_count_in_the_share_so_ejection_never_empties_the_fleet() -> None:
    a, b = Instance("a"), Instance("b", live=False)  # b is down: a is all that serves
    assert not fail(a, [a, b], 0.0, 10) and a.routable


def test_a_share_of_one_still_leaves_one_instance_routable() -> None:
    policy = EjectionPolicy(after_failures=1, base_s=5.0, max_s=30.0, max_share=1.0)
    for size in (2, 3, 5):
        fleet = [Instance(str(i)) for i in range(size)]
        for inst in fleet:
            for _ in range(3):
                inst.record_failure("boom", 0.0, fleet, policy)
        assert [i.routable for i in fleet].count(True) == 1, size
        assert sum(i.ejected for i in fleet) == size - 1
    assert [EjectionPolicy(max_share=1.0).max_ejected(n) for n in (1, 2, 3, 10)] == [0, 1, 2, 9]
    assert [EjectionPolicy(max_share=0.9).max_ejected(n) for n in (2, 10, 11)] == [1, 9, 9]


def test_a_share_of_one_counts_down_instances_so_the_last_live_one_stays() -> None:
    a, b, c = Instance("a"), Instance("b"), Instance("c", live=False)
    policy = EjectionPolicy(after_failures=1, max_share=1.0)
    assert a.record_failure("x", 0.0, [a, b, c], policy)  # c down, a ejected: b is left
    assert not b.record_failure("x", 0.0, [a, b, c], policy) and b.routable


def test_zero_share_disables_ejection() -> None:
    a, b = Instance("a"), Instance("b")
    policy = EjectionPolicy(after_failures=1, max_share=0.0)
    assert not a.record_failure("x", 0.0, [a, b], policy) and a.routable


def test_a_refused_connection_marks_down_until_a_probe_says_up() -> None:
    a = Instance("a")
    a.mark_down("refused", 1.0)
    assert a.state == "down" and not a.routable
    a.probed(True, 2.0)
    assert a.state == "up"


def test_holds_reads_the_readiness_map() -> None:
    a = Instance("a")
    assert a.holds("m", "1") is None  # no repository index yet: unknown
    a.models = {"m": frozenset({"1", "2"})}
    assert a.holds("m", "2") and a.holds("m", "") and not a.holds("m", "3") and not a.holds("n", "")
    a.forget("m", "2")
    assert a.models == {"m": frozenset({"1"})}
    a.forget("m", "1")
    assert a.models == {} and a.holds("m", "") is False


def test_snapshot_shows_state_counters_errors_and_models() -> None:
    a = Instance("http://a:1", weight=2.0)
    a.models = {"m": frozenset({"10", "2"})}
    fail(a, [a, Instance("b")], 10.0, 3)
    view = a.snapshot(12.0)
    assert view["state"] == "ejected" and view["ejected_for_s"] == 3.0 and view["ejections"] == 1
    assert view["weight"] == 2.0 and view["failures"] == 3 and view["consecutive_failures"] == 3
    assert view["recent_errors"][0] == {"age_s": 2.0, "error": "boom"}
    assert view["models"] == {"m": ["2", "10"]}


def test_an_end_answered_elsewhere_ends_only_what_it_follows_and_ends_are_kept_for_the_idle_time() -> None:
    here, there = Instance("a"), Instance("a")  # one instance as two worker processes see it
    here.sequence_answered("m", "1", b"7", False, 10.0, idle_s=5.0)
    here.sequence_answered("m", "1", b"8", False, 12.0, idle_s=5.0)  # answered after the end below
    there.sequence_answered("m", "1", b"7", True, 11.0, idle_s=5.0)
    there.sequence_answered("m", "1", b"8", True, 11.0, idle_s=5.0)
    assert there.open_sequences("m", "1", 11.0) == 0
    assert there.recent_ends("m", "1", 11.0) == [(b"7", 11.0), (b"8", 11.0)]
    here.ended_elsewhere("m", "1", there.recent_ends("m", "1", 11.0))
    assert here.open_sequences("m", "1", 12.0) == 1  # 8 again since: still under way
    assert here.snapshot(12.0)["sequences"] == {"m/1": 1}
    assert there.recent_ends("m", "1", 15.9) == [(b"7", 11.0), (b"8", 11.0)]
    assert there.recent_ends("m", "1", 16.0) == []  # past the idle time, no worker counts them
    there.sequence_answered("m", "1", b"9", True, 20.0, idle_s=5.0)
    there.forget_sequences("m")  # reloaded: nothing of it is left to end anywhere
    assert there.recent_ends("m", "1", 20.0) == []
