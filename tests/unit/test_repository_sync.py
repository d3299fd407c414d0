"""The repository sync (gateway/upstream/repository.py) against a fake Triton in explicit
model-control mode: an aiohttp server that keeps the loaded versions of each model as Triton
does (exactly the versions a load names; a version whose model.py fails is UNAVAILABLE with a
reason, the others load), and a real model folder in a temporary directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from gateway.config import RepositoryConfig
from gateway.errors import Unavailable
from gateway.instances import Instance
from gateway.router import Router
from gateway.upstream.repository import (
    PLACEMENT_PARAMETER,
    WARMUP_SEQUENCE,
    ControlError,
    RepositorySync,
    Target,
    model_file,
    own_files,
    parse_model_config,
    pinned_config,
    read_version,
    recorded_placement,
    same_instances,
    scan_repository,
    served_versions,
    warmup_body,
)

CONFIG = """
name: "m"
backend: "python"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "x", data_type: TYPE_FP32, dims: [ 3 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 3 ] } ]
"""


# Triton's datatypes as they travel in binary (BF16 as its raw 16 bits; BYTES length-prefixed).
WIRE = {"BOOL": "<u1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
        "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "BF16": "<u2", "FP32": "<f4", "FP64": "<f8"}  # fmt: skip


def read_infer(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """An infer request as Triton reads it: the JSON header (the first ``header_length`` bytes,
    else the whole body) and each input's values, from its JSON ``data`` or from the binary part
    (``binary_data_size`` bytes each, in input order). ValueError with Triton's message for what
    it refuses: FP16 and BF16 data in JSON."""
    length = len(body) if header_length is None else int(header_length)
    header = json.loads(body[:length])
    binary, values = body[length:], {}
    for spec in header["inputs"]:
        name, datatype = spec["name"], spec["datatype"]
        count = int(np.prod(spec["shape"]))
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            if datatype in ("FP16", "BF16"):
                raise ValueError(f"receiving {datatype} data via JSON is not supported. Please use the binary data format for input {name}")
            values[name] = np.array(spec["data"]).ravel().tolist()
        elif datatype == "BYTES":
            items, at = [], 0
            for _ in range(count):
                (n,) = struct.unpack_from("<I", binary, at)
                items.append(binary[at + 4 : at + 4 + n])
                at += 4 + n
            assert at == size
            values[name] = items
        else:
            values[name] = np.frombuffer(binary[:size], WIRE[datatype]).tolist()
            assert len(values[name]) == count
        binary = binary[size or 0 :]
    assert binary == b"", "binary data left over"
    return header, values


class FakeTriton:
    def __init__(self) -> None:
        self.models: dict[str, dict[str, dict[str, str]]] = {}  # model -> version -> {state, reason}
        self.broken: dict[tuple[str, str], str] = {}  # versions whose load fails, with the reason
        self.failing_infer: set[tuple[str, str]] = set()
        self.busy_infer: set[tuple[str, str]] = set()  # answered 503: not the version's fault
        self.reject_config = ""  # a config error for every load, when set
        self.calls: list[tuple[str, str, list[str]]] = []  # (action, model, versions)
        self.infers: list[tuple[str, str]] = []
        self.warmups: list[tuple[dict[str, Any], dict[str, list[Any]]]] = []  # (header, values) as read
        # What /config answers (Triton's JSON form of the model's config).
        self.model_config: dict[str, Any] = {"max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]}
        self.gate: asyncio.Event | None = None  # loads wait on it when set
        self.loaded_configs: dict[str, dict[str, Any]] = {}  # model -> the config its last load carried
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v2/repository/index", self.index)
        app.router.add_get("/v2/models/{model}/versions/{version}/config", self.config)
        app.router.add_get("/v2/models/{model}/config", self.loaded_config)
        app.router.add_post("/v2/models/{model}/versions/{version}/infer", self.infer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def ready(self) -> dict[str, frozenset[str]]:
        return {
            m: frozenset(v for v, s in vs.items() if s["state"] == "READY")
            for m, vs in self.models.items()
            if any(s["state"] == "READY" for s in vs.values())
        }

    async def load(self, model: str, config: str) -> None:
        versions = [str(v) for v in json.loads(config)["version_policy"]["specific"]["versions"]]
        self.calls.append(("load", model, versions))
        if self.gate is not None:
            await self.gate.wait()
        if self.reject_config:
            raise ControlError(self.reject_config, retry=False)
        states = {}
        failed = []
        for v in versions:
            reason = self.broken.get((model, v))
            states[v] = {"state": "UNAVAILABLE", "reason": reason} if reason else {"state": "READY", "reason": ""}
            if reason:
                failed.append(v)
        self.models[model] = states
        self.loaded_configs[model] = json.loads(config)
        if failed:
            raise ControlError(f"load failed for model '{model}': version {failed[0]} is at UNAVAILABLE state", retry=False)

    async def unload(self, model: str) -> None:
        self.calls.append(("unload", model, []))
        self.models.pop(model, None)
        self.loaded_configs.pop(model, None)

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"name": m, "version": v, **s} for m, vs in self.models.items() for v, s in vs.items()]
        )

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(self.model_config)

    async def loaded_config(self, request: web.Request) -> web.Response:
        """The config Triton serves the model with: the one its load carried."""
        config = self.loaded_configs.get(request.match_info["model"])
        if config is None:
            return web.json_response({"error": "Request for unknown model"}, status=400)
        return web.json_response(config)

    async def infer(self, request: web.Request) -> web.Response:
        key = (request.match_info["model"], request.match_info["version"])
        try:
            header, values = read_infer(await request.read(), request.headers.get("Inference-Header-Content-Length"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        wanted = [i for i in self.model_config["input"] if not i.get("optional")]
        assert [(i["name"], i["shape"]) for i in header["inputs"]] == [(i["name"], [1, *i["dims"]]) for i in wanted]
        assert all(not v for vs in values.values() for v in vs), "not zeros"
        self.warmups.append((header, values))
        self.infers.append(key)
        if key in self.busy_infer:
            return web.json_response({"error": "server busy"}, status=503)
        if key in self.failing_infer:
            return web.json_response({"error": "execute failed"}, status=500)
        return web.json_response({"outputs": []})


def add_version(repo: Path, model: str, version: str, text: str = "weights") -> None:
    folder = repo / model / version
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "m").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text(CONFIG)
    add_version(root, "m", "1")
    return root


@pytest.fixture
async def tritons() -> AsyncIterator[list[FakeTriton]]:
    fakes = [FakeTriton(), FakeTriton()]
    for fake in fakes:
        await fake.start()
    yield fakes
    for fake in fakes:
        await fake.stop()


class FakeControl:
    """Load and unload calls, answered by the fake Triton the target names."""

    def __init__(self, tritons: list[FakeTriton]) -> None:
        self.by_target = {t.url: t for t in tritons}
        self.unreachable: set[str] = set()
        self.deadline_after_load: set[str] = set()  # the load happens, but the call times out

    async def load(self, target: str, model: str, config: str) -> None:
        if target in self.unreachable:
            raise ControlError("failed to connect to all addresses", retry=True)
        await self.by_target[target].load(model, config)
        if target in self.deadline_after_load:
            raise ControlError("Deadline Exceeded", retry=True)

    async def unload(self, target: str, model: str) -> None:
        await self.by_target[target].unload(model)

    async def close(self) -> None:
        pass


BROKEN = "RuntimeError: broken on purpose"  # why a broken version fails to load


class Harness:
    def __init__(self, repo: Path, tritons: list[FakeTriton], **config: Any) -> None:
        self.repo = repo
        self.tritons = tritons
        self.instances = [Instance(t.url, grpc=t.url) for t in tritons]
        self.control = FakeControl(tritons)
        for instance in self.instances:
            instance.set_index({})  # explicit mode: Triton starts empty
        self.router = Router(self.instances, client=None)  # type: ignore[arg-type]
        self.reloaded: list[tuple[str, str]] = []
        settings = RepositoryConfig(path=str(repo), **{"drain_timeout_s": 5.0, **config})
        self.sync = RepositorySync(
            settings, self.router, self.control, on_version_reloaded=lambda m, v: self.reloaded.append((m, v))
        )

    def probe(self) -> None:
        """What a health round does: the index says what is READY."""
        for instance, triton in zip(self.instances, self.tritons):
            instance.set_index(triton.ready())

    async def round(self) -> None:
        """One scan-and-act round, waited through (the probe first, as in the gateway)."""
        self.probe()
        await self.sync.sync_once()
        await self.settle()

    async def settle(self) -> None:
        while self.sync._tasks:
            await asyncio.wait(list(self.sync._tasks.values()))

    async def publish(self, version: str = "2") -> None:
        """Publish ``version`` of model m and run two rounds: the sync acts on a new folder once
        two scans agree."""
        add_version(self.repo, "m", version)
        await self.round()
        await self.round()

    async def publish_broken(self, version: str = "2", warmup: bool = False) -> None:
        """Break ``version`` of model m on every instance (its load fails with ``BROKEN``, or
        with ``warmup`` its warm-up inference fails), and publish it."""
        for triton in self.tritons:
            if warmup:
                triton.failing_infer.add(("m", version))
            else:
                triton.broken[("m", version)] = BROKEN
        await self.publish(version)

    def routed(self, model: str = "m") -> list[list[str]]:
        return [sorted((i.models or {}).get(model, ()), key=int) for i in self.instances]

    def events(self, what: str) -> list[dict[str, Any]]:
        return [e for e in self.sync.events if e["event"] == what]


@pytest.fixture
async def harness(repo: Path, tritons: list[FakeTriton]) -> AsyncIterator[Harness]:
    h = Harness(repo, tritons)
    await h.sync.start()
    yield h
    await h.sync.close()


# -- the folder and the config ------------------------------------------------------------------


def test_scan_finds_models_and_numbered_versions_only(repo: Path) -> None:
    add_version(repo, "m", "2")
    (repo / "m" / ".3.tmp").mkdir()  # being written: not a version yet
    (repo / "m" / "notes").mkdir()
    (repo / ".staging").mkdir()
    (repo / "not_a_model").mkdir()  # no config.pbtxt
    scan = scan_repository(repo)
    assert list(scan) == ["m"]
    assert [v for v, _ in scan["m"].versions] == ["1", "2"]


def test_a_fingerprint_changes_with_the_files_but_not_with_pycache(repo: Path) -> None:
    folder = repo / "m" / "1"
    before = read_version(folder)[0]
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"compiled by the server")
    assert read_version(folder)[0] == before
    (folder / "model.py").write_text("new weights, new size")
    assert read_version(folder)[0] != before


def test_a_fingerprint_sees_a_file_replaced_by_one_of_the_same_size_and_an_older_time(repo: Path) -> None:
    """As ``rsync -a`` or ``cp -p`` put retrained weights (same shapes, same size) in place,
    keeping their own, older time, beside a newer file: a count, a total size and the newest
    time are all unchanged, yet the model is not."""
    folder = repo / "m" / "1"
    weights = folder / "model.pt"
    weights.write_bytes(b"old weights")
    os.utime(weights, ns=(10**18, 10**18))
    os.utime(folder / "model.py", ns=(2 * 10**18, 2 * 10**18))  # the newest file, untouched
    before = read_version(folder)[0]
    weights.write_bytes(b"new weights")
    os.utime(weights, ns=(10**18 - 1, 10**18 - 1))
    assert read_version(folder)[0] != before


def test_a_fingerprint_sees_files_swapped_or_renamed(repo: Path) -> None:
    folder = repo / "m" / "1"
    (folder / "weights").mkdir()
    for name in ("a.bin", "b.bin"):
        (folder / "weights" / name).write_bytes(b"0123")
        os.utime(folder / "weights" / name, ns=(10**18, 10**18))
    before = read_version(folder)[0]
    (folder / "weights" / "a.bin").rename(folder / "weights" / "c.bin")
    assert read_version(folder)[0] != before
    (folder / "weights" / "c.bin").rename(folder / "c.bin")  # the same name, another folder
    assert read_version(folder)[0] != before


def test_a_fingerprint_is_the_same_for_the_same_files(repo: Path, tmp_path: Path) -> None:
    """What a load records (``recorded_placement``) must match again after a restart: the
    fingerprint depends on the files, not on the order a walk meets them in."""
    folder = repo / "m" / "1"
    (folder / "weights").mkdir()
    for name in ("b.bin", "a.bin"):
        (folder / "weights" / name).write_bytes(name.encode())
    assert read_version(folder)[0] == read_version(folder)[0]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy2)  # same names, sizes and times
    assert read_version(copy)[0] == read_version(folder)[0]


def test_a_model_folders_own_files_are_fingerprinted_per_file(repo: Path) -> None:
    model = repo / "m"
    (model / "labels.txt").write_text("cat\ndog\n")
    (model / "extra.txt").write_text("a\n")
    os.utime(model / "labels.txt", ns=(10**18, 10**18))
    os.utime(model / "extra.txt", ns=(2 * 10**18, 2 * 10**18))
    before = own_files(str(model))
    (model / "config.pbtxt").write_text((model / "config.pbtxt").read_text() + "\n")  # read apart
    (model / ".notes").write_text("hidden")
    assert own_files(str(model)) == before
    (model / "labels.txt").write_text("dog\ncat\n")  # the same size, an older time than extra.txt
    os.utime(model / "labels.txt", ns=(10**18 + 1, 10**18 + 1))
    assert own_files(str(model)) != before


def test_a_version_is_read_in_one_walk_with_its_top_level_names(repo: Path) -> None:
    folder = repo / "m" / "1"
    (folder / "__pycache__").mkdir()
    (folder / "weights").mkdir()
    (folder / "weights" / "part.bin").write_bytes(b"0123")
    stamp, names = read_version(folder)
    assert names == frozenset(os.listdir(folder))  # __pycache__ too: Triton sees it
    (folder / "weights" / "part.bin").write_bytes(b"4567")  # a file one folder down
    os.utime(folder / "weights" / "part.bin", ns=(10**9, 10**9))
    assert read_version(folder)[0] != stamp


def test_a_version_folder_that_cannot_be_read_raises(repo: Path) -> None:
    with pytest.raises(OSError):
        read_version(repo / "m" / "9")
    (repo / "m" / "8").write_text("a file, not a folder")
    with pytest.raises(OSError):
        read_version(repo / "m" / "8")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("version_policy: { all { } }", ["1", "2", "10"]),
        ("version_policy: { latest { num_versions: 2 } }", ["2", "10"]),
        ("version_policy: { specific { versions: [ 1, 10 ] } }", ["1", "10"]),
        ("", ["10"]),  # Triton's default: the latest one
    ],
)
def test_served_versions_follow_the_models_version_policy(policy: str, expected: list[str]) -> None:
    config = parse_model_config(f'name: "m"\n{policy}\n')
    assert served_versions(config, ["10", "1", "2"]) == expected


def test_a_config_that_does_not_parse_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match=r"config.pbtxt: .*no field named \"bogus\""):
        parse_model_config('name: "m"\nbogus: 3\n')


def test_the_load_config_pins_the_versions_and_keeps_the_rest_of_the_config() -> None:
    sent = json.loads(pinned_config(parse_model_config(CONFIG), ["2", "10"]))
    assert [int(v) for v in sent["version_policy"]["specific"]["versions"]] == [2, 10]
    assert "all" not in sent["version_policy"]
    assert sent["max_batch_size"] == 8 and sent["input"][0]["name"] == "x"
    assert "parameters" not in sent
    stamped = json.loads(pinned_config(parse_model_config(CONFIG), ["2"], stamp="abc"))
    assert stamped["parameters"] == {PLACEMENT_PARAMETER: {"string_value": "abc"}}


def test_the_warmup_request_is_one_row_of_zeros_shaped_by_the_config() -> None:
    config = {
        "max_batch_size": 4,
        "input": [
            {"name": "img", "data_type": "TYPE_FP32", "dims": [2, -1]},
            {"name": "text", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "mask", "data_type": "TYPE_BOOL", "dims": [2]},
            {"name": "extra", "data_type": "TYPE_FP32", "dims": [5], "optional": True},
        ],
    }
    header, values = read_infer(*warmup_sent(config))
    assert header["inputs"] == [
        {"name": "img", "datatype": "FP32", "shape": [1, 2, 1], "parameters": {"binary_data_size": 8}},
        {"name": "text", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 4}},
        {"name": "mask", "datatype": "BOOL", "shape": [1, 2], "parameters": {"binary_data_size": 2}},
    ]
    assert values == {"img": [0.0, 0.0], "text": [b""], "mask": [0, 0]}
    assert header["parameters"] == {"binary_data_output": True}  # outputs binary too: FP16 ones cannot be JSON
    unbatched, _ = read_infer(*warmup_sent({"max_batch_size": 0, "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [3]}]}))
    assert unbatched["inputs"][0]["shape"] == [3]


def warmup_sent(config: dict[str, Any]) -> tuple[bytes, str]:
    """The warm-up's body and its Inference-Header-Content-Length header."""
    body, length = warmup_body(config)
    return body, str(length)


TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "STRING"]


def test_the_warmup_request_sends_every_datatype_as_binary_zeros() -> None:
    """Triton refuses FP16 and BF16 data in JSON: every input travels binary, as the gateway's
    own requests do."""
    config = {"max_batch_size": 2, "input": [{"name": t.lower(), "data_type": f"TYPE_{t}", "dims": [3]} for t in TYPES]}
    body, length = warmup_sent(config)
    header, values = read_infer(body, length)
    sizes = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4, "INT32": 4,
             "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "STRING": 4}  # fmt: skip
    assert header["inputs"] == [
        {"name": t.lower(), "datatype": "BYTES" if t == "STRING" else t, "shape": [1, 3], "parameters": {"binary_data_size": 3 * sizes[t]}}
        for t in TYPES
    ]
    assert values == {t.lower(): [b"", b"", b""] if t == "STRING" else [0, 0, 0] for t in TYPES}
    assert len(body) == int(length) + sum(3 * size for size in sizes.values())


@pytest.mark.parametrize(("corrid", "sid"), [("TYPE_UINT64", WARMUP_SEQUENCE), ("TYPE_STRING", str(WARMUP_SEQUENCE)), (None, WARMUP_SEQUENCE)])
def test_a_stateful_models_warmup_is_a_whole_sequence_in_one_request(corrid: str | None, sid: int | str) -> None:
    """Triton refuses a request outside a sequence to a model with sequence batching."""
    controls = [{"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "fp32_false_true": [0, 1]}]}]
    if corrid is not None:
        controls.append({"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": corrid}]})
    config = {"max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
              "sequence_batching": {"control_input": controls}}  # fmt: skip
    body, values = read_infer(*warmup_sent(config))
    assert body["parameters"] == {"sequence_id": sid, "sequence_start": True, "sequence_end": True, "binary_data_output": True}
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 1], "parameters": {"binary_data_size": 4}}]
    assert values == {"x": [0.0]}
    stateless, _ = read_infer(*warmup_sent({"max_batch_size": 8, "input": config["input"]}))
    assert stateless["parameters"] == {"binary_data_output": True}


# -- the sync -----------------------------------------------------------------------------------


async def test_start_loads_every_model_on_every_instance_warms_it_and_routes_it(harness: Harness) -> None:
    for triton in harness.tritons:
        assert triton.calls == [("load", "m", ["1"])]
        assert triton.infers == [("m", "1")]  # the warm-up
    assert harness.routed() == [["1"], ["1"]]
    assert len(harness.events("ready")) == 2


async def test_the_first_round_leaves_a_model_still_being_copied_to_the_later_rounds(repo: Path, tritons: list[FakeTriton]) -> None:
    """A starting gateway (or a worker taking the driving over) acts on two scans too."""
    add_version(repo, "m", "2")
    copied = repo / "m" / "2" / "weights.bin"

    async def copy() -> None:
        with copied.open("ab") as out:
            while True:
                out.write(b"\0" * 100)
                out.flush()
                await asyncio.sleep(0.01)

    copying = asyncio.create_task(copy())
    h = Harness(repo, tritons)
    try:
        await h.sync.start()
        assert all(t.calls == [] for t in tritons), "acted on a folder still being copied"
        copying.cancel()
        await asyncio.gather(copying, return_exceptions=True)
        await h.round()
        await h.round()
        assert h.routed() == [["1", "2"], ["1", "2"]]
    finally:
        copying.cancel()
        await h.sync.close()


async def test_a_model_with_fp16_inputs_warms_up_and_is_routed(repo: Path, tritons: list[FakeTriton]) -> None:
    """Triton refuses FP16 data in JSON (400): a warm-up sent so would fail such a model for good."""
    for triton in tritons:
        triton.model_config = {
            "max_batch_size": 8,
            "input": [{"name": "x", "data_type": "TYPE_FP16", "dims": [3]}, {"name": "b", "data_type": "TYPE_BF16", "dims": [2]}],
            "sequence_batching": {},
        }
    harness = Harness(repo, tritons)
    await harness.sync.start()
    try:
        assert harness.routed() == [["1"], ["1"]]
        assert harness.events("failed") == [] and len(harness.events("ready")) == 2
        for triton in tritons:
            header, values = triton.warmups[-1]
            assert [(i["name"], i["datatype"]) for i in header["inputs"]] == [("x", "FP16"), ("b", "BF16")]
            assert values == {"x": [0.0, 0.0, 0.0], "b": [0, 0]}
            assert header["parameters"]["sequence_start"] is True  # a stateful model's: one whole sequence
    finally:
        await harness.sync.close()


async def test_a_new_version_is_routed_only_after_it_loaded_and_warmed_everywhere(harness: Harness, repo: Path) -> None:
    add_version(repo, "m", "2")
    await harness.round()
    assert all(t.calls[-1] == ("load", "m", ["1"]) for t in harness.tritons), "acted before two scans agreed"
    gate = asyncio.Event()
    for triton in harness.tritons:
        triton.gate = gate
    harness.probe()
    await harness.sync.sync_once()
    await asyncio.sleep(0.05)
    assert [t.calls[-1] for t in harness.tritons] == [("load", "m", ["1", "2"])] * 2
    assert harness.routed() == [["1"], ["1"]]  # loading: withheld
    assert harness.router.newest_version("m") == "1"
    with pytest.raises(Unavailable, match=r"model .m. version 2 is available \(loading\)"):
        harness.router.pick("m", "2")
    gate.set()
    await harness.settle()
    assert all(("m", "2") in t.infers for t in harness.tritons)
    assert harness.routed() == [["1", "2"], ["1", "2"]]
    assert harness.router.newest_version("m") == "2"


async def test_a_version_that_fails_its_warmup_is_never_routed_and_is_unloaded(harness: Harness) -> None:
    await harness.publish_broken(warmup=True)
    assert harness.routed() == [["1"], ["1"]]
    assert "warm-up inference failed" in harness.sync.snapshot()["models"]["m"]["failed"]["2"]
    await harness.round()  # the failed version goes; version 1 stays
    assert all(t.ready() == {"m": frozenset({"1"})} for t in harness.tritons)
    assert harness.routed() == [["1"], ["1"]]
    await harness.round()
    calls = len(harness.tritons[0].calls)
    await harness.round()
    assert len(harness.tritons[0].calls) == calls, "a failed version is not tried again with the same files"


async def test_a_version_that_fails_to_load_is_reported_and_tried_again_when_its_files_change(harness: Harness, repo: Path) -> None:
    await harness.publish_broken()
    snapshot = harness.sync.snapshot()["models"]["m"]
    assert snapshot["failed"] == {"2": BROKEN}
    assert snapshot["serving"] == ["1"]
    assert harness.routed() == [["1"], ["1"]]
    assert all(t.ready() == {"m": frozenset({"1"})} for t in harness.tritons)  # version 1 untouched
    calls = len(harness.tritons[0].calls)
    await harness.round()
    await harness.round()
    assert all("2" not in versions for _, _, versions in harness.tritons[0].calls[calls:])  # not tried again
    # Fixed files: tried again (after two scans agree), and routed.
    for triton in harness.tritons:
        triton.broken.clear()
    (repo / "m" / "2" / "model.py").write_text("fixed, and longer than before")
    await harness.round()
    await harness.round()
    assert harness.routed() == [["1", "2"], ["1", "2"]]
    assert harness.sync.snapshot()["models"]["m"]["failed"] == {}


async def test_a_removed_version_is_withheld_drained_then_unloaded(harness: Harness, repo: Path) -> None:
    await harness.publish()
    assert harness.routed() == [["1", "2"], ["1", "2"]]
    busy = harness.instances[0]
    busy.started("m", "1")  # a request in flight on version 1 there
    shutil.rmtree(repo / "m" / "1")
    await harness.round()
    harness.probe()
    await harness.sync.sync_once()
    await asyncio.sleep(0.2)
    assert harness.routed() == [["2"], ["2"]]  # out of routing everywhere at once
    assert harness.tritons[1].calls[-1] == ("load", "m", ["2"])  # idle there: unloaded
    assert harness.tritons[0].calls[-1] == ("load", "m", ["1", "2"]), "unloaded under a request in flight"
    busy.finished("m", "1")
    await harness.settle()
    assert harness.tritons[0].calls[-1] == ("load", "m", ["2"])
    assert len(harness.events("unloaded")) == 2


@pytest.mark.parametrize("how", ["ended", "idle"])
async def test_a_removed_version_is_unloaded_only_once_its_sequences_under_way_are_over(harness: Harness, repo: Path, how: str) -> None:
    await harness.publish()
    home = harness.instances[0]
    # A sequence of a stateful model answered there on version 1: more of its requests to come,
    # unless none comes within the model's idle time (Triton then forgets it).
    home.sequence_answered("m", "1", b"7", False, time.monotonic(), idle_s=0.5 if how == "idle" else 60.0)
    shutil.rmtree(repo / "m" / "1")
    await harness.round()
    harness.probe()
    await harness.sync.sync_once()
    await asyncio.sleep(0.2)
    assert harness.routed() == [["2"], ["2"]]  # no new request goes to version 1...
    assert home.drains("m", "1")  # ...but the sequence's next ones do
    assert harness.tritons[1].calls[-1] == ("load", "m", ["2"])
    assert harness.tritons[0].calls[-1] == ("load", "m", ["1", "2"]), "unloaded under a sequence under way"
    if how == "ended":
        home.sequence_answered("m", "1", b"7", True, time.monotonic(), idle_s=60.0)  # its last request
    await asyncio.wait_for(harness.settle(), 2)
    assert harness.tritons[0].calls[-1] == ("load", "m", ["2"])
    assert not harness.events("drain timed out")


@pytest.mark.parametrize("how", ["ended", "timed out"])
async def test_a_stateful_model_is_reloaded_where_its_sequences_are_under_way_only_once_they_are_over(
    repo: Path, tritons: list[FakeTriton], how: str
) -> None:
    """Any load call reloads the model (every version), which drops its sequences under way."""
    (repo / "m" / "config.pbtxt").write_text(CONFIG + "sequence_batching { }\n")
    harness = Harness(repo, tritons, drain_timeout_s=0.5 if how == "timed out" else 5.0)
    await harness.sync.start()
    try:
        home, other = harness.instances
        home.sequence_answered("m", "1", b"7", False, time.monotonic(), idle_s=60.0)
        add_version(repo, "m", "2")
        await harness.round()
        harness.probe()
        await harness.sync.sync_once()
        await asyncio.sleep(0.2)
        assert tritons[0].calls[-1] == ("load", "m", ["1"]), "reloaded under a sequence"
        assert home.quiescing == {"m"} and not other.quiescing  # new sequences start elsewhere...
        assert not home.reloading  # (not reloading yet: only while its load call runs)
        assert tritons[1].calls[-1] == ("load", "m", ["1"]), "...so that one waits its turn"
        if how == "ended":
            home.sequence_answered("m", "1", b"7", True, time.monotonic(), idle_s=60.0)
        await asyncio.wait_for(harness.settle(), 2)
        assert tritons[0].calls[-1] == tritons[1].calls[-1] == ("load", "m", ["1", "2"])
        assert not home.quiescing and not other.quiescing
        assert home.open_sequences("m", "1", time.monotonic()) == 0  # reloaded: none left there
        dropped = harness.events("sequences dropped")
        if how == "ended":
            assert dropped == []
        else:
            assert [(e["instance"], e["detail"]) for e in dropped] == [(home.url, "1 sequence(s) still under way when reloaded")]
    finally:
        await harness.sync.close()


async def test_a_new_model_folder_becomes_a_model_and_a_removed_one_is_unloaded(harness: Harness, repo: Path) -> None:
    staging = repo / ".other.tmp"
    staging.mkdir()
    (staging / "config.pbtxt").write_text(CONFIG.replace('name: "m"', 'name: "other"'))
    add_version(staging, ".", "1")
    staging.rename(repo / "other")
    await harness.round()
    await harness.round()
    assert harness.routed("other") == [["1"], ["1"]]
    shutil.rmtree(repo / "other")
    await harness.round()
    await harness.round()
    assert all(t.calls[-1] == ("unload", "other", []) for t in harness.tritons)
    assert harness.routed("other") == [[], []]
    assert harness.routed("m") == [["1"], ["1"]]
    await harness.round()
    assert "other" not in harness.sync.snapshot()["models"]


async def test_a_config_that_does_not_parse_leaves_the_model_as_it_is(harness: Harness, repo: Path) -> None:
    (repo / "m" / "config.pbtxt").write_text(CONFIG + "\nnot a field: at all\n")
    await harness.publish()
    await harness.round()
    assert all(t.calls == [("load", "m", ["1"])] for t in harness.tritons)
    assert harness.routed() == [["1"], ["1"]]
    assert "config.pbtxt" in harness.sync.snapshot()["models"]["m"]["config_error"]
    assert len(harness.events("config rejected")) == 1  # reported once, not every round
    (repo / "m" / "config.pbtxt").write_text(CONFIG)  # fixed: the new version loads
    await harness.round()
    await harness.round()
    assert harness.routed() == [["1", "2"], ["1", "2"]]


async def test_a_config_triton_refuses_leaves_the_model_until_the_file_changes(harness: Harness, repo: Path) -> None:
    for triton in harness.tritons:
        triton.reject_config = "unknown backend 'nope'"
    (repo / "m" / "config.pbtxt").write_text(CONFIG.replace('"python"', '"nope"'))
    await harness.round()
    await harness.round()
    assert "unknown backend 'nope'" in harness.sync.snapshot()["models"]["m"]["config_error"]
    calls = len(harness.tritons[0].calls)
    await harness.round()
    assert len(harness.tritons[0].calls) == calls
    assert harness.routed() == [["1"], ["1"]]


async def test_a_config_triton_refuses_leaves_a_version_changed_in_place_routed(harness: Harness, repo: Path) -> None:
    for triton in harness.tritons:
        triton.reject_config = "unknown backend 'nope'"
    (repo / "m" / "config.pbtxt").write_text(CONFIG.replace('"python"', '"nope"'))
    (repo / "m" / "1" / "model.py").write_text("retrained weights, other size")
    await harness.round()
    await harness.round()
    assert "unknown backend 'nope'" in harness.sync.snapshot()["models"]["m"]["config_error"]
    assert harness.routed() == [["1"], ["1"]]  # still loaded, and serving
    for triton in harness.tritons:
        triton.reject_config = ""
    (repo / "m" / "config.pbtxt").write_text(CONFIG)
    await harness.round()
    await harness.round()
    assert all(t.calls[-1] == ("load", "m", ["1"]) for t in harness.tritons)
    assert harness.routed() == [["1"], ["1"]]


async def test_a_loaded_version_held_back_for_a_failure_since_cleared_is_warmed_and_routed_again(
    harness: Harness, repo: Path
) -> None:
    """The driver before failed it on that instance; this one serves it: warmed, then routed."""
    first = harness.instances[0]
    first.withhold("m", "1", "failed: broken on purpose")
    warmups, calls = len(harness.tritons[0].infers), len(harness.tritons[0].calls)
    new = RepositorySync(harness.sync.config, harness.router, harness.control)
    new.seed({})
    await new.start()
    try:
        assert len(harness.tritons[0].calls) == calls  # loaded from these files already: not reloaded
        assert harness.tritons[0].infers[warmups:] == [("m", "1")]
        assert harness.routed() == [["1"], ["1"]]
    finally:
        await new.close()


async def test_an_instance_that_restarted_empty_gets_the_models_again(harness: Harness) -> None:
    restarted = harness.tritons[1]
    restarted.models.clear()
    restarted.infers.clear()
    await harness.round()
    assert restarted.calls[-1] == ("load", "m", ["1"]) and restarted.infers == [("m", "1")]
    assert harness.routed() == [["1"], ["1"]]


async def test_files_changed_in_place_reload_the_version_and_drop_what_was_derived_from_it(harness: Harness, repo: Path) -> None:
    (repo / "m" / "1" / "model.py").write_text("retrained weights, other size")
    await harness.round()
    await harness.round()
    assert all(t.calls[-1] == ("load", "m", ["1"]) and len(t.calls) == 2 for t in harness.tritons)
    assert harness.reloaded == [("m", "1"), ("m", "1")]
    assert harness.routed() == [["1"], ["1"]]  # never withheld: Triton swaps it in


async def test_a_driver_taking_over_loads_nothing_the_one_before_placed_from_the_files_on_disk(
    harness: Harness, repo: Path
) -> None:
    await harness.publish("2")
    assert harness.routed() == [["1", "2"], ["1", "2"]]
    placements = harness.sync.placements()
    assert set(placements) == {t.url for t in harness.tritons} and all(set(p) == {"m"} for p in placements.values())
    before = [len(t.calls) for t in harness.tritons]
    # The worker taking over (the driver exited): same router, seeded with what it placed.
    new = RepositorySync(harness.sync.config, harness.router, harness.control)
    new.seed(placements)
    await new.start()
    try:
        assert [len(t.calls) for t in harness.tritons] == before  # no load call: it would reload the model
        assert harness.routed() == [["1", "2"], ["1", "2"]]
        (repo / "m" / "2" / "model.py").write_text("retrained weights, other size")  # changed since
        for _ in range(2):
            harness.probe()
            await new.sync_once()
            while new._tasks:
                await asyncio.wait(list(new._tasks.values()))
        assert all(t.calls[len(t.calls) - 1] == ("load", "m", ["1", "2"]) for t in harness.tritons)
        assert [len(t.calls) for t in harness.tritons] == [n + 1 for n in before]
    finally:
        await new.close()


async def test_a_model_still_warming_up_is_not_handed_over_as_placed(harness: Harness) -> None:
    """A driver that exits while a version warms up: the next one must warm it, not route it."""
    first, second = harness.instances
    first.withhold("m", "1", "warming up")
    placements = harness.sync.placements()
    assert "m" not in placements[first.url] and "m" in placements[second.url]


async def test_a_driver_taking_over_without_a_placement_or_from_other_files_loads_again(
    harness: Harness, repo: Path
) -> None:
    placements = harness.sync.placements()
    before = [len(t.calls) for t in harness.tritons]
    for n, seed in enumerate((placements, {})):
        (repo / "m" / "1" / "model.py").write_text("retrained weights" + " again" * n)  # while nobody drove
        new = RepositorySync(harness.sync.config, harness.router, harness.control)
        new.seed(seed)
        await new.start()
        await new.close()
    assert [len(t.calls) for t in harness.tritons] == [n + 2 for n in before]  # each loaded it once


async def test_a_restarted_gateway_takes_over_what_it_loaded_from_these_files_without_reloading(
    harness: Harness, repo: Path
) -> None:
    """A gateway restarted (a new process: nothing seeded, new instance objects) finds the
    models its loads recorded their files' placement for: no load call, which would reload
    every version there; a version still arriving is warmed up and routed as a new one is."""
    await harness.publish("2")
    await harness.sync.close()
    calls = [len(t.calls) for t in harness.tritons]
    warmups = [len(t.infers) for t in harness.tritons]
    restarted = Harness(repo, harness.tritons)
    restarted.probe()  # the first health round: the instances hold m 1 and 2
    for instance in restarted.instances:  # as a version is until it is admitted
        instance.withhold("m", "2", "loading")
    await restarted.sync.start()
    try:
        assert [len(t.calls) for t in harness.tritons] == calls
        assert [t.infers[n:] for t, n in zip(harness.tritons, warmups)] == [[("m", "2")]] * 2
        assert restarted.routed() == [["1", "2"], ["1", "2"]]
        assert [e["version"] for e in restarted.events("adopted")] == ["1,2", "1,2"]
        await restarted.round()  # placed: later rounds leave it as it is
        await restarted.round()
        assert [len(t.calls) for t in harness.tritons] == calls
    finally:
        await restarted.sync.close()


@pytest.mark.parametrize("why", ["files changed", "labels changed", "no record", "another config", "other instances"])
async def test_a_restarted_gateway_loads_again_what_was_not_loaded_from_these_files(
    harness: Harness, repo: Path, why: str
) -> None:
    await harness.sync.close()
    if why == "files changed":
        (repo / "m" / "1" / "model.py").write_text("retrained weights, other size")  # while it was down
    elif why == "labels changed":  # a file of the model folder's own, which Triton reads at a load
        (repo / "m" / "labels.txt").write_text("benign\nmalignant\n")
    elif why == "no record":  # loaded by hand, by Triton at its start, or by an older gateway
        for triton in harness.tritons:
            del triton.loaded_configs["m"]["parameters"]
    elif why == "another config":
        (repo / "m" / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 8", "max_batch_size: 4"))
    else:
        (repo / "m" / "config.pbtxt").write_text(CONFIG + "instance_group [ { count: 2, kind: KIND_CPU } ]\n")
    calls = [len(t.calls) for t in harness.tritons]
    restarted = Harness(repo, harness.tritons)
    restarted.probe()
    await restarted.sync.start()
    try:
        assert [len(t.calls) for t in harness.tritons] == [n + 1 for n in calls]
        assert all(t.calls[-1] == ("load", "m", ["1"]) for t in harness.tritons)
        assert not restarted.events("adopted") and restarted.routed() == [["1"], ["1"]]
    finally:
        await restarted.sync.close()


async def test_adopting_leaves_a_routed_version_routed_and_warms_the_one_still_arriving(repo: Path, tritons: list[FakeTriton]) -> None:
    """A new version whose warm-up got no answer (Triton busy) is tried again each round, by
    adoption (the load went through, recorded): the version serving meanwhile is never
    withheld, nor warmed again, and nothing is reloaded."""
    h = Harness(repo, tritons[:1])
    await h.sync.start()
    try:
        triton = tritons[0]
        triton.busy_infer.add(("m", "2"))
        await h.publish("2")
        assert h.routed() == [["1"]]
        calls, routed = len(triton.calls), []
        for _ in range(3):
            await h.round()
            routed.append(h.routed())
        assert routed == [[["1"]]] * 3 and len(triton.calls) == calls
        assert ("m", "1") not in triton.infers[1:]  # warmed once, when it was loaded
        assert len(h.events("adopted")) == 1  # said once, not each round
        triton.busy_infer.clear()
        await h.round()
        assert h.routed() == [["1", "2"]] and len(triton.calls) == calls
    finally:
        await h.sync.close()


async def test_a_file_of_the_model_folder_changed_reloads_the_model(harness: Harness, repo: Path) -> None:
    """A labels file (Triton reads it at a load) is part of what a model is loaded from."""
    (repo / "m" / "labels.txt").write_text("benign\nmalignant\n")
    await harness.round()
    await harness.round()
    assert all(t.calls[-1] == ("load", "m", ["1"]) and len(t.calls) == 2 for t in harness.tritons)


def test_the_record_of_a_load_is_the_same_whatever_its_instance_groups() -> None:
    """Triton changes a model's instances in place (no reload) when nothing else of its config
    changed: the recorded parameter must not change with them."""
    files = {"1": "the version's fingerprint"}
    plain = Target.chosen(parse_model_config(CONFIG), (1, 1), files)
    scaled = Target.chosen(parse_model_config(CONFIG + "instance_group [ { count: 2 } ]"), (2, 2), files)
    assert recorded_placement(plain) == recorded_placement(scaled)
    other = Target.chosen(parse_model_config(CONFIG.replace("max_batch_size: 8", "max_batch_size: 4")), (1, 1), files)
    assert recorded_placement(other) != recorded_placement(plain)
    assert same_instances([{"name": "m_0", "kind": "KIND_CPU", "count": 2, "gpus": []}], scaled.config)
    assert not same_instances([{"name": "m_0", "kind": "KIND_CPU", "count": 1, "gpus": []}], scaled.config)
    assert same_instances([{"kind": "KIND_GPU", "count": 3}], plain.config)  # none asked for: Triton's choice


async def test_a_missing_repository_folder_refuses_to_start(tmp_path: Path, tritons: list[FakeTriton]) -> None:
    h = Harness(tmp_path / "nowhere", tritons)
    with pytest.raises(RuntimeError, match="is not a folder"):
        await h.sync.start()


async def test_an_unreadable_scan_changes_nothing(harness: Harness, repo: Path) -> None:
    moved = repo.with_name("moved")
    os.rename(repo, moved)
    await harness.round()
    assert harness.sync.snapshot()["scan_error"]
    assert harness.routed() == [["1"], ["1"]]
    assert all(t.calls == [("load", "m", ["1"])] for t in harness.tritons)


async def test_an_instance_that_cannot_be_reached_for_a_load_is_tried_again(harness: Harness, repo: Path) -> None:
    target = harness.tritons[1].url
    harness.control.unreachable.add(target)
    await harness.publish()
    assert harness.routed() == [["1", "2"], ["1"]]
    assert harness.sync.snapshot()["models"]["m"]["failed"] == {}  # not the version's fault
    assert harness.router.newest_version("m") == "1"  # not on every instance yet
    await harness.round()
    assert len([e for e in harness.events("load failed") if e["instance"] == target]) == 1  # not once a round
    harness.control.unreachable.clear()
    await harness.round()
    assert harness.routed() == [["1", "2"], ["1", "2"]]
    assert harness.router.newest_version("m") == "2"


LATEST_ONE = CONFIG.replace("version_policy: { all { } }", "")  # Triton's default: the latest version


async def test_under_a_latest_one_policy_the_new_version_is_routed_before_the_old_one_leaves(
    tritons: list[FakeTriton], repo: Path
) -> None:
    (repo / "m" / "config.pbtxt").write_text(LATEST_ONE)
    h = Harness(repo, tritons)
    await h.sync.start()
    add_version(repo, "m", "2")
    await h.round()
    gates = [asyncio.Event(), asyncio.Event()]
    for triton, gate in zip(tritons, gates):
        triton.gate = gate
    h.probe()
    await h.sync.sync_once()
    await asyncio.sleep(0.05)
    assert [t.calls[-1] for t in tritons] == [("load", "m", ["1", "2"])] * 2  # beside the old one
    assert h.routed() == [["1"], ["1"]] and h.router.newest_version("m") == "1"  # never nothing
    tritons[0].gate = None
    gates[0].set()  # instance 0 loads version 2 and admits it; instance 1 is slower
    await asyncio.sleep(0.3)
    assert h.routed() == [["1", "2"], ["1"]]
    # Version 1 stays on instance 0 until version 2 is routable on instance 1 too.
    assert tritons[0].calls[-1] == ("load", "m", ["1", "2"]), tritons[0].calls
    tritons[1].gate = None
    gates[1].set()
    await h.settle()
    assert [t.calls[-1] for t in tritons] == [("load", "m", ["2"])] * 2
    assert h.routed() == [["2"], ["2"]]
    await h.sync.close()


async def test_under_a_latest_one_policy_the_old_version_stays_while_the_new_one_cannot_load_everywhere(
    tritons: list[FakeTriton], repo: Path
) -> None:
    (repo / "m" / "config.pbtxt").write_text(LATEST_ONE)
    h = Harness(repo, tritons, load_timeout_s=0.3)
    await h.sync.start()
    try:
        h.control.unreachable.add(tritons[1].url)  # no answer to its load calls
        await h.publish()
        assert h.routed() == [["1", "2"], ["1"]], "the old version left although the new one is not everywhere"
        assert h.router.newest_version("m") == "1"
        await h.round()
        assert h.routed() == [["1", "2"], ["1"]]  # waited again, and kept again
        h.control.unreachable.clear()
        await h.round()
        assert [t.calls[-1] for t in tritons] == [("load", "m", ["2"])] * 2
        assert h.routed() == [["2"], ["2"]]
    finally:
        await h.sync.close()


async def test_under_a_latest_one_policy_a_version_failing_on_one_instance_is_not_left_serving_alone_on_another(
    tritons: list[FakeTriton], repo: Path
) -> None:
    (repo / "m" / "config.pbtxt").write_text(LATEST_ONE)
    h = Harness(repo, tritons)
    await h.sync.start()
    try:
        tritons[1].failing_infer.add(("m", "2"))  # its warm-up fails there only
        await asyncio.wait_for(h.publish(), 2)  # not waiting out load_timeout_s for a failed version
        assert "2" in h.sync.snapshot()["models"]["m"]["failed"]
        assert h.routed() == [["1"], ["1"]]
        await h.round()
        assert all(t.ready() == {"m": frozenset({"1"})} for t in tritons)
        assert h.routed() == [["1"], ["1"]]
    finally:
        await h.sync.close()


async def test_under_a_latest_one_policy_a_failed_new_version_leaves_the_one_before_as_the_target(
    tritons: list[FakeTriton], repo: Path
) -> None:
    (repo / "m" / "config.pbtxt").write_text(LATEST_ONE)
    h = Harness(repo, tritons)
    await h.sync.start()
    try:
        await h.publish_broken("2")
        assert h.sync.snapshot()["models"]["m"]["serving"] == ["1"]
        (repo / "m" / "3").mkdir()  # a version being copied in: the model's target stays as it is
        (repo / "m" / "3" / "weights.bin").write_bytes(b"part")
        await h.round()
        assert h.routed() == [["1"], ["1"]]
        assert all(t.ready() == {"m": frozenset({"1"})} for t in tritons)
    finally:
        await h.sync.close()


async def test_a_load_call_that_timed_out_after_loading_is_warmed_and_admitted_later(harness: Harness, repo: Path) -> None:
    target = harness.tritons[1].url
    harness.control.deadline_after_load.add(target)
    await harness.publish()
    assert harness.tritons[1].ready() == {"m": frozenset({"1", "2"})}  # Triton has it...
    assert harness.routed() == [["1", "2"], ["1"]]  # ...but it was never warmed: not routed
    harness.control.deadline_after_load.clear()
    await harness.round()
    assert ("m", "2") in harness.tritons[1].infers
    assert harness.routed() == [["1", "2"], ["1", "2"]]


async def test_a_warmup_that_gets_no_answer_is_tried_again_not_failed(harness: Harness, repo: Path) -> None:
    harness.tritons[0].busy_infer.add(("m", "2"))
    await harness.publish()
    assert harness.routed() == [["1"], ["1", "2"]]
    assert harness.sync.snapshot()["models"]["m"]["failed"] == {}
    harness.tritons[0].busy_infer.clear()
    await harness.round()
    assert harness.routed() == [["1", "2"], ["1", "2"]]


def test_version_folders_are_named_as_triton_reads_them(repo: Path) -> None:
    for name in ("01", "0", "²", "2"):
        (repo / "m" / name).mkdir()
    assert [v for v, _ in scan_repository(repo)["m"].versions] == ["1", "2"]


async def test_an_unexpected_error_in_a_round_is_reported_and_tried_again(harness: Harness, repo: Path) -> None:
    calls = []

    def broken_callback(model: str, version: str) -> None:
        calls.append((model, version))
        if len(calls) == 1:
            raise RuntimeError("a bug in a callback")

    harness.sync.on_version_reloaded = broken_callback
    (repo / "m" / "1" / "model.py").write_text("retrained, other size")
    await harness.round()
    await harness.round()
    assert any("a bug in a callback" in e["detail"] for e in harness.events("load failed"))
    await harness.round()
    assert harness.routed() == [["1"], ["1"]]


async def test_a_failed_version_whose_folder_is_removed_and_published_again_is_tried_again(harness: Harness, repo: Path) -> None:
    await harness.publish_broken()
    assert "2" in harness.sync.snapshot()["models"]["m"]["failed"]
    staged = repo / ".2.fixed"
    shutil.move(str(repo / "m" / "2"), staged)  # taken out (same files, same times)...
    await harness.round()
    await harness.round()
    assert harness.sync.snapshot()["models"]["m"]["failed"] == {}
    for triton in harness.tritons:
        triton.broken.clear()
    shutil.move(str(staged), repo / "m" / "2")  # ...and put back once the server side is fixed
    await harness.round()
    await harness.round()
    assert harness.routed() == [["1", "2"], ["1", "2"]]


async def test_a_version_folder_without_its_model_file_is_failed_without_a_load_call(harness: Harness, repo: Path) -> None:
    """Triton holds such a version LOADING for good, and the model's later loads behind it: it is
    never sent. The versions around it load; once the file arrives, it loads too."""
    (repo / "m" / "2").mkdir()
    (repo / "m" / "2" / "weights.pt").write_text("weights, but no model.py")
    add_version(repo, "m", "3")
    await harness.round()
    await harness.round()
    snapshot = harness.sync.snapshot()["models"]["m"]
    assert "has no model.py" in snapshot["failed"]["2"] and snapshot["serving"] == ["1", "3"]
    assert all(("load", "m", ["1", "3"]) in t.calls for t in harness.tritons)
    assert all("2" not in versions for t in harness.tritons for _, _, versions in t.calls)
    assert harness.routed() == [["1", "3"], ["1", "3"]]
    with pytest.raises(Unavailable, match="has no model.py"):
        harness.router.pick("m", "2")
    assert len(harness.events("failed")) == 1
    await harness.round()
    assert len(harness.events("failed")) == 1, "reported once, not every round"
    (repo / "m" / "2" / "model.py").write_text("the model, at last")
    await harness.round()
    await harness.round()
    assert harness.routed() == [["1", "2", "3"], ["1", "2", "3"]]
    assert harness.sync.snapshot()["models"]["m"]["failed"] == {}


def test_the_file_a_version_needs_follows_the_backend_and_the_config() -> None:
    assert model_file(parse_model_config('backend: "python"')) == "model.py"
    assert model_file(parse_model_config('backend: "python" default_model_filename: "serve.py"')) == "serve.py"
    assert model_file(parse_model_config('platform: "onnxruntime_onnx"')) == ""


async def test_a_stateful_model_is_never_quiesced_everywhere_at_once_so_new_sequences_always_have_a_place(
    repo: Path, tritons: list[FakeTriton]
) -> None:
    """Both instances hold sequences under way: one is quiesced (new sequences start on the
    other) and reloaded once its sequences end, then the other; none is dropped."""
    (repo / "m" / "config.pbtxt").write_text(CONFIG + "sequence_batching { }\n")
    harness = Harness(repo, tritons)
    await harness.sync.start()
    try:
        for n, instance in enumerate(harness.instances):
            instance.sequence_answered("m", "1", b"%d" % n, False, time.monotonic(), idle_s=60.0)
        add_version(repo, "m", "2")
        await harness.round()
        harness.probe()
        await harness.sync.sync_once()
        await asyncio.sleep(0.2)
        first = next(i for i in harness.instances if i.quiescing)
        second = next(i for i in harness.instances if i is not first)
        assert not second.quiescing, "quiesced everywhere: new sequences have nowhere to start"
        second.sequence_answered("m", "1", b"9", False, time.monotonic(), idle_s=60.0)  # one starts there meanwhile
        first.sequence_answered("m", "1", b"%d" % harness.instances.index(first), True, time.monotonic(), idle_s=60.0)
        await asyncio.sleep(0.3)
        assert not first.quiescing and second.quiescing  # the first reloaded; the second's turn
        for key in (b"%d" % harness.instances.index(second), b"9"):
            second.sequence_answered("m", "1", key, True, time.monotonic(), idle_s=60.0)
        await asyncio.wait_for(harness.settle(), 2)
        assert [t.calls[-1] for t in tritons] == [("load", "m", ["1", "2"])] * 2
        assert harness.events("sequences dropped") == [] and harness.events("drain timed out") == []
    finally:
        await harness.sync.close()


async def test_a_stateful_model_is_marked_reloading_while_its_load_call_runs(repo: Path, tritons: list[FakeTriton]) -> None:
    (repo / "m" / "config.pbtxt").write_text(CONFIG + "sequence_batching { }\n")
    harness = Harness(repo, tritons)
    await harness.sync.start()
    try:
        home = harness.instances[0]
        tritons[0].gate = asyncio.Event()  # its load calls wait
        add_version(repo, "m", "2")
        await harness.round()
        harness.probe()
        await harness.sync.sync_once()
        await asyncio.sleep(0.2)
        assert home.reloading == {"m"} and home.quiescing == {"m"}
        assert harness.instances[1].reloading == frozenset(), "its turn comes after"
        tritons[0].gate.set()
        await asyncio.wait_for(harness.settle(), 2)
        assert not home.reloading and not home.quiescing
    finally:
        await harness.sync.close()
