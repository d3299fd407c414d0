"""``POST /v2/models/{m}[/versions/{v}]/infer``: the infer endpoint, for the HTTP protocol and
as a plain ASGI callable.

The infer route carries nearly all traffic, so it skips Starlette's middleware, router and
Request/Response objects: ``InferEndpoint.serve`` turns one request (its path, headers and body)
into a ``Reply``, doing only what the request needs: decode, run the pipeline, encode. Two ways
in: the gateway's HTTP protocol (``protocol/infer_server.py``) holds a small infer request until
it is complete and hands it over (``may_serve``, ``answer_from_cache``, ``serve_held``), without
any ASGI cycle; every other infer request (large, compressed, HTTP/1.0, ...) arrives as ASGI
(``__call__``), which hands everything that is not an infer request (and the lifespan) to
Starlette.

For models with the response cache on, a request is first looked up as it arrived: the served
version is chosen (the rollout's or the router's choice, made once and handed to the pipeline
on a miss), and the model, that version, the content type, the binary-header length and the
body make a raw key (``cache.raw_key``). A repeat of a cacheable request is answered with the
stored bytes of the first answer, without decoding, checking or encoding anything; the answer
is byte-identical to the computed one but for ``X-Cache: hit``. The protocol asks for it first
(``answer_from_cache``) and writes a hit at once, without a task; a miss is served with what
that lookup learned (the version chosen, the key), so neither is done twice.

Every answered request is counted once (``metrics.InferCounts``: model, served version, status
code, where a cached model's answer came from, latency from one clock reading at arrival); a
client that left first is counted apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Container, Iterable, MutableMapping, Sequence
from typing import Any, TypeVar

from gateway import deadlines
from gateway.cache import ANY, Epoch, Freshness, RawAnswer, ResponseCache, freshness, raw_key
from gateway.errors import BadRequest, ClientGone, GatewayError, NotFound, PayloadTooLarge, UnsupportedMediaType, shown
from gateway.metrics import InferCounts, fleet_labels
from gateway.pipeline import InferencePipeline
from gateway.protocol import msgpack as msgpack_codec
from gateway.protocol.msgpack import MSGPACK_TYPES, is_msgpack
from gateway.protocol import v2
from gateway.protocol.infer_server import Reply
from gateway.tensors import InferRequest

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPE = v2.JSON_CONTENT_TYPE.encode()
BINARY_TYPE = v2.BINARY_CONTENT_TYPE.encode()

# Where an answer came from when it may be kept as raw bytes: the cache produced it, and no
# version drop since the request's epoch can have made it stale. Not "coalesced": that
# computation began before this request read its epoch (its first request keeps it).
RAW_STORABLE = frozenset({"miss", "hit"})


def infer_target(path: str) -> tuple[str, str] | None:
    """(model, version) for an infer path, else None. Version "" lets the server choose."""
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return v2.model_and_version(parts[3], "")
    if len(parts) == 7 and parts[6] == "infer" and parts[1:3] == ["v2", "models"] and parts[4] == "versions" and parts[3]:
        if not parts[5]:
            raise BadRequest("the path names an empty model version (versions//infer); leave out /versions/ for the served one")
        return v2.model_and_version(parts[3], parts[5])
    return None


def is_infer_path(path: str) -> bool:
    """Whether the infer endpoint answers a POST to ``path`` (a malformed version too: with 400)."""
    try:
        return infer_target(path) is not None
    except BadRequest:
        return True


def disconnect_probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap check of whether the client has gone, for the batcher to drop queued requests of
    clients that left. ASGI offers this only by awaiting ``receive()``, a task per request; the
    ASGI server's own flag costs nothing. uvicorn's ``receive`` is a method of its per-request
    cycle, whose ``disconnected`` flag it sets on connection loss. None on other servers."""
    cycle = getattr(receive, "__self__", None)
    if cycle is not None and isinstance(getattr(cycle, "disconnected", None), bool):
        return lambda: cycle.disconnected
    return None


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"invalid Content-Length header: {shown(declared.decode('latin-1'))}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the gateway's limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected before its request body arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the gateway's limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


INFLATE_CHUNK = 1 << 16  # compressed bytes fed to zlib at a time: what it copies stays small
MAX_GZIP_MEMBERS = 64  # a client compresses a body in one member; gzip -d reads any number


def inflate(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), within the
    limit, in time linear in the body (zlib is fed bounded slices: a body of many tiny gzip
    members, each leaving the rest of the body to copy, would be quadratic)."""
    name = encoding.strip().lower()
    if name in (b"", b"identity"):
        return body
    if name not in (b"gzip", b"deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {shown(name.decode('latin-1'))}; use gzip, deflate or none")
    what = name.decode()
    view = memoryview(body)
    parts: list[bytes] = []
    size = pos = 0
    try:
        for _ in range(MAX_GZIP_MEMBERS):  # gzip: member after member (RFC 1952 2.2), as gzip -d reads them
            inflater = zlib.decompressobj(wbits=31 if name == b"gzip" else 15)
            while not inflater.eof:
                if pos >= len(body):
                    raise BadRequest(f"body is truncated {what} data: its stream does not end")
                chunk = view[pos : pos + INFLATE_CHUNK]
                part = inflater.decompress(chunk, limit + 1 - size)
                size += len(part)
                if size > limit or inflater.unconsumed_tail:
                    raise PayloadTooLarge(f"decompressed request body exceeds the gateway's limit of {limit} bytes")
                parts.append(part)
                pos += len(chunk)
            pos -= len(inflater.unused_data)
            if pos == len(body) or not body[pos]:
                # The end; zeros padding a gzip file are ignored, as gzip -d does.
                if view[pos:].tobytes().strip(b"\0"):
                    raise BadRequest(f"body has data after the zeros that end its {what} stream")
                return b"".join(parts)
            if name != b"gzip":
                raise BadRequest(f"body has {len(body) - pos} byte(s) after the end of its deflate stream")
        raise BadRequest(f"body has more than {MAX_GZIP_MEMBERS} gzip members")
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {what} data: {exc}") from None


# A body this large is inflated and decoded in a thread: parsing one of tens of megabytes
# takes seconds of CPU (millions of BYTES elements, a JSON array of millions of numbers), which
# on the event loop would stall every other request and health probe meanwhile. In a thread it
# still needs the GIL, but gives it up every few milliseconds while it runs Python code
# (sys.getswitchinterval), so the loop goes on: a 64 MiB msgpack body of BYTES elements left
# health probes waiting 0.2 s at most, against 4 s on the loop. One long call into C (orjson
# parsing a huge JSON array) still holds it throughout: 1.3 s for a 15-million-number array.
# Below this size the hand-over (tens of microseconds) would cost more than it saves.
OFF_LOOP_BYTES = 1 << 20

R = TypeVar("R")


async def off_loop(size: int, work: Callable[..., R], *args: Any) -> R:
    """``work(*args)``, in a thread when ``size`` (the bytes it reads) is large."""
    if size < OFF_LOOP_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def error_reply(status: int, message: str, content_type: bytes) -> Reply:
    """An error answer, in the wire format of the request (msgpack, else JSON)."""
    body, media = msgpack_codec.error_answer(message, content_type)
    return Reply(status, [(b"content-type", media), (b"content-length", str(len(body)).encode())], body)


def has_shadow(rollouts: Any, model: str) -> bool:
    """Whether the model's rollout mirrors requests to a shadow version (which a stored answer
    would skip)."""
    state = rollouts.states.get(model)
    return state is not None and bool(state.config.shadow)


# Requests whose answers the HTTP protocol may give from the cache by itself have bodies this
# small at most (it holds the body until the request is complete, outside uvicorn's flow control).
SMALL_BODY = 65536


# What a raw lookup learned, for a later lookup and the full path to reuse: the version the
# rollout or the router chose for a request naming none (else None), and the raw key the request
# was looked up under (None if it was not looked up).
Looked = tuple[tuple[str, bool] | None, bytes | None]


def raw_lookup(
    pipeline: InferencePipeline, cache: ResponseCache, call: Call, looked: Looked = (None, None)
) -> tuple[Reply | None, str, Looked]:
    """(the stored answer, with its ``Age``, or None; the version chosen to serve it; what the
    lookup learned).
    ``looked``: what an earlier lookup of this same request learned (its choice is kept, its
    key not computed again). The version is "" where the full path must answer (no version
    known, the deadline passed, a shadow to mirror to): then nothing was looked up. A hit is
    counted, and told to the rollout that chose its version, as the full path would: one
    request to that version, answered well."""
    chosen, key = looked
    model, version = call.target
    if version:
        served, via_rollout = version, False
    else:
        if chosen is None:
            chosen = pipeline.choose_version(model, call.sticky)
        served, via_rollout = chosen
    rollouts = pipeline.rollouts
    if (
        not served
        or (call.deadline is not None and call.deadline <= time.monotonic())  # the full path answers 504
        or (via_rollout and has_shadow(rollouts, model))  # the full path mirrors it
    ):
        return None, "", (chosen, None)
    start = time.monotonic() if via_rollout else 0.0
    if key is None:
        key = raw_key(model, served, call.content_type, call.header_length, call.body)
    found = cache.get_raw(model, served, key, call.freshness)
    if found is None:
        return None, served, (chosen, key)
    if via_rollout:
        rollouts.count(model, served)
        rollouts.record(model, served, True, time.monotonic() - start, computed=False)
    answer, age = found
    header, line = age_header(age)
    return Reply(200, (*answer.headers, header), answer.body, answer.head + line), served, (chosen, key)


# A hit's Age header, made once for the first hour (the header and its line).
AGE_HEADERS = [(b"age", b"%d" % seconds) for seconds in range(3600)]
AGE_LINES = [b"age: %d\r\n" % seconds for seconds in range(3600)]


def age_header(age: float) -> tuple[tuple[bytes, bytes], bytes]:
    """The ``Age`` header of an answer ``age`` seconds old (whole seconds), and its line."""
    seconds = int(age)
    if seconds < len(AGE_LINES):
        return AGE_HEADERS[seconds], AGE_LINES[seconds]
    return (b"age", b"%d" % seconds), b"age: %d\r\n" % seconds


@dataclass(slots=True)
class Headers:
    """What an infer request's headers say, read in one pass."""

    content_type: bytes = b""
    declared: bytes | None = None  # Content-Length
    header_length: bytes | None = None  # Inference-Header-Content-Length
    encoding: bytes = b""
    deadline: float | None = None
    freshness: Freshness = ANY  # what its Cache-Control allows of a cached answer
    sticky: dict[bytes, bytes] | None = None


def read_headers(headers: Iterable[tuple[bytes, bytes]], pins: Container[bytes], start: float) -> Headers:
    """``headers``: lower-case names, as ASGI servers give them; ``pins``: the header names
    rollouts pin clients by; ``start``: the request's arrival, for a relative deadline."""
    h = Headers()
    pragma_no_cache = False
    cache_control: list[bytes] | None = None
    for name, value in headers:
        if name == b"content-type":
            h.content_type = value
        elif name == b"content-length":
            h.declared = value
        elif name == b"inference-header-content-length":
            h.header_length = value
        elif name == b"content-encoding":
            h.encoding = value
        elif name == deadlines.HEADER:
            h.deadline = deadlines.from_header(value, start)
        elif name == b"cache-control":
            cache_control = [value] if cache_control is None else [*cache_control, value]
        elif name == b"pragma":
            pragma_no_cache = pragma_no_cache or b"no-cache" in value.lower()
        elif name in pins:
            h.sticky = {**(h.sticky or {}), name: value}
    if cache_control is not None or pragma_no_cache:
        h.freshness = freshness(cache_control or (), pragma_no_cache)
    return h


@dataclass(slots=True)
class Call:
    """One infer request as it arrived: where it goes, its body and what its headers said."""

    target: tuple[str, str]  # (model, version)
    body: bytes
    content_type: bytes
    header_length: bytes | None  # Inference-Header-Content-Length
    deadline: float | None
    gone: Callable[[], bool] | None
    freshness: Freshness = ANY  # what its Cache-Control allows of a cached answer
    sticky: dict[bytes, bytes] | None = None  # the headers rollouts pin clients by (rollout.py)
    request: InferRequest | None = None  # once decoded: its version is the one chosen, if any


class InferEndpoint:
    def __init__(
        self,
        app: Any,
        max_body_bytes: int,
        counts: InferCounts | None = None,
        read_timeout_s: float = 30.0,
        max_header_bytes: int = 65536,
    ) -> None:
        self.app = app  # the Starlette app: everything that is not an infer request
        self._limit = max_body_bytes
        self.counts = counts if counts is not None else InferCounts()
        # Read by the HTTP protocol (protocol/http_server.py).
        self.read_timeout_s = read_timeout_s
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if b"%2f" in scope.get("raw_path", b"").lower():
            # An encoded "/" belongs to a path segment, a name, as Triton reads it; no model or
            # version name holds one, so no route matches (decoded, it would name another).
            reply = error_reply(404, f"no such endpoint: {scope['method']} {scope['raw_path'].decode('latin-1')} "
                                "(an encoded '/' is part of a name, and no name holds one)", b"")  # fmt: skip
        elif not is_infer_path(scope["path"]):
            return await self.app(scope, receive, send)
        elif scope["method"] == "POST":
            start = time.monotonic()
            reply = await self.serve(scope["path"], scope["headers"], start, receive=receive, gone=disconnect_probe(receive))
        else:  # not an inference: answered, not counted
            refused = error_reply(405, f"method {scope['method']} is not allowed on {scope['path']}: use POST", b"")
            reply = Reply(405, [*refused.headers, (b"allow", b"POST")], refused.body)
        if reply is not None:
            await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
            await send({"type": "http.response.body", "body": reply.body})

    async def serve(
        self,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        start: float,
        *,
        body: bytes | None = None,
        receive: Receive | None = None,
        gone: Callable[[], bool] | None = None,
        looked: Looked = (None, None),
        target: tuple[str, str] | None = None,
    ) -> Reply | None:
        """The answer to an infer request (``path``, its lower-case ``headers``), counted; None if
        its client left first. The body is ``body`` as it arrived, or read from ``receive``;
        ``start``: its arrival; ``gone``: whether its client has left; ``looked``: what a lookup
        of it already learned; ``target``: its (model, version), where already parsed from
        ``path``. Never raises for a request: errors are answers."""
        # First: an error about the path or a header is answered in the client's format too.
        content_type = next((value for name, value in headers if name == b"content-type"), b"")
        call = None
        try:
            if target is None:
                target = infer_target(path)
            if target is None:
                raise NotFound(f"no such endpoint: POST {path}")
            services = self.app.state.services
            pipeline = services.pipeline
            h = read_headers(headers, pipeline.rollouts.pin_headers, start)
            content_type = h.content_type
            if body is None:
                body = await read_body(receive, h.declared, self._limit)
            if h.encoding:
                body = await off_loop(len(body), inflate, body, h.encoding, self._limit)
            call = Call(target, body, content_type, h.header_length, h.deadline, gone, h.freshness, h.sticky)
            cache = pipeline.cache
            if cache is not None and h.freshness.use and cache.enabled_for(target[0]):
                reply, version, source = await self._infer_cached(pipeline, cache, call, looked)
            else:
                reply, version, source = await self._infer(pipeline, call)
            if gone is not None and gone():  # left while its request was upstream: nobody to answer
                raise ClientGone("the client disconnected before its answer")
            self.counts.record(target[0], version, 200, time.monotonic() - start, source)
            return reply
        except ClientGone:
            model, _ = self._labels(path, target, call)
            self.counts.disconnected(model)
            return None
        except GatewayError as exc:
            if isinstance(exc, BadRequest) and target is not None:
                exc = await self._unknown_first(target, exc)
            reply = error_reply(exc.status, exc.message, content_type)
        except Exception as exc:  # a bug: answer 500 and keep the traceback in the log
            log.exception("unhandled error on POST %s", path)
            reply = error_reply(500, f"internal gateway error ({exc.__class__.__name__})", content_type)
        model, version = self._labels(path, target, call)
        self.counts.record(model, version, reply.status, time.monotonic() - start)
        return reply

    async def _unknown_first(self, target: tuple[str, str], error: BadRequest) -> GatewayError:
        """What to answer a request refused as malformed: Triton's 404 when its model or version
        is unknown (Triton looks the model up first), else ``error``. Only refused requests pay."""
        metadata = self.app.state.services.pipeline.metadata
        try:
            if metadata.fresh(*target) is None:
                await metadata.get(*target)
        except NotFound as unknown:
            return unknown
        except GatewayError:  # the fleet cannot say now: the request's own fault stands
            pass
        return error

    def _labels(self, path: str, target: tuple[str, str] | None, call: Call | None) -> tuple[str, str]:
        """The model and version a request that no version answered is counted under: those it
        named or was given (the chosen version, once decoded), where the fleet holds them."""
        if target is None:  # the path itself was refused
            parts = path.split("/")
            target = (parts[3] if len(parts) > 3 else "", "")
        services = getattr(self.app.state, "services", None)
        if services is None:  # not started yet: nothing is known of the fleet
            return "", ""
        version = call.request.version if call is not None and call.request is not None else target[1]
        return fleet_labels(services.router, target[0], version)

    async def _infer_cached(
        self, pipeline: InferencePipeline, cache: ResponseCache, call: Call, looked: Looked
    ) -> tuple[Reply, str, str]:
        """A request for a cached model: its raw answer if one is stored, else the full path
        (which keeps the answer for the next identical request). Returns the reply, the version
        that served it and where the answer came from (``X-Cache``)."""
        reply, served, (chosen, key) = raw_lookup(pipeline, cache, call, looked)
        if reply is None:
            keep = (cache, cache.epoch(call.target[0], served), served, key) if key is not None else None
            return await self._infer(pipeline, call, chosen, keep)
        return reply, served, "hit"

    # -- infer requests served by the HTTP protocol itself (protocol/infer_server.py) --------

    def may_serve(self, url: bytes, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str] | None:
        """The (model, version) of an arriving POST (its request target and lower-case headers)
        that the protocol may serve by itself, without an ASGI cycle: an infer request with a
        small body of declared length, not compressed. None: the ASGI path serves it."""
        if not url.endswith(b"/infer") or b"%" in url or getattr(self.app.state, "services", None) is None:
            return None
        declared = None
        for name, value in headers:
            if name == b"content-length":
                declared = value
            elif name in (b"content-encoding", b"transfer-encoding"):
                return None
        if declared is None or not declared.isdigit() or int(declared) > min(SMALL_BODY, self._limit):
            return None
        try:
            return infer_target(url.decode("latin-1"))
        except BadRequest:  # the ASGI path answers it
            return None

    def answer_from_cache(
        self, target: tuple[str, str], headers: list[tuple[bytes, bytes]], body: bytes, start: float
    ) -> tuple[Reply | None, Looked]:
        """The stored answer to a request ``may_serve`` accepted, counted as ``serve`` counts one,
        and what the lookup learned (``Looked``), for ``serve_held`` to reuse. None at once for
        a model whose cache is off."""
        pipeline = self.app.state.services.pipeline
        cache = pipeline.cache
        if cache is None or not cache.enabled_for(target[0]):
            return None, (None, None)
        try:
            h = read_headers(headers, pipeline.rollouts.pin_headers, start)
        except GatewayError:  # a malformed header: serve_held answers it
            return None, (None, None)
        if not h.freshness.use:
            return None, (None, None)
        call = Call(target, body, h.content_type, h.header_length, h.deadline, None, h.freshness, h.sticky)
        answer, served, looked = raw_lookup(pipeline, cache, call)
        if answer is not None:
            self.counts.record(target[0], served, 200, time.monotonic() - start, "hit")
        return answer, looked

    def serve_held(
        self,
        url: bytes,
        target: tuple[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        start: float,
        looked: Looked,
        gone: Callable[[], bool],
    ) -> Awaitable[Reply | None]:
        """``serve`` for a request ``may_serve`` accepted and the protocol holds complete (``body``)."""
        return self.serve(url.decode("latin-1"), headers, start, body=body, gone=gone, looked=looked, target=target)

    def request_lost(self, target: tuple[str, str]) -> None:
        """A request the protocol held whose client left before it was complete: counted as
        ``serve`` counts a client gone before its answer."""
        services = getattr(self.app.state, "services", None)
        if services is not None:
            self.counts.disconnected(fleet_labels(services.router, target[0], target[1])[0])

    def request_failed(self, target: tuple[str, str], start: float) -> None:
        """A request the protocol answered 500 itself (``serve`` never answered it: cancelled when
        the server's shutdown grace ran out, or a bug): counted as ``serve`` counts a 500."""
        services = getattr(self.app.state, "services", None)
        if services is not None:
            model, version = fleet_labels(services.router, target[0], target[1])
            self.counts.record(model, version, 500, time.monotonic() - start)

    async def _infer(
        self,
        pipeline: InferencePipeline,
        call: Call,
        chosen: tuple[str, bool] | None = None,
        keep: tuple[ResponseCache, Epoch, str, bytes] | None = None,
    ) -> tuple[Reply, str, str]:
        """Decode, run the pipeline and encode; with ``keep`` (the cache, its epoch before
        computing, and the version and raw key the request was looked up under), a cacheable
        answer is also kept as raw bytes. Returns the reply, the version that served it and
        where the answer came from (``X-Cache``; "" for a model without the cache)."""
        model, version = call.target
        body = call.body
        if is_msgpack(call.content_type):
            req = call.request = await off_loop(len(body), msgpack_codec.decode_request, body, model, version)
            resp = await pipeline.infer(req, call.deadline, call.gone, call.freshness, call.sticky, chosen)
            payload = msgpack_codec.encode_response(resp, req)
            headers = [(b"content-type", MSGPACK_TYPES[0]), (b"model-version", resp.version.encode())]
        else:
            header_length = call.header_length
            length = v2.parse_header_length(None if header_length is None else header_length.decode("latin-1"), len(body))
            req = call.request = await off_loop(len(body), v2.decode_request, body, length, model, version)
            resp = await pipeline.infer(req, call.deadline, call.gone, call.freshness, call.sticky, chosen)
            payload, json_length = v2.encode_response(resp, req)
            if json_length is None:
                headers = [(b"content-type", JSON_TYPE)]
            else:
                headers = [(b"content-type", BINARY_TYPE), (b"inference-header-content-length", b"%d" % json_length)]
            headers.append((b"model-version", resp.version.encode()))
        length_header = (b"content-length", str(len(payload)).encode())
        if keep is not None and resp.cache in RAW_STORABLE:
            cache, epoch, looked_up, key = keep
            stored = RawAnswer((*headers, (b"x-cache", b"hit"), length_header), payload)
            if resp.version != looked_up:  # that version left the fleet meanwhile: another served it
                key = raw_key(model, resp.version, call.content_type, call.header_length, body)
            cache.put_raw(model, resp.version, key, stored, epoch, computed=resp.cache == "miss", age=resp.age or 0.0)
        if resp.cache:
            headers.append((b"x-cache", resp.cache.encode()))
            if resp.age is not None:
                headers.append(age_header(resp.age)[0])
        headers.append(length_header)
        return Reply(200, headers, payload), resp.version, resp.cache
