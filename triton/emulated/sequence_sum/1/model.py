"""Triton Python-backend model: sequence_sum (see ../config.pbtxt and ../../README.md).

Keeps a running total per sequence (by its correlation id, the CORRID control input): START
resets it, every request adds its x and answers the total, END forgets it. A request of a sequence whose start
this instance never saw is answered with an error, as a stateful model would fail it.
numpy stays out of it (DLPack and torch), as in the other models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils


def _tensor(request: Any, name: str) -> torch.Tensor:
    return torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        torch.set_num_threads(1)
        self.totals: dict[int, float] = {}

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            x = _tensor(request, "x").reshape(-1)
            start = bool(_tensor(request, "START").reshape(-1)[0] != 0)
            corrid = int(_tensor(request, "CORRID").reshape(-1)[0])
            if start:
                self.totals[corrid] = 0.0
            elif corrid not in self.totals:
                error = pb_utils.TritonError(f"sequence {corrid}: this instance never saw its start")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            self.totals[corrid] += float(x[0])
            total = torch.tensor([[self.totals[corrid]]], dtype=torch.float32)
            if bool(_tensor(request, "END").reshape(-1)[0] != 0):
                del self.totals[corrid]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("total", torch.utils.dlpack.to_dlpack(total))]))
        return responses
