"""The gateway's HTTP client for Triton: binary tensors over persistent connections.

One connection pool per instance (``upstream.http``): connections are kept alive and capped per
instance (``upstream.max_connections_per_instance``).
Every failure becomes a ``GatewayError``: ``InstanceUnreachable`` when no answer came at all (the
router may retry elsewhere), ``GatewayTimeout`` when the instance did not answer in time, and
``UpstreamError`` carrying Triton's own message when Triton answered with an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from gateway.batcher import BatchResult
from gateway.config import UpstreamConfig
from gateway.errors import BadRequest, GatewayTimeout, ModelError, Unavailable, UpstreamError
from gateway.protocol import v2
from gateway.protocol.v2 import HEADER_LENGTH
from gateway.tensors import RequestedOutput, Tensor
from gateway.upstream.http import ConnectFailed, ConnectionBroke, HostPool, MalformedResponse



class InstanceUnreachable(Unavailable):
    """No response came from the instance: safe to retry elsewhere.

    ``connect_failed`` is true when no connection could be made at all (refused, no route,
    connect timeout): the instance is down. Otherwise an open connection broke (for example a
    kept-alive connection the instance had closed): worth a retry, no proof the instance is down.
    """

    def __init__(self, message: str, connect_failed: bool = False) -> None:  # the default lets copy.copy work
        super().__init__(message)
        self.connect_failed = connect_failed


@dataclass(slots=True)
class RawResponse:
    status: int
    body: bytes


def model_path(model: str, version: str) -> str:
    """The v2 path of a model (version "" lets Triton choose); names are quoted, never trusted."""
    name = quote(model, safe="")
    return f"/v2/models/{name}/versions/{version}" if version else f"/v2/models/{name}"


def upstream_error(status: int, body: bytes) -> UpstreamError:
    try:
        message = orjson.loads(body)["error"]
    except Exception:
        # Not Triton's own error answer (a proxy's page, an empty body): the instance's fault.
        text = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
        return UpstreamError(text, status=status if 400 <= status < 500 else 502)
    message = str(message) or f"Triton answered HTTP {status} without a message"
    if 400 <= status < 500:
        return UpstreamError(message, status=status)
    # Triton's 5xx is the gateway's 502: the fault is upstream, not the client's or ours.
    error = ModelError(message, status=502)
    error.triton_status = status
    return error


class TritonClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._pools: dict[str, HostPool] = {}

    async def start(self) -> None:
        pass  # connections are opened on first use, per instance

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def forget(self, base_url: str) -> None:
        """Close the idle connections to an instance that left the fleet."""
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            pool.close()

    def abandon(self, base_url: str, reason: str, quiet_for: float = 0.0) -> int:
        """Give up the requests in flight to an instance (each fails as ``InstanceUnreachable``,
        which the router retries elsewhere); return how many. None if the instance answered a
        request within the last ``quiet_for`` seconds (``HostPool.abandon``)."""
        pool = self._pools.get(base_url)
        return 0 if pool is None else pool.abandon(reason, quiet_for)

    def _pool(self, base_url: str) -> HostPool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            pool = self._pools[base_url] = HostPool(
                parts.hostname or "127.0.0.1",
                parts.port or 80,
                self._config.max_connections_per_instance,
                self._config.connect_timeout_s,
            )
        return pool

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        body: bytes = b"",
        headers: bytes = b"",
        timeout: float | None = None,
        capped: bool = True,
    ) -> tuple[RawResponse, str | None]:
        """Send one request; return the response and its binary header length header, if any
        (``capped`` False: a health probe, outside max_connections_per_instance)."""
        limit = self._config.request_timeout_s if timeout is None else min(timeout, self._config.request_timeout_s)
        # The messages name no address: they reach clients. The router files each under its
        # instance (the fleet view, and the log line when an instance changes state).
        try:
            resp = await self._pool(base_url).request(method, path, headers, body, max(limit, 0.001), capped)
        except ConnectFailed as exc:
            # Nothing was sent: the instance is unreachable, and another one may take the request.
            raise InstanceUnreachable(f"Triton instance unreachable: {exc}", connect_failed=True) from None
        except ConnectionBroke as exc:
            raise InstanceUnreachable(f"Triton instance did not answer: {exc}", connect_failed=False) from None
        except TimeoutError:
            raise GatewayTimeout(f"Triton instance did not answer within {limit:.3g} s") from None
        except MalformedResponse as exc:  # an answer that is not HTTP (wrong port, broken proxy...)
            raise UpstreamError(f"Triton instance gave a malformed answer: {exc}", status=502) from None
        length = resp.headers.get(b"inference-header-content-length")
        return RawResponse(resp.status, resp.body), None if length is None else length.decode("latin-1")

    async def get(self, base_url: str, path: str, timeout: float | None = None, capped: bool = True) -> RawResponse:
        resp, _ = await self.request("GET", base_url, quote(path, safe="/%"), timeout=timeout, capped=capped)
        return resp

    async def infer(
        self,
        base_url: str,
        model: str,
        version: str,
        inputs: list[Tensor],
        parameters: dict[str, Any] | None = None,
        timeout: float | None = None,
        outputs: list[RequestedOutput] | None = None,
    ) -> BatchResult:
        body, json_length = v2.encode_upstream_request(inputs, outputs, parameters=parameters)
        headers = b"%s: %d\r\nContent-Type: application/octet-stream\r\n" % (HEADER_LENGTH.encode(), json_length)
        resp, header_length = await self.request("POST", base_url, model_path(model, version) + "/infer", body, headers, timeout)
        if resp.status != 200:
            raise upstream_error(resp.status, resp.body)
        try:
            length = v2.parse_header_length(header_length, len(resp.body))
            header, tensors = v2.decode_upstream_response(resp.body, length)
        except (BadRequest, UpstreamError) as exc:
            # Not the client's fault; maybe not the instance's either (an output the gateway
            # cannot decode comes back so from every instance): like Triton's own 5xx, it counts
            # against the instance only once another one answers (``router.py``).
            error = ModelError(f"Triton instance gave a malformed answer: {exc.message}", status=502)
            error.triton_status = resp.status
            raise error from None
        return BatchResult(str(header.get("model_version", version)), tensors, header.get("parameters") or {})
