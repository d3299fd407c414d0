"""The cache key of a request: what decides its answer, hashed from the raw tensor bytes.

The key covers the model, the version that serves the request (after the router's choice:
never "", so an entry cannot outlive a version change), and every input's name, datatype,
shape and bytes, in the model's input order. It is a 16-byte BLAKE2b digest over the decoded
tensors (little-endian, row-major, as on the wire), never over a re-serialisation of the JSON:
a JSON request and a msgpack or binary request for the same tensors share one entry.

What the request asks to see is not part of the key: the gateway always fetches every output
from Triton, and picks the requested ones per response. Except for a classification (an
output's top classes, which Triton computes): the outputs asked for and their class counts
are then part of the key, since the answer holds those outputs only. Requests whose parameters
could change the answer (request parameters, output parameters Triton does not define) are
not cached.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from gateway.tensors import InferRequest, RequestedOutput, Tensor

_LEN = struct.Struct("<I")


def _update_tensor(h: "hashlib._Hash", t: Tensor) -> None:
    h.update(t.name.encode())
    h.update(b"\0")
    h.update(t.datatype.encode())
    h.update(b"\0")
    h.update(struct.pack(f"<{len(t.data.shape)}q", *t.data.shape))
    if t.datatype == "BYTES":
        for item in t.data.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            h.update(_LEN.pack(len(raw)))
            h.update(raw)
    else:
        h.update(memoryview(np.ascontiguousarray(t.data)).cast("B"))


def request_key(model: str, version: str, inputs: list[Tensor], classes: list[RequestedOutput] | None = None) -> bytes:
    """``classes``: the outputs of a request that asks for a classification (None otherwise)."""
    h = hashlib.blake2b(digest_size=16, person=b"classes" if classes else b"")
    h.update(model.encode())
    h.update(b"\0")
    h.update(version.encode())
    h.update(b"\0")
    for t in inputs:
        _update_tensor(h, t)
    for out in classes or ():
        h.update(_LEN.pack(len(out.name.encode())))
        h.update(out.name.encode())
        h.update(struct.pack("<Q", out.class_count))
    return h.digest()


def cacheable(request: InferRequest) -> bool:
    """No parameter that could change the answer: only ``binary_data`` (presentation) and
    ``classification`` (part of the key) on outputs."""
    if request.parameters:
        return False
    return all(set(o.parameters) <= {"binary_data"} for o in request.outputs or ())


def raw_key(model: str, version: str, content_type: bytes, header_length: bytes | None, body: bytes) -> bytes:
    """The key of a request as it arrived, for answers stored as bytes (``RawAnswer``).

    Everything the encoded answer depends on: the model, the version that serves it (after the
    rollout's or the router's choice), the content type and binary-header length (which decide
    how the body is read and which wire format answers), and the body itself, which holds the
    inputs, the outputs asked for and how, the parameters, and the ``id`` the answer echoes.
    A different personalisation keeps these keys apart from ``request_key``'s."""
    fields = (model, version, content_type, header_length)
    prefix = _RAW_PREFIXES.get(fields)
    if prefix is None:
        prefix = b"%d:%s\0%d:%s\0%d:%s\0" % (
            len(model), model.encode(), len(version), version.encode(), len(content_type), content_type
        )
        prefix += b"-\0" if header_length is None else b"%d:%s\0" % (len(header_length), header_length)
        if len(prefix) <= MAX_RAW_PREFIX_BYTES:  # headers are the client's: only short ones are kept
            if len(_RAW_PREFIXES) >= MAX_RAW_PREFIXES:
                _RAW_PREFIXES.clear()
            _RAW_PREFIXES[fields] = prefix
    h = hashlib.blake2b(prefix, digest_size=16, person=b"gateway-raw")
    h.update(body)
    return h.digest()


# The encoded fields before the body, by the fields: clients send the same few again and again.
_RAW_PREFIXES: dict[tuple[str, str, bytes, bytes | None], bytes] = {}
MAX_RAW_PREFIXES = 1024
MAX_RAW_PREFIX_BYTES = 256
