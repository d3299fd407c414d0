"""The gateway's error hierarchy.

Every error carries an HTTP status and a message. Errors are raised anywhere and rendered as a
KServe v2 error body (``{"error": "..."}``) only at the HTTP edge: ``infer_endpoint.error_reply`` for
infer requests (msgpack-encoded for msgpack clients), ``handlers.error_response`` for the rest.
"""

from __future__ import annotations

import json
from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """A value a client sent, for an error message: written as JSON (``true``, ``null``,
    ``"2"``), as the client wrote it, or Python's repr for what JSON cannot hold (bytes from a
    msgpack body, a NaN); cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    """The JSON (or msgpack) name of a value's type, for an error message."""
    if value is None:
        return "null"
    for types, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), ((list, tuple), "array"),
                        (dict, "object"), ((bytes, bytearray, memoryview), "binary")):
        if isinstance(value, types):
            return name
    return type(value).__name__


class GatewayError(Exception):
    status: int = 500
    # The failure of a computation another request started and this one waited for (a coalesced
    # request, ``cache.flight``): that request's failure, counted once, by that request.
    shared: bool = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequest(GatewayError):
    """The client sent something malformed or inconsistent with the model."""

    status = 400


class NotFound(GatewayError):
    """Unknown model, version or route."""

    status = 404


class PayloadTooLarge(GatewayError):
    status = 413


class UnsupportedMediaType(GatewayError):
    status = 415


class Unavailable(GatewayError):
    """No upstream instance could take the request (all down, or none holds the model)."""

    status = 503


class GatewayTimeout(GatewayError):
    status = 504


class NotCached(GatewayError):
    """The client asked for a stored answer only (``Cache-Control: only-if-cached``) and none
    may answer: 504, as RFC 9111 says. The client's choice, not the version's failure: it never
    counts against a canary, as a timeout does."""

    status = 504


class ClientGone(GatewayError):
    """The client disconnected: its request is dropped and there is no one to answer."""

    status = 499  # nginx's "client closed request"; never sent


class UpstreamError(GatewayError):
    """Triton answered with an error; ``status`` is Triton's own status code."""

    status = 502


class ModelError(UpstreamError):
    """Triton answered with a server error (5xx) and its own error message: the model's fault
    (a model that raises, a bad version) as often as the instance's. The router tells them
    apart by trying another instance (``router.py``). ``triton_status``: the status Triton
    answered (503: unavailable, its queue full; else a failure of the model or the server)."""

    triton_status: int = 500


def rebuilt(kind: str, message: str, status: int) -> GatewayError:
    """The error another process met, from its class name, message and status (the host tier's
    failed claims, a request another worker batched): of that class where it is one of these,
    else a plain ``GatewayError``."""
    cls = globals().get(kind)
    if not (isinstance(cls, type) and issubclass(cls, GatewayError)):
        cls = GatewayError
    return cls(message, status)


def missing_model(error: UpstreamError) -> bool:
    """Triton's answer for a model (version) it does not hold or has not finished loading (its
    400 "unknown model ... is not found", or its 503 "... is not at ready state", which reaches
    here as a ``ModelError`` with that ``triton_status``)."""
    text = error.message.lower()
    if isinstance(error, ModelError):  # of Triton's 5xx, only that one (not its full queue's 503)
        return error.triton_status == 503 and ("unknown model" in text or "not at ready state" in text)
    return error.status in (400, 404, 503) and (
        "unknown model" in text or "is not found" in text or "not ready" in text or "unavailable" in text
    )
