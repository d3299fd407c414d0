"""KServe v2 / Triton HTTP inference protocol: JSON bodies and the binary tensor data extension.

A body is a JSON object, optionally followed by raw tensor data; the JSON part's length is then
given by the ``Inference-Header-Content-Length`` HTTP header. A binary tensor carries
``parameters.binary_data_size`` and its bytes follow the JSON, in tensor order: little-endian,
row-major, BOOL as one byte 0/1, BYTES as repeated (4-byte little-endian length, bytes), BF16 as
the upper 16 bits of each float32 (held as uint16 in memory; JSON data carries numbers, rounded to
the nearest bfloat16 on the way in).

The buffer helpers (``parse_tensor_spec``, ``tensor_from_buffer``, ``tensor_to_buffer``,
``select_outputs``) are shared with the msgpack codec.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import orjson

from gateway.errors import BadRequest, UpstreamError, shown, type_name
from gateway.tensors import V2_TO_NUMPY, InferRequest, InferResponse, RequestedOutput, Tensor, bf16_bits, bf16_values

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

MAX_DIMS = 32  # numpy cannot hold more dimensions
MAX_ELEMENTS = 2**40  # far beyond any body limit, well within what numpy can shape
_INT64_MAX = 2**63 - 1
_U32 = struct.Struct("<I")

# Builds a validation error: BadRequest for clients, UpstreamError for Triton's (not their fault).
MakeError = Callable[[str], Exception]


def _upstream_error(message: str) -> Exception:
    return UpstreamError(f"malformed response from upstream: {message}")


def _is_dim(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _INT64_MAX  # bool is not a dimension


def parse_tensor_spec(obj: Any, kind: str, index: int, err: MakeError) -> tuple[str, str, tuple[int, ...]]:
    """Validate the ``name``, ``datatype`` and ``shape`` of the ``index``-th input/output object."""
    if not isinstance(obj, dict):
        raise err(f"{kind} #{index} must be an object, got {type_name(obj)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise err(f"{kind} #{index}: 'name' must be a non-empty string")
    datatype = obj.get("datatype")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise err(f"{kind} '{name}': unknown datatype {shown(datatype)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
        raise err(f"{kind} '{name}': shape must be a list of non-negative integers, got {shown(shape)}")
    if len(shape) > MAX_DIMS:
        raise err(f"{kind} '{name}': shape has {len(shape)} dimensions, more than the {MAX_DIMS} a tensor may have")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        # Even with a zero dimension (no data at all), numpy cannot represent such a shape.
        raise err(f"{kind} '{name}': shape {shown(shape)} is too large")
    return name, datatype, tuple(shape)


def deserialize_bytes(buf: bytes | memoryview, count: int, where: str, err: MakeError) -> np.ndarray:
    """Parse ``count`` length-prefixed BYTES elements that must fill ``buf`` exactly."""
    items: list[bytes] = []
    unpack = _U32.unpack_from
    size_total, offset = len(buf), 0
    for index in range(count):
        if offset + 4 > size_total:
            raise err(f"{where}: BYTES data ends before element {index} of {count} (corrupt length prefix?)")
        (length,) = unpack(buf, offset)
        offset += 4
        end = offset + length
        if end > size_total:
            left = size_total - offset
            raise err(f"{where}: BYTES element {index} claims {length} bytes but only {left} remain")
        items.append(bytes(buf[offset:end]))
        offset = end
    if offset != size_total:
        raise err(f"{where}: {size_total - offset} bytes of BYTES data left over after {count} elements")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    """Length-prefix every element (``bytes`` or ``str``, row-major) of a BYTES tensor."""
    parts: list[bytes] = []
    pack = _U32.pack
    for item in array.ravel(order="C"):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif isinstance(item, (bytearray, memoryview)):
            item = bytes(item)
        elif not isinstance(item, bytes):
            raise TypeError(f"BYTES tensor elements must be bytes or str, got {type(item).__name__}")
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def tensor_from_buffer(
    buf: bytes | memoryview, datatype: str, shape: tuple[int, ...], where: str, err: MakeError
) -> np.ndarray:
    """A tensor over raw little-endian row-major data; a zero-copy view for numeric types."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count, where, err).reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise err(f"{where}: got {len(buf)} bytes of data, {datatype} shape {list(shape)} needs {expected}")
    if datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise err(f"{where}: BOOL data holds bytes other than 0 and 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# Numeric tensors this small are copied out, which costs less than making a view of them.
COPY_BELOW = 65536


def tensor_to_buffer(tensor: Tensor) -> bytes | memoryview:
    """The tensor's wire bytes; larger contiguous numeric tensors are exposed without a copy."""
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    data = tensor.data
    wire = V2_TO_NUMPY[tensor.datatype]
    if data.dtype != wire:
        data = data.astype(wire)
    if data.nbytes < COPY_BELOW or not data.flags.c_contiguous:
        return data.tobytes()
    return memoryview(data).cast("B")


def select_outputs(response: InferResponse, request: InferRequest) -> list[tuple[Tensor, bool]]:
    """The outputs to answer with, in answer order, each with whether it goes binary."""
    if request.outputs is None:
        return [(t, request.binary_output) for t in response.outputs]
    by_name = {t.name: t for t in response.outputs}
    selected = []
    for wanted in request.outputs:
        tensor = by_name.get(wanted.name)
        if tensor is None:
            raise BadRequest(f"requested output '{wanted.name}' is not produced by model '{response.model}'")
        selected.append((tensor, request.binary_output if wanted.binary is None else wanted.binary))
    return selected


def _flatten_strings(data: list, where: str, err: MakeError) -> list[bytes]:
    # Iterative so that deeply nested lists cannot exhaust the Python stack.
    out: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise err(f"{where}: BYTES data elements must be strings, got {type_name(item)}")
            out.append(item.encode("utf-8"))
        else:
            stack.pop()
    return out


def _holds_bool(data: list, arr: np.ndarray) -> bool:
    """Whether the JSON ``data`` that numpy read as the numbers ``arr`` holds true/false among
    them (numpy reads them as 1 and 0, silently). A large one's elements are looked at only
    where ``arr`` holds a 0 or a 1 (a small one's cost less to look at than that check)."""
    if arr.size > 128 and not ((arr == 0) | (arr == 1)).any():
        return False
    lists = [data]
    while lists:  # each list's element types at C speed; nested lists after it
        items = lists.pop()
        types = set(map(type, items))
        if bool in types:
            return True
        if list in types:
            lists.extend(item for item in items if type(item) is list)
    return False


def _shown_number(value: Any) -> str:
    """A JSON value for an error message, NaN and infinities written as the client sent them."""
    return json.dumps(value) if type(value) is float else shown(value)


def _tensor_from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str, err: MakeError) -> np.ndarray:
    if not isinstance(data, list):
        raise err(f"{where}: 'data' must be a list, got {type_name(data)}")
    count = math.prod(shape)
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        flat = _flatten_strings(data, where, err)
        if len(flat) != count:
            raise err(f"{where}: 'data' has {len(flat)} elements but shape {list(shape)} needs {count}")
        out = np.empty(count, dtype=object)
        out[:] = flat
        return out.reshape(shape)
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise err(f"{where}: 'data' must be a flat or regularly nested list of {datatype} values") from None
    if arr.size != count:
        raise err(f"{where}: 'data' has {arr.size} elements but shape {list(shape)} needs {count}")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    kind = arr.dtype.kind
    if datatype != "BOOL" and kind in "iuf" and _holds_bool(data, arr):
        # As Triton: true/false are BOOL values, not the numbers 1 and 0.
        raise err(f"{where}: {datatype} data must be numbers, not true/false")
    if datatype == "BOOL":
        if kind != "b":
            raise err(f"{where}: BOOL data must be true/false values")
    elif datatype == "BF16":
        arr = _bf16_from_json(arr, where, err)
    elif dtype.kind in "iu":
        if kind not in "iu":
            # numpy makes float64 of small ints mixed with ints above INT64 max: recheck exactly.
            arr = np.array(data, dtype=object)
            for value in arr.flat:
                if type(value) is not int:
                    raise err(f"{where}: {datatype} data must be integers, got {_shown_number(value)}")
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise err(f"{where}: a value is out of range for {datatype}")
    else:
        if kind not in "iuf":
            raise err(f"{where}: {datatype} data must be numbers")
        try:
            with np.errstate(over="raise"):
                arr = arr.astype(dtype)
        except FloatingPointError:
            raise err(f"{where}: a value is out of range for {datatype}") from None
    return arr.astype(dtype, copy=False).reshape(shape)


def _bf16_from_json(arr: np.ndarray, where: str, err: MakeError) -> np.ndarray:
    """JSON numbers as bfloat16 bits: read as float32 (as FP32 data is), then rounded to the
    nearest bfloat16, ties to even (as torch rounds). NaN and infinities are taken as they are;
    a finite value too large for bfloat16 is refused, as one too large for FP16 or FP32 is."""
    if arr.dtype.kind not in "iuf":
        raise err(f"{where}: BF16 data must be numbers")
    try:
        with np.errstate(over="raise"):
            values = arr.astype(np.float32)
    except FloatingPointError:
        raise err(f"{where}: a value is out of range for BF16") from None
    bits = bf16_bits(values)
    infinite = (bits & 0x7FFF) == 0x7F80
    if infinite.any() and not np.isinf(values[infinite]).all():
        raise err(f"{where}: a value is out of range for BF16")
    return bits


def _json_values(tensor: Tensor) -> Any:
    if tensor.datatype == "BYTES":
        try:
            return [item if isinstance(item, str) else bytes(item).decode("utf-8") for item in tensor.data.ravel()]
        except UnicodeDecodeError:
            raise BadRequest(f"output '{tensor.name}' holds non-UTF-8 bytes; ask for binary_data=true") from None
    # orjson serializes contiguous native numpy arrays directly (OPT_SERIALIZE_NUMPY).
    if tensor.datatype == "BF16":
        # Each value exactly, for a reader of doubles too (float32's shortest form is not).
        with np.errstate(invalid="ignore"):  # signalling NaNs stay NaNs
            values = bf16_values(tensor.data).astype(np.float64).reshape(-1)
    else:
        values = np.ascontiguousarray(tensor.data, dtype=V2_TO_NUMPY[tensor.datatype]).reshape(-1)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        # orjson writes NaN and infinities as null; Triton writes NaN, Infinity and -Infinity,
        # which its clients (tritonclient reads with rapidjson) read back as such.
        return orjson.Fragment(json.dumps(values.tolist(), separators=(",", ":")).encode())
    return values


MAX_MODEL_NAME_BYTES = 255  # a model is a folder of the repository: a file name's limit


def model_and_version(model: str, version: str) -> tuple[str, str]:
    """A request path's model name and version ("": none named), checked. A version is a decimal
    number (Triton's are 64-bit), returned in its canonical form: Triton reads "01" as "1", so
    the gateway does too, with one batcher, cache key and metrics series per version."""
    if len(model.encode()) > MAX_MODEL_NAME_BYTES:
        raise BadRequest(f"model name is longer than {MAX_MODEL_NAME_BYTES} bytes, the longest a repository folder can be")
    if not version:
        return model, ""
    number = canonical_version(version)
    if number is None:
        raise BadRequest(f"model version must be a positive integer (64-bit), got {shown(version)}")
    return model, number


def canonical_version(text: str) -> str | None:
    """A version number as Triton reads it (64-bit; "01" is "1"), or None if ``text`` is none."""
    digits = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(digits) > 19 or int(digits) > _INT64_MAX:
        return None
    return digits


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Parse the ``Inference-Header-Content-Length`` header; None when it is absent."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise BadRequest(f"{HEADER_LENGTH} header must be a non-negative integer, got {shown(value)}")
    length = int(text)
    if length > body_length:
        raise BadRequest(f"{HEADER_LENGTH} header ({length}) exceeds the body length ({body_length})")
    return length


def _split_body(body: bytes, header_length: int | None, err: MakeError) -> tuple[memoryview, memoryview]:
    view = memoryview(body)
    if header_length is None:
        return view, view[:0]
    if not 0 <= header_length <= len(view):
        raise err(f"JSON header length {header_length} does not fit the {len(view)}-byte body")
    return view[:header_length], view[header_length:]


_NON_FINITE = re.compile(r"NaN|Infinity")
_I64_MIN = -(2**63)


def _int_as_orjson(text: str) -> int | float:
    """An integer as orjson reads it: a float beyond what 64 bits hold."""
    value = int(text)
    return value if _I64_MIN <= value <= _U64_MAX else float(value)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: refused by orjson (and Triton), not read as Infinity
        raise ValueError("number is infinity when parsed as double")
    return value


def _load_non_finite(data: memoryview, refused: orjson.JSONDecodeError) -> Any:
    """The JSON document orjson refused for its first ``NaN``, ``Infinity`` or ``-Infinity``,
    read by Python's parser, which takes them (as Triton does, and as tritonclient and Python's
    json.dumps write them); None if that is not why it was refused, or Python's parser refuses
    it too (a document holding them is never null). Nothing else that orjson refuses is taken:
    not invalid UTF-8, a byte order mark, numbers that overflow a double, lone surrogates."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return None
    at = refused.pos  # a character index; after the sign of -Infinity
    if _NON_FINITE.search(text, max(at - 1, 0), at + 9) is None:
        return None
    try:
        doc = json.loads(text, parse_float=_finite_float, parse_int=_int_as_orjson)
        orjson.dumps(doc)  # what orjson cannot hold: strings with lone surrogates ("\ud800"), ...
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    return doc


def _load_object(data: memoryview, err: MakeError) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson is strict JSON; NaN and infinities are read on this (slower) path only.
        doc = _load_non_finite(data, exc)
        if doc is None:
            raise err(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise err(f"the JSON body must be an object, got {type_name(doc)}")
    return doc


def _parameters(obj: dict[str, Any], where: str, err: MakeError) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise err(f"{where}: 'parameters' must be an object")
    if "shared_memory_region" in params:
        raise err(f"{where}: shared memory is not supported by this server")
    return dict(params)


_U64_MAX = 2**64 - 1
_U32_MAX = 2**32 - 1
# Triton's own request parameters and what it accepts for each; any other is the model's, passed
# on. Not "timeout": the gateway consumes it as the request's deadline (deadlines.py checks it).
_UNSIGNED, _BOOLEAN = "an unsigned integer", "true or false"
_KNOWN_PARAMETERS = {
    "priority": _UNSIGNED,
    "sequence_id": "an unsigned integer or a string",
    "sequence_start": _BOOLEAN,
    "sequence_end": _BOOLEAN,
    "binary_data_output": _BOOLEAN,
}


def _parameter_fits(name: str, value: Any) -> bool:
    unsigned = type(value) is int and 0 <= value <= _U64_MAX
    rule = _KNOWN_PARAMETERS.get(name)
    if rule is _UNSIGNED:
        return unsigned
    if rule is _BOOLEAN:
        return type(value) is bool
    if rule is not None:  # sequence_id
        return unsigned or type(value) is str
    return type(value) in (str, int, bool) or (type(value) is float and math.isfinite(value))


def check_request_parameters(params: dict[Any, Any]) -> dict[str, Any]:
    """The request-level ``parameters``, checked as Triton would read them (it answers a bad
    ``priority`` or sequence parameter with a 500, which would count against a healthy
    instance): a 400 naming the parameter instead."""
    for name, value in params.items():
        if type(name) is not str:
            raise BadRequest(f"request parameter names must be strings, got {shown(name)}")
        if not _parameter_fits(name, value):
            what = _KNOWN_PARAMETERS.get(name, "a string, an integer, a finite number or a boolean")
            raise BadRequest(f"request parameter '{name}' must be {what}, got {shown(value)}")
    return params


def _decode_tensors(raw: Any, binary: memoryview, kind: str, err: MakeError) -> list[Tensor]:
    if not isinstance(raw, list):
        raise err(f"'{kind}s' must be a list of tensors")
    tensors: list[Tensor] = []
    seen: set[str] = set()
    offset, available = 0, len(binary)
    for index, obj in enumerate(raw):
        name, datatype, shape = parse_tensor_spec(obj, kind, index, err)
        where = f"{kind} '{name}'"
        if name in seen:
            raise err(f"duplicate {where}")
        seen.add(name)
        size = _parameters(obj, where, err).get("binary_data_size")
        if size is not None:
            if "data" in obj:
                raise err(f"{where} has both 'data' and parameters.binary_data_size")
            if type(size) is not int or size < 0:
                raise err(f"{where}: binary_data_size must be a non-negative integer, got {shown(size)}")
            if offset + size > available:
                left = available - offset
                raise err(f"{where}: binary_data_size {size} runs past the end of the body ({left} bytes left)")
            array = tensor_from_buffer(binary[offset : offset + size], datatype, shape, where, err)
            offset += size
        elif "data" in obj:
            array = _tensor_from_json(obj["data"], datatype, shape, where, err)
        else:
            raise err(f"{where} has neither 'data' nor parameters.binary_data_size")
        tensors.append(Tensor(name, datatype, array))
    if offset != available:
        raise err(f"binary_data_size values add up to {offset} bytes but {available} follow the JSON header")
    return tensors


def class_count(value: Any, output: str) -> int:
    """The ``classification`` parameter of a requested output, checked as Triton reads it: an
    unsigned integer (Triton answers anything else with a 500), kept in 32 bits (a larger one
    would wrap around there, 2**32 to 0: the values, not classes)."""
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise BadRequest(
            f"requested output '{output}': classification must be an unsigned 32-bit integer (the number "
            f"of top classes to return; 0 for the values), got {shown(value)}"
        )
    return value


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, obj in enumerate(raw):
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            raise BadRequest(f"requested output #{index} must be an object with a non-empty 'name'")
        name = obj["name"]
        if name in seen:
            raise BadRequest(f"duplicate requested output '{name}'")
        seen.add(name)
        params = _parameters(obj, f"requested output '{name}'", BadRequest)
        binary = params.pop("binary_data", None)
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"requested output '{name}': binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary, params, class_count(params.pop("classification", 0), name)))
    return outputs or None  # an empty list asks for every output, like no list


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a request's JSON header says when every input is numeric binary data and the header
    carries no request parameters and no id but an empty one: clients such as perf_analyzer
    (``"id":""``) and tritonclient (no id) then send the same header bytes again and again, so it
    is validated once and remembered. (An id that changes from request to request would only
    fill the memo with headers never seen again.)"""

    inputs: tuple[tuple[str, str, np.dtype, int, tuple[int, ...]], ...]  # name, datatype, dtype, count, shape
    binary_size: int  # the bytes that must follow the header
    outputs: tuple[RequestedOutput, ...] | None  # shared by every request decoded with it: read-only
    binary_output: bool
    id: str | None  # None or ""

    @classmethod
    def of(cls, doc: dict[str, Any], request: InferRequest) -> _Layout | None:
        """The layout of a request just decoded from ``doc`` in full, if it has one."""
        if request.id or request.parameters or any("data" in obj for obj in doc["inputs"]):
            return None
        inputs = []
        for tensor in request.inputs:
            if tensor.datatype in ("BYTES", "BOOL"):  # their bytes need checking each time
                return None
            inputs.append((tensor.name, tensor.datatype, tensor.data.dtype, tensor.data.size, tensor.data.shape))
        size = sum(t.data.nbytes for t in request.inputs)
        outputs = None if request.outputs is None else tuple(request.outputs)
        return cls(tuple(inputs), size, outputs, request.binary_output, request.id)

    def request(self, body: bytes, offset: int, model: str, version: str) -> InferRequest:
        inputs = []
        for name, datatype, dtype, count, shape in self.inputs:
            inputs.append(Tensor(name, datatype, np.frombuffer(body, dtype, count, offset).reshape(shape)))
            offset += count * dtype.itemsize
        outputs = None if self.outputs is None else list(self.outputs)
        return InferRequest(model, version, inputs, outputs, self.id, {}, self.binary_output)


# Layouts by their header's bytes; headers up to this long, this many at most (oldest dropped).
_LAYOUTS: dict[bytes, _Layout] = {}
MAX_LAYOUT_HEADER = 2048
MAX_LAYOUTS = 512


def decode_request(body: bytes, header_length: int | None, model: str, version: str) -> InferRequest:
    """Decode a v2 infer request body (JSON, optionally followed by binary tensor data)."""
    remember = (
        header_length is not None
        and 0 < header_length <= MAX_LAYOUT_HEADER
        and header_length <= len(body)
        and type(body) is bytes  # a slice of it is the memo's (hashable) key
    )
    if remember:
        key = body[:header_length]
        layout = _LAYOUTS.get(key)
        if layout is not None and len(body) - header_length == layout.binary_size:
            return layout.request(body, header_length, model, version)
    request, doc = _decode_in_full(body, header_length)
    if remember and (layout := _Layout.of(doc, request)) is not None:
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            del _LAYOUTS[next(iter(_LAYOUTS))]
        _LAYOUTS[key] = layout
    request.model, request.version = model, version
    return request


def _json_object_length(body: bytes) -> int | None:
    """The length of the JSON object a body starts with, when more bytes follow it (binary
    tensor data sent without its header length); else None. Only for a body already refused."""
    try:
        doc, end = json.JSONDecoder().raw_decode(bytes(body).decode("latin-1"))  # one char per byte
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack allows
        return None
    return end if isinstance(doc, dict) and end < len(body) else None


def _decode_in_full(body: bytes, header_length: int | None) -> tuple[InferRequest, dict[str, Any]]:
    """The request (model and version left to the caller) and its JSON header as parsed."""
    header, binary = _split_body(body, header_length, BadRequest)
    try:
        doc = _load_object(header, BadRequest)
    except BadRequest as exc:
        json_length = _json_object_length(body) if header_length is None else None
        if json_length is not None:
            raise BadRequest(
                f"{exc.message}; the body holds a JSON object of {json_length} bytes and then {len(body) - json_length} "
                f"more: binary tensor data after the JSON needs the {HEADER_LENGTH} header ({json_length})"
            ) from None
        raise
    if "inputs" not in doc:
        raise BadRequest("the request has no 'inputs'")
    inputs = _decode_tensors(doc["inputs"], binary, "input", BadRequest)
    outputs = _requested_outputs(doc.get("outputs"))
    params = check_request_parameters(_parameters(doc, "request", BadRequest))
    binary_output = params.pop("binary_data_output", False)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("request 'id' must be a string")
    return InferRequest("", "", inputs, outputs, request_id, params, binary_output), doc


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """Encode an answer as Triton would: the body, and the length of its JSON header when binary
    tensor data follows it (the ``Inference-Header-Content-Length`` header; the content type is
    then ``BINARY_CONTENT_TYPE``), else None (plain JSON)."""
    header: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if request.id is not None:
        header["id"] = request.id
    if response.parameters:
        header["parameters"] = response.parameters
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for tensor, binary in select_outputs(response, request):
        # orjson writes the shape tuple as a JSON array.
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.data.shape}
        if binary:
            blob = tensor_to_buffer(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(tensor)
        outputs.append(entry)
    header["outputs"] = outputs
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# ------------------------------------------------------------------ the gateway's side, facing Triton


def encode_upstream_request(
    inputs: list[Tensor],
    outputs: list[RequestedOutput] | None,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int]:
    """A binary-inputs, binary-outputs request body for Triton, and its JSON header length.
    ``outputs``: the outputs to ask for, each with its classification (None: every output)."""
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    specs: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for tensor in inputs:
        blob = tensor_to_buffer(tensor)
        spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        specs.append({**spec, "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    doc["inputs"] = specs
    params = dict(parameters or {})
    if outputs:
        doc["outputs"] = [_upstream_output(out) for out in outputs]
    else:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    head = orjson.dumps(doc)
    return b"".join([head, *blobs]), len(head)


def _upstream_output(out: RequestedOutput) -> dict[str, Any]:
    if out.class_count:
        return {"name": out.name, "parameters": {"binary_data": True, "classification": out.class_count}}
    return {"name": out.name, "parameters": {"binary_data": True}}


def decode_upstream_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], list[Tensor]]:
    """Triton's answer: (its model_name/model_version/id/parameters, outputs); UpstreamError if malformed."""
    header, binary = _split_body(body, header_length, _upstream_error)
    doc = _load_object(header, _upstream_error)
    tensors = _decode_tensors(doc.get("outputs"), binary, "output", _upstream_error)
    meta = {key: doc[key] for key in ("model_name", "model_version", "id", "parameters") if key in doc}
    return meta, tensors
