"""Triton Python-backend model for a version published by `python -m training publish`.

Self-contained on purpose: Triton runs this file on its own, so it does not import the project's
training code. It serves either default model (digits_cnn, breast_cancer_mlp): the checkpoint
`model.pt` beside it names the architecture and holds its constructor arguments and weights
(plain tensors, loaded with weights_only=True), optionally int8-quantized:

- no "quantization" key: float weights, as `training.models` defines the architectures;
- "dynamic_int8": Linear layers dynamically quantized to int8 (torch.ao.quantization);
- "weight_only_int8": `<name>.weight_int8` + `<name>.weight_scale` (one per output channel),
  turned back into float weights here.

The architectures repeat `training.models` with the same parameter names (the training module's
unit tests check both give the same outputs). Input and output names come from config.pbtxt.
Tensors move through DLPack in both directions, as in the default models' model.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils
from torch import nn

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


class BreastCancerMLP(nn.Module):
    def __init__(self, num_features: int = 30, hidden: int = 32, num_classes: int = 2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


ARCHITECTURES = {"digits_cnn": DigitsCNN, "breast_cancer_mlp": BreastCancerMLP}


def dequantize_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("_scale") and key[: -len("_scale")] + "_int8" in state:
            continue
        if key.endswith("_int8"):
            name = key[: -len("_int8")]
            scale = state[name + "_scale"]
            out[name] = value.float() * scale.view((-1,) + (1,) * (value.dim() - 1))
        else:
            out[key] = value
    return out


def load_model(path: Path, default_arch: str) -> nn.Module:
    """The model a published model.pt describes, in eval mode on the CPU."""
    with warnings.catch_warnings():
        # torch.ao.quantization and qint8 tensors warn that they are deprecated; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        model: nn.Module = ARCHITECTURES[payload.get("arch", default_arch)](**payload["config"])
        state = payload["state_dict"]
        scheme = payload.get("quantization")
        if scheme == "weight_only_int8":
            state = dequantize_weights(state)
        elif scheme == "dynamic_int8":
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)
        elif scheme is not None:
            raise ValueError(f"{path}: unknown quantization {scheme!r}")
        model.load_state_dict(state)
    return model.eval()


def _outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits": logits, "probabilities": torch.softmax(logits, dim=1)}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_num_threads", "1")))
        self.name = config.get("name") or args.get("model_name", "")
        self.input_name = config["input"][0]["name"]
        self.model = load_model(Path(args["model_repository"]) / args["model_version"] / "model.pt", self.name)
        # int8 kernels are CPU kernels: a quantized model stays on the CPU.
        quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in self.model.modules())
        self.device = torch.device("cuda" if torch.cuda.is_available() and not quantized else "cpu")
        self.model.to(self.device)
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        # One forward pass for everything Triton's dynamic batcher handed us.
        try:
            inputs = [
                torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name).to_dlpack())
                for r in requests
            ]
            sizes = [int(t.shape[0]) for t in inputs]
            with torch.inference_mode():
                batch = torch.cat(inputs).to(self.device, torch.float32)
                outputs = {k: v.cpu() for k, v in _outputs(self.model(batch)).items()}
        except Exception as exc:  # report to every client rather than crash the stub
            error = pb_utils.TritonError(f"{self.name}: {exc}")
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
