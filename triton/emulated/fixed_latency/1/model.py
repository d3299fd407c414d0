"""Triton Python-backend model: fixed_latency (see ../config.pbtxt and ../../README.md).

One execution per batch Triton hands over, taking ``delay_ms`` whatever the batch size, as a
device would; then ``y = 2 * x`` for every request. numpy stays out of it (DLPack and torch),
because the Python backend in the bundled server mishandles numpy 2 arrays.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.delay = float(params.get("delay_ms", "10")) / 1000.0
        torch.set_num_threads(1)

    def execute(self, requests: list[Any]) -> list[Any]:
        time.sleep(self.delay)
        responses = []
        for request in requests:
            x = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, "x").to_dlpack())
            y = (x * 2).contiguous()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("y", torch.utils.dlpack.to_dlpack(y))]))
        return responses
