"""The default served models and their ground truth: a direct torch forward pass of the same
weights, on the held-out test split of the real dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import Splits, breast_cancer_splits, digits_splits
from training.models import load_checkpoint

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MAX_BATCH = 64  # max_batch_size in both config.pbtxt files
ATOL = 1e-4


@dataclass(frozen=True)
class ServedModel:
    name: str
    input_name: str
    splits: Callable[[], Splits]
    target_accuracy: float


MODELS = [
    ServedModel("digits_cnn", "image", digits_splits, 0.95),
    ServedModel("breast_cancer_mlp", "features", breast_cancer_splits, 0.93),
]
DIGITS, BREAST_CANCER = MODELS


def torch_reference(model: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of a direct forward pass of the served weights."""
    net = load_checkpoint(MODEL_REPOSITORY / model / "1" / "model.pt")
    with torch.inference_mode():
        logits = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return logits.numpy(), torch.softmax(logits, dim=1).numpy()
