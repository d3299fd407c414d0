"""int8 quantization, and loading any artifact this module writes back into a model.

Two schemes, both stored as a plain state dict (loads with torch.load(weights_only=True)):

- `dynamic` (payload "quantization": "dynamic_int8"): every nn.Linear becomes a dynamically
  quantized int8 Linear (torch.ao.quantization.quantize_dynamic, per-output-channel weight
  scales): weights stored in int8, activations quantized on the fly, int8 matrix products
  (fbgemm/x86 kernels). Convolutions stay float.
- `weight-only` ("weight_only_int8"): the weight of every Conv2d and Linear is stored as int8
  with one float scale per output channel (symmetric, round to nearest) and turned back into
  float when loaded; compute stays float. A quarter of the weight bytes, the CNN's convolutions
  included, and no run-time cost.

torch.ao.quantization is deprecated in favour of the separate torchao package, which this
project does not depend on; it still ships with the pinned torch, and its deprecation warnings
are silenced where it is called. The served model.py (training/templates/model.py) repeats the
loading code below, since Triton runs it without this package.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models import ARCHITECTURES

SCHEMES = {"dynamic": "dynamic_int8", "weight-only": "weight_only_int8"}
INT8_MAX = 127


@contextmanager
def quiet_quantization() -> Iterator[None]:
    """Silence the deprecation warnings of torch.ao.quantization and of loading qint8 tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        yield


def dynamic_structure(model: nn.Module) -> nn.Module:
    """The model with every Linear replaced by a dynamically quantized int8 Linear."""
    with quiet_quantization():
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


def quantize_weights(state_dict: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Weight-only int8: each named weight -> `<name>_int8` (int8) + `<name>_scale` (float32, one
    per output channel); everything else unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in names:
            out[key] = value
            continue
        w = value.detach().float()
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        shape = (-1,) + (1,) * (w.dim() - 1)
        out[key + "_int8"] = torch.clamp(torch.round(w / scale.view(shape)), -INT8_MAX, INT8_MAX).to(torch.int8)
        out[key + "_scale"] = scale.to(torch.float32)
    return out


def dequantize_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("_scale") and key[: -len("_scale")] + "_int8" in state_dict:
            continue
        if key.endswith("_int8"):
            name = key[: -len("_int8")]
            scale = state_dict[name + "_scale"]
            out[name] = value.float() * scale.view((-1,) + (1,) * (value.dim() - 1))
        else:
            out[key] = value
    return out


def quantizable_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantize(model: nn.Module, scheme: str) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """(the quantized model to evaluate, the state dict to store, the payload's scheme name)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    model = model.eval()
    if scheme == "dynamic":
        q = dynamic_structure(_copy(model))
        return q, q.state_dict(), SCHEMES[scheme]
    stored = quantize_weights(model.state_dict(), quantizable_weights(model))
    restored = _copy(model)
    restored.load_state_dict(dequantize_weights(stored))
    return restored.eval(), stored, SCHEMES[scheme]


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


class NotACheckpoint(ValueError):
    """A file torch loads that does not hold a checkpoint of this module."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path} is not a model checkpoint ({reason})")
        self.reason = reason


def load_payload(path: str | Path) -> dict[str, Any]:
    with quiet_quantization():
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise NotACheckpoint(path, "expected a dict with 'config' and 'state_dict'")
    if not isinstance(payload["config"], dict) or not isinstance(payload["state_dict"], dict):
        raise NotACheckpoint(path, "its 'config' and 'state_dict' must both be dicts")
    return payload


def load_error(exc: BaseException) -> str:
    """Why torch.load (or the checks after it) could not read a file, in a few words on one line:
    not torch's paragraph about ``weights_only``, which is the wrong advice for a corrupt file."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # weights_only refused the pickle: garbage bytes, or objects that are not plain data
        after = text.split(marker, 1)[1].strip()
        detail = after.splitlines()[0].strip() if after else ""
        if detail.startswith("Unsupported global"):
            return "it holds objects other than tensors and plain values: " + _clip(detail.split(" was not an allowed", 1)[0])
        return "not a torch file: " + _clip(detail or "unreadable pickle data")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return {"EOFError": "the file is empty or cut short"}.get(type(exc).__name__, type(exc).__name__)
    return _clip(" ".join(lines))


def _clip(text: str, limit: int = 200) -> str:
    """The first sentence of text, at most `limit` characters."""
    first = text.split(". ", 1)[0].rstrip(".")
    return first if len(first) <= limit else first[: limit - 1] + "\u2026"


def read_source(source: str | Path, model: str) -> dict[str, Any]:
    """The checkpoint a command was given with ``--from``, which must hold a ``model`` that it
    builds (its ``config`` fits the architecture and its ``state_dict`` the model that config
    makes); a one-line UsageError says what is wrong with it otherwise."""
    from training.specs import UsageError

    path = Path(source)
    if path.is_dir():
        raise UsageError(f"--from {source} is a folder, not a checkpoint file")
    if not path.exists():
        raise UsageError(f"--from {source}: no such file")
    if not path.is_file():
        raise UsageError(f"--from {source} is not a regular file")
    try:
        payload = load_payload(source)
    except NotACheckpoint as exc:
        raise UsageError(f"--from {source}: not a checkpoint ({exc.reason})") from None
    except Exception as exc:
        raise UsageError(f"--from {source}: not a checkpoint ({load_error(exc)})") from None
    if payload.get("arch") != model:
        raise UsageError(f"--from {source} holds a {payload.get('arch')!r} model, not {model!r}")
    try:
        model_from_payload(payload)
    except Exception as exc:
        raise UsageError(f"--from {source} does not fit the {model} architecture ({fit_error(exc)})") from None
    return payload


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(.*?)\]\)\.?"
)


def fit_error(exc: BaseException) -> str:
    """Why a checkpoint's config or state dict does not build its model, on one line."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        # "Error(s) in loading state_dict for X:\n\tMissing key(s) ...\n\tsize mismatch for ...": the details
        details = [_SIZE_MISMATCH.sub(r"\1 has shape [\2] in the file, [\3] in the model", line.strip()).rstrip(". ")
                   for line in text.splitlines()[1:] if line.strip()]  # fmt: skip
        text = "; ".join(details) or text
    elif isinstance(exc, TypeError) and "__init__()" in text:
        text = "config: " + text.split("__init__() ", 1)[1]
    else:
        text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "\u2026"


def trained_seed(payload: dict[str, Any]) -> int | None:
    """The seed of the train/validation/test split a checkpoint was trained (or distilled) on:
    ``training.seed`` in `train`'s checkpoints, ``seed`` in compressed ones and in the default
    versions'; None when it records none."""
    training = payload.get("training")
    for seed in (training.get("seed") if isinstance(training, dict) else None, payload.get("seed")):
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
    return None


def split_seed(payload: dict[str, Any], source: str | Path, requested: int | None) -> int:
    """The split to measure a checkpoint on: the one it was trained on (0, the default, when it
    records none). Another split would count rows it trained on as held out, so a ``--seed``
    that differs from the recorded one is a UsageError."""
    from training.specs import UsageError, check_seed, seed_refusal

    seed = trained_seed(payload)
    if requested is not None:
        check_seed(requested)
    if seed is not None and (refusal := seed_refusal(seed)) is not None:
        raise UsageError(f"the split seed {source} records: {refusal}")
    if seed is None:
        return 0 if requested is None else requested
    if requested is not None and requested != seed:
        raise UsageError(
            f"--seed {requested}: {source} was trained on the seed-{seed} split, and measuring it on another "
            f"split would count rows it trained on; leave --seed out"
        )
    return seed


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model a payload describes (float, dynamic int8 or weight-only int8), eval mode."""
    model = ARCHITECTURES[payload["arch"]](**payload["config"])
    scheme = payload.get("quantization")
    state = payload["state_dict"]
    if scheme == "weight_only_int8":
        state = dequantize_weights(state)
    elif scheme == "dynamic_int8":
        model = dynamic_structure(model)
    elif scheme is not None:
        raise ValueError(f"unknown quantization {scheme!r} in checkpoint")
    with quiet_quantization():
        model.load_state_dict(state)
    return model.eval()
