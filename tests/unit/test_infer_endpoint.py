"""The infer endpoint's own parsing: which paths it answers, and the body limit."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.infer_endpoint import ClientGone, infer_target, is_msgpack, read_body


@pytest.mark.parametrize(
    "path, target",
    [
        ("/v2/models/digits_cnn/infer", ("digits_cnn", "")),
        ("/v2/models/digits_cnn/versions/3/infer", ("digits_cnn", "3")),
        ("/v2/models//infer", None),
        ("/v2/models/m/versions/3/other/infer", None),
        ("/v1/models/m/infer", None),
        ("/v2/model/m/infer", None),
    ],
)
def test_infer_paths(path: str, target: tuple[str, str] | None) -> None:
    assert infer_target(path) == target


def test_non_numeric_version_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="'latest'"):
        infer_target("/v2/models/m/versions/latest/infer")


def test_msgpack_content_types() -> None:
    assert is_msgpack(b"application/msgpack") and is_msgpack(b"Application/X-Msgpack; charset=binary")
    assert not is_msgpack(b"application/json") and not is_msgpack(b"")


def receiver(*messages: dict):  # noqa: ANN201
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


async def test_body_chunks_are_joined_within_the_limit() -> None:
    body = await read_body(
        receiver({"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd"}), None, 10
    )
    assert body == b"abcd"


async def test_declared_and_streamed_bodies_over_the_limit_are_413() -> None:
    with pytest.raises(PayloadTooLarge, match="11 bytes"):
        await read_body(receiver(), b"11", 10)
    chunks = [{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 2
    with pytest.raises(PayloadTooLarge):
        await read_body(receiver(*chunks), None, 10)


async def test_bad_content_length_and_disconnects() -> None:
    with pytest.raises(BadRequest, match="Content-Length"):
        await read_body(receiver(), b"-1", 10)
    with pytest.raises(ClientGone):
        await read_body(receiver({"type": "http.disconnect"}), None, 10)


def test_gzip_and_deflate_bodies_are_inflated_within_the_limit() -> None:
    import gzip
    import zlib

    from gateway.errors import UnsupportedMediaType
    from gateway.infer_endpoint import inflate

    data = b'{"inputs": []}' * 10
    assert inflate(gzip.compress(data), b"gzip", 1000) == data
    assert inflate(zlib.compress(data), b"deflate", 1000) == data
    assert inflate(data, b"identity", 1000) == data
    with pytest.raises(PayloadTooLarge):
        inflate(gzip.compress(b"\0" * 10_000), b"gzip", 1000)  # a small body that inflates past the limit
    with pytest.raises(BadRequest, match="gzip"):
        inflate(b"not gzip", b"gzip", 1000)
    with pytest.raises(UnsupportedMediaType, match="br"):
        inflate(data, b"br", 1000)
