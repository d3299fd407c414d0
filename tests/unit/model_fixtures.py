"""Model metadata the unit tests share (imported by module name, as pytest puts this folder on
``sys.path``)."""

from __future__ import annotations

from gateway.models import ModelInfo

# Model "m": input x and output y, both FP32 [-1, 2]; batches of up to 8 rows.
INFO = ModelInfo.from_triton(
    {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
     "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]},
    {"max_batch_size": 8}, b"{}", b"{}",
)  # fmt: skip
