"""The KServe v2 codec against the real tritonclient encoder/decoder, and its validation."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as httpclient

from gateway.errors import BadRequest, UpstreamError
from gateway.protocol import v2
from gateway.tensors import V2_TO_NUMPY, InferRequest, InferResponse, RequestedOutput, Tensor


def _ints(dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, 7, info.max - 1]], dtype=dtype)


# Every datatype, shape (2, 3), with extreme values; BYTES is UTF-8 so it can also travel as JSON.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": _ints("<u1"),
    "UINT16": _ints("<u2"),
    "UINT32": _ints("<u4"),
    "UINT64": _ints("<u8"),
    "INT8": _ints("<i1"),
    "INT16": _ints("<i2"),
    "INT32": _ints("<i4"),
    "INT64": _ints("<i8"),
    "FP16": np.array([[0.5, -1.25, 65504.0], [1e-3, 0.0, -0.1]], dtype="<f2"),
    "FP32": np.array([[0.1, -3.4e38, 1e-30], [2.5, 0.0, 7.0]], dtype="<f4"),
    "FP64": np.array([[0.1, -1.7e308, 5e-324], [2.5, 0.0, 1 / 3]], dtype="<f8"),
    "BYTES": np.array([[b"", b"abc", "h\u00e9llo \u2603".encode()], [b"x" * 300, b"0", b" "]], dtype=object),
}
ALL_TYPES = list(SAMPLES)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
        assert all(type(x) is bytes for x in actual.ravel())
    else:
        np.testing.assert_array_equal(actual, expected)


def triton_body(arrays: dict[str, np.ndarray], binary: bool, outputs=None, request_id: str = ""):
    inputs = []
    for name, array in arrays.items():
        item = httpclient.InferInput(name, list(array.shape), _v2_type(array))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    return httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)


def _v2_type(array: np.ndarray) -> str:
    return next(name for name, dt in V2_TO_NUMPY.items() if dt == array.dtype)


def json_body(doc: dict) -> bytes:
    return orjson.dumps(doc)


def decode(body: bytes, header_length: int | None = None) -> InferRequest:
    return v2.decode_request(body, header_length, "m", "1")


# ------------------------------------------------------------------ requests from tritonclient


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_tritonclient_request_decodes(datatype: str, binary: bool) -> None:
    outputs = [httpclient.InferRequestedOutput("OUT_B", binary_data=True), httpclient.InferRequestedOutput("OUT_J", binary_data=False)]
    body, json_size = triton_body({"IN": SAMPLES[datatype]}, binary, outputs, request_id="req-7")
    assert (json_size is not None) == binary
    request = decode(body, json_size)
    assert request.model == "m" and request.version == "1" and request.id == "req-7"
    assert [t.name for t in request.inputs] == ["IN"]
    assert request.inputs[0].datatype == datatype
    assert_same(request.inputs[0].data, SAMPLES[datatype])
    assert request.outputs == [RequestedOutput("OUT_B", True, {}), RequestedOutput("OUT_J", False, {})]
    assert request.binary_output is False
    assert request.parameters == {}


def test_tritonclient_mixed_inputs_and_defaults() -> None:
    arrays = {"A": SAMPLES["FP32"], "B": SAMPLES["BYTES"], "C": SAMPLES["INT8"]}
    inputs = []
    for (name, array), binary in zip(arrays.items(), [True, False, True]):
        item = httpclient.InferInput(name, list(array.shape), _v2_type(array))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, priority=3, timeout=100, parameters={"custom": "x"}
    )
    request = decode(body, json_size)
    for tensor, (name, array) in zip(request.inputs, arrays.items()):
        assert tensor.name == name
        assert_same(tensor.data, array)
    assert request.outputs is None
    assert request.binary_output is True  # tritonclient sets binary_data_output without outputs
    assert request.parameters == {"priority": 3, "timeout": 100, "custom": "x"}
    assert request.id is None


def test_binary_input_is_zero_copy_view() -> None:
    body, json_size = triton_body({"IN": SAMPLES["FP32"]}, True)
    data = decode(body, json_size).inputs[0].data
    assert not data.flags.owndata and not data.flags.writeable


def test_nested_json_data_and_scalars() -> None:
    doc = {
        "inputs": [
            {"name": "nested", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
            {"name": "flat_float", "datatype": "FP32", "shape": [3], "data": [1, 2.5, -3]},
            {"name": "scalar", "datatype": "FP64", "shape": [], "data": [4.5]},
            {"name": "empty", "datatype": "UINT8", "shape": [0, 3], "data": []},
            {"name": "strings", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["\u00e9"]]},
        ],
        "outputs": [{"name": "y", "parameters": {"classification": 2}}],
        "parameters": {"binary_data_output": True},
    }
    request = decode(json_body(doc))
    nested, flat_float, scalar, empty, strings = (t.data for t in request.inputs)
    assert_same(nested, np.array([[1, 2], [3, 4]], dtype="<i4"))
    assert_same(flat_float, np.array([1, 2.5, -3], dtype="<f4"))
    assert_same(scalar, np.array(4.5))
    assert_same(empty, np.empty((0, 3), dtype="<u1"))
    assert_same(strings, np.array([[b"a"], ["\u00e9".encode()]], dtype=object))
    assert request.outputs == [RequestedOutput("y", None, {}, class_count=2)]
    assert request.binary_output is True and request.parameters == {}


def test_classification_is_read_from_tritonclient_and_checked() -> None:
    outputs = [
        httpclient.InferRequestedOutput("top", binary_data=True, class_count=3),
        httpclient.InferRequestedOutput("plain", binary_data=False, class_count=0),
    ]
    request = decode(*triton_body({"x": SAMPLES["FP32"]}, True, outputs))
    assert request.outputs == [RequestedOutput("top", True, {}, class_count=3), RequestedOutput("plain", False, {}, class_count=0)]


@pytest.mark.parametrize("value", [-1, -(2**63), 2**32, 2**64 - 1, 2.5, "2", True, None, [2]])
def test_a_classification_that_is_no_unsigned_integer_is_400(value: object) -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "outputs": [{"name": "y", "parameters": {"classification": value}}],
    }
    with pytest.raises(BadRequest, match="requested output 'y': classification must be an unsigned 32-bit integer"):
        decode(json_body(doc))


def test_binary_bytes_with_non_utf8_and_empty_tensors() -> None:
    raw = np.array([b"\x00\xff\xfe", b""], dtype=object)
    body, json_size = triton_body({"B": raw, "E": np.empty((0,), dtype="<f4")}, True)
    request = decode(body, json_size)
    assert_same(request.inputs[0].data, raw)
    assert_same(request.inputs[1].data, np.empty((0,), dtype="<f4"))


# ------------------------------------------------------------------ responses for tritonclient


def response_for(arrays: dict[str, np.ndarray]) -> InferResponse:
    return InferResponse("m", "3", [Tensor(n, _v2_type(a), a) for n, a in arrays.items()])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_response_parses_with_tritonclient(datatype: str, binary: bool) -> None:
    response = response_for({"OUT": SAMPLES[datatype], "OTHER": SAMPLES["INT32"]})
    request = InferRequest("m", "", [], [RequestedOutput("OUT", binary)], id="abc")
    body, header_length = v2.encode_response(response, request)
    assert (header_length is not None) == binary
    result = httpclient.InferResult.from_response_body(body, verbose=False, header_length=header_length)
    got = result.as_numpy("OUT")
    expected = SAMPLES[datatype]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if datatype == "BYTES" and not binary:
        expected = np.vectorize(bytes.decode, otypes=[object])(expected)  # JSON carries strings
    assert got.tolist() == expected.tolist()
    doc = result.get_response()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "3", "abc")
    assert [o["name"] for o in doc["outputs"]] == ["OUT"]  # only what was requested


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_nan_and_infinities_in_json_outputs_are_written_as_triton_writes_them(datatype: str) -> None:
    values = np.array([[np.nan, np.inf, -np.inf, 1.5]], V2_TO_NUMPY[datatype])
    request = InferRequest("m", "", [], [RequestedOutput("y", False)])
    body, header_length = v2.encode_response(InferResponse("m", "1", [Tensor("y", datatype, values)]), request)
    assert b'"data":[NaN,Infinity,-Infinity,1.5]' in body  # not null, which orjson would write
    got = httpclient.InferResult.from_response_body(body, verbose=False, header_length=header_length).as_numpy("y")
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got, values)  # NaN where NaN, each infinity with its sign


def test_response_defaults_order_and_mixed_binary() -> None:
    arrays = {"A": SAMPLES["FP16"], "B": SAMPLES["BYTES"], "C": SAMPLES["BOOL"]}
    response = response_for(arrays)
    response.parameters = {"sequence_id": 5}
    # No outputs requested: every output, response order, request default = binary.
    body, header_length = v2.encode_response(response, InferRequest("m", "", [], None, binary_output=True))
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    doc = result.get_response()
    assert "id" not in doc and doc["parameters"] == {"sequence_id": 5}
    assert [o["name"] for o in doc["outputs"]] == ["A", "B", "C"]
    for name, array in arrays.items():
        assert result.as_numpy(name).tolist() == array.tolist()
    # Requested order wins; per-output flags override the request default.
    request = InferRequest("m", "", [], [RequestedOutput("C", None), RequestedOutput("A", False)], binary_output=True)
    body, header_length = v2.encode_response(response, request)
    doc = orjson.loads(body[:header_length])
    assert [o["name"] for o in doc["outputs"]] == ["C", "A"]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 6} and "data" not in doc["outputs"][0]
    assert "parameters" not in doc["outputs"][1]
    assert body[header_length:] == SAMPLES["BOOL"].tobytes()


def test_response_errors() -> None:
    response = response_for({"OUT": np.array([b"\xff"], dtype=object)})
    with pytest.raises(BadRequest, match="requested output 'nope'"):
        v2.encode_response(response, InferRequest("m", "", [], [RequestedOutput("nope")]))
    with pytest.raises(BadRequest, match="output 'OUT'.*UTF-8"):
        v2.encode_response(response, InferRequest("m", "", [], None))


def test_error_body() -> None:
    assert orjson.loads(v2.error_body('bad "thing"')) == {"error": 'bad "thing"'}


# ------------------------------------------------------------------ gateway <-> Triton


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_upstream_roundtrip(datatype: str) -> None:
    tensor = Tensor("X", datatype, SAMPLES[datatype])
    outputs = [RequestedOutput("Y"), RequestedOutput("Z", False, class_count=3)]
    body, json_size = v2.encode_upstream_request([tensor], outputs, request_id="r1", parameters={"priority": 1})
    head = orjson.loads(body[:json_size])
    assert head["id"] == "r1" and head["parameters"] == {"priority": 1}
    # Every output comes back binary; a classification travels with its output.
    assert head["outputs"] == [
        {"name": "Y", "parameters": {"binary_data": True}},
        {"name": "Z", "parameters": {"binary_data": True, "classification": 3}},
    ]
    assert head["inputs"][0]["parameters"]["binary_data_size"] == len(body) - json_size
    # Triton would parse it as our own server side does.
    assert_same(decode(body, json_size).inputs[0].data, SAMPLES[datatype])
    # A binary answer as Triton sends it, decoded back.
    answer, header_length = v2.encode_response(InferResponse("m", "1", [tensor], id="r1"), InferRequest("m", "", [], None, id="r1", binary_output=True))
    meta, tensors = v2.decode_upstream_response(answer, header_length)
    assert meta == {"model_name": "m", "model_version": "1", "id": "r1"}
    assert_same(tensors[0].data, SAMPLES[datatype])


def test_upstream_without_outputs_and_json_answers() -> None:
    body, json_size = v2.encode_upstream_request([Tensor("X", "FP32", SAMPLES["FP32"])], None)
    head = orjson.loads(body[:json_size])
    assert "outputs" not in head and "id" not in head
    assert head["parameters"] == {"binary_data_output": True}
    answer = json_body({"model_name": "m", "model_version": "2", "parameters": {"k": 1}, "outputs": [
        {"name": "Y", "datatype": "INT64", "shape": [2], "data": [1, 2]}]})
    meta, tensors = v2.decode_upstream_response(answer, None)
    assert meta == {"model_name": "m", "model_version": "2", "parameters": {"k": 1}}
    assert_same(tensors[0].data, np.array([1, 2], dtype="<i8"))


def test_upstream_malformed_is_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="malformed response from upstream: malformed JSON"):
        v2.decode_upstream_response(b"<html>", None)
    bad = json_body({"outputs": [{"name": "Y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(UpstreamError, match="output 'Y'.*runs past the end"):
        v2.decode_upstream_response(bad + b"\0" * 4, len(bad))


# ------------------------------------------------------------------ header length


def test_parse_header_length() -> None:
    assert v2.parse_header_length(None, 10) is None
    assert v2.parse_header_length(" 7 ", 10) == 7
    assert v2.parse_header_length("10", 10) == 10
    for bad in ["-1", "abc", "1.5", "+3", "1_0", "", "\u0663"]:
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length header must be"):
            v2.parse_header_length(bad, 10)
    with pytest.raises(BadRequest, match="exceeds the body length"):
        v2.parse_header_length("11", 10)


# ------------------------------------------------------------------ malformed requests


def _input(**fields) -> dict:
    return {"name": "x", "datatype": "FP32", "shape": [2], **fields}


def _binary_request(inputs: list[dict], payload: bytes) -> tuple[bytes, int]:
    head = json_body({"inputs": inputs})
    return head + payload, len(head)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"priority": "high"}, "'priority' must be an unsigned integer, got \"high\""),
        ({"priority": -1}, "'priority' must be an unsigned integer, got -1"),
        ({"priority": True}, "'priority' must be an unsigned integer, got true"),
        ({"sequence_id": -1}, "'sequence_id' must be an unsigned integer or a string, got -1"),
        ({"sequence_id": 1.5}, "'sequence_id' must be an unsigned integer or a string"),
        ({"sequence_start": "x"}, "'sequence_start' must be true or false, got \"x\""),
        ({"sequence_end": 1}, "'sequence_end' must be true or false, got 1"),
        ({"custom": None}, "'custom' must be a string, an integer, a finite number or a boolean, got null"),
        ({"custom": [1]}, "'custom' must be a string"),
        ({"custom": {"a": 1}}, "'custom' must be a string"),
    ],
)
def test_request_parameters_triton_would_refuse_are_a_400_naming_them(parameters: dict, message: str) -> None:
    """Triton answers a bad priority or sequence parameter with a 500, which the gateway would
    take for the instance's fault (a retry elsewhere, an ejection)."""
    with pytest.raises(BadRequest, match=f"request parameter {message}") as info:
        decode(json_body({"inputs": [_input(data=[1, 2])], "parameters": parameters}))
    assert info.value.status == 400


def test_binary_data_without_its_header_length_is_a_400_that_says_so() -> None:
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}'
    body = header + np.array([1.5, 2.5], np.float32).tobytes()
    with pytest.raises(BadRequest, match=f"a JSON object of {len(header)} bytes and then 8 more: binary tensor data after "
                       f"the JSON needs the Inference-Header-Content-Length header \\({len(header)}\\)"):
        v2.decode_request(body, None, "m", "1")
    assert v2.decode_request(body, len(header), "m", "1").inputs[0].data.tolist() == [1.5, 2.5]
    with pytest.raises(BadRequest) as info:
        v2.decode_request(b'{"inputs": [', None, "m", "1")  # plain malformed JSON: no such hint
    assert "Inference-Header-Content-Length" not in info.value.message


def test_request_parameters_triton_accepts_pass() -> None:
    parameters = {"priority": 3, "sequence_id": "abc", "sequence_start": True, "sequence_end": False, "custom": 1.5, "n": -7, "s": "x"}
    request = decode(json_body({"inputs": [_input(data=[1, 2])], "parameters": parameters}))
    assert request.parameters == parameters
    assert decode(json_body({"inputs": [_input(data=[1, 2])], "parameters": {"sequence_id": 2**64 - 1}})).parameters == {"sequence_id": 2**64 - 1}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "must be an object, got array"),
        (json_body({}), "no 'inputs'"),
        (json_body({"inputs": {"x": 1}}), "'inputs' must be a list"),
        (json_body({"inputs": [5]}), "input #0 must be an object"),
        (json_body({"inputs": [_input(name="")]}), "input #0: 'name' must be a non-empty string"),
        (json_body({"inputs": [_input(datatype="FP8", data=[1, 2])]}), "input 'x': unknown datatype \"FP8\""),
        (json_body({"inputs": [_input(datatype=["FP32"], data=[1, 2])]}), "input 'x': unknown datatype"),
        (json_body({"inputs": [_input(shape=[-1], data=[])]}), "input 'x': shape must be a list of non-negative"),
        (json_body({"inputs": [_input(shape=[2.0], data=[1, 2])]}), "input 'x': shape must be"),
        (json_body({"inputs": [_input(shape=[True], data=[1])]}), "input 'x': shape must be"),
        (json_body({"inputs": [_input(shape="2", data=[1, 2])]}), "input 'x': shape must be"),
        (json_body({"inputs": [_input(shape=[1] * 33, data=[1])]}), "input 'x': shape has 33 dimensions, more than the 32 a tensor may have"),
        (json_body({"inputs": [_input(data=[1, 2, 3])]}), "input 'x': 'data' has 3 elements but shape \\[2\\] needs 2"),
        (json_body({"inputs": [_input(data=[[1, 2], [3]])]}), "input 'x': 'data' must be a flat or regularly nested"),
        (json_body({"inputs": [_input(data=["1", "2"])]}), "input 'x': FP32 data must be numbers"),
        (json_body({"inputs": [_input(data=[1, None])]}), "input 'x': FP32 data must be numbers"),
        (json_body({"inputs": [_input(data=[1e300, 1])]}), "input 'x': a value is out of range for FP32"),
        (json_body({"inputs": [_input(data=3)]}), "input 'x': 'data' must be a list"),
        (json_body({"inputs": [_input(datatype="UINT8", data=[1, 256])]}), "input 'x': a value is out of range for UINT8"),
        (json_body({"inputs": [_input(datatype="INT8", data=[-129, 0])]}), "out of range for INT8"),
        (json_body({"inputs": [_input(datatype="INT32", data=[1.5, 2])]}), "input 'x': INT32 data must be integers"),
        (json_body({"inputs": [_input(datatype="BOOL", data=[1, 0])]}), "input 'x': BOOL data must be true/false"),
        (json_body({"inputs": [_input(datatype="BYTES", data=["a", 1])]}), "input 'x': BYTES data elements must be strings"),
        (json_body({"inputs": [_input(datatype="BYTES", data=[["a"]])]}), "input 'x': 'data' has 1 elements"),
        (json_body({"inputs": [_input(data=[1, 2]), _input(data=[3, 4])]}), "duplicate input 'x'"),
        (json_body({"inputs": [_input()]}), "input 'x' has neither 'data' nor parameters.binary_data_size"),
        (json_body({"inputs": [_input(data=[1, 2], parameters={"binary_data_size": 8})]}), "input 'x' has both"),
        (json_body({"inputs": [_input(parameters=[1])]}), "input 'x': 'parameters' must be an object"),
        (json_body({"inputs": [_input(parameters={"shared_memory_region": "r"})]}), "input 'x': shared memory is not supported"),
        (json_body({"inputs": [_input(parameters={"binary_data_size": -8})]}), "input 'x': binary_data_size must be a non-negative"),
        (json_body({"inputs": [_input(parameters={"binary_data_size": "8"})]}), "input 'x': binary_data_size must be"),
        (json_body({"inputs": [_input(data=[1, 2])], "outputs": {"y": 1}}), "'outputs' must be a list"),
        (json_body({"inputs": [_input(data=[1, 2])], "outputs": [{"nom": "y"}]}), "requested output #0 must be an object"),
        (json_body({"inputs": [_input(data=[1, 2])], "outputs": [{"name": "y"}, {"name": "y"}]}), "duplicate requested output 'y'"),
        (json_body({"inputs": [_input(data=[1, 2])], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}), "requested output 'y': binary_data must be true or false"),
        (json_body({"inputs": [_input(data=[1, 2])], "parameters": {"binary_data_output": "yes"}}), "parameter 'binary_data_output' must be true or false"),
        (json_body({"inputs": [_input(data=[1, 2])], "parameters": 3}), "request: 'parameters' must be an object"),
        (json_body({"inputs": [_input(data=[1, 2])], "id": 17}), "'id' must be a string"),
    ],
)
def test_malformed_json_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        decode(body)
    assert info.value.status == 400


def _bytes_payload(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


@pytest.mark.parametrize(
    ("inputs", "payload", "message"),
    [
        ([_input(parameters={"binary_data_size": 8})], b"\0" * 4, "input 'x': binary_data_size 8 runs past the end of the body \\(4 bytes left"),
        ([_input(parameters={"binary_data_size": 4})], b"\0" * 4, "input 'x': got 4 bytes of data, FP32 shape \\[2\\] needs 8"),
        ([_input(parameters={"binary_data_size": 8})], b"\0" * 12, "add up to 8 bytes but 12 follow the JSON header"),
        ([_input(data=[1, 2])], b"junk", "add up to 0 bytes but 4 follow the JSON header"),
        ([_input(datatype="BOOL", parameters={"binary_data_size": 2})], b"\x01\x02", "input 'x': BOOL data holds bytes other than 0 and 1"),
        ([_input(datatype="BYTES", parameters={"binary_data_size": 9})], _bytes_payload(b"a") + b"\x05\0\0\0", "input 'x': BYTES element 1 claims 5 bytes but only 0 remain"),
        ([_input(datatype="BYTES", parameters={"binary_data_size": 7})], _bytes_payload(b"a") + b"\x05\0", "input 'x': BYTES data ends before element 1"),
        ([_input(datatype="BYTES", parameters={"binary_data_size": 12})], _bytes_payload(b"a", b"b") + b"\0\0", "input 'x': 2 bytes of BYTES data left over"),
        ([_input(datatype="BYTES", parameters={"binary_data_size": 5})], _bytes_payload(b"a"), "input 'x': BYTES data ends before element 1 of 2"),
    ],
)
def test_malformed_binary_requests(inputs: list[dict], payload: bytes, message: str) -> None:
    body, header_length = _binary_request(inputs, payload)
    with pytest.raises(BadRequest, match=message):
        decode(body, header_length)


def test_binary_size_without_header_length() -> None:
    body = json_body({"inputs": [_input(parameters={"binary_data_size": 8})]})
    with pytest.raises(BadRequest, match="input 'x': binary_data_size 8 runs past the end"):
        decode(body)
    with pytest.raises(BadRequest, match="malformed JSON"):
        decode(body + b"\0" * 8)  # no header length: the whole body must be JSON


def test_deeply_nested_data() -> None:
    # Deeper than Python's recursion limit for BYTES; deeper than numpy's 32 dimensions for numbers.
    deep = "[" * 1000 + '"a"' + "]" * 1000
    body = ('{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": %s}]}' % deep).encode()
    assert_same(decode(body).inputs[0].data, np.array([b"a"], dtype=object))
    body = ('{"inputs": [{"name": "n", "datatype": "FP32", "shape": [1], "data": %s}]}' % deep.replace('"a"', "1")).encode()
    with pytest.raises(BadRequest, match="input 'n': 'data' must be a flat or regularly nested"):
        decode(body)


@pytest.mark.parametrize("depth", [1000, 1024, 5000])
def test_a_body_nested_deeper_than_the_parsers_go_is_a_400(depth: int) -> None:
    # Not an object, or deeper than orjson's limit: refused, and the look for a JSON object
    # followed by binary data (Python's own parser, whose recursion stops sooner) finds none.
    deep = ("[" * depth + "]" * depth).encode()
    with pytest.raises(BadRequest, match="malformed JSON|must be an object"):
        v2.decode_request(deep, None, "m", "")
    inside = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + deep + b"}]}"
    with pytest.raises(BadRequest):
        v2.decode_request(inside, None, "m", "")


def test_a_zero_element_tensor_with_enormous_dimensions_is_a_400() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**62, 2**62], "data": []}]})
    with pytest.raises(BadRequest, match="too large"):
        v2.decode_request(body, None, "m", "")


# ------------------------------------------------------------------ NaN and infinities in JSON data

NON_FINITE = np.array([np.nan, np.inf, -np.inf, 1.5])


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_nan_and_infinities_in_json_data_from_tritonclient_are_read_as_such(datatype: str) -> None:
    """tritonclient writes np.nan and np.inf (binary_data=False) with Python's json.dumps: NaN,
    Infinity, -Infinity, not strict JSON, which Triton takes."""
    array = NON_FINITE.astype(V2_TO_NUMPY[datatype]).reshape(2, 2)
    body, json_size = triton_body({"IN": array}, binary=False)
    assert json_size is None and b"NaN" in body and b"-Infinity" in body
    tensor = decode(body).inputs[0]
    assert tensor.data.dtype == V2_TO_NUMPY[datatype] and tensor.data.shape == (2, 2)
    np.testing.assert_array_equal(tensor.data, array)  # NaN where NaN was


def test_nan_and_infinities_are_read_with_the_rest_of_the_request() -> None:
    body = (
        b'{"id": "r\\u00e9", "inputs": [{"name": "x", "datatype": "FP16", "shape": [3], "data": [-Infinity, NaN, 2]},'
        b' {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\\ud83d\\ude00"]}],'
        b' "outputs": [{"name": "y", "parameters": {"binary_data": true}}], "parameters": {"priority": 2}}'
    )
    request = decode(body)
    np.testing.assert_array_equal(request.inputs[0].data, np.array([-np.inf, np.nan, 2], np.float16))
    assert request.inputs[1].data.tolist() == ["\U0001f600".encode()]
    assert request.id == "r\u00e9" and request.parameters == {"priority": 2}
    assert request.outputs == [RequestedOutput("y", True, {})]


def test_a_strict_json_body_is_read_by_orjson_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("Python's json parser used for a body orjson reads")

    monkeypatch.setattr(v2.json, "loads", refused)
    assert decode(json_body({"inputs": [_input(data=[1.5, 2])]})).inputs[0].data.tolist() == [1.5, 2]


@pytest.mark.parametrize(
    ("datatype", "message"),
    [("INT64", "INT64 data must be integers, got NaN"), ("UINT8", "UINT8 data must be integers, got NaN"),
     ("BOOL", "BOOL data must be true/false"), ("BYTES", "BYTES data elements must be strings")],
)  # fmt: skip
def test_nan_in_data_of_a_type_without_it_is_a_400_naming_the_input(datatype: str, message: str) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "%s", "shape": [2], "data": [1, NaN]}]}' % datatype.encode()
    with pytest.raises(BadRequest, match=f"input 'x': {message}") as info:
        decode(body)
    assert info.value.status == 400
    infinite = b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [-Infinity, 1]}]}'
    with pytest.raises(BadRequest, match="input 'x': INT32 data must be integers, got -Infinity"):
        decode(infinite)


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}]} trailing',
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, 1e400]}]}',  # overflows a double
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}], "id": "\\ud800"}',  # lone surrogate
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}], "id": "\xff"}',  # not UTF-8
        b'\xef\xbb\xbf{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}]}',  # a BOM
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [nan, inf]}]}',
    ],
    ids=["trailing", "overflow", "surrogate", "not-utf8", "bom", "lowercase"],
)
def test_a_body_with_nan_that_is_malformed_otherwise_keeps_orjsons_message(body: bytes) -> None:
    import orjson as strict

    with pytest.raises(strict.JSONDecodeError) as refused:
        strict.loads(body)
    with pytest.raises(BadRequest, match="malformed JSON") as info:
        decode(body)
    assert info.value.message.startswith(f"malformed JSON: {refused.value}")


def test_nan_in_a_request_parameter_is_still_a_400() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}], "parameters": {"p": NaN}}'
    with pytest.raises(BadRequest, match="request parameter 'p' must be"):
        decode(body)


# ------------------------------------------------------------------ booleans among numbers


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT64", [True, 2]),
        ("INT32", [2, False]),
        ("UINT8", [[False], [3]]),
        ("FP32", [True, 2]),
        ("FP32", [2.5, True]),
        ("FP64", [[0.5], [False]]),
        ("FP16", [1] * 199 + [True]),  # large enough to be looked at past the check for 0 and 1
        ("INT64", [True, False]),
        ("FP32", [True, False]),
    ],
)
def test_json_numbers_mixed_with_booleans_are_a_400_naming_the_input(datatype: str, data: list) -> None:
    """numpy reads true as 1; Triton refuses a boolean in a numeric tensor's data."""
    shape = [len(data)] if not isinstance(data[0], list) else [len(data), 1]
    with pytest.raises(BadRequest, match=f"input 'x': {datatype} data must be") as info:
        decode(json_body({"inputs": [_input(datatype=datatype, shape=shape, data=data)]}))
    assert info.value.status == 400


def test_bool_data_and_numbers_without_booleans_still_pass() -> None:
    assert decode(json_body({"inputs": [_input(datatype="BOOL", data=[True, False])]})).inputs[0].data.tolist() == [True, False]
    ones = decode(json_body({"inputs": [_input(datatype="FP32", shape=[300], data=[1, 0, 1.0] * 100)]})).inputs[0].data
    assert ones.dtype == np.float32 and ones.tolist() == [1, 0, 1] * 100
    assert decode(json_body({"inputs": [_input(datatype="INT64", data=[1, 0])]})).inputs[0].data.tolist() == [1, 0]


# ------------------------------------------------------------------ remembered header layouts


@pytest.fixture
def layouts(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """An empty layout memo; returns the list of bodies decoded in full (not from a layout)."""
    monkeypatch.setattr(v2, "_LAYOUTS", {})
    full: list[bytes] = []
    decode_in_full = v2._decode_in_full

    def counted(body: bytes, header_length: int | None):  # noqa: ANN202
        full.append(body)
        return decode_in_full(body, header_length)

    monkeypatch.setattr(v2, "_decode_in_full", counted)
    return full


def test_a_repeated_header_is_parsed_once_and_each_body_keeps_its_own_data(layouts: list[bytes]) -> None:
    outputs = [httpclient.InferRequestedOutput("OUT", binary_data=True)]
    first = SAMPLES["FP32"]
    bodies = [triton_body({"IN": first + k, "N": SAMPLES["INT64"] // (k + 1)}, True, outputs) for k in (1, 2, 3)]
    assert len({body[:size] for body, size in bodies}) == 1  # the same JSON header every time
    requests = [decode(body, size) for body, size in bodies]
    assert layouts == [bodies[0][0]]
    for k, request in zip((1, 2, 3), requests):
        assert [t.name for t in request.inputs] == ["IN", "N"]
        assert_same(request.inputs[0].data, first + k)
        assert_same(request.inputs[1].data, SAMPLES["INT64"] // (k + 1))
        assert request.outputs == [RequestedOutput("OUT", True, {})]
        assert (request.model, request.version, request.id, request.parameters) == ("m", "1", None, {})
    assert requests[1].outputs is not requests[2].outputs
    other = v2.decode_request(*bodies[1], "other", "")
    assert (other.model, other.version) == ("other", "")


def test_a_remembered_header_with_the_wrong_amount_of_data_is_still_a_400(layouts: list[bytes]) -> None:
    body, size = triton_body({"IN": SAMPLES["FP32"]}, True)
    decode(body, size)
    assert layouts == [body] and body[:size] in v2._LAYOUTS  # remembered
    with pytest.raises(BadRequest, match="runs past the end of the body"):
        decode(body[:-4], size)
    with pytest.raises(BadRequest, match="add up to 24 bytes but 28 follow"):
        decode(body + b"\0" * 4, size)
    assert len(layouts) == 3  # both went the full way, which refuses them


def test_binary_output_without_outputs_comes_back_from_a_remembered_layout(layouts: list[bytes]) -> None:
    body, size = triton_body({"IN": SAMPLES["INT32"]}, True)  # tritonclient: binary_data_output, no outputs
    first, second = decode(body, size), decode(body, size)
    assert layouts == [body]
    assert (first.outputs, first.binary_output) == (second.outputs, second.binary_output) == (None, True)


@pytest.mark.parametrize(
    "arrays, extra",
    [
        ({"IN": SAMPLES["FP32"]}, {"request_id": "r-1"}),  # the id differs from request to request
        ({"IN": SAMPLES["FP32"]}, {"parameters": {"custom": 1}}),  # parameters are the request's own
        ({"IN": SAMPLES["BOOL"]}, {}),  # data checked every time
        ({"IN": SAMPLES["BYTES"]}, {}),
    ],
    ids=["id", "parameters", "BOOL", "BYTES"],
)
def test_headers_not_remembered(layouts: list[bytes], arrays: dict, extra: dict) -> None:
    inputs = []
    for name, array in arrays.items():
        item = httpclient.InferInput(name, list(array.shape), _v2_type(array))
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    body, size = httpclient.InferenceServerClient.generate_request_body(inputs, **extra)
    first, second = decode(body, size), decode(body, size)
    assert layouts == [body, body]
    assert second.parameters == first.parameters == extra.get("parameters", {})
    assert second.id == first.id == extra.get("request_id")


def test_an_empty_id_is_remembered_and_given_back(layouts: list[bytes]) -> None:
    """perf_analyzer sends ``"id":""`` with every request."""
    head = json_body({"id": "", "inputs": [_input(parameters={"binary_data_size": 8})]})
    body, size = head + np.array([1.5, 2.5], "<f4").tobytes(), len(head)
    first, second = decode(body, size), decode(body, size)
    assert layouts == [body]
    assert first.id == second.id == ""
    assert_same(second.inputs[0].data, np.array([1.5, 2.5], "<f4"))
    assert v2.encode_response(InferResponse("m", "1", [Tensor("y", "FP32", np.zeros((1, 2), "<f4"))]), second)[0].startswith(
        b'{"model_name":"m","model_version":"1","id":""'
    )


def test_json_data_in_the_header_is_not_remembered(layouts: list[bytes]) -> None:
    body, size = _binary_request([_input(data=[1, 2]), _input(name="y", parameters={"binary_data_size": 8})], b"\0" * 8)
    decode(body, size), decode(body, size)
    assert len(layouts) == 2


def test_the_layout_memo_is_bounded(layouts: list[bytes]) -> None:
    for rows in range(1, v2.MAX_LAYOUTS + 20):
        body, size = triton_body({"IN": np.zeros((rows, 1), "<f4")}, True)
        decode(body, size)
    assert len(v2._LAYOUTS) == v2.MAX_LAYOUTS
    assert len(layouts) == v2.MAX_LAYOUTS + 19


# ------------------------------------------------------------------ BF16: raw bits in memory, numbers in JSON


def torch_bf16_bits(values: list[float]) -> np.ndarray:
    """The ground truth: torch's bfloat16 of each value (round to nearest even), as uint16 bits."""
    return torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy().view("<u2")


def torch_bf16_values(bits: np.ndarray) -> np.ndarray:
    """The ground truth: the float32 value of each bfloat16 bit pattern, by torch."""
    return torch.from_numpy(bits.astype("<u2").view("<i2").copy()).view(torch.bfloat16).float().numpy()


BF16_VALUES = [
    0.0, -0.0, 1.0, -1.0, 0.1, -1 / 3, 1.5, 3, 257, 65535, 16777217, -(2**40),
    1 + 2**-8,  # halfway between 1 and the next bfloat16: to even, 1
    1 + 3 * 2**-8,  # halfway again: to even, upwards
    1 + 2**-8 + 2**-30,  # above halfway as a double, halfway once read as float32: to even, 1 (as torch)
    3.3895313892515355e38, -3.3895e38,  # bfloat16's largest finite, and one that rounds to it
    1.1754943508222875e-38, 9.183549615799121e-41, 1e-40, 1.4e-45, -1e-45,  # subnormals, and below
]  # fmt: skip


def test_bf16_json_numbers_round_to_nearest_even_as_torch() -> None:
    rng = np.random.default_rng(7)
    values = BF16_VALUES + (rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).tolist()
    request = decode(json_body({"inputs": [_input(datatype="BF16", shape=[len(values)], data=values)]}))
    (tensor,) = request.inputs
    assert tensor.datatype == "BF16" and tensor.data.dtype == np.dtype("<u2") and tensor.data.shape == (len(values),)
    np.testing.assert_array_equal(tensor.data, torch_bf16_bits(values))
    nested = decode(json_body({"inputs": [_input(datatype="BF16", shape=[2, 2, 1], data=[[[0.1], [2]], [[-3], [1e-3]]])]}))
    np.testing.assert_array_equal(nested.inputs[0].data, torch_bf16_bits([0.1, 2, -3, 1e-3]).reshape(2, 2, 1))


def test_bf16_json_integers_past_64_bits_are_read_as_fp32_reads_them() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "BF16", "shape": [3], "data": [18446744073709551615, -1, 1180591620717411303424]}]}'
    np.testing.assert_array_equal(decode(body).inputs[0].data, torch_bf16_bits([2.0**64, -1, 2.0**70]))


def test_bf16_nan_and_infinities_in_json_data_are_read_as_fp32_reads_them() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "BF16", "shape": [2, 2], "data": [[NaN, Infinity], [-Infinity, 1.5]]}]}'
    bits = decode(body).inputs[0].data
    np.testing.assert_array_equal(bits, torch_bf16_bits([np.nan, np.inf, -np.inf, 1.5]).reshape(2, 2))
    assert bits.tolist() == [[0x7FC0, 0x7F80], [0xFF80, 0x3FC0]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([3.4e38, 1], "a value is out of range for BF16"),  # finite, but rounds to infinity
        ([1, -1e39], "a value is out of range for BF16"),  # past float32 too
        ([True, 1], "BF16 data must be numbers, not true/false"),
        (["1", "2"], "BF16 data must be numbers"),
        ([1, None], "BF16 data must be numbers"),
        ([1, 2, 3], "'data' has 3 elements but shape \\[2\\] needs 2"),
        ([[1], [2, 3]], "'data' must be a flat or regularly nested list of BF16 values"),
    ],
)
def test_bad_bf16_json_data_is_a_400_naming_the_input(data: list, message: str) -> None:
    with pytest.raises(BadRequest, match=f"input 'x': {message}") as info:
        decode(json_body({"inputs": [_input(datatype="BF16", data=data)]}))
    assert info.value.status == 400


@pytest.mark.parametrize("size", [0, 2, 3, 6])
def test_bf16_binary_data_of_the_wrong_size_is_a_400_naming_the_input(size: int) -> None:
    body, header_length = _binary_request([_input(datatype="BF16", parameters={"binary_data_size": size})], b"\x80" * size)
    with pytest.raises(BadRequest, match=f"input 'x': got {size} bytes of data, BF16 shape \\[2\\] needs 4") as info:
        decode(body, header_length)
    assert info.value.status == 400


def test_an_empty_bf16_tensor_from_json() -> None:
    tensor = decode(json_body({"inputs": [_input(datatype="BF16", shape=[0, 3], data=[])]})).inputs[0]
    assert tensor.data.dtype == np.dtype("<u2") and tensor.data.shape == (0, 3)


def tritonclient_bf16_body(array: np.ndarray, outputs=None) -> tuple[bytes, int | None]:  # noqa: ANN001
    item = httpclient.InferInput("IN", list(array.shape), "BF16")
    item.set_data_from_numpy(array, binary_data=True)  # tritonclient sends BF16 as binary data only
    return httpclient.InferenceServerClient.generate_request_body([item], outputs=outputs)


def test_a_bf16_binary_request_from_tritonclient_is_its_bits(layouts: list[bytes]) -> None:
    array = np.array([[0.1, -2.5, np.inf], [1e-40, -0.0, 3e38]], dtype=ml_dtypes.bfloat16)
    body, size = tritonclient_bf16_body(array)
    first, second = decode(body, size), decode(body, size)
    assert layouts == [body]  # a numeric binary header: remembered, and the repeat maps its data
    for request in (first, second):
        (tensor,) = request.inputs
        assert (tensor.name, tensor.datatype, tensor.data.dtype, tensor.data.shape) == ("IN", "BF16", np.dtype("<u2"), (2, 3))
        np.testing.assert_array_equal(tensor.data, array.view("<u2"))
    np.testing.assert_array_equal(first.inputs[0].data, torch_bf16_bits(array.astype(np.float32).ravel().tolist()).reshape(2, 3))


EVERY_BF16 = np.arange(2**16, dtype="<u2")  # every bit pattern: zeros, subnormals, infinities, NaNs


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_bf16_output_reads_back_in_tritonclient(binary: bool) -> None:
    bits = EVERY_BF16.reshape(2, -1)
    request = InferRequest("m", "", [], [RequestedOutput("y", binary)])
    body, header_length = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", bits)]), request)
    got = httpclient.InferResult.from_response_body(body, verbose=False, header_length=header_length).as_numpy("y")
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == bits.shape
    if binary:
        np.testing.assert_array_equal(got.view("<u2"), bits)  # every bit, NaN payloads too
    else:
        np.testing.assert_array_equal(got.astype(np.float32), torch_bf16_values(bits))  # NaN where NaN


def test_bf16_json_output_is_each_value_exactly() -> None:
    request = InferRequest("m", "", [], [RequestedOutput("y", False)])
    body, header_length = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", EVERY_BF16)]), request)
    assert header_length is None
    (out,) = json.loads(body)["outputs"]  # Python's parser: it reads NaN and Infinity
    assert (out["datatype"], out["shape"]) == ("BF16", [2**16])
    written = np.array(out["data"], dtype=np.float64)  # as a reader of doubles sees them
    with np.errstate(invalid="ignore"):  # signalling NaNs
        expected = torch_bf16_values(EVERY_BF16).astype(np.float64)
    np.testing.assert_array_equal(written, expected)
    finite = np.isfinite(expected)
    assert (np.signbit(written[finite]) == np.signbit(expected[finite])).all()  # -0.0 too


def test_bf16_nan_and_infinities_in_json_outputs_are_written_as_triton_writes_them() -> None:
    bits = np.array([[0x7FC0, 0x7F80, 0xFF80, 0x3FC0]], "<u2")
    request = InferRequest("m", "", [], [RequestedOutput("y", False)])
    body, _ = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", bits)]), request)
    assert b'"data":[NaN,Infinity,-Infinity,1.5]' in body
    plain, _ = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", bits[:, 3:])]), request)
    assert b'"data":[1.5]' in plain


def test_bf16_travels_to_triton_and_back_as_its_bits() -> None:
    bits = EVERY_BF16.reshape(4, -1)[:, ::3]  # not contiguous
    body, json_size = v2.encode_upstream_request([Tensor("x", "BF16", bits)], None)
    head = orjson.loads(body[:json_size])
    assert head["inputs"] == [{"name": "x", "datatype": "BF16", "shape": list(bits.shape), "parameters": {"binary_data_size": bits.size * 2}}]
    assert body[json_size:] == np.ascontiguousarray(bits).tobytes()
    answer, header_length = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", bits)]), InferRequest("m", "", [], None, binary_output=True))
    _, (tensor,) = v2.decode_upstream_response(answer, header_length)
    assert (tensor.datatype, tensor.data.dtype) == ("BF16", np.dtype("<u2"))
    np.testing.assert_array_equal(tensor.data, bits)
    short = json_body({"outputs": [{"name": "y", "datatype": "BF16", "shape": [2], "parameters": {"binary_data_size": 3}}]})
    with pytest.raises(UpstreamError, match="output 'y': got 3 bytes of data, BF16 shape \\[2\\] needs 4"):
        v2.decode_upstream_response(short + b"\0" * 3, len(short))


def test_a_bf16_request_has_one_cache_key_in_json_and_in_binary_and_not_uint16s() -> None:
    from gateway.cache.keys import request_key

    values = [1.5, -0.1, 300.0]
    from_json = decode(json_body({"inputs": [_input(datatype="BF16", shape=[3], data=values)]})).inputs
    body, size = tritonclient_bf16_body(np.array(values, dtype=ml_dtypes.bfloat16))
    from_binary = decode(body, size).inputs
    from_binary[0].name = "x"
    assert request_key("m", "1", from_json) == request_key("m", "1", from_binary)
    same_bits = [Tensor("x", "UINT16", from_json[0].data)]
    assert request_key("m", "1", same_bits) != request_key("m", "1", from_json)
