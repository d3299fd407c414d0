"""Instance choice and failover, with a fake Triton client (no network)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.errors import Unavailable, UpstreamError
from gateway.router import Instance, Router
from gateway.tensors import Tensor
from gateway.upstream.client import InstanceUnreachable


class FakeClient:
    def __init__(
        self, down: set[str] = frozenset(), error: Exception | None = None, errors: dict[str, Exception] | None = None
    ) -> None:
        self.down = set(down)
        self.error = error
        self.errors = errors or {}
        self.calls: list[str] = []

    async def infer(self, url, model, version, inputs, parameters, timeout):  # noqa: ANN001, ANN201
        self.calls.append(url)
        if url in self.down:
            raise InstanceUnreachable(f"{url}: refused", connect_failed=True)
        if url in self.errors:
            raise self.errors[url]
        if self.error is not None:
            raise self.error
        return BatchResult("1", inputs)


INPUTS = [Tensor("x", "FP32", np.zeros((1, 2), np.float32))]


def test_pick_prefers_fewest_outstanding_per_weight_among_healthy() -> None:
    a, b, c = Instance("a", weight=1), Instance("b", weight=3), Instance("c", healthy=False)
    router = Router([a, b, c], FakeClient())  # type: ignore[arg-type]
    a.outstanding, b.outstanding = 1, 3  # a: 2/1, b: 4/3
    assert router.pick() is b
    b.outstanding = 6  # b: 7/3 > 2
    assert router.pick() is a
    assert router.pick(exclude=[a]) is b


def test_no_healthy_instance_is_unavailable() -> None:
    router = Router([Instance("a", healthy=False)], FakeClient())  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        router.pick()


async def test_unreachable_instance_is_marked_down_and_the_request_retried_elsewhere() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient(down={"a"})
    router = Router([a, b], client)  # type: ignore[arg-type]
    result = await router.infer("m", "", INPUTS, None)
    assert result.outputs is INPUTS
    assert client.calls == ["a", "b"] and not a.healthy and b.healthy
    assert a.outstanding == b.outstanding == 0


async def test_all_unreachable_raises_after_trying_each_once() -> None:
    client = FakeClient(down={"a", "b"})
    router = Router([Instance("a"), Instance("b")], client)  # type: ignore[arg-type]
    with pytest.raises(InstanceUnreachable):
        await router.infer("m", "", INPUTS, None)
    assert sorted(client.calls) == ["a", "b"]


async def test_an_answer_with_an_error_is_not_retried() -> None:
    client = FakeClient(error=UpstreamError("bad input", status=400))
    router = Router([Instance("a"), Instance("b")], client)  # type: ignore[arg-type]
    with pytest.raises(UpstreamError, match="bad input"):
        await router.infer("m", "", INPUTS, None)
    assert len(client.calls) == 1


async def test_a_dropped_connection_is_retried_elsewhere_without_evicting_the_instance() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient(errors={"a": InstanceUnreachable("a: server disconnected", connect_failed=False)})
    router = Router([a, b], client)  # type: ignore[arg-type]
    await router.infer("m", "", INPUTS, None)
    assert client.calls == ["a", "b"] and a.healthy


async def test_an_instance_without_the_model_version_hands_the_request_to_another() -> None:
    missing = UpstreamError("Request for unknown model: 'm' version 2 is not found", status=400)
    client = FakeClient(errors={"a": missing})
    router = Router([Instance("a"), Instance("b")], client)  # type: ignore[arg-type]
    result = await router.infer("m", "2", INPUTS, None)
    assert result.outputs is INPUTS and client.calls == ["a", "b"]
