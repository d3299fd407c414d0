"""The msgpack client: dtype mapping, error bodies, and one exchange with a stub server."""

from __future__ import annotations

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.client import GatewayClient, GatewayClientError, parse_error_body, tensor_from_numpy
from gateway.errors import GatewayError
from gateway.protocol import msgpack as codec
from gateway.protocol import v2
from gateway.tensors import V2_TO_NUMPY, InferResponse, Tensor


@pytest.mark.parametrize("datatype", [name for name in V2_TO_NUMPY if name not in ("BYTES", "BF16")])  # BF16: uint16 bits
def test_numeric_dtypes_map_to_v2(datatype: str) -> None:
    array = np.zeros((2, 1), dtype=V2_TO_NUMPY[datatype])
    tensor = tensor_from_numpy("x", array)
    assert tensor.datatype == datatype and tensor.data is array


def test_big_endian_is_converted() -> None:
    array = np.array([1.5, -2.0], dtype=">f4")
    tensor = tensor_from_numpy("x", array)
    assert tensor.datatype == "FP32"
    assert bytes(v2.tensor_to_buffer(tensor)) == np.array([1.5, -2.0], dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.array([["a", "\u00e9"]]),
        np.array([[b"a", "\u00e9".encode()]]),
        np.array([["a", "\u00e9".encode()]], dtype=object),
    ],
    ids=["str", "bytes", "object"],
)
def test_text_arrays_become_bytes(array: np.ndarray) -> None:
    tensor = tensor_from_numpy("s", array)
    assert tensor.datatype == "BYTES" and tensor.data.shape == (1, 2)
    assert v2.tensor_to_buffer(tensor) == b"\x01\0\0\0a\x02\0\0\0\xc3\xa9"


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match="input 'c': numpy dtype complex64"):
        tensor_from_numpy("c", np.zeros(2, dtype=np.complex64))


def test_parse_error_body() -> None:
    assert parse_error_body(codec.error_body("m-err"), "application/msgpack") == "m-err"
    assert parse_error_body(v2.error_body("j-err"), "application/json") == "j-err"
    assert parse_error_body(v2.error_body("j-err"), "application/msgpack") == "j-err"
    assert parse_error_body(codec.error_body("m-err"), None) == "m-err"
    assert parse_error_body(b"Internal Server Error", "text/plain") == "Internal Server Error"
    assert parse_error_body(b"", None) == "empty error body"


async def _infer_handler(request: web.Request) -> web.Response:
    body = await request.read()
    assert request.headers["Content-Type"] == codec.CONTENT_TYPE
    try:
        infer = codec.decode_request(body, request.match_info["model"], request.match_info.get("version", ""))
        if infer.model == "jsonerr":
            return web.Response(status=503, body=v2.error_body("no instance"), content_type="application/json")
        if infer.model == "garbage":
            return web.Response(body=b"\xc1", content_type=codec.CONTENT_TYPE)
        # Echo: every input comes back doubled (BYTES repeated) as "<name>_out".
        outputs = [Tensor(f"{t.name}_out", t.datatype, t.data * 2) for t in infer.inputs]
        answer = codec.encode_response(InferResponse(infer.model, infer.version or "1", outputs, parameters=infer.parameters), infer)
    except GatewayError as exc:
        return web.Response(status=exc.status, body=codec.error_body(exc.message), content_type=codec.CONTENT_TYPE)
    return web.Response(body=answer, content_type=codec.CONTENT_TYPE)


@pytest.fixture
async def server():
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", _infer_handler)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", _infer_handler)
    async with TestServer(app) as test_server:
        yield test_server


async def test_client_infer_against_stub(server: TestServer) -> None:
    url = str(server.make_url("/"))
    async with GatewayClient(url) as client:
        result = await client.infer(
            "m/odd name",
            {"a": np.arange(4, dtype=np.float32).reshape(2, 2), "s": np.array([b"xy"], dtype=object)},
            outputs=["s_out", "a_out"],
            version="7",
            request_id="rid",
            parameters={"sequence_id": 7, "sequence_start": True},
        )
        assert (result.model_name, result.model_version, result.id) == ("m/odd name", "7", "rid")
        assert result.parameters == {"sequence_id": 7, "sequence_start": True}  # sent, and echoed by the stub
        assert list(result.outputs) == ["s_out", "a_out"]
        np.testing.assert_array_equal(result.outputs["a_out"], np.arange(4, dtype=np.float32).reshape(2, 2) * 2)
        assert result.outputs["s_out"].tolist() == [b"xyxy"]

        with pytest.raises(GatewayClientError) as info:
            await client.infer("m", {"a": np.zeros(1, np.float32), "b": np.zeros(1)}, outputs=["nope"])
        assert info.value.status == 400 and "requested output 'nope'" in info.value.message

        with pytest.raises(GatewayClientError) as info:
            await client.infer("garbage", {"a": np.zeros(1, np.float32)})
        assert info.value.status == 200 and "malformed msgpack" in info.value.message


async def test_client_json_and_text_errors(server: TestServer) -> None:
    async with GatewayClient(str(server.make_url("/"))) as client:
        with pytest.raises(GatewayClientError) as info:
            await client.infer("jsonerr", {"x": np.zeros(1, np.float32)})
        assert (info.value.status, info.value.message) == (503, "no instance")
    async with GatewayClient(str(server.make_url("/elsewhere/"))) as client:
        with pytest.raises(GatewayClientError) as info:
            await client.infer("m", {"x": np.zeros(1, np.float32)})  # no such route: a text body
        assert info.value.status == 404 and "Not Found" in info.value.message
        assert str(info.value).startswith("HTTP 404: ")
