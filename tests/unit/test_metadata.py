"""The metadata cache: one fetch for many callers, fresh entries served without awaiting, expiry,
and unknown models remembered briefly. A fake router (no network)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.errors import NotFound
from gateway.upstream.client import RawResponse
from gateway.upstream.metadata import NOT_FOUND_TTL_S, MetadataCache

METADATA = {"name": "m", "versions": ["1"], "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}], "outputs": []}


class Router:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.known = {"m"}

    async def get(self, path: str, timeout: float | None = None, model: str | None = None, version: str = "") -> RawResponse:
        self.paths.append(path)
        await asyncio.sleep(0)
        if model not in self.known:
            return RawResponse(400, orjson.dumps({"error": f"Request for unknown model: '{model}' is not found"}))
        if path.endswith("/config"):
            return RawResponse(200, orjson.dumps({"max_batch_size": 8}))
        return RawResponse(200, orjson.dumps(METADATA))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_fetch_and_fresh_entries_need_no_await() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    assert cache.fresh("m", "") is None
    infos = await asyncio.gather(*(cache.get("m", "") for _ in range(10)))
    assert router.paths == ["/v2/models/m", "/v2/models/m/config"]
    assert all(info is infos[0] for info in infos) and infos[0].max_batch_size == 8
    assert cache.fresh("m", "") is infos[0]
    clock.now += 5.0  # expired: fetched again
    assert cache.fresh("m", "") is None
    await cache.get("m", "")
    assert len(router.paths) == 4


async def test_an_unknown_model_is_remembered_briefly_and_never_fresh() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(NotFound, match="model 'nope' is not served"):
            await cache.get("nope", "")
        assert cache.fresh("nope", "") is None
    assert len(router.paths) == 2
    router.known.add("nope")
    clock.now += NOT_FOUND_TTL_S
    assert (await cache.get("nope", "")).name == "m"
