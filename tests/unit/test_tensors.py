"""Tensors packed for another process (the host tier's entries, host-wide batching) come back as
they left; BF16 tensors are their uint16 bits everywhere but in JSON."""

from __future__ import annotations

import asyncio
import json

import msgpack
import numpy as np
import torch

from gateway.batcher import BatchResult, Pending, concat_inputs, signature_of, split_outputs
from gateway.protocol import v2
from gateway.tensors import (
    NUMPY_TO_V2,
    V2_TO_NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
    bf16_bits,
    bf16_values,
    pack_tensors,
    unpack_tensors,
)


def round_trip(tensors: list[Tensor]) -> list[Tensor]:
    return unpack_tensors(msgpack.unpackb(msgpack.packb(pack_tensors(tensors), use_bin_type=True), raw=False))


def test_tensors_travel_unchanged() -> None:
    strings = np.empty((2, 1), dtype=object)
    strings[:, 0] = [b"ab", b""]
    tensors = [Tensor("x", "FP16", np.ones((2, 3, 4), np.float16)), Tensor("s", "BYTES", strings)]
    back = round_trip(tensors)
    assert [(t.name, t.datatype, t.shape) for t in back] == [("x", "FP16", (2, 3, 4)), ("s", "BYTES", (2, 1))]
    np.testing.assert_array_equal(back[0].data, tensors[0].data)
    assert back[1].data.tolist() == [[b"ab"], [b""]]


def test_a_transposed_array_travels_in_row_major_order() -> None:
    data = np.arange(6, dtype=np.int32).reshape(2, 3).T  # not C-contiguous
    (back,) = round_trip([Tensor("x", "INT32", data)])
    np.testing.assert_array_equal(back.data, data)


def test_string_elements_travel_as_their_utf8_bytes() -> None:
    strings = np.asarray(["é", b"raw"], dtype=object)
    (back,) = round_trip([Tensor("s", "BYTES", strings)])
    assert back.data.tolist() == ["é".encode(), b"raw"]


def test_an_empty_tensor_keeps_its_shape() -> None:
    (back,) = round_trip([Tensor("x", "FP32", np.empty((0, 4), np.float32))])
    assert back.shape == (0, 4) and back.data.dtype == np.float32


# ------------------------------------------------------------------ BF16: uint16 bits in memory


def test_uint16_arrays_map_back_to_uint16_never_bf16() -> None:
    assert V2_TO_NUMPY["BF16"] == V2_TO_NUMPY["UINT16"] == np.dtype("<u2")
    assert NUMPY_TO_V2[np.dtype("<u2")] == "UINT16" and NUMPY_TO_V2[np.dtype(np.uint16)] == "UINT16"
    assert "BF16" not in NUMPY_TO_V2.values()
    assert set(NUMPY_TO_V2.values()) == set(V2_TO_NUMPY) - {"BF16"}


def test_bf16_conversions_match_torch_for_every_bit_pattern() -> None:
    bits = np.arange(2**16, dtype="<u2")
    expected = torch.from_numpy(bits.view("<i2").copy()).view(torch.bfloat16).float().numpy()
    values = bf16_values(bits)
    assert values.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(values.view("<u4"), expected.view("<u4"))  # bit for bit, NaNs too
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(bf16_bits(values)[finite], bits[finite])  # exact values come back unchanged
    assert set(bf16_bits(values[~finite]).tolist()) == {0x7FC0}


def test_bf16_rounding_matches_torch_on_random_float32s() -> None:
    floats = np.random.default_rng(3).integers(0, 2**32, 200_000, dtype=np.uint64).astype("<u4").view("<f4")
    floats = floats[~np.isnan(floats)]
    expected = torch.from_numpy(floats.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    np.testing.assert_array_equal(bf16_bits(floats), expected)
    assert bf16_bits(np.float32(1.5)).shape == () and bf16_bits(np.float32(1.5)) == 0x3FC0  # 0-d stays an array
    assert bf16_values(np.array(0x3FC0, "<u2")).shape == ()


def test_bf16_tensors_travel_between_processes_as_their_bits() -> None:
    bits = np.array([[0x3FC0, 0xFFFF], [0x0001, 0x8000]], "<u2")
    (back,) = round_trip([Tensor("b", "BF16", bits)])
    assert (back.datatype, back.data.dtype) == ("BF16", np.dtype("<u2"))
    np.testing.assert_array_equal(back.data, bits)


async def test_bf16_rows_are_batched_and_split_as_uint16_rows() -> None:
    """Two clients' BF16 requests (binary and JSON) in one batch to Triton, whose answer (2 * x,
    computed in bfloat16 by torch) is split back: each client gets exactly its own rows."""
    loop = asyncio.get_running_loop()
    first = torch.tensor([[0.1, -2.5, 3.0]], dtype=torch.bfloat16)
    second = [[1e-3, 7.0, -0.0], [300.0, 1e-40, 65504.0]]
    binary_body = json.dumps({"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 3], "parameters": {"binary_data_size": 6}}]}).encode()
    one = v2.decode_request(binary_body + first.view(torch.int16).numpy().tobytes(), len(binary_body), "m", "")
    two = v2.decode_request(json.dumps({"inputs": [{"name": "x", "datatype": "BF16", "shape": [2, 3], "data": second}]}).encode(), None, "m", "")
    pending = [
        Pending(request.inputs, len(request.inputs[0].data), signature_of(request.inputs), loop.create_future(), 0.0)
        for request in (one, two)
    ]
    assert pending[0].signature == pending[1].signature
    (batch,) = concat_inputs(pending)
    assert (batch.datatype, batch.data.dtype, batch.data.shape) == ("BF16", np.dtype("<u2"), (3, 3))
    # Triton's side: the batch as it arrives, the model's answer as it leaves.
    body, size = v2.encode_upstream_request([batch], None)
    (arrived,) = v2.decode_request(body, size, "m", "").inputs
    x = torch.from_numpy(arrived.data.view("<i2").copy()).view(torch.bfloat16)
    y = (2 * x).view(torch.int16).numpy().view("<u2")
    answer, answer_size = v2.encode_response(InferResponse("m", "1", [Tensor("y", "BF16", y)]), InferRequest("m", "", [], None, binary_output=True))
    _, outputs = v2.decode_upstream_response(answer, answer_size)
    parts = split_outputs(BatchResult("1", outputs), pending)
    expected = [2 * first, 2 * torch.tensor(second, dtype=torch.bfloat16)]
    for part, want in zip(parts, expected):
        (out,) = part.outputs
        assert out.datatype == "BF16"
        np.testing.assert_array_equal(out.data, want.view(torch.int16).numpy().view("<u2"))
        np.testing.assert_array_equal(bf16_values(out.data), want.float().numpy())
