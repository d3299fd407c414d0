"""Mangled request bodies: every one is decoded or refused with a 400 (BadRequest), never another
exception. Seeded random mutations of valid bodies in each wire format, each decoded twice (the
second decode of a v2 body may come from a remembered header layout)."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.errors import BadRequest
from gateway.protocol import msgpack as msgpack_codec
from gateway.protocol import v2
from gateway.tensors import NUMPY_TO_V2, Tensor


def _v2_bodies() -> list[tuple[bytes, int | None]]:
    bodies = []
    for binary in (True, False):
        image = httpclient.InferInput("image", [2, 1, 8, 8], "FP32")
        image.set_data_from_numpy(np.arange(128, dtype=np.float32).reshape(2, 1, 8, 8), binary_data=binary)
        flags = httpclient.InferInput("flags", [2], "BOOL")
        flags.set_data_from_numpy(np.array([True, False]), binary_data=binary)
        words = httpclient.InferInput("words", [2], "BYTES")
        words.set_data_from_numpy(np.array([b"ab", b"c"], dtype=object), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        bodies.append(httpclient.InferenceServerClient.generate_request_body([image], outputs=outputs))
        bodies.append(httpclient.InferenceServerClient.generate_request_body([image, flags, words]))
    return bodies


def _mutations(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:  # flip a byte
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:  # cut the body short
            del data[at:]
        elif kind == 2:  # insert bytes JSON or msgpack care about
            data[at:at] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"-1", b"1e999", b"\xc1", b"\x92", b"\xff" * 4])
        elif kind == 3 and data:  # drop a span
            del data[at : at + rng.randint(1, 8)]
        else:  # repeat a span
            data[at:at] = data[max(0, at - 8) : at]
    return bytes(data)


def _decodes_or_400(decode) -> None:  # noqa: ANN001
    for _ in range(2):
        try:
            decode()
        except BadRequest:
            pass


@pytest.mark.parametrize("seed", range(4))
def test_mangled_v2_bodies_are_decoded_or_refused_with_400(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v2, "_LAYOUTS", {})
    rng = random.Random(seed)
    for body, header_length in _v2_bodies():
        for _ in range(400):
            mangled = _mutations(body, rng)
            length = header_length
            if length is not None and rng.random() < 0.2:
                length = rng.randint(0, len(mangled) + 4)
            if length is not None and length > len(mangled):
                length = len(mangled)  # the endpoint refuses a longer one before decoding
            _decodes_or_400(lambda: v2.decode_request(mangled, length, "m", ""))


@pytest.mark.parametrize("seed", range(4))
def test_mangled_msgpack_bodies_are_decoded_or_refused_with_400(seed: int) -> None:
    rng = random.Random(seed)
    tensors = {"image": np.arange(128, dtype=np.float32).reshape(2, 1, 8, 8), "flags": np.array([True, False])}
    body = msgpack_codec.encode_request(
        [Tensor(name, NUMPY_TO_V2[a.dtype], a) for name, a in tensors.items()], outputs=["probabilities"]
    )
    assert msgpack.unpackb(body, raw=False)  # a valid starting point
    for _ in range(1000):
        mangled = _mutations(body, rng)
        _decodes_or_400(lambda: msgpack_codec.decode_request(mangled, "m", ""))

