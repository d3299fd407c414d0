"""Model parallelism: the MLP split across two processes gives the unsplit model's outputs,
losses and trained parameters."""

from __future__ import annotations

import torch

from training.data import breast_cancer_splits
from training.models import BreastCancerMLP
from training.pipeline import compare, reference, run_split, split
from training.specs import build


def _model() -> tuple[BreastCancerMLP, dict]:
    torch.manual_seed(0)
    model, config = build("breast_cancer_mlp", breast_cancer_splits(0))
    return model.eval(), config  # type: ignore[return-value]


def test_the_two_stages_compose_to_the_whole_model() -> None:
    model, _ = _model()
    s0, s1 = split(model)
    x = torch.from_numpy(breast_cancer_splits(0).x_test)
    with torch.inference_mode():
        assert torch.equal(s1(s0(x)), model(x))
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in s0.parameters()) + sum(p.numel() for p in s1.parameters()) == n


def test_the_split_model_on_two_ranks_equals_the_unsplit_one() -> None:
    model, config = _model()
    s = breast_cancer_splits(0)
    kw = dict(train_steps=4, train_batch=32, lr=0.05)
    # 114 test rows in micro-batches of 16: the last one is short, on purpose.
    run = run_split(model, config, s.x_test, s.x_train, s.y_train, micro_batch=16, **kw)
    ref = reference(model, s.x_test, s.x_train, s.y_train, **kw)
    diffs = compare(run, ref)
    assert run["logits"].shape == (len(s.x_test), 2)
    assert diffs["logits_max_abs_diff"] <= 1e-6
    assert diffs["same_predictions"] == 1.0
    assert diffs["loss_max_abs_diff"] <= 1e-6
    assert diffs["params_max_abs_diff_after_training"] <= 1e-6
    # The training steps did change the weights (so the comparison above means something).
    s0, s1 = split(model)
    moved = max(float((run["stage0"][k] - s0.state_dict()[k]).abs().max()) for k in run["stage0"])
    assert moved > 1e-3
