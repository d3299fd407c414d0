"""Data-parallel training on CPU: two DDP workers take the same steps as one process on the same
global batch, parameter averaging converges, and bad settings are refused clearly."""

from __future__ import annotations

import pytest
import torch

from training.distributed import TrainConfig, train
from training.specs import UsageError

STEPS = 12  # a few steps: enough for rounding differences to show if the two disagreed


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ddp_workers_match_one_process_on_the_same_global_batch() -> None:
    common = dict(max_steps=STEPS, batch_size=64, seed=3, keep_best=False, progress=False, timeout_s=120)
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
        TrainConfig("digits_cnn", workers=2, mode="average", average_every=4, epochs=4, seed=0, progress=False, timeout_s=120)
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
    ],
)
def test_bad_settings_are_refused_before_anything_starts(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig("digits_cnn", **kwargs).resolved()


def test_unknown_model_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown model 'resnet'.*known models: breast_cancer_mlp, digits_cnn"):
        TrainConfig("resnet").resolved()


def test_single_worker_training_reaches_the_recipe_accuracy_quickly() -> None:
    result = train(TrainConfig("breast_cancer_mlp", epochs=20, progress=False))
    assert result is not None
    assert result.metrics["test_accuracy"] >= 0.93
    payload = result.payload()
    assert payload["arch"] == "breast_cancer_mlp" and payload["training"]["workers"] == 1
