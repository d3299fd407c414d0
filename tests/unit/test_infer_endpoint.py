"""The infer endpoint's own parsing: which paths it answers, and the body limit."""

from __future__ import annotations

import pytest

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway import deadlines
from gateway.errors import BadRequest, ClientGone, PayloadTooLarge
from gateway.infer_endpoint import disconnect_probe, infer_target, read_body
from gateway.protocol.msgpack import is_msgpack


@pytest.mark.parametrize(
    "path, target",
    [
        ("/v2/models/digits_cnn/infer", ("digits_cnn", "")),
        ("/v2/models/digits_cnn/versions/3/infer", ("digits_cnn", "3")),
        # Triton reads a version as a number: one spelling per version, one batcher, cache key, series.
        ("/v2/models/digits_cnn/versions/003/infer", ("digits_cnn", "3")),
        ("/v2/models/digits_cnn/versions/" + "0" * 5000 + "1/infer", ("digits_cnn", "1")),
        ("/v2/models/digits_cnn/versions/00/infer", ("digits_cnn", "0")),
        ("/v2/models/digits_cnn/versions/9223372036854775807/infer", ("digits_cnn", "9223372036854775807")),
        ("/v2/models//infer", None),
        ("/v2/models/m/versions/3/other/infer", None),
        ("/v1/models/m/infer", None),
        ("/v2/model/m/infer", None),
    ],
)
def test_infer_paths(path: str, target: tuple[str, str] | None) -> None:
    assert infer_target(path) == target


@pytest.mark.parametrize("version", ["latest", "-1", "1.0", "\u0661", "9223372036854775808", "1" * 5000])
def test_a_version_that_is_no_64_bit_number_is_a_bad_request(version: str) -> None:
    with pytest.raises(BadRequest, match="model version must be a positive integer \\(64-bit\\), got \""):
        infer_target(f"/v2/models/m/versions/{version}/infer")


def test_an_empty_version_in_the_path_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="empty model version"):
        infer_target("/v2/models/digits_cnn/versions//infer")


def test_a_model_name_longer_than_a_folder_name_is_a_bad_request() -> None:
    assert infer_target("/v2/models/" + "a" * 255 + "/infer") == ("a" * 255, "")
    with pytest.raises(BadRequest, match="model name is longer than 255 bytes"):
        infer_target("/v2/models/" + "a" * 256 + "/infer")
    with pytest.raises(BadRequest, match="model name is longer than 255 bytes"):
        infer_target("/v2/models/" + "é" * 128 + "/versions/1/infer")  # 256 bytes in UTF-8


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


def test_the_disconnect_probe_reads_uvicorns_flag() -> None:
    # The probe relies on uvicorn's per-request cycle: receive is its method, and it keeps a
    # `disconnected` flag. This pins that contract to the uvicorn version installed.
    cycle = RequestResponseCycle.__new__(RequestResponseCycle)
    cycle.disconnected = False
    probe = disconnect_probe(cycle.receive)
    assert probe is not None and probe() is False
    cycle.disconnected = True
    assert probe() is True
    assert "disconnected" in RequestResponseCycle.__init__.__code__.co_names
    assert disconnect_probe(receiver()) is None  # another server: no probe, nothing breaks


@pytest.mark.parametrize("value", [b"0", b"-5", b"abc", b"nan", b"inf", b"", b"1_0", b"+5", b"0x10", b"1e999"])
def test_a_bad_timeout_header_is_400(value: bytes) -> None:
    with pytest.raises(BadRequest, match="X-Request-Timeout-Ms"):
        deadlines.from_header(value, 0.0)


def test_the_timeout_header_is_milliseconds() -> None:
    assert deadlines.from_header(b"250", 10.0) == pytest.approx(10.25)
    assert deadlines.from_header(b"0.5", 10.0) == pytest.approx(10.0005)
    assert deadlines.from_header(b" 2e3 ", 10.0) == pytest.approx(12.0)
    assert deadlines.from_header(b".5", 10.0) == pytest.approx(10.0005)


def test_a_gzip_body_of_several_members_is_read_whole_and_a_cut_or_padded_stream_is_a_400() -> None:
    import gzip
    import zlib

    from gateway.infer_endpoint import inflate

    data = b'{"inputs": []}' * 10
    assert inflate(gzip.compress(data[:50]) + gzip.compress(data[50:]), b"gzip", 1000) == data  # as gzip -d reads it
    assert inflate(gzip.compress(data) + b"\0" * 8, b"gzip", 1000) == data  # zeros padding the file
    with pytest.raises(PayloadTooLarge):  # the limit counts every member
        inflate(gzip.compress(data) * 8, b"gzip", 1000)
    with pytest.raises(BadRequest, match="truncated gzip data"):
        inflate(gzip.compress(data)[:-12], b"gzip", 1000)
    with pytest.raises(BadRequest, match="not valid gzip data"):
        inflate(gzip.compress(data) + b"junk", b"gzip", 1000)
    with pytest.raises(BadRequest, match="4 byte\\(s\\) after the end of its deflate stream"):
        inflate(zlib.compress(data) + b"junk", b"deflate", 1000)
    with pytest.raises(BadRequest, match="truncated deflate data"):
        inflate(b"", b"deflate", 1000)


def test_a_body_of_many_gzip_members_is_refused_and_a_large_one_inflates_across_zlibs_slices() -> None:
    import gzip
    import os

    from gateway.infer_endpoint import MAX_GZIP_MEMBERS, inflate

    empty = gzip.compress(b"")
    many = empty * 100_000  # 2 MB of empty members: each used to copy the rest of the body
    with pytest.raises(BadRequest, match=f"more than {MAX_GZIP_MEMBERS} gzip members"):
        inflate(many, b"gzip", 1 << 26)
    assert inflate(empty * MAX_GZIP_MEMBERS + b"\0" * 100, b"gzip", 10) == b""
    data = os.urandom(1 << 20) * 4  # fed to zlib in slices, across member boundaries
    assert inflate(gzip.compress(data[: 1 << 21]) + gzip.compress(data[1 << 21 :]), b"gzip", 1 << 23) == data
    with pytest.raises(BadRequest, match="data after the zeros"):
        inflate(empty + b"\0\0junk", b"gzip", 10)


async def test_a_large_body_is_parsed_off_the_event_loop() -> None:
    import threading

    from gateway.infer_endpoint import OFF_LOOP_BYTES, off_loop

    def where(_: bytes) -> int:
        return threading.get_ident()

    loop_thread = threading.get_ident()
    assert await off_loop(100, where, b"x" * 100) == loop_thread  # small: no hand-over
    assert await off_loop(OFF_LOOP_BYTES, where, b"x") != loop_thread
