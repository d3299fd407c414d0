"""A small async client for the gateway's msgpack infer endpoint.

    async with GatewayClient("http://127.0.0.1:8000") as client:
        result = await client.infer("resnet", {"INPUT0": batch})
        scores = result.outputs["OUTPUT0"]

Output arrays are read-only views over the response body; copy them to modify them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import msgpack
import numpy as np
import orjson

from gateway.errors import GatewayError
from gateway.protocol import msgpack as codec
from gateway.tensors import NUMPY_TO_V2, Tensor


class GatewayClientError(Exception):
    """The gateway answered with a non-2xx status (or an unreadable body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(slots=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def tensor_from_numpy(name: str, array: np.ndarray) -> Tensor:
    """Wrap an array as a Tensor, picking its v2 datatype (str/bytes arrays become BYTES)."""
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind == "U":
        array = np.char.encode(array, "utf-8").astype(object)
    elif kind == "S":
        array = array.astype(object)
    elif kind != "O" and array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))  # the wire is little-endian
    datatype = NUMPY_TO_V2.get(array.dtype)
    if datatype is None:
        raise TypeError(f"input '{name}': numpy dtype {array.dtype} has no KServe v2 datatype")
    return Tensor(name, datatype, array)


def parse_error_body(body: bytes, content_type: str | None) -> str:
    """The message of a gateway error body (msgpack or JSON ``{"error": ...}``), else its text."""
    loaders = [orjson.loads, lambda b: msgpack.unpackb(b, raw=False)]
    if content_type and "msgpack" in content_type:
        loaders.reverse()
    for load in loaders:
        try:
            doc = load(body)
        except Exception:  # noqa: BLE001 - any undecodable body falls through to the next format
            continue
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    text = body.decode("utf-8", errors="replace").strip()
    return text[:500] or "empty error body"


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        timeout: float | None = 60.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> GatewayClient:
        self._get_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        version: str | None = None,
        request_id: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> InferResult:
        """``parameters``: the v2 request parameters, e.g. ``{"sequence_id": 7,
        "sequence_start": True}`` for a stateful model, ``{"timeout": 200_000}`` (µs)."""
        path = f"/v2/models/{quote(model, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        body = codec.encode_request(
            [tensor_from_numpy(name, array) for name, array in inputs.items()], outputs, request_id, parameters
        )
        headers = {"Content-Type": codec.CONTENT_TYPE, "Accept": codec.CONTENT_TYPE}
        async with self._get_session().post(f"{self._url}{path}/infer", data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
            if not 200 <= status < 300:
                raise GatewayClientError(status, parse_error_body(payload, resp.headers.get("Content-Type")))
        try:
            response = codec.decode_response(payload)
        except GatewayError as exc:
            raise GatewayClientError(status, str(exc)) from None
        return InferResult(
            outputs={t.name: t.data for t in response.outputs},
            model_name=response.model,
            model_version=response.version,
            id=response.id,
            parameters=response.parameters,
        )
