"""Training module: datasets, model definitions, the default models served by the gateway, and
`python -m training`: distributed training, compression and publishing of new model versions
(see training/README.md). `python -m training.default_models` trains the served version 1.
"""

import importlib.util
import sys


def _ignore_repository_triton_folder() -> None:
    """Keep the repository's `triton/` folder from posing as the Triton compiler package.

    Run from the repository root (`python -m training...`, `python -m pytest`), the current
    directory is on sys.path and `triton/` (scripts that run Triton Inference Server) is found as
    a namespace package named `triton`. Where the real compiler package is not installed (CPU
    builds of torch), torch then believes it is and fails inside torch._dynamo (optimizers import
    it) with "module 'triton' has no attribute 'language'". The real package is a regular package,
    found ahead of any namespace folder, so this only acts when no real one exists: it marks
    `triton` as absent, which is what torch expects on such machines.
    """
    if "triton" in sys.modules:
        return
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is None:  # a namespace package: a bare folder
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` -> ImportError


_ignore_repository_triton_folder()
