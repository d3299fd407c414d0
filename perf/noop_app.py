#!/usr/bin/env python3
"""A bare Starlette "no-op" KServe v2 endpoint: the Python ceiling anchor for perf/compare.py.

It does the least any Python ASGI service answering perf_analyzer must do: route the request,
read the whole body, and send a response. No parsing, no upstream call. Whatever throughput it
reaches on a given ASGI server is the ceiling for a Python gateway on that same server.

It answers:

* ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``: server metadata / 200;
* ``GET /v2/models/{m}``, ``/v2/models/{m}/config``, ``/v2/models/{m}/ready``,
  (and the ``/versions/{v}/`` forms): the bodies captured from a real Triton before the run,
  so perf_analyzer accepts the endpoint as that model;
* ``GET /v2/models/{m}/stats``: the number of infer requests answered, with zero time spent
  (perf_analyzer needs the count to move between its reads);
* ``POST /v2/models/{m}/infer``: reads the body, returns a precomputed binary-tensor response
  (``Inference-Header-Content-Length`` + raw output bytes) of the shapes a batch-1 request gets.

The spec file (JSON, written by compare.py) is::

    {"server": {...},                         # GET /v2 body
     "models": {"digits_cnn": {
         "metadata": {...}, "config": {...},
         "infer": {"body_b64": "...", "header_length": 242}    # optional; else synthesised
     }}}

Run it on the same ASGI set-up as the gateway (uvicorn: uvloop + httptools, no access log;
granian: ASGI interface, uvloop, one worker):

    .venv/bin/python perf/noop_app.py --spec spec.json --port 8420 --server uvicorn
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
SPEC_ENV = "NOOP_SPEC"

_JSON = "application/json"
_OCTET = "application/octet-stream"

# Bytes per element of the fixed-size KServe v2 datatypes (BYTES is not supported here).
_ELEMENT_SIZE = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}  # fmt: skip


def synthesise_infer_response(metadata: dict[str, Any], batch_size: int = 1) -> tuple[bytes, int]:
    """A binary-tensor response (all outputs, zero-filled) for a request of `batch_size` rows.

    Dynamic dimensions (-1) after the batch dimension are taken as 1. Returns (body, json_len)."""
    outputs = []
    blobs = []
    for out in metadata.get("outputs", []):
        shape = [int(d) for d in out["shape"]]
        if shape and shape[0] == -1:
            shape[0] = batch_size
        shape = [1 if d < 0 else d for d in shape]
        count = 1
        for d in shape:
            count *= d
        size = count * _ELEMENT_SIZE[out["datatype"]]
        blobs.append(b"\0" * size)
        outputs.append(
            {"name": out["name"], "datatype": out["datatype"], "shape": shape, "parameters": {"binary_data_size": size}}
        )
    header = json.dumps(
        {"model_name": metadata["name"], "model_version": (metadata.get("versions") or ["1"])[-1], "outputs": outputs},
        separators=(",", ":"),
    ).encode()
    return header + b"".join(blobs), len(header)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def build_app(spec: dict[str, Any]) -> Starlette:
    server_body = _json_bytes(spec.get("server") or {"name": "noop", "version": "0", "extensions": []})
    models: dict[str, dict[str, Any]] = {}
    for name, m in spec["models"].items():
        if m.get("infer"):
            body = base64.b64decode(m["infer"]["body_b64"])
            header_length = int(m["infer"]["header_length"])
        else:
            body, header_length = synthesise_infer_response(m["metadata"])
        models[name] = {
            "version": str((m["metadata"].get("versions") or ["1"])[-1]),
            "metadata": _json_bytes(m["metadata"]),
            "config": _json_bytes(m["config"]),
            "infer_body": body,
            "infer_headers": {"Inference-Header-Content-Length": str(header_length)},
        }
    not_found = Response(_json_bytes({"error": "unknown model"}), 404, media_type=_JSON)

    def ok_json(body: bytes) -> Response:
        return Response(body, 200, media_type=_JSON)

    async def server_metadata(request: Request) -> Response:
        return ok_json(server_body)

    async def health(request: Request) -> Response:
        return Response(b"", 200)

    counts = dict.fromkeys(models, 0)  # requests answered, per model

    async def model_stats(request: Request) -> Response:
        # perf_analyzer reads the server's statistics before and after each window and fails
        # ("failed to find the requested model version") when no request of the model was
        # counted, so report the requests answered, with zero time spent.
        name = request.path_params["model"]
        if name not in models:
            return not_found
        n = counts[name]
        step = {"count": n, "ns": 0}
        zero = {"count": 0, "ns": 0}
        stats = {
            "model_stats": [
                {
                    "name": name,
                    "version": models[name]["version"],
                    "last_inference": 0,
                    "inference_count": n,
                    "execution_count": n,
                    "inference_stats": {
                        "success": step, "fail": zero, "queue": step, "compute_input": step,
                        "compute_infer": step, "compute_output": step, "cache_hit": zero, "cache_miss": zero,
                    },
                    "response_stats": {},
                    "batch_stats": [],
                    "memory_usage": [],
                }
            ]
        }  # fmt: skip
        return ok_json(_json_bytes(stats))

    def getter(key: str):
        async def handler(request: Request) -> Response:
            model = models.get(request.path_params["model"])
            return ok_json(model[key]) if model else not_found

        return handler

    async def model_ready(request: Request) -> Response:
        return Response(b"", 200 if request.path_params["model"] in models else 404)

    async def infer(request: Request) -> Response:
        await request.body()  # read (and drop) the whole request, as any real handler must
        name = request.path_params["model"]
        model = models.get(name)
        if model is None:
            return not_found
        counts[name] += 1
        return Response(model["infer_body"], 200, headers=model["infer_headers"], media_type=_OCTET)

    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", health, methods=["GET"]),
        Route("/v2/health/ready", health, methods=["GET"]),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(base, getter("metadata"), methods=["GET"]),
            Route(base + "/config", getter("config"), methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/stats", model_stats, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        ]
    return Starlette(routes=routes)


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def app_from_env() -> Starlette:
    """Factory for granian (which imports the app by name in its worker process)."""
    return build_app(load_spec(os.environ[SPEC_ENV]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON spec file (see module docstring)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    args = parser.parse_args(argv)
    spec_path = str(Path(args.spec).resolve())
    if args.server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        os.environ[SPEC_ENV] = spec_path
        # Same settings as `python -m gateway serve --server granian`.
        Granian(
            "noop_app:app_from_env",
            address=args.host,
            port=args.port,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            factory=True,
            log_access=False,
            working_dir=HERE,
        ).serve()
        return 0

    import uvicorn

    sys.path.insert(0, str(HERE.parent))  # the repository root, for the gateway's HTTP protocol
    from gateway.protocol.http_server import OneWriteHttpToolsProtocol

    # Same settings as `python -m gateway serve` (the uvicorn default), the same HTTP protocol
    # included (httptools, each response's head and body in one write).
    uvicorn.run(
        build_app(load_spec(spec_path)),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=OneWriteHttpToolsProtocol,
        log_level="warning",
        access_log=False,
        # The same server settings as the gateway (gateway/__main__.py).
        proxy_headers=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
