"""The rollout file: parsing and validation, the traffic split, sticky clients, hot reload that
keeps the rollout in force when the new file is bad (no network, a seeded random generator)."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from gateway.rollout import ModelRollout, RolloutError, Rollouts, parse_rollouts


def test_a_rollout_table_parses() -> None:
    models = parse_rollouts(
        {"models": {"digits_cnn": {"stable": "1", "canary": 2, "canary_share": 0.1, "sticky_header": "X-User"}}}
    )
    assert models == {"digits_cnn": ModelRollout("1", "2", 0.1, b"x-user")}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {}}, "unknown section(s): model"),
        ({"models": {"m": {"canary": "2"}}}, "[models.m] needs a stable version"),
        ({"models": {"m": {"stable": "one"}}}, "models.m.stable must be a version number"),
        ({"models": {"m": {"stable": "1", "canary": "2", "canary_share": 1.5}}}, "canary_share must be a number in 0..1"),
        ({"models": {"m": {"stable": "1", "canary_share": 0.2}}}, "there is no canary version"),
        ({"models": {"m": {"stable": "1", "canary": "1"}}}, "the canary is the stable version"),
        ({"models": {"m": {"stable": "1", "canry": "2"}}}, "unknown key(s) in [models.m]: canry"),
        ({"models": {"m": {"stable": "1", "sticky_header": "a b"}}}, "sticky_header must be a header name"),
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
    assert rollouts.reload_if_changed() and rollouts.choose("m") == "2" and rollouts.pin_headers == {b"x-user"}
    path.write_text("[models.m\nstable = ")
    os.utime(path, ns=(1, 2 * 10**18))
    assert not rollouts.reload_if_changed()
    assert rollouts.choose("m") == "2" and "invalid TOML" in rollouts.error
    assert rollouts.snapshot()["error"] == rollouts.error


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rollout.toml"
    path.write_text('[models.m]\nstable = "x"\n')
    with pytest.raises(RolloutError, match="version number"):
        Rollouts.from_file(path)
