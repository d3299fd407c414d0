"""Run a version folder of the model repository outside Triton, with its own model.py.

The accuracy gate and the publish step measure what Triton will load, not an in-memory model:
the version's model.py is imported (with a stand-in for the `triton_python_backend_utils`
module, which only exists inside Triton's Python backend), its TritonPythonModel is initialised
with the arguments Triton passes (model config JSON, model folder, version), and the model it
builds is run on the test split. The default versions' model.py and the one `publish` writes
both keep the network in `self.model`.
"""

from __future__ import annotations

import errno
import importlib.util
import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch

from training.quantize import load_error, load_payload, quiet_quantization
from training.specs import UsageError, spec

_counter = itertools.count()
OUTPUTS = ("logits", "probabilities")


def model_config(model: str) -> dict[str, Any]:
    """The parts of the model's config (as Triton hands it to model.py) that model.py reads."""
    s = spec(model)
    return {
        "name": model,
        "input": [{"name": s.input_name, "data_type": "TYPE_FP32", "dims": list(s.input_shape)}],
        "output": [{"name": name, "data_type": "TYPE_FP32"} for name in OUTPUTS],
        "parameters": {"torch_num_threads": {"string_value": "1"}},
    }


def load_version(model_dir: Path, version: str | int, model: str) -> Any:
    """The initialised TritonPythonModel of `model_dir/<version>/model.py`."""
    source = Path(model_dir) / str(version) / "model.py"
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(source))
    name = f"_version_model_{next(_counter)}"
    spec_ = importlib.util.spec_from_file_location(name, source)
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ in the version folder
    threads = torch.get_num_threads()
    try:
        with quiet_quantization():
            spec_.loader.exec_module(module)
            instance = module.TritonPythonModel()
            instance.initialize(
                {
                    "model_config": json.dumps(model_config(model)),
                    "model_repository": str(Path(model_dir)),
                    "model_version": str(version),
                    "model_name": model,
                }
            )
    finally:
        sys.dont_write_bytecode = dont_write
        torch.set_num_threads(threads)  # initialize() sets the served thread count
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved
    return instance


def version_network(model_dir: Path, version: str | int, model: str) -> torch.nn.Module:
    """The network a version serves, as its model.py builds it (on the CPU)."""
    net = load_version(model_dir, version, model).model
    return net.cpu().eval()


def served_version(model_dir: Path, version: str | int, model: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network a version serves and its checkpoint (`model.pt`); a UsageError naming the
    version and what is wrong with it when either does not load."""
    folder = Path(model_dir) / str(version)
    try:
        return version_network(model_dir, version, model), load_payload(folder / "model.pt")
    except Exception as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename:
            reason = f"it has no {Path(exc.filename).name}"
        else:
            reason = f"{type(exc).__name__}: {load_error(exc)}"
        raise UsageError(f"version {version} of {model} ({folder}) does not load: {reason}") from None
