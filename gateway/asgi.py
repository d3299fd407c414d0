"""An ASGI application factory for servers that import the app by name (granian, gunicorn...):
``GATEWAY_CONFIG=configs/local.toml granian --interface asgi --factory gateway.asgi:app_from_env``.
"""

from __future__ import annotations

import os

from gateway.app import build_app
from gateway.config import load_config
from gateway.infer_endpoint import InferEndpoint


def app_from_env() -> InferEndpoint:
    path = os.environ.get("GATEWAY_CONFIG")
    if not path:
        raise RuntimeError("set GATEWAY_CONFIG to the gateway's TOML config file")
    return build_app(load_config(path))
