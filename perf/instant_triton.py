#!/usr/bin/env python3
"""An instant stand-in for Triton, for measuring the gateway's own capacity (compare.py
``--upstream instant``).

It answers like the Triton the spec was captured from (``noop_app.py``'s spec: server and model
metadata, model config), plus what the gateway asks of an instance (``/v2/health/*``,
``POST /v2/repository/index``, model statistics), and answers every infer request at once, in
the HTTP protocol itself: a binary-tensor response of zeros with as many rows as the request's
first input has, so the gateway's batches split back to their callers. It does no inference:
its answers are never right, only instant and cheap, so the gateway in front of it is the
only thing measured. Never a Triton for tests of answers.

    .venv/bin/python perf/instant_triton.py --spec spec.json --port 8430
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import orjson
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for the gateway's HTTP protocol
sys.path.insert(0, str(HERE))

import noop_app  # noqa: E402
from gateway.protocol.http_server import OneWriteHttpToolsProtocol  # noqa: E402


class Answers:
    """The infer answers, one per batch size (built once), and the rows answered per model."""

    def __init__(self, spec: dict) -> None:
        self.metadata = {name: m["metadata"] for name, m in spec["models"].items()}
        self.rows = dict.fromkeys(self.metadata, 0)
        self._built: dict[tuple[str, int], bytes] = {}

    def answer(self, model: str, rows: int) -> bytes:
        built = self._built.get((model, rows))
        if built is None:
            body, header_length = noop_app.synthesise_infer_response(self.metadata[model], rows)
            built = self._built[(model, rows)] = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"inference-header-content-length: %d\r\ncontent-length: %d\r\n\r\n%s" % (header_length, len(body), body)
            )
        self.rows[model] += rows
        return built


def build(spec: dict, answers: Answers):  # noqa: ANN201
    app = noop_app.build_app(spec)

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

    # Ahead of the no-op's own routes: the index, and statistics that count rows answered here.
    app.router.routes[:0] = [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/models/{model}/stats", stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", stats, methods=["GET"]),
    ]
    return app


def protocol(answers: Answers) -> type:
    class InstantInferProtocol(OneWriteHttpToolsProtocol):
        """POST /v2/models/{m}[/versions/{v}]/infer answered when complete, without ASGI."""

        _held: list[bytes] | None = None

        def on_headers_complete(self) -> None:
            if self.parser.get_method() == b"POST" and self.url.endswith(b"/infer"):
                self._held = []
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._held is not None:
                self._held.append(body)
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            held = self._held
            if held is None:
                return super().on_message_complete()
            self._held = None
            body = b"".join(held)
            model = self.url.split(b"/")[3].decode()
            length = dict(self.headers).get(b"inference-header-content-length")
            header = orjson.loads(body[: int(length)] if length else body)
            self.transport.write(answers.answer(model, int(header["inputs"][0]["shape"][0])))
            self.on_response_complete()

    return InstantInferProtocol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the JSON spec compare.py writes (noop_app.py's format)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8430)
    args = parser.parse_args(argv)
    spec = noop_app.load_spec(args.spec)
    answers = Answers(spec)
    uvicorn.run(
        build(spec, answers), host=args.host, port=args.port, loop="uvloop", http=protocol(answers),
        log_level="warning", access_log=False, proxy_headers=False, server_header=False,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
