"""Rollout decisions shared between worker processes (gateway/rollout_workers.py): two
``Rollouts``, each with its own ``SharedDecisions`` on one folder, stand for two workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson

from gateway.rollout import ModelRollout, Rollouts, parse_rollout_file, trial_key
from gateway.rollout_workers import DECISIONS, FOLDER, TRIALS_KEPT, SharedDecisions, shared_decisions

CANARY = ModelRollout("1", "2", 0.5, rollback_error_rate=0.1, rollback_window=10)
RAMP = ModelRollout("1", "2", ramp=(0.1, 0.5, 1.0), ramp_min_requests=5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def worker(folder: Path, pid: int, config: ModelRollout = CANARY, clock: Clock | None = None) -> tuple[Rollouts, SharedDecisions]:
    rollouts = Rollouts(clock=clock or Clock(), seed=pid)
    rollouts.set_models({"m": config})
    return rollouts, SharedDecisions(folder, rollouts, clock=rollouts._clock, pid=pid)


def served(rollouts: Rollouts, n: int = 400) -> Counter[str]:
    return Counter(rollouts.choose("m") for _ in range(n))


def fail_canary(rollouts: Rollouts) -> None:
    """Enough canary failures, against a healthy stable, to break the rollback rule."""
    for _ in range(10):
        rollouts.record("m", "1", True, 0.01)
    for _ in range(10):
        rollouts.record("m", "2", False, 0.01)


def test_an_operators_rollback_in_one_worker_reaches_the_other(tmp_path: Path) -> None:
    a, shared_a = worker(tmp_path, 1)
    b, shared_b = worker(tmp_path, 2)
    assert set(served(b)) == {"1", "2"}
    a.act("m", "rollback")
    shared_b.poll()
    assert served(b) == {"1": 400}
    state = b.state("m")
    assert state is not None and state.status == "rolled_back" and state.share == 0.0
    assert state.events[-1]["event"] == "rollback" and state.events[-1]["by"] == "operator" and state.events[-1]["worker"] == 1
    # The worker that wrote it reads its own record as already in force: no second event.
    shared_a.poll()
    state_a = a.state("m")
    assert state_a is not None and [e["event"] for e in state_a.events] == ["rollback"]
    # And a later operator action the other way reaches the first worker in turn.
    b.act("m", "set_share", 0.25)
    shared_a.poll()
    assert state_a.status == "canary" and state_a.share == 0.25


def test_an_automatic_rollback_in_one_worker_reaches_the_other(tmp_path: Path) -> None:
    a, _ = worker(tmp_path, 1)
    b, shared_b = worker(tmp_path, 2)
    fail_canary(a)
    state_a = a.state("m")
    assert state_a is not None and state_a.status == "rolled_back"
    shared_b.poll()
    state_b = b.state("m")
    assert state_b is not None and state_b.status == "rolled_back" and served(b) == {"1": 400}
    event = state_b.events[-1]
    assert event["by"] == "automatic" and event["canary_error_rate"] == 1.0 and event["worker"] == 1


def test_ramp_steps_and_the_promotion_reach_the_other_worker(tmp_path: Path) -> None:
    a, _ = worker(tmp_path, 1, RAMP)
    b, shared_b = worker(tmp_path, 2, RAMP)
    for _ in range(5):
        a.record("m", "2", True, 0.01)
    shared_b.poll()
    state_b = b.state("m")
    assert state_b is not None and (state_b.step, state_b.share) == (1, 0.5)
    for _ in range(10):  # the last step (1.0), then the promotion
        a.record("m", "2", True, 0.01)
    shared_b.poll()
    assert state_b.status == "promoted" and state_b.stable == "2" and served(b) == {"2": 400}


def test_a_worker_behind_does_not_undo_a_rollback_with_a_ramp_step(tmp_path: Path) -> None:
    """Worker 1 rolls the canary back; worker 2, before it has looked, completes a ramp step.
    The step is not written over the rollback: worker 2 takes the rollback instead."""
    a, _ = worker(tmp_path, 1, RAMP)
    b, _ = worker(tmp_path, 2, RAMP)
    a.act("m", "rollback")
    for _ in range(5):
        b.record("m", "2", True, 0.01)
    state_b = b.state("m")
    assert state_b is not None and state_b.status == "rolled_back" and served(b) == {"1": 400}
    (record,) = orjson.loads((tmp_path / FOLDER / DECISIONS).read_bytes())["trials"].values()
    assert record["status"] == "rolled_back" and record["pid"] == 1


def test_a_worker_behind_still_rolls_back_over_a_ramp_step(tmp_path: Path) -> None:
    """Worker 1 completes a ramp step; worker 2, before it has looked, sees the canary fail: its
    rollback goes further, so it is written, and worker 1 takes it."""
    config = ModelRollout("1", "2", ramp=(0.5, 0.75, 1.0), ramp_min_requests=5, rollback_error_rate=0.1, rollback_window=10)
    a, shared_a = worker(tmp_path, 1, config)
    b, _ = worker(tmp_path, 2, config)
    for _ in range(10):  # a full window, judged: a ramp step
        a.record("m", "2", True, 0.01)
    state_a = a.state("m")
    assert state_a is not None and state_a.step == 1
    fail_canary(b)
    shared_a.poll()
    state_a = a.state("m")
    assert state_a is not None and state_a.status == "rolled_back" and served(a) == {"1": 400}


def test_workers_on_different_trials_neither_apply_nor_overwrite_each_others_decisions(tmp_path: Path) -> None:
    """A worker that has not yet read an edited rollout file runs the old table's trial."""
    old, shared_old = worker(tmp_path, 1, CANARY)
    new, shared_new = worker(tmp_path, 2, ModelRollout("1", "2", 0.2))
    old.act("m", "rollback")
    shared_new.poll()
    state_new = new.state("m")
    assert state_new is not None and state_new.status == "canary" and state_new.share == 0.2
    new.act("m", "set_share", 0.3)
    shared_old.poll()
    state_old = old.state("m")
    assert state_old is not None and state_old.status == "rolled_back"
    trials = orjson.loads((tmp_path / FOLDER / DECISIONS).read_bytes())["trials"]
    assert {r["status"] for r in trials.values()} == {"rolled_back", "canary"}


def test_a_trial_is_named_by_its_table_alone_or_under_the_defaults_by_its_versions() -> None:
    assert trial_key("m", CANARY) == trial_key("m", ModelRollout("1", "2", 0.5, rollback_error_rate=0.1, rollback_window=10))
    assert trial_key("m", CANARY) != trial_key("n", CANARY)
    assert trial_key("m", CANARY) != trial_key("m", ModelRollout("1", "2", 0.3))
    # Under [defaults], a trial is its stable and canary versions (its rules may be edited).
    assert trial_key("m", CANARY, automatic=True) == trial_key("m", ModelRollout("1", "2", 0.3), automatic=True)


def test_a_worker_started_after_other_edits_of_the_file_joins_the_trial_its_table_runs(tmp_path: Path) -> None:
    """Workers read different versions of the file (one started later, after an edit of another
    model's table, or skipped an intermediate version): the same table is the same trial."""
    a, _ = worker(tmp_path, 1)
    a._stamp = (1, 100)
    a.act("m", "rollback")
    late = Rollouts(clock=Clock(), seed=2)
    late._stamp = (7, 180)  # another version of the file
    late.set_models({"m": CANARY, "n": ModelRollout("3")})
    SharedDecisions(tmp_path, late, clock=late._clock, pid=2)  # at its start: no traffic yet
    assert served(late) == {"1": 400}


def test_a_table_edited_away_and_back_is_a_new_trial_in_every_worker(tmp_path: Path) -> None:
    a, shared_a = worker(tmp_path, 1)
    b, shared_b = worker(tmp_path, 2)
    a.act("m", "rollback")
    shared_b.poll()
    assert served(b) == {"1": 400}
    for rollouts in (a, b):  # the table edited...
        rollouts.set_models({"m": ModelRollout("1", "2", 0.2)})
    for rollouts in (a, b):  # ...and back
        rollouts.set_models({"m": CANARY})
    shared_a.poll()
    shared_b.poll()
    assert served(a).keys() == served(b).keys() == {"1", "2"}  # a trial anew: nothing to take over
    late, _ = worker(tmp_path, 3)
    assert served(late).keys() == {"1", "2"}


def test_a_table_edited_and_put_back_before_one_worker_saw_the_edit_leaves_the_workers_agreeing(tmp_path: Path) -> None:
    fixed = ModelRollout("1", "2", 0.3)  # no rules: no later decision would bring them together
    a, shared_a = worker(tmp_path, 1, fixed)
    b, shared_b = worker(tmp_path, 2, fixed)
    a.act("m", "rollback")
    shared_b.poll()
    a.set_models({"m": ModelRollout("1", "2", 0.5)})  # edited, and put back before b looked twice
    a.set_models({"m": fixed})
    shared_a.poll()
    shared_b.poll()
    state_a, state_b = a.state("m"), b.state("m")
    assert state_a is not None and state_b is not None
    assert state_a.position == state_b.position and state_b.status == "canary" and state_b.share == 0.3


DEFAULTS_FILE = parse_rollout_file({"defaults": {"canary_share": 0.5, "rollback_error_rate": 0.1, "rollback_window": 10}})


def auto_worker(folder: Path, pid: int) -> tuple[Rollouts, SharedDecisions]:
    rollouts = Rollouts(clock=Clock(), seed=pid)
    rollouts.set_file(DEFAULTS_FILE)
    return rollouts, SharedDecisions(folder, rollouts, clock=rollouts._clock, pid=pid)


def test_a_worker_started_after_a_dropped_in_canary_was_rolled_back_joins_that_trial(tmp_path: Path) -> None:
    """A replacement worker (a crash, a SIGHUP) first sees the fleet with the rolled-back canary
    as its newest version: it must not make it the stable one."""
    a, _ = auto_worker(tmp_path, 1)
    a.observe("m", "1", lambda v: True)
    a.observe("m", "2", lambda v: True)
    a.act("m", "rollback")
    late, _ = auto_worker(tmp_path, 2)
    late.observe("m", "2", lambda v: True)
    state = late.auto["m"]
    assert (state.stable, state.canary, state.status) == ("1", "2", "rolled_back")
    assert served(late) == {"1": 400}


def test_defaults_removed_and_written_again_start_their_trials_anew(tmp_path: Path) -> None:
    a, _ = auto_worker(tmp_path, 1)
    a.observe("m", "1", lambda v: True)
    a.observe("m", "2", lambda v: True)
    a.act("m", "rollback")
    a.set_file(parse_rollout_file({}))  # [defaults] removed...
    a.set_file(DEFAULTS_FILE)  # ...and written again
    late, _ = auto_worker(tmp_path, 2)
    for rollouts in (a, late):
        rollouts.observe("m", "2", lambda v: True)
        assert rollouts.auto["m"].status == "stable" and served(rollouts) == {"2": 400}


def test_a_worker_joining_a_trial_whose_canary_left_keeps_its_stable_version(tmp_path: Path) -> None:
    a, _ = auto_worker(tmp_path, 1)
    a.observe("m", "1", lambda v: True)
    a.observe("m", "3", lambda v: True)  # a canary of 1...
    late, _ = auto_worker(tmp_path, 2)
    late.observe("m", "2", lambda v: v != "3")  # ...gone by the time this worker looks; 2 is newer than 1
    state = late.auto["m"]
    assert (state.stable, state.canary) == ("1", "")  # as the others will have it: 2 then comes as a canary


def test_a_rolled_back_canary_still_in_the_fleet_is_not_tried_again_after_a_later_trial_ends(tmp_path: Path) -> None:
    a, _ = auto_worker(tmp_path, 1)
    fleet = {"1", "2"}
    a.observe("m", "1", lambda v: v == "1")
    a.observe("m", "2", fleet.__contains__)
    a.act("m", "rollback")  # 2 is bad; its folder stays
    fleet.add("3")
    a.observe("m", "3", fleet.__contains__)  # a fix, a canary of 1: the trial that knew of 2 ends
    a.act("m", "rollback")  # bad too, and removed
    fleet.discard("3")
    for _ in range(2):
        a.observe("m", "2", fleet.__contains__)  # 2 is the fleet's newest again
    assert (a.auto["m"].stable, a.auto["m"].canary) == ("1", "") and served(a) == {"1": 400}
    late, _ = auto_worker(tmp_path, 2)  # a replacement worker learns it from the others
    late.observe("m", "2", fleet.__contains__)
    assert served(late) == {"1": 400}
    fleet.discard("2")
    a.observe("m", "1", fleet.__contains__)  # once it has left the fleet...
    fleet.add("2")
    a.observe("m", "2", fleet.__contains__)  # ...a version 2 copied in again is a canary anew
    assert (a.auto["m"].canary, a.auto["m"].status) == ("2", "canary")


def test_the_records_of_many_models_keep_each_models_latest_trial(tmp_path: Path) -> None:
    a, _ = auto_worker(tmp_path, 1)
    a.observe("bad", "1", lambda v: v == "1")
    a.observe("bad", "2", lambda v: True)
    a.act("bad", "rollback")
    for i in range(TRIALS_KEPT + 10):  # more models than records kept before any eviction
        a.observe(f"m{i}", "1", lambda v: True)
    late, _ = auto_worker(tmp_path, 2)
    late.observe("bad", "2", lambda v: True)
    state = late.auto["bad"]
    assert (state.stable, state.status) == ("1", "rolled_back")
    assert Counter(late.choose("bad") for _ in range(100)) == {"1": 100}


def test_a_rolled_back_canary_removed_then_published_again_under_its_number_is_tried_anew(tmp_path: Path) -> None:
    a, _ = auto_worker(tmp_path, 1)
    b, shared_b = auto_worker(tmp_path, 2)
    for rollouts in (a, b):
        rollouts.observe("m", "1", lambda v: True)
        rollouts.observe("m", "2", lambda v: True)
    a.act("m", "rollback")
    shared_b.poll()
    for rollouts in (a, b):
        rollouts.observe("m", "1", lambda v: v != "2")  # its folder removed
        assert rollouts.auto["m"].status == "stable"
    for rollouts in (a, b):
        rollouts.observe("m", "2", lambda v: True)  # a fix, published as version 2 again
    shared_b.poll()
    assert served(a).keys() == served(b).keys() == {"1", "2"}
    late, _ = auto_worker(tmp_path, 3)
    late.observe("m", "2", lambda v: True)
    assert served(late).keys() == {"1", "2"}


def test_a_worker_that_starts_a_trial_late_takes_over_its_decisions(tmp_path: Path) -> None:
    a, _ = worker(tmp_path, 1)
    a.act("m", "rollback")
    late, shared_late = worker(tmp_path, 2)
    shared_late.poll()
    assert served(late) == {"1": 400}


def test_a_worker_that_reads_the_edited_rollout_file_after_the_others_decided_takes_their_decision(tmp_path: Path) -> None:
    """Worker 2 looks at the decisions while still on the old table, so the file does not change
    again when it starts the new table's trial: the record it read already still applies."""
    edited = ModelRollout("1", "2", 0.2)
    a, _ = worker(tmp_path, 1, edited)
    b, shared_b = worker(tmp_path, 2, CANARY)
    a.act("m", "rollback")
    shared_b.poll()  # on the old trial: nothing to take
    state_b = b.state("m")
    assert state_b is not None and state_b.status == "canary"
    b.set_models({"m": edited})
    shared_b.poll()
    assert served(b) == {"1": 400}


def test_an_unusable_folder_leaves_the_decisions_to_each_worker(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    rollouts = Rollouts(clock=Clock())
    rollouts.set_models({"m": CANARY})
    assert shared_decisions(blocker, rollouts) is None
    rollouts.act("m", "rollback")  # still works, in this worker
    assert served(rollouts) == {"1": 400}


def test_a_spoilt_decisions_file_is_logged_and_replaced_by_the_next_decision(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    a, shared_a = worker(tmp_path, 1)
    b, shared_b = worker(tmp_path, 2)
    (tmp_path / FOLDER / DECISIONS).write_bytes(b"{not json")
    shared_b.poll()  # logged, nothing taken over
    assert "do not parse" in caplog.text and served(b).keys() == {"1", "2"}
    a.act("m", "rollback")
    shared_b.poll()
    assert served(b) == {"1": 400}
