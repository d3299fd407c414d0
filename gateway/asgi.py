"""An ASGI application factory for servers that import the app by name (granian, gunicorn...):
``GATEWAY_CONFIG=configs/local.toml granian --interface asgi --factory gateway.asgi:app_from_env``.
"""

from __future__ import annotations

import os

from gateway.app import build_app
from gateway.cache.host import SEGMENT_ENV
from gateway.config import load_config
from gateway.host_files import WORKERS_ENV
from gateway.infer_endpoint import InferEndpoint


def app_from_env() -> InferEndpoint:
    path = os.environ.get("GATEWAY_CONFIG")
    if not path:
        raise RuntimeError("set GATEWAY_CONFIG to the gateway's TOML config file")
    # Set by ``python -m gateway serve`` for its workers: the cache's host tier (cache/host.py)
    # and the workers' folder (host_files.create_workers_folder).
    workers = os.environ.get(WORKERS_ENV, "")
    # A worker of a running gateway (its folder set) starts even where the rollout file went bad
    # since the gateway started, from the rollout in force in the other workers.
    return build_app(load_config(path, check_rollout=not workers), os.environ.get(SEGMENT_ENV, ""), workers)
