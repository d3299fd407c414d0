"""Triton Python-backend model: digits_cnn (see ../config.pbtxt for inputs and outputs).

Self-contained on purpose: Triton runs this file on its own, so it must not import the
project's training code. The architecture repeats `training.models.DigitsCNN` with the same
parameter names; the checkpoint `model.pt` beside this file holds the constructor arguments and
the weights (plain tensors, loaded with weights_only=True).

Tensors move through DLPack in both directions rather than `as_numpy()`: the Python backend in
the bundled server silently mishandles numpy 2 arrays, and DLPack avoids a copy anyway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils
from torch import nn

INPUT_NAME = "image"
DIGITS_PIXEL_MAX = 16.0


class DigitsCNN(nn.Module):
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


def _outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits": logits, "probabilities": torch.softmax(logits, dim=1)}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_num_threads", "1")))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = Path(args["model_repository"]) / args["model_version"] / "model.pt"
        payload: dict[str, Any] = torch.load(weights, map_location="cpu", weights_only=True)
        self.model = DigitsCNN(**payload["config"])
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval().to(self.device)
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        # One forward pass for everything Triton's dynamic batcher handed us: concatenate the
        # rows of all requests, run once, split the results back per request.
        try:
            inputs = [
                torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, INPUT_NAME).to_dlpack())
                for r in requests
            ]
            sizes = [int(t.shape[0]) for t in inputs]
            with torch.inference_mode():
                batch = torch.cat(inputs).to(self.device, torch.float32)
                outputs = {k: v.cpu() for k, v in _outputs(self.model(batch)).items()}
        except Exception as exc:  # report to every client rather than crash the stub
            error = pb_utils.TritonError(f"digits_cnn: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        split = {name: outputs[name].split(sizes) for name in self.output_names}
        responses = []
        for i, request in enumerate(requests):
            wanted = request.requested_output_names() or self.output_names
            tensors = [
                pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(split[name][i].contiguous()))
                for name in self.output_names
                if name in wanted
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.model = None
