"""Data-parallel training on CPU: two DDP workers take the same steps as one process on the same
global batch, parameter averaging converges, and bad settings are refused clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training import distributed
from training.distributed import TrainConfig, train
from training.specs import UsageError

STEPS = 12  # a few steps: enough for rounding differences to show if the two disagreed


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ddp_workers_match_one_process_on_the_same_global_batch() -> None:
    common = dict(max_steps=STEPS, batch_size=64, seed=3, keep_best=False, progress=False, timeout_s=120, device="cpu")
    one = train(TrainConfig("digits_cnn", workers=1, **common))
    two = train(TrainConfig("digits_cnn", workers=2, mode="ddp", **common))
    assert one is not None and two is not None
    assert len(two.rank_states) == 2
    # The replicas stay identical (DDP's all-reduce) ...
    assert _max_diff(two.rank_states[0], two.rank_states[1]) == 0.0
    assert two.metrics["steps"] == one.metrics["steps"] == STEPS
    assert two.metrics["samples"] == STEPS * 64
    # Training moved the weights away from their shared initial values.
    untrained = train(TrainConfig("digits_cnn", workers=1, **{**common, "max_steps": 1}))
    assert untrained is not None
    moved = _max_diff(untrained.rank_states[0], one.rank_states[0])
    assert moved > 1e-2
    # ... and equal the single process: each worker computes 32 rows of the same 64-row batch.
    # Summing 2 x 32 rows rounds differently from 64 at once, by an amount that depends on the
    # CPU's kernels, and Adam scales tiny gradients up: after 12 steps the two differ by 0.6%
    # of how far the weights moved on one CPU seen here (an AVX-512 Xeon), by less on others.
    # Training on 32-row batches instead, a wrong split, differs by about 180%.
    assert _max_diff(one.rank_states[0], two.rank_states[0]) < 0.02 * moved


def test_parameter_averaging_converges_and_leaves_identical_replicas() -> None:
    result = train(
        TrainConfig(
            "digits_cnn", workers=2, mode="average", average_every=4, epochs=4, seed=0, progress=False, timeout_s=120, device="cpu"
        )
    )
    assert result is not None
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] / 3, losses
    assert result.metrics["test_accuracy"] > 0.85, result.metrics
    # Averaged at the end of every epoch: both workers hold the same model.
    a, b = result.rank_states
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "--workers must be at least 1"),
        ({"workers": 3}, "must be a multiple of --workers 3"),
        ({"mode": "gossip"}, "--mode must be one of"),
        ({"average_every": 0}, "--average-every must be at least 1"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"seed": -1}, r"--seed: a seed is an integer from 0 to 4294967295 \(2\*\*32 - 1\), got -1$"),
        ({"seed": 2**32}, r"--seed: a seed is an integer from 0 to 4294967295 \(2\*\*32 - 1\), got 4294967296$"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig("digits_cnn", **kwargs).resolved()


@pytest.mark.parametrize(
    ("gpus", "workers", "torchrun_local", "device"),
    [
        (0, 1, None, "cpu"),
        (1, 1, None, "cuda"),
        (1, 2, None, "cpu"),  # one GPU for two workers: gloo on the CPU, not a refusal
        (2, 2, None, "cuda"),
        (1, 2, 1, "cuda"),  # torchrun, two machines with a GPU and a worker each
    ],
)
def test_auto_trains_on_cuda_only_with_a_gpu_for_each_worker(
    monkeypatch: pytest.MonkeyPatch, gpus: int, workers: int, torchrun_local: int | None, device: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if torchrun_local is not None:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torchrun_local))
    resolved = TrainConfig("digits_cnn", workers=workers).resolved()
    assert resolved.device == device
    assert resolved.use_cuda() == (device == "cuda")


def test_cuda_asked_for_with_fewer_gpus_than_workers_is_refused_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="2 workers on CUDA need 2 GPUs.*this machine has 1"):
        train(TrainConfig("digits_cnn", workers=2, device="cuda", progress=False))


def test_unknown_model_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown model 'resnet'.*known models: breast_cancer_mlp, digits_cnn"):
        TrainConfig("resnet").resolved()


def test_single_worker_training_reaches_the_recipe_accuracy_quickly() -> None:
    result = train(TrainConfig("breast_cancer_mlp", epochs=20, progress=False))
    assert result is not None
    assert result.metrics["test_accuracy"] >= 0.93
    payload = result.payload()
    assert payload["arch"] == "breast_cancer_mlp" and payload["training"]["workers"] == 1


@pytest.mark.parametrize(("lr", "weight_decay"), [(float("nan"), None), (float("inf"), None), (None, float("nan")), (None, float("inf"))])
def test_a_learning_rate_or_weight_decay_that_is_not_finite_is_refused(lr: float | None, weight_decay: float | None) -> None:
    with pytest.raises(UsageError, match="--lr must be a positive finite number and --weight-decay a finite one"):
        TrainConfig("breast_cancer_mlp", lr=lr, weight_decay=weight_decay).resolved()


def test_a_batch_larger_than_the_training_rows_is_refused_before_workers_are_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    def spawn(*_: object) -> None:
        raise AssertionError("workers were spawned")

    monkeypatch.setattr(distributed, "spawn", spawn)
    for workers in (1, 2):
        with pytest.raises(UsageError, match="--batch-size 1000 is larger than the 398 training rows"):
            train(TrainConfig("breast_cancer_mlp", workers=workers, batch_size=1000, progress=False, device="cpu"))


TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
GOOD_ENV = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TORCHELASTIC_RUN_ID": "x"}, r"started as a torchrun worker \(TORCHELASTIC_RUN_ID is set\), but WORLD_SIZE is not set"),
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}, "but RANK is not set"),
        ({**GOOD_ENV, "RANK": "abc"}, r"torchrun environment: RANK='abc' is not an integer"),
        ({**GOOD_ENV, "WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be at least 1"),
        ({**GOOD_ENV, "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
        ({**GOOD_ENV, "RANK": "-1"}, r"RANK='-1' must be at least 0"),
        ({**GOOD_ENV, "RANK": "5", "WORLD_SIZE": "2"}, r"RANK='5' must be below WORLD_SIZE='2'"),
        ({k: v for k, v in GOOD_ENV.items() if k != "MASTER_PORT"}, "but MASTER_PORT is not set"),
        ({**GOOD_ENV, "MASTER_PORT": "99999"}, r"MASTER_PORT='99999' must be from 1 to 65535"),
        ({**GOOD_ENV, "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": ""}, "but MASTER_ADDR is empty"),
        ({**GOOD_ENV, "LOCAL_WORLD_SIZE": "abc"}, r"LOCAL_WORLD_SIZE='abc' is not an integer"),
        ({**GOOD_ENV, "LOCAL_RANK": "x"}, r"LOCAL_RANK='x' is not an integer"),
        ({**GOOD_ENV, "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "1"}, r"LOCAL_RANK='1' must be from 0 to 0"),
    ],
)
def test_a_bad_torchrun_environment_is_refused_before_the_rendezvous(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def rendezvous(*_: object, **__: object) -> None:
        raise AssertionError("the rendezvous started (a bad rank would wait there for ever)")

    monkeypatch.setattr(distributed.dist, "init_process_group", rendezvous)
    with pytest.raises(UsageError, match=message):
        train(TrainConfig("breast_cancer_mlp", max_steps=1, progress=False, device="cpu"))


def test_a_good_torchrun_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**GOOD_ENV, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_by_torchrun() and distributed.torchrun_env() == (2, 4, 0)


def test_bench_workers_refuses_a_batch_two_workers_cannot_split_before_running_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training import bench
    from training.cli import main

    def ran(*_: object, **__: object) -> None:
        raise AssertionError("a benchmark ran before the batch size was refused")

    monkeypatch.setattr(bench, "train", ran)
    out = tmp_path / "bench.md"
    argv = ["bench-workers", "--model", "breast_cancer_mlp", "--batch-size", "33", "--epochs", "1", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 2
    assert re.search(r"error: 2 workers \(ddp\), 1 thread each: --batch-size 33 must be a multiple of --workers 2", capsys.readouterr().err)
    assert not out.exists()
    assert main([*argv[:-1], str(tmp_path)]) == 2  # an --out that is a folder, refused before running too
    assert re.search(r"--out .* is a folder", capsys.readouterr().err)
