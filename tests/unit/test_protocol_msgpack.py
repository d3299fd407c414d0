"""The msgpack wire format: round-trips, a hand-built body, and validation."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import torch

from gateway.errors import BadRequest, UpstreamError
from gateway.protocol import msgpack as codec
from gateway.tensors import V2_TO_NUMPY, InferRequest, InferResponse, RequestedOutput, Tensor

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False], [False, True]]),
    **{
        name: np.array([[np.iinfo(dt).min, np.iinfo(dt).max], [0, 1]], dtype=dt)
        for name, dt in V2_TO_NUMPY.items()
        if dt.kind in "iu" and name != "BF16"
    },
    # BF16 as its raw bits: 0.1, -largest, infinity, a NaN with a payload, passed through untouched.
    "BF16": np.array([[0x3DCD, 0xFF7F], [0x7F80, 0xFFFF]], dtype="<u2"),
    "FP16": np.array([[0.5, -65504.0], [1e-3, 0.0]], dtype="<f2"),
    "FP32": np.array([[0.1, -3.4e38], [np.inf, np.nan]], dtype="<f4"),
    "FP64": np.array([[0.1, -1.7e308], [5e-324, -0.0]], dtype="<f8"),
    "BYTES": np.array([[b"", b"\x00\xff"], ["\u2603".encode(), b"x" * 70000]], dtype=object),
}


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(actual, expected)  # NaN == NaN here


def pack(doc: object) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_request_roundtrip(datatype: str) -> None:
    tensors = [Tensor("IN", datatype, SAMPLES[datatype]), Tensor("EMPTY", datatype, SAMPLES[datatype][:0])]
    body = codec.encode_request(tensors, ["A", "B"], request_id="id-1", parameters={"priority": 2})
    request = codec.decode_request(body, "m", "4")
    assert (request.model, request.version, request.id) == ("m", "4", "id-1")
    assert request.parameters == {"priority": 2}
    assert request.outputs == [RequestedOutput("A"), RequestedOutput("B")]
    assert [t.name for t in request.inputs] == ["IN", "EMPTY"]
    assert all(t.datatype == datatype for t in request.inputs)
    assert_same(request.inputs[0].data, SAMPLES[datatype])
    assert_same(request.inputs[1].data, SAMPLES[datatype][:0])


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_response_roundtrip(datatype: str) -> None:
    response = InferResponse("m", "2", [Tensor("OUT", datatype, SAMPLES[datatype]), Tensor("X", "INT8", SAMPLES["INT8"])])
    body = codec.encode_response(response, InferRequest("m", "", [], None, id="r"))
    decoded = codec.decode_response(body)
    assert (decoded.model, decoded.version, decoded.id, decoded.parameters) == ("m", "2", "r", {})
    assert [t.name for t in decoded.outputs] == ["OUT", "X"]
    assert_same(decoded.outputs[0].data, SAMPLES[datatype])


def test_hand_built_request_and_output_forms() -> None:
    floats = np.arange(6, dtype="<f4").reshape(2, 3)
    strings = b"".join(struct.pack("<I", len(s)) + s for s in [b"ab", b"", b"c"])
    body = pack(
        {
            "inputs": [
                {"name": "f", "datatype": "FP32", "shape": [2, 3], "data": floats.tobytes()},
                {"name": "s", "datatype": "BYTES", "shape": [3], "data": strings},
            ],
            "outputs": ["y", {"name": "z"}],
        }
    )
    request = codec.decode_request(body, "m", "")
    assert_same(request.inputs[0].data, floats)
    assert_same(request.inputs[1].data, np.array([b"ab", b"", b"c"], dtype=object))
    assert request.outputs == [RequestedOutput("y"), RequestedOutput("z")]
    assert request.id is None and request.parameters == {} and request.binary_output is False
    assert codec.decode_request(pack({"inputs": [], "outputs": []}), "m", "").outputs is None


def test_bf16_data_is_the_bits_of_bfloat16_values() -> None:
    values = torch.tensor([[0.1, -2.5], [1e-40, 3e38]], dtype=torch.bfloat16)
    raw = values.view(torch.int16).numpy().tobytes()  # little-endian on every host torch runs on here
    body = pack({"inputs": [{"name": "b", "datatype": "BF16", "shape": [2, 2], "data": raw}]})
    (tensor,) = codec.decode_request(body, "m", "").inputs
    assert (tensor.datatype, tensor.data.dtype, tensor.data.shape) == ("BF16", np.dtype("<u2"), (2, 2))
    assert tensor.data.tobytes() == raw
    doc = msgpack.unpackb(codec.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", tensor.data)]), InferRequest("m", "", [], None)), raw=False)
    assert doc["outputs"] == [{"name": "y", "datatype": "BF16", "shape": [2, 2], "data": raw}]


def test_an_output_may_ask_for_its_top_classes() -> None:
    body = pack({"inputs": [], "outputs": [{"name": "p", "classification": 3}, {"name": "q", "classification": 0}]})
    assert codec.decode_request(body, "m", "").outputs == [RequestedOutput("p", class_count=3), RequestedOutput("q")]
    for bad in (-1, 2**32, 1.5, "3", None):
        with pytest.raises(BadRequest, match="requested output 'p': classification must be an unsigned 32-bit integer"):
            codec.decode_request(pack({"inputs": [], "outputs": [{"name": "p", "classification": bad}]}), "m", "")
    with pytest.raises(BadRequest, match=r"requested output #0: unknown key\(s\) \['binary'\]"):
        codec.decode_request(pack({"inputs": [], "outputs": [{"name": "p", "binary": True}]}), "m", "")


def test_response_order_parameters_and_missing_output() -> None:
    tensors = [Tensor(n, "INT32", SAMPLES["INT32"]) for n in ("a", "b", "c")]
    response = InferResponse("m", "1", tensors, parameters={"seq": 1})
    request = InferRequest("m", "", [], [RequestedOutput("c"), RequestedOutput("a")])
    doc = msgpack.unpackb(codec.encode_response(response, request), raw=False)
    assert [o["name"] for o in doc["outputs"]] == ["c", "a"]
    assert doc["parameters"] == {"seq": 1} and "id" not in doc
    assert doc["outputs"][0]["data"] == SAMPLES["INT32"].tobytes()
    with pytest.raises(BadRequest, match="requested output 'zz'"):
        codec.encode_response(response, InferRequest("m", "", [], [RequestedOutput("zz")]))


def test_error_body() -> None:
    assert msgpack.unpackb(codec.error_body("boom"), raw=False) == {"error": "boom"}


def _inp(**fields) -> dict:
    return {"name": "x", "datatype": "INT32", "shape": [2], "data": b"\0" * 8, **fields}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "malformed msgpack body"),
        (b"\xc1", "malformed msgpack body: a byte that starts no msgpack value"),
        (pack({"inputs": []}) + b"\x00", "malformed msgpack body"),
        (b"\xdd\xff\xff\xff\xff", "malformed msgpack body"),  # array32 claiming 4G items
        (b"\x91" * 5000 + b"\x90", "malformed msgpack body: nested too deeply"),  # deeper than the unpacker's stack
        (b"\x81\xa1\xff\x90", "malformed msgpack body"),  # invalid UTF-8 string
        (pack({1: 2}), "malformed msgpack body"),  # non-string map key
        (pack({"inputs": [], "p": msgpack.ExtType(5, b"x")}), "malformed msgpack body"),
        (pack([1, 2]), "must be a map, got array"),
        (pack({}), "no 'inputs'"),
        (pack({"inputs": [], "input": []}), "request: unknown key\\(s\\) \\['input'\\]"),
        (pack({"inputs": {"x": 1}}), "'inputs' must be an array"),
        (pack({"inputs": [3]}), "input #0 must be an object"),
        (pack({"inputs": [_inp(name=5)]}), "input #0: 'name' must be a non-empty string"),
        (pack({"inputs": [_inp(datatype="FP8")]}), "input 'x': unknown datatype \"FP8\""),
        (pack({"inputs": [_inp(datatype="BF16")]}), "input 'x': got 8 bytes of data, BF16 shape \\[2\\] needs 4"),
        (pack({"inputs": [_inp(datatype="BF16", data=b"\0" * 3)]}), "input 'x': got 3 bytes of data, BF16 shape \\[2\\] needs 4"),
        (pack({"inputs": [_inp(shape=[2, -1])]}), "input 'x': shape must be a list of non-negative integers"),
        (pack({"inputs": [_inp(shape=2)]}), "input 'x': shape must be"),
        (pack({"inputs": [_inp(data="\0" * 8)]}), "input 'x': 'data' must be msgpack bin, got string"),
        (pack({"inputs": [_inp(data=None)]}), "input 'x': 'data' must be msgpack bin"),
        (pack({"inputs": [_inp(data=b"\0" * 7)]}), "input 'x': got 7 bytes of data, INT32 shape \\[2\\] needs 8"),
        (pack({"inputs": [_inp(datatype="BOOL", data=b"\x00\x07")]}), "input 'x': BOOL data holds bytes"),
        (pack({"inputs": [_inp(datatype="BYTES", data=b"\x09\0\0\0abc")]}), "input 'x': BYTES element 0 claims 9 bytes"),
        (pack({"inputs": [_inp(extra=1)]}), "input 'x': unknown key\\(s\\) \\['extra'\\]"),
        (pack({"inputs": [_inp(), _inp()]}), "duplicate input 'x'"),
        (pack({"inputs": [], "outputs": "y"}), "'outputs' must be an array"),
        (pack({"inputs": [], "outputs": [7]}), "requested output #0 must be a non-empty string"),
        (pack({"inputs": [], "outputs": [{"name": "y", "binary": True}]}), "requested output #0: unknown key"),
        (pack({"inputs": [], "outputs": ["y", {"name": "y"}]}), "duplicate requested output 'y'"),
        (pack({"inputs": [], "id": 5}), "'id' must be a string"),
        (pack({"inputs": [], "parameters": [1]}), "'parameters' must be a map"),
        (pack({"inputs": [], "parameters": {"x": b"a"}}), "request parameter 'x' must be a string, an integer, a finite number or a boolean, got b'a'"),
        (pack({"inputs": [], "parameters": {"x": [b"a"]}}), "request parameter 'x' must be"),
        (pack({"inputs": [], "parameters": {b"x": 1}}), "request parameter names must be strings, got b'x'"),
        (pack({"inputs": [], "parameters": {"priority": "high"}}), "request parameter 'priority' must be an unsigned integer, got \"high\""),
    ],
)
def test_malformed_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        codec.decode_request(body, "m", "1")


def test_string_length_limit() -> None:
    body = pack({"inputs": [], "id": "x" * (codec.MAX_STR_LEN + 1)})
    with pytest.raises(BadRequest, match="malformed msgpack body"):
        codec.decode_request(body, "m", "1")


def test_malformed_response_is_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="malformed msgpack response: malformed msgpack body"):
        codec.decode_response(b"{}")
    with pytest.raises(UpstreamError, match="output 'y': got 1 bytes"):
        codec.decode_response(pack({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": b"\0"}]}))


def test_keys_mixing_str_and_bytes_are_a_400_not_a_crash() -> None:
    body = msgpack.packb({"inputs": [], b"a": 1, "b": 2}, use_bin_type=True)
    with pytest.raises(BadRequest, match="unknown key"):
        codec.decode_request(body, "m", "")
