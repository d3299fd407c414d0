"""Tensors packed for another process (the host tier's entries, host-wide batching) come back as
they left."""

from __future__ import annotations

import msgpack
import numpy as np

from gateway.tensors import Tensor, pack_tensors, unpack_tensors


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
