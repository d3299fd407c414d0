"""What the training module knows of each served model: its dataset, its architecture, the
name of the tensor Triton feeds it, and the recipe that trains it.

Hyperparameters come from `default_models.RECIPES` (the recipe that trained the served weights),
so `python -m training train` with no options reproduces the served model's training, now on any
number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.data import Splits
from training.default_models import RECIPES, Recipe
from training.models import ARCHITECTURES


class UsageError(ValueError):
    """A bad argument from the user: printed as one clear line, exit status 2."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_name: str  # the input tensor in config.pbtxt
    input_shape: tuple[int, ...]  # one row, without the batch dimension
    default_config: Mapping[str, Any]  # constructor arguments of the served architecture
    recipe: Recipe

    @property
    def arch(self) -> type[nn.Module]:
        return ARCHITECTURES[self.name]

    @property
    def splits(self) -> Callable[[int], Splits]:
        return self.recipe.splits


MODELS: dict[str, ModelSpec] = {
    "digits_cnn": ModelSpec(
        "digits_cnn", "image", (1, 8, 8), {"channels": [16, 32], "hidden": 64, "num_classes": 10}, RECIPES["digits_cnn"]
    ),
    "breast_cancer_mlp": ModelSpec(
        "breast_cancer_mlp",
        "features",
        (30,),
        {"num_features": 30, "hidden": 32, "num_classes": 2},
        RECIPES["breast_cancer_mlp"],
    ),
}


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def build(name: str, splits: Splits, config: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A freshly initialised model (from the current torch seed) and its constructor arguments.

    The MLP's standardization buffers are set from the training split only, as the served
    model's were."""
    s = spec(name)
    cfg = dict(s.default_config if config is None else config)
    model = s.arch(**cfg)
    if name == "breast_cancer_mlp":
        model.mean.copy_(torch.from_numpy(splits.x_train.mean(axis=0)))
        model.std.copy_(torch.from_numpy(splits.x_train.std(axis=0) + 1e-6))
    return model, cfg


def parse_ints(text: str, what: str, count: int | None = None) -> list[int]:
    """'8,16' -> [8, 16], every value >= 1; a clear UsageError otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or (count is not None and len(values) != count):
        n = f"{count} " if count else ""
        raise UsageError(f"{what} must be {n}positive integers separated by commas, got {text!r}")
    return values


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take 0 .. 2**32 - 1


def seed_refusal(seed: object) -> str | None:
    """Why numpy and scikit-learn would not take `seed`, None when they would. The one wording of
    every seed refusal, whether the seed comes from the command line (text that is not an integer
    included), a TrainConfig or a checkpoint, so that the same mistake reads the same everywhere."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
        return None
    return f"a seed is an integer from 0 to {SEED_MAX} (2**32 - 1), got {seed!r}"


def check_seed(seed: int, what: str = "--seed") -> int:
    """A seed numpy and scikit-learn accept; a UsageError naming `what` otherwise."""
    refusal = seed_refusal(seed)
    if refusal is not None:
        raise UsageError(f"{what}: {refusal}")
    return seed


def check_output_file(path: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written as a file: a folder, a
    path under something that is not a folder, or a folder this process may not write in."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give the path of a file to write")
    if path.name in ("", ".", ".."):
        raise UsageError(f"{what} {path} does not name a file")
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise UsageError(f"{what} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: no permission to write in {parent}")
    if path.exists() and not path.is_file():
        raise UsageError(f"{what} {path} exists and is not a regular file")
