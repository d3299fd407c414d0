#!/usr/bin/env python3
"""An instant stand-in for Triton, for measuring the gateway's own capacity (compare.py
``--upstream instant``).

It answers like the Triton the spec was captured from (``noop_app.py``'s spec: server and model
metadata, model config), plus what the gateway asks of an instance (``/v2/health/*``,
``POST /v2/repository/index``, model statistics), and answers every infer request at once: a
binary-tensor response of zeros with as many rows as the request's first input has, so the
gateway's batches split back to their callers. The answers are written by the gateway's own
HTTP protocol (``gateway/protocol/infer_server.py``) through the hooks the gateway answers
its cache hits with; a request that protocol does not hold gets the same answer via
ASGI. It does no inference: its answers are never right, only instant and cheap, so the gateway
in front of it is the only thing measured. Never a Triton for tests of answers.

    .venv/bin/python perf/instant_triton.py --spec spec.json --port 8430
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for the gateway's HTTP protocol
sys.path.insert(0, str(HERE))

import noop_app  # noqa: E402
from gateway.cache import RawAnswer  # noqa: E402
from gateway.protocol.infer_server import InferHttpToolsProtocol  # noqa: E402


class Answers:
    """The infer answers, one per batch size (built once), and the rows answered per model."""

    def __init__(self, spec: dict) -> None:
        self.metadata = {name: m["metadata"] for name, m in spec["models"].items()}
        self.rows = dict.fromkeys(self.metadata, 0)
        self._built: dict[tuple[str, int], RawAnswer] = {}

    def answer(self, model: str, header_length: bytes | None, body: bytes) -> RawAnswer:
        """The answer to an infer request of ``model`` (its Inference-Header-Content-Length and body)."""
        header = orjson.loads(body[: int(header_length)] if header_length else body)
        rows = int(header["inputs"][0]["shape"][0])
        built = self._built.get((model, rows))
        if built is None:
            data, json_length = noop_app.synthesise_infer_response(self.metadata[model], rows)
            headers = (
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", b"%d" % json_length),
                (b"content-length", b"%d" % len(data)),
            )
            built = self._built[(model, rows)] = RawAnswer(headers, data)
        self.rows[model] += rows
        return built


class InstantTriton:
    """The ASGI app, with the hooks ``InferHttpToolsProtocol`` asks of the app it serves:
    every infer request is held, and answered."""

    def __init__(self, app: Any, answers: Answers) -> None:
        self.app, self.answers = app, answers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def may_serve(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
        return url.split(b"/")[3].decode() if url.endswith(b"/infer") else None

    def answer_from_cache(
        self, model: str, headers: list[tuple[bytes, bytes]], body: bytes, start: float
    ) -> tuple[RawAnswer, None]:
        return self.answers.answer(model, dict(headers).get(b"inference-header-content-length"), body), None


def build(spec: dict, answers: Answers) -> InstantTriton:
    app = noop_app.build_app(spec)

    async def infer(request: Request) -> Response:  # requests the protocol did not hold
        answer = answers.answer(
            request.path_params["model"], request.headers.get("inference-header-content-length", "").encode() or None,
            await request.body(),
        )  # fmt: skip
        return Response(answer.body, headers={k.decode(): v.decode() for k, v in answer.headers})

    async def index(request: Request) -> Response:
        listed = [{"name": name, "version": str((m.get("versions") or ["1"])[-1]), "state": "READY"} for name, m in answers.metadata.items()]
        return Response(json.dumps(listed), media_type="application/json")

    async def stats(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in answers.rows:
            return Response(b'{"error":"unknown model"}', 404, media_type="application/json")
        n = answers.rows[name]
        step, zero = {"count": n, "ns": 0}, {"count": 0, "ns": 0}
        body = {"model_stats": [{
            "name": name, "version": str((answers.metadata[name].get("versions") or ["1"])[-1]), "last_inference": 0,
            "inference_count": n, "execution_count": n,
            "inference_stats": {"success": step, "fail": zero, "queue": step, "compute_input": step,
                                "compute_infer": step, "compute_output": step, "cache_hit": zero, "cache_miss": zero},
            "response_stats": {}, "batch_stats": [], "memory_usage": [],
        }]}  # fmt: skip
        return Response(json.dumps(body), media_type="application/json")

    # Ahead of the no-op's own routes: the index, infer answers of the right rows, and
    # statistics that count the rows answered here.
    routes = [Route("/v2/repository/index", index, methods=["POST"])]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(base + "/infer", infer, methods=["POST"]), Route(base + "/stats", stats, methods=["GET"])]
    app.router.routes[:0] = routes
    return InstantTriton(app, answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the JSON spec compare.py writes (noop_app.py's format)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8430)
    args = parser.parse_args(argv)
    spec = noop_app.load_spec(args.spec)
    uvicorn.run(
        build(spec, Answers(spec)), host=args.host, port=args.port, loop="uvloop", http=InferHttpToolsProtocol,
        log_level="warning", access_log=False, proxy_headers=False, server_header=False,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
