"""Train the two default models and write their weights into the model repository.

    python -m training.default_models [--repository model_repository] [--force]

Each model trains in seconds on a CPU with fixed seeds. Weights go to
`<repository>/<model>/1/model.pt`; a model whose weights already exist is skipped unless
--force is given, so set-up scripts can call this on every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import Splits, breast_cancer_splits, digits_splits
from training.models import BreastCancerMLP, DigitsCNN, checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Recipe:
    name: str
    splits: Callable[[int], Splits]
    build: Callable[[Splits], tuple[nn.Module, dict[str, Any]]]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    target_accuracy: float


def _build_digits(_: Splits) -> tuple[nn.Module, dict[str, Any]]:
    config = {"channels": [16, 32], "hidden": 64, "num_classes": 10}
    return DigitsCNN(**config), config


def _build_breast_cancer(splits: Splits) -> tuple[nn.Module, dict[str, Any]]:
    config = {"num_features": splits.x_train.shape[1], "hidden": 32, "num_classes": 2}
    model = BreastCancerMLP(**config)
    # Standardization statistics from the training split only (no test leakage).
    model.mean.copy_(torch.from_numpy(splits.x_train.mean(axis=0)))
    model.std.copy_(torch.from_numpy(splits.x_train.std(axis=0) + 1e-6))
    return model, config


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("digits_cnn", digits_splits, _build_digits, 40, 64, 3e-3, 1e-4, 0.95),
        Recipe("breast_cancer_mlp", breast_cancer_splits, _build_breast_cancer, 60, 32, 3e-3, 1e-3, 0.93),
    )
}


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.inference_mode():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def train(recipe: Recipe, seed: int = 0) -> tuple[nn.Module, dict[str, Any], dict[str, float]]:
    """Train with Adam; keep the weights of the epoch with the best validation accuracy."""
    torch.manual_seed(seed)
    splits = recipe.splits(seed)
    model, config = recipe.build(splits)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    x_train, y_train = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
    generator = torch.Generator().manual_seed(seed)

    best_val, best_state = -1.0, None
    for _ in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        val = accuracy(model, splits.x_val, splits.y_val)
        if val > best_val:
            best_val = val
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    metrics = {
        "val_accuracy": best_val,
        "test_accuracy": accuracy(model, splits.x_test, splits.y_test),
    }
    return model.eval(), config, metrics


def write_weights(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a Triton polling the repository must never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file():
            tmp.unlink()  # leave no half-written file behind
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--force", action="store_true", help="retrain even if weights exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", choices=sorted(RECIPES), default=sorted(RECIPES))
    args = parser.parse_args(argv)

    # A few threads are plenty for these tiny models; more only adds contention.
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    failed = False
    for name in args.models:
        recipe = RECIPES[name]
        target = args.repository / name / "1" / "model.pt"
        if target.exists() and not args.force:
            print(f"{name}: {target} exists, skipping (use --force to retrain)")
            continue
        started = time.perf_counter()
        model, config, metrics = train(recipe, args.seed)
        elapsed = time.perf_counter() - started
        write_weights(target, checkpoint(name, model, config, metrics=metrics, seed=args.seed))
        ok = metrics["test_accuracy"] >= recipe.target_accuracy
        failed |= not ok
        print(
            f"{name}: test accuracy {metrics['test_accuracy']:.4f} "
            f"(target {recipe.target_accuracy}, {'ok' if ok else 'BELOW TARGET'}), "
            f"val {metrics['val_accuracy']:.4f}, trained in {elapsed:.1f}s -> {target}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
