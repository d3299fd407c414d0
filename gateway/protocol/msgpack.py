"""A compact msgpack wire format for the infer endpoint (``Content-Type: application/msgpack``).

Same route as the v2 protocol (``POST /v2/models/{model}[/versions/{version}]/infer``); tensor data
travels as msgpack ``bin`` holding the raw little-endian row-major bytes, so nothing is parsed
element by element except BYTES.

Request (a map)::

    {"inputs": [{"name": str, "datatype": "FP32" | ..., "shape": [int, ...], "data": bin}, ...],
     "outputs"?: [str | {"name": str, "classification"?: int}, ...],   # absent, nil or []: every output
     "id"?: str,
     "parameters"?: map}

Response (a map)::

    {"model_name": str, "model_version": str, "id"?: str, "parameters"?: map,
     "outputs": [{"name": str, "datatype": str, "shape": [int, ...], "data": bin}, ...]}

Error (any non-2xx status): ``{"error": str}``.

``classification`` asks for an output's top N classes per row, as v2's output parameter of that
name does (BYTES strings "value:index[:label]"; 0: the values).

``data`` of a BYTES tensor uses the v2 binary layout: per element a 4-byte little-endian length,
then the bytes. BOOL is one byte per element, 0 or 1; BF16 two, the upper 16 bits of a float32.
Unknown map keys are rejected.
"""

from __future__ import annotations

from typing import Any

import msgpack

from gateway.errors import BadRequest, UpstreamError, type_name
from gateway.protocol import v2
from gateway.protocol.v2 import (
    MakeError,
    check_request_parameters,
    class_count,
    parse_tensor_spec,
    select_outputs,
    tensor_from_buffer,
    tensor_to_buffer,
)
from gateway.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

CONTENT_TYPE = "application/msgpack"

# Limits on one body's structure; tensor payloads are bounded by the body size alone.
MAX_STR_LEN = 1 << 20
MAX_ARRAY_LEN = 1 << 16
MAX_MAP_LEN = 1 << 12

_REQUEST_KEYS = frozenset({"inputs", "outputs", "id", "parameters"})
_RESPONSE_KEYS = frozenset({"model_name", "model_version", "id", "parameters", "outputs"})
_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data"})
_OUTPUT_KEYS = frozenset({"name", "classification"})


def _response_error(message: str) -> Exception:
    return UpstreamError(f"malformed msgpack response: {message}")


# What the unpacker's errors that carry no message mean.
_UNPACK_ERRORS = {
    msgpack.exceptions.FormatError: "a byte that starts no msgpack value",
    msgpack.exceptions.StackError: "nested too deeply",
}


def _unpack(body: bytes, err: MakeError) -> dict[str, Any]:
    try:
        doc = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=len(body),
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,  # no extension types in this format
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise err(f"malformed msgpack body: {str(exc) or _UNPACK_ERRORS.get(type(exc), type(exc).__name__)}") from None
    if not isinstance(doc, dict):
        raise err(f"the msgpack body must be a map, got {type_name(doc)}")
    return doc


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str, err: MakeError) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise err(f"{where}: unknown key(s) {sorted(map(str, unknown))}")  # keys may mix str and bytes


def _tensors(raw: Any, kind: str, err: MakeError) -> list[Tensor]:
    if not isinstance(raw, list):
        raise err(f"'{kind}s' must be an array of tensors")
    tensors: list[Tensor] = []
    seen: set[str] = set()
    for index, obj in enumerate(raw):
        name, datatype, shape = parse_tensor_spec(obj, kind, index, err)
        where = f"{kind} '{name}'"
        _check_keys(obj, _TENSOR_KEYS, where, err)
        if name in seen:
            raise err(f"duplicate {where}")
        seen.add(name)
        data = obj.get("data")
        if not isinstance(data, bytes):
            raise err(f"{where}: 'data' must be msgpack bin, got {type_name(data)}")
        tensors.append(Tensor(name, datatype, tensor_from_buffer(data, datatype, shape, where, err)))
    return tensors


def _optional_str(doc: dict[str, Any], key: str, err: MakeError) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise err(f"'{key}' must be a string")
    return value


def _optional_map(doc: dict[str, Any], key: str, err: MakeError) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(f"'{key}' must be a map")
    return value


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be an array")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        classes: Any = 0
        if isinstance(item, dict):
            _check_keys(item, _OUTPUT_KEYS, f"requested output #{index}", BadRequest)
            classes = item.get("classification", 0)
            item = item.get("name")
        if not isinstance(item, str) or not item:
            raise BadRequest(f"requested output #{index} must be a non-empty string or a map with 'name'")
        if item in seen:
            raise BadRequest(f"duplicate requested output '{item}'")
        seen.add(item)
        outputs.append(RequestedOutput(item, class_count=class_count(classes, item)))
    return outputs or None


def decode_request(body: bytes, model: str, version: str) -> InferRequest:
    doc = _unpack(body, BadRequest)
    _check_keys(doc, _REQUEST_KEYS, "request", BadRequest)
    if "inputs" not in doc:
        raise BadRequest("the request has no 'inputs'")
    return InferRequest(
        model=model,
        version=version,
        inputs=_tensors(doc["inputs"], "input", BadRequest),
        outputs=_requested_outputs(doc.get("outputs")),
        id=_optional_str(doc, "id", BadRequest),
        parameters=check_request_parameters(dict(_optional_map(doc, "parameters", BadRequest))),
    )


def _tensor_entries(tensors: list[Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": tensor_to_buffer(t)}
        for t in tensors
    ]


def encode_response(response: InferResponse, request: InferRequest) -> bytes:
    doc: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if request.id is not None:
        doc["id"] = request.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = _tensor_entries([tensor for tensor, _ in select_outputs(response, request)])
    return msgpack.packb(doc, use_bin_type=True)


def encode_request(
    inputs: list[Tensor],
    outputs: list[str] | None = None,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> bytes:
    doc: dict[str, Any] = {"inputs": _tensor_entries(inputs)}
    if outputs:
        doc["outputs"] = list(outputs)
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    return msgpack.packb(doc, use_bin_type=True)


def decode_response(body: bytes) -> InferResponse:
    """Decode a msgpack answer; raises UpstreamError when it is malformed."""
    err = _response_error
    doc = _unpack(body, err)
    _check_keys(doc, _RESPONSE_KEYS, "response", err)
    return InferResponse(
        model=_optional_str(doc, "model_name", err) or "",
        version=_optional_str(doc, "model_version", err) or "",
        outputs=_tensors(doc.get("outputs"), "output", err),
        id=_optional_str(doc, "id", err),
        parameters=dict(_optional_map(doc, "parameters", err)),
    )


MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")


def is_msgpack(content_type: bytes) -> bool:
    return content_type.split(b";")[0].strip().lower() in MSGPACK_TYPES


def error_body(message: str) -> bytes:
    return msgpack.packb({"error": message}, use_bin_type=True)


def error_answer(message: str, content_type: bytes) -> tuple[bytes, bytes]:
    """An error's body and its content type, in the wire format of a request of
    ``content_type``: msgpack for msgpack, else v2's JSON."""
    if is_msgpack(content_type):
        return error_body(message), MSGPACK_TYPES[0]
    return v2.error_body(message), v2.JSON_CONTENT_TYPE.encode()
