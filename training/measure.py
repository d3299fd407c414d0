"""The numbers every compression step and every published version reports.

- accuracy on the fixed test split (and validation split),
- parameter count and non-zero parameters (int8 weights counted as the parameters they stand for),
- file size of the saved artifact, and its size once zlib-compressed (pruning's zeros do not
  shrink a dense file, they compress away),
- CPU latency of one forward pass (median, one thread as Triton runs it), one row and 64 rows.
"""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.data import Splits

LATENCY_BATCHES = (1, 64)  # 64 = max_batch_size in config.pbtxt


@dataclass(frozen=True)
class Metrics:
    test_accuracy: float
    val_accuracy: float
    params: int
    nonzero_params: int
    file_bytes: int
    zipped_bytes: int
    latency_ms_b1: float
    latency_ms_b64: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def accuracy(model: nn.Module | object, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    """Top-1 accuracy of `model` (anything callable on a float tensor giving logits), fed in
    batches no larger than the served max_batch_size."""
    preds = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch], np.float32))
            preds.append(model(xb).argmax(dim=1).numpy())  # type: ignore[operator]
    return float((np.concatenate(preds) == y).mean())


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); a dynamically quantized Linear counts its int8 weight
    and float bias as the parameters they replace."""
    total = nonzero = 0
    for m in model.modules():
        tensors: list[torch.Tensor] = list(m.parameters(recurse=False))
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w = m.weight()  # type: ignore[operator]
            tensors = [w.dequantize() if w.is_quantized else w]
            b = m.bias()  # type: ignore[operator]
            if b is not None:
                tensors.append(b)
        for t in tensors:
            total += t.numel()
            nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero


def sparsity(model: nn.Module) -> float:
    """Share of zeros among the weights of Conv2d and Linear layers (what pruning targets)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


def latency_ms(model: nn.Module | object, example: np.ndarray, batch: int, runs: int = 100) -> float:
    """Median milliseconds of one forward pass on one CPU thread, after warm-up."""
    x = torch.from_numpy(np.ascontiguousarray(np.resize(example, (batch,) + example.shape[1:]), np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.inference_mode():
            for _ in range(max(3, runs // 10)):
                model(x)  # type: ignore[operator]
            for _ in range(runs):
                t = time.perf_counter()
                model(x)  # type: ignore[operator]
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1000


def file_sizes(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return len(data), len(zlib.compress(data, 9))


def measure(model: nn.Module | object, splits: Splits, artifact: Path, *, module: nn.Module | None = None, runs: int = 100) -> Metrics:
    """All the numbers for `model`, whose saved form is `artifact`."""
    params, nonzero = param_counts(module if module is not None else model)  # type: ignore[arg-type]
    size, zipped = file_sizes(artifact)
    return Metrics(
        test_accuracy=accuracy(model, splits.x_test, splits.y_test),
        val_accuracy=accuracy(model, splits.x_val, splits.y_val),
        params=params,
        nonzero_params=nonzero,
        file_bytes=size,
        zipped_bytes=zipped,
        latency_ms_b1=latency_ms(model, splits.x_test, 1, runs),
        latency_ms_b64=latency_ms(model, splits.x_test, 64, max(10, runs // 2)),
    )
