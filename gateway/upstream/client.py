"""The gateway's HTTP client for Triton: binary tensors over persistent connections.

One aiohttp session for the whole fleet; connections are kept alive and capped per instance.
Every failure becomes a ``GatewayError``: ``InstanceUnreachable`` when no answer came at all (the
router may retry elsewhere), ``GatewayTimeout`` when the instance did not answer in time, and
``UpstreamError`` carrying Triton's own message when Triton answered with an error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.batcher import BatchResult
from gateway.config import UpstreamConfig
from gateway.errors import BadRequest, GatewayTimeout, Unavailable, UpstreamError
from gateway.protocol import v2
from gateway.protocol.v2 import HEADER_LENGTH
from gateway.tensors import Tensor



class InstanceUnreachable(Unavailable):
    """No response came from the instance: safe to retry elsewhere.

    ``connect_failed`` is true when no connection could be made at all (refused, no route,
    connect timeout): the instance is down. Otherwise an open connection broke (for example a
    kept-alive connection the instance had closed): worth a retry, no proof the instance is down.
    """

    def __init__(self, message: str, connect_failed: bool) -> None:
        super().__init__(message)
        self.connect_failed = connect_failed


@dataclass(slots=True)
class RawResponse:
    status: int
    body: bytes
    content_type: str


def model_path(model: str, version: str) -> str:
    """The v2 path of a model (version "" lets Triton choose); names are quoted, never trusted."""
    name = quote(model, safe="")
    return f"/v2/models/{name}/versions/{version}" if version else f"/v2/models/{name}"


def upstream_error(status: int, body: bytes) -> UpstreamError:
    try:
        message = orjson.loads(body)["error"]
    except Exception:
        message = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    # Triton's 5xx is the gateway's 502: the fault is upstream, not the client's or ours.
    return UpstreamError(str(message), status=status if 400 <= status < 500 else 502)


class TritonClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._config.max_connections_per_instance,
            keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._config.request_timeout_s, sock_connect=self._config.connect_timeout_s),
            auto_decompress=False,
            # Triton gzips responses when asked to; compressing on loopback or a LAN costs more
            # CPU on both sides than it saves.
            headers={"Accept-Encoding": "identity"},
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),  # Triton sets no cookies; skip the jar per request
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("TritonClient.start() was not awaited")
        return self._session

    def _timeout(self, seconds: float | None) -> aiohttp.ClientTimeout | None:
        if seconds is None or seconds >= self._config.request_timeout_s:
            return None  # the session's default
        return aiohttp.ClientTimeout(total=max(seconds, 0.001), sock_connect=self._config.connect_timeout_s)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[RawResponse, str | None]:
        """Send one request; return the response and its binary header length header, if any."""
        try:
            deadline = self._timeout(timeout)
            kwargs = {} if deadline is None else {"timeout": deadline}
            async with self.session.request(method, url, data=body, headers=headers, **kwargs) as resp:
                data = await resp.read()
                return RawResponse(resp.status, data, resp.headers.get("Content-Type", "")), resp.headers.get(HEADER_LENGTH)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing was sent: the instance is unreachable, and another one may take the request.
            raise InstanceUnreachable(f"{url}: {exc.__class__.__name__}: {exc}", connect_failed=True) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise GatewayTimeout(f"{url}: no answer within the deadline") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise InstanceUnreachable(f"{url}: {exc.__class__.__name__}: {exc}", connect_failed=False) from None
        except aiohttp.ClientError as exc:  # an answer that is not HTTP (wrong port, broken proxy...)
            raise UpstreamError(f"{url}: malformed answer: {exc.__class__.__name__}: {exc}", status=502) from None

    async def get(self, base_url: str, path: str, timeout: float | None = None) -> RawResponse:
        try:
            resp, _ = await self.request("GET", base_url + path, timeout=timeout)
        except InstanceUnreachable:
            # A GET is idempotent: one more try on a fresh connection rides over a pooled
            # connection the instance had already closed.
            resp, _ = await self.request("GET", base_url + path, timeout=timeout)
        return resp

    async def infer(
        self,
        base_url: str,
        model: str,
        version: str,
        inputs: list[Tensor],
        parameters: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> BatchResult:
        body, json_length = v2.encode_upstream_request(inputs, None, parameters=parameters)
        path = model_path(model, version) + "/infer"
        headers = {HEADER_LENGTH: str(json_length), "Content-Type": "application/octet-stream"}
        resp, header_length = await self.request("POST", base_url + path, body, headers, timeout)
        if resp.status != 200:
            raise upstream_error(resp.status, resp.body)
        try:
            length = v2.parse_header_length(header_length, len(resp.body))
        except BadRequest as exc:  # Triton's answer is malformed: not the client's fault
            raise UpstreamError(f"{base_url}: {exc.message}", status=502) from None
        header, tensors = v2.decode_upstream_response(resp.body, length)
        return BatchResult(str(header.get("model_version", version)), tensors, header.get("parameters") or {})
