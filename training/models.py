"""Model definitions for the default models.

The served copies live in `model_repository/<model>/<version>/model.py`, which must not import
this package (Triton's Python backend runs them on their own); they repeat these classes with
identical parameter names, and the integration tests check that both give the same outputs.
Checkpoints store the constructor arguments next to the weights, so a smaller (distilled or
pruned) variant of the same architecture loads without code changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DIGITS_PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digit images; takes raw pixels [N, 1, 8, 8], returns logits [N, 10]."""

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x * (1.0 / DIGITS_PIXEL_MAX)))


class BreastCancerMLP(nn.Module):
    """MLP on the 30 raw breast-cancer features; standardization is part of the model."""

    def __init__(self, num_features: int = 30, hidden: int = 32, num_classes: int = 2):
        super().__init__()
        # Buffers, not parameters: set from the training split, saved in the state dict, so
        # clients send raw feature values.
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "breast_cancer_mlp": BreastCancerMLP,
}


def checkpoint(arch: str, model: nn.Module, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The model.pt payload: plain tensors and primitives only, so it loads with weights_only."""
    return {"arch": arch, "config": config, "state_dict": model.state_dict(), **extra}


def load_checkpoint(path: str | Any, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a model.pt written by `checkpoint`, in eval mode."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = ARCHITECTURES[payload["arch"]](**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
