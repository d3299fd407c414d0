"""Loading the model repository onto every Triton instance, driven by the gateway.

Triton left to itself (poll mode) loads a new version on each instance at its own moment, serves
it before it has answered once, and a version that fails to load stalls the model's later
loads. With ``[repository] path`` set, the gateway drives loading instead, Triton running with
``--model-control-mode=explicit``, so that a version gets traffic only once it works everywhere
it is loaded:

* **Scan.** Every ``scan_interval_s`` the folder is read: models (folders holding a
  ``config.pbtxt``; names starting with "." are ignored), their versions (folders named by a
  number) and a fingerprint of each version (each file's path, size and modification time,
  ``__pycache__`` left out: a file replaced by one of another size or time, renamed or swapped
  with another is seen; one of the same size and the same time is not). A model is acted on
  once two scans in a row agree, so a folder being copied is not loaded half-written;
  publishing by renaming a finished folder (as the training module does) takes one scan. The
  first round (a starting gateway, or a worker taking the driving over) scans twice,
  ``FIRST_GAP`` of a scan interval apart: a model still changing then is left to the later
  rounds.
* **Target.** The versions to serve are those on disk, less those that failed with the same
  files, filtered by the model's own ``version_policy`` (all, latest N, specific).
* **Load.** Each up instance whose versions differ from the target (a version added or removed,
  files or ``config.pbtxt`` changed, an instance restarted empty) gets one load call (over
  gRPC, see ``GrpcControl``) with the model's config, its version policy set to exactly the
  target versions, or an unload call when none is left. Triton keeps serving what it has while
  it loads and swaps reloaded versions in without a gap (it reloads every version of a model
  whose config changed, and the version list is part of the config). The call records the
  files it loads (``recorded_placement``, in the config parameter ``gateway_placement``): a gateway
  started later finds a model loaded from the files on disk now, and does not load it again.
* **Admit.** A version new to an instance is withheld from routing while it loads, then
  answers a warm-up inference (zeros shaped by its config; must come back 200), and only then
  is routed to there. Requests naming no version move to it once every instance holding the
  model has it (``Router.newest_version``).
* **Drain.** A version leaving is withheld on every instance first, its requests in flight
  there are awaited (at most ``drain_timeout_s``), and only then is it unloaded.
* **Stateful models** (``sequence_batching``). Any load or unload call makes Triton reload the
  model there, every version, dropping its sequences under way (Triton's documentation leaves
  finishing them to the user). So before such a call on an instance, new sequences start on
  other instances (``Instance.quiescing``) and those under way there are awaited, within
  ``drain_timeout_s`` (each ends, or goes idle for longer than Triton keeps it). Instances
  take turns (``_reload_turn``): never all those holding the model at once, so that new
  sequences always have one to start on; and while the load call runs, none starts there
  (``Instance.reloading``: the reload would drop it unnoticed). A version
  being drained meanwhile still takes the later requests of its sequences
  (``Instance.drains``). What is left at the deadline is dropped and reported. The warm-up of
  such a model is a sequence of one request.
* **Failure.** A version folder without the file its backend loads (``model.py`` for the
  Python backend, or the config's ``default_model_filename``) is failed without a load call:
  Triton would hold it loading for good, and the model's later versions behind it. A version
  that fails to load or to warm up is recorded with Triton's reason,
  never admitted, and unloaded; the versions already serving stay as they are. It is tried
  again when its files change. A ``config.pbtxt`` that does not parse, or that Triton rejects,
  leaves the model as it is until the file changes.

State and recent events: ``GET /v2/gateway/repository``. The worker processes of one gateway
(``server.workers`` > 1) leave loading to one of them, which the others follow
(``repository_workers.py``). Several gateway replicas in front of one fleet must leave loading to
one of them (the others without ``[repository] path``).
"""

from __future__ import annotations

import asyncio
import hashlib
import functools
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from gateway.config import RepositoryConfig
from gateway.instances import Instance
from gateway.models import PLACEMENT_PARAMETER
from gateway.protocol import v2
from gateway.router import Router
from gateway.tensors import V2_TO_NUMPY, Tensor

log = logging.getLogger(__name__)

Fingerprint = str  # a digest of a folder's files: each one's path, size and modification time (``fingerprint``)
VERSION = re.compile(r"[1-9][0-9]*", re.ASCII)  # a version folder's name, as Triton reads them
MAX_EVENTS = 200
POLL_S = 0.05  # how often a drain checks the requests in flight
FIRST_GAP = 0.1  # the first round's two scans are this share of scan_interval_s apart


# -- the folder ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelFolder:
    name: str
    config: str | None  # config.pbtxt's text; None if it could not be read
    config_stamp: tuple[int, int]  # its size and modification time
    versions: tuple[tuple[str, Fingerprint], ...]  # (version, fingerprint), by version number
    names: tuple[tuple[str, frozenset[str]], ...] = ()  # (version, the names at its top level)
    # The model folder's own files but config.pbtxt (a labels file, a Python environment),
    # which Triton reads at a load (``own_files``).
    files_stamp: Fingerprint = ""


def fingerprint(files: list[tuple[str, int, int]]) -> Fingerprint:
    """The fingerprint of a folder's files, each given as (path within the folder, size,
    modification time in ns), in any order. Per file, not summed: a file replaced by one of the
    same size but an older time changes it even where another file is the newest."""
    files.sort()
    return hashlib.blake2b(repr(files).encode(), digest_size=16).hexdigest()


def read_version(folder: Path) -> tuple[Fingerprint, frozenset[str]]:
    """A version folder's fingerprint and the names at its top level, in one walk (OSError if
    the folder itself cannot be read; an unreadable folder inside it is left out)."""
    files: list[tuple[str, int, int]] = []
    names: frozenset[str] | None = None

    def unreadable(exc: OSError) -> None:
        if names is None:
            raise exc

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        if names is None:
            names = frozenset(dirnames + filenames)
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]  # written by Triton's loading itself
        within = os.path.relpath(dirpath, folder)
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue  # removed while scanning: the next scan sees the change
            files.append((os.path.join(within, name), st.st_size, st.st_mtime_ns))
    return fingerprint(files), names or frozenset()


def own_files(folder: str) -> Fingerprint:
    """``ModelFolder.files_stamp``: the fingerprint of a model folder's own files, but its
    config.pbtxt and hidden ones (OSError if the folder cannot be read)."""
    files: list[tuple[str, int, int]] = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or entry.name == "config.pbtxt" or not entry.is_file():
            continue
        try:
            st = entry.stat()
        except OSError:
            continue  # removed while scanning: the next scan sees the change
        files.append((entry.name, st.st_size, st.st_mtime_ns))
    return fingerprint(files)


def scan_repository(root: Path, previous: Mapping[str, ModelFolder] | None = None) -> dict[str, ModelFolder]:
    """Every model folder under ``root`` (raises OSError if ``root`` cannot be read); a model
    folder that cannot be read is taken from ``previous``."""
    models: dict[str, ModelFolder] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        config_path = Path(entry.path) / "config.pbtxt"
        try:
            st = config_path.stat()
            text: str | None = config_path.read_text()
        except FileNotFoundError:
            continue  # not a model (yet): Python-backend models need a config.pbtxt
        except (OSError, UnicodeDecodeError):
            try:
                st, text = config_path.stat(), None
            except OSError:
                continue
        try:
            folders = sorted(
                (v for v in os.scandir(entry.path) if VERSION.fullmatch(v.name) and v.is_dir()), key=lambda v: int(v.name)
            )
            contents = [(v.name, read_version(Path(v.path))) for v in folders]
            versions = [(name, fp) for name, (fp, _) in contents]
            names = [(name, top) for name, (_, top) in contents]
        except OSError as exc:  # one unreadable folder: that model stays as last seen, the rest go on
            log.warning("repository: cannot read %s: %s", entry.path, exc)
            if previous is not None and entry.name in previous:
                models[entry.name] = previous[entry.name]
            continue
        models[entry.name] = ModelFolder(
            entry.name, text, (st.st_size, st.st_mtime_ns), tuple(versions), tuple(names), own_files(entry.path)
        )
    return models


def model_file(config: model_config_pb2.ModelConfig) -> str:
    """The file a version folder must hold for Triton to load it ("" where we cannot tell): the
    config's ``default_model_filename``, else the Python backend's ``model.py``. Without it
    Triton 2.51 does not fail the load: it holds the version LOADING for good, and every later
    load of the model waits behind it."""
    if config.default_model_filename:
        return config.default_model_filename
    return "model.py" if config.backend == "python" else ""


@functools.lru_cache(maxsize=256)
def parse_model_config(text: str | None) -> model_config_pb2.ModelConfig:
    """config.pbtxt as Triton reads it; ValueError naming the problem otherwise. Every scan
    asks again for every model: an unchanged file is parsed once (callers never modify it)."""
    if text is None:
        raise ValueError("config.pbtxt cannot be read")
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt: {exc}") from None


def served_versions(config: model_config_pb2.ModelConfig, versions: Iterable[str]) -> list[str]:
    """The versions the model's ``version_policy`` serves out of ``versions`` (Triton's rules:
    no policy means the latest one)."""
    ordered = sorted(versions, key=int)
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return ordered
    if which == "specific":
        wanted = {int(v) for v in policy.specific.versions}
        return [v for v in ordered if int(v) in wanted]
    latest = policy.latest.num_versions if which == "latest" else 1
    return ordered[-latest:] if latest > 0 else []


def pinned_config(config: model_config_pb2.ModelConfig, versions: Iterable[str], stamp: str = "") -> str:
    """The model's config as JSON (what a load call carries), serving exactly ``versions``, and
    recording ``stamp`` (the target's ``recorded_placement``) in its parameter
    ``PLACEMENT_PARAMETER``, where given: Triton keeps it with the model's config, so a gateway
    started later can tell a model loaded from the files on disk now (and leave it loaded) from
    one to load again. Backends ignore parameters they do not know."""
    pinned = model_config_pb2.ModelConfig()
    pinned.CopyFrom(config)
    pinned.version_policy.specific.versions[:] = sorted(int(v) for v in versions)
    if stamp:
        pinned.parameters[PLACEMENT_PARAMETER].string_value = stamp
    return json_format.MessageToJson(pinned, preserving_proto_field_name=True, indent=None)


WARMUP_SEQUENCE = 0x7761726D  # "warm": a stateful model's warm-up is a sequence of one request


def warmup_body(config: Mapping[str, Any]) -> tuple[bytes, int]:
    """An inference request of zeros, one row, shaped by the model's config as Triton reports it
    (``/v2/models/{m}/versions/{v}/config``), and the length of its JSON header (the
    ``Inference-Header-Content-Length`` header). For a stateful model (``sequence_batching``),
    which Triton refuses any request outside a sequence, a whole sequence in one request: it
    starts and ends, with an id of the type the model takes (a string where its correlation
    id is TYPE_STRING).

    Inputs and outputs travel as binary tensors, as the gateway's own requests do
    (``v2.encode_upstream_request``): Triton refuses FP16 and BF16 data in JSON, in a request
    and in its answer."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    inputs: list[Tensor] = []
    for spec in config.get("input", []):
        if spec.get("optional"):
            continue
        dims = [max(1, int(d)) for d in spec.get("dims", [])]
        shape = ([1] if batched else []) + dims
        datatype = str(spec.get("data_type", "TYPE_FP32")).removeprefix("TYPE_")
        datatype = "BYTES" if datatype == "STRING" else datatype
        if datatype == "BYTES":
            zeros = np.full(shape, b"", dtype=object)
        else:
            zeros = np.zeros(shape, dtype=V2_TO_NUMPY[datatype])  # KeyError: a type we cannot tell
        inputs.append(Tensor(spec["name"], datatype, zeros))
    parameters: dict[str, Any] = {}
    sequences = config.get("sequence_batching")
    if sequences is not None:
        controls = [c for i in sequences.get("control_input", []) for c in i.get("control", [])]
        strings = any(c.get("kind") == "CONTROL_SEQUENCE_CORRID" and c.get("data_type") == "TYPE_STRING" for c in controls)
        sid: int | str = str(WARMUP_SEQUENCE) if strings else WARMUP_SEQUENCE
        parameters = {"sequence_id": sid, "sequence_start": True, "sequence_end": True}
    return v2.encode_upstream_request(inputs, None, parameters=parameters)


# -- load and unload calls -----------------------------------------------------------------------


class ControlError(Exception):
    """A load or unload call failed: ``retry`` when no answer came (try again later), else
    Triton refused it (its message says why)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


class Control(Protocol):
    async def load(self, target: str, model: str, config: str) -> None: ...
    async def unload(self, target: str, model: str) -> None: ...
    async def close(self) -> None: ...


class GrpcControl:
    """Load and unload calls over gRPC (``target`` is an instance's host:port for gRPC).

    Not over HTTP: while Triton 2.51 runs an HTTP load call, every request on its kept-alive
    HTTP connections waits until the load is done (measured: 16 connections all stalled for
    the whole 1.4 s load of a Python-backend model; the same load over gRPC left them at 5 ms
    worst). The gateway's traffic rides kept-alive HTTP connections."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    def _client(self, target: str) -> grpcclient.InferenceServerClient:
        if not target:
            raise ControlError("the instance has no grpc_port in the config", retry=False)
        client = self._clients.get(target)
        if client is None:
            client = self._clients[target] = grpcclient.InferenceServerClient(target)
        return client

    async def load(self, target: str, model: str, config: str) -> None:
        await self._call(self._client(target).load_model(model, config=config, client_timeout=self._timeout))

    async def unload(self, target: str, model: str) -> None:
        await self._call(self._client(target).unload_model(model, client_timeout=self._timeout))

    async def _call(self, call: Awaitable[object]) -> None:
        try:
            await call
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            retry = status.endswith(("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"))
            raise ControlError(exc.message() or str(exc), retry) from None

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


# -- the sync -----------------------------------------------------------------------------------

PENDING = ("loading", "warming up")  # withheld, and still to be admitted


def _stateful(target: Target, instance: Instance, name: str) -> bool:
    """Whether the model keeps sequences (``sequence_batching``), or had some there."""
    if target.config is not None and target.config.HasField("sequence_batching"):
        return True
    return any(m == name for m, _ in instance.sequences)


def _failed_why(reason: str) -> str:
    return f"failed: {reason.splitlines()[0] if reason else 'unknown'}"


def busy(instance: Instance, model: str, versions: Iterable[str], now: float, requests: bool = True) -> int:
    """What draining ``versions`` there still waits for: requests in flight (unless not
    ``requests``), and sequences under way (each of which has more requests to come)."""
    return sum((instance.active.get((model, v), 0) if requests else 0) + instance.open_sequences(model, v, now) for v in versions)


class Peers(Protocol):
    async def drained(self, url: str, model: str, versions: list[str], deadline: float, requests: bool = True) -> int: ...


@dataclass(frozen=True, slots=True)
class Target:
    """What one model should be on every instance."""

    config: model_config_pb2.ModelConfig | None
    config_stamp: tuple[int, int] | None
    versions: Mapping[str, Fingerprint]
    # What the version policy chose ``versions`` from: those on disk, less those failed.
    usable: Mapping[str, Fingerprint] = field(default_factory=dict, compare=False)
    files_stamp: Fingerprint = ""  # the model folder's own files (``ModelFolder``)

    @classmethod
    def chosen(
        cls,
        config: model_config_pb2.ModelConfig,
        stamp: tuple[int, int] | None,
        usable: Mapping[str, Fingerprint],
        files_stamp: Fingerprint = "",
    ) -> Target:
        """The versions the model's ``version_policy`` serves out of ``usable``."""
        return cls(config, stamp, {v: usable[v] for v in served_versions(config, usable)}, dict(usable), files_stamp)


def placement(target: Target) -> str:
    """What identifies the files a target was made from (its config's, the model folder's own
    and its versions' stamps)."""
    text = repr((target.config_stamp, target.files_stamp, sorted(target.versions.items())))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def recorded_placement(target: Target) -> str:
    """What a load call records of the files it loads (``PLACEMENT_PARAMETER``): the config as
    parsed (but its instance groups, which Triton changes in place without reloading the
    model, and which a parameter that changed with them would make it reload: they are
    compared apart, ``same_instances``), the model folder's own files and the versions'."""
    config = model_config_pb2.ModelConfig()
    if target.config is not None:
        config.CopyFrom(target.config)
    config.ClearField("instance_group")
    config.ClearField("version_policy")
    text = repr((config.SerializeToString(deterministic=True), target.files_stamp, sorted(target.versions.items())))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def same_instances(served: Any, wanted: model_config_pb2.ModelConfig) -> bool:
    """Whether the instance groups Triton serves a model with (its config's ``instance_group``,
    as JSON) are those ``wanted`` asks for: each group's count, and its kind and GPUs where
    it names them (Triton fills in what it leaves out). No group asked for: any will do."""
    groups = list(wanted.instance_group)
    if not groups:
        return True
    if not isinstance(served, list) or len(served) != len(groups):
        return False
    auto = model_config_pb2.ModelInstanceGroup.Kind.KIND_AUTO
    for have, want in zip(served, groups):
        if not isinstance(have, dict) or int(have.get("count", 1)) != (want.count or 1):
            return False
        if want.kind != auto and have.get("kind") != model_config_pb2.ModelInstanceGroup.Kind.Name(want.kind):
            return False
        if want.gpus and [int(g) for g in have.get("gpus", [])] != list(want.gpus):
            return False
    return True


@dataclass(slots=True)
class Failure:
    stamp: object  # the files (version fingerprint, or config stamp) that failed
    reason: str


@dataclass(slots=True)
class RepositorySync:
    config: RepositoryConfig
    router: Router
    control: Control
    on_version_reloaded: Callable[[str, str], object] | None = None
    # With several worker processes, the others (upstream.repository_workers): a drain waits
    # for their requests in flight too.
    peers: Peers | None = None
    clock: Callable[[], float] = time.monotonic
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    _session: aiohttp.ClientSession | None = None
    _last_scan: dict[str, ModelFolder] | None = None
    _targets: dict[str, Target] = field(default_factory=dict)
    _placed: dict[str, dict[str, Target]] = field(default_factory=dict)  # url -> model -> target it holds
    _failed: dict[tuple[str, str], Failure] = field(default_factory=dict)
    _config_errors: dict[str, Failure] = field(default_factory=dict)
    _tasks: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    _scan_error: str | None = None
    _last_event: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    _turns: dict[str, set[str]] = field(default_factory=dict)  # stateful model -> instances quiescing or reloading it (URLs)
    # What the driver before this one placed (``seed``): url -> model -> ``placement``.
    _seeded: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.config.path)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """The first round, awaited: the repository is loaded before the gateway takes traffic.
        As in every round, a model is acted on once two scans agree: here two taken a moment
        apart, so that a folder at rest costs no wait and one being copied is not loaded."""
        if not self.root.is_dir():
            raise RuntimeError(f"repository.path {str(self.root)!r} is not a folder")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._last_scan = await self._scan()
        await asyncio.sleep(self.config.scan_interval_s * FIRST_GAP)
        await self.sync_once()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval_s)
            try:
                await self.sync_once()
            except Exception:  # the loop must outlive any one round
                log.exception("repository sync round failed")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self.control.close()

    # -- one round ------------------------------------------------------------------------------

    async def _scan(self) -> dict[str, ModelFolder] | None:
        """The folder as it is now; None if it cannot be read (reported once)."""
        try:
            scan = await asyncio.to_thread(scan_repository, self.root, self._last_scan)
        except OSError as exc:
            if self._scan_error != str(exc):
                self._event("", "", "", "scan failed", str(exc))
            self._scan_error = str(exc)
            return None
        self._scan_error = None
        return scan

    async def sync_once(self) -> None:
        scan = await self._scan()
        if scan is None:
            return  # an unreadable folder changes nothing: what is loaded stays
        last = self._last_scan
        self._last_scan = scan
        for name in sorted(set(scan) | set(last or {}) | set(self._targets)):
            folder = scan.get(name)
            if last is None or folder != last.get(name):
                continue  # still changing (or not seen before): act when two scans agree
            target = self._target(name, folder)
            if target is not None:
                self._targets[name] = target
            else:
                self._targets.pop(name, None)  # a bad config.pbtxt: the model stays as it is
        members = {i.url for i in self.router.instances}
        for url in [u for u in self._placed if u not in members]:
            del self._placed[url]  # an instance that left the fleet (DNS)
        for instance in self.router.instances:
            if instance.routable and instance.loaded is not None:
                self._release_unloaded(instance, scan)
                for name, target in self._targets.items():
                    self._reconcile(instance, name, target)
        for name in [n for n, t in self._targets.items() if not t.versions and not self._held_anywhere(n)]:
            del self._targets[name]  # a removed model, unloaded everywhere

    def _target(self, name: str, folder: ModelFolder | None) -> Target | None:
        """The model's target, or None to leave it as it is (its config.pbtxt is bad)."""
        if folder is None:
            self._config_errors.pop(name, None)
            return Target(None, None, {})  # removed: unload
        error = self._config_errors.get(name)
        if error is not None and error.stamp == folder.config_stamp:
            return None
        try:
            config = parse_model_config(folder.config)
        except ValueError as exc:
            self._config_error(name, folder.config_stamp, str(exc))
            return None
        self._config_errors.pop(name, None)
        on_disk = dict(folder.versions)
        for model, version in [k for k in self._failed if k[0] == name and k[1] not in on_disk]:
            del self._failed[(model, version)]  # its folder is gone: a new one is new
        usable = []
        required, names = model_file(config), dict(folder.names)
        for version, print_ in on_disk.items():
            failure = self._failed.get((name, version))
            if failure is None or failure.stamp != print_:
                self._failed.pop((name, version), None)  # new files: try again
                if required and required not in names.get(version, frozenset({required})):
                    reason = f"the version folder has no {required}, which the model's backend loads; not loaded"
                    self._failed[(name, version)] = Failure(print_, reason)
                    for instance in self.router.instances:  # a request naming it is told why
                        instance.withhold(name, version, _failed_why(reason))
                    self._event("", name, version, "failed", reason)
                    continue
                usable.append(version)
        return Target.chosen(config, folder.config_stamp, {v: on_disk[v] for v in usable}, folder.files_stamp)

    def placements(self) -> dict[str, dict[str, str]]:
        """What this sync placed on each instance and admitted (url -> model -> ``placement``),
        for a driver taking over from it (``seed``): a model with a version still loading or
        warming up there is left out, so the next driver warms it up."""
        instances = {i.url: i for i in self.router.instances}
        placed: dict[str, dict[str, str]] = {}
        for url, models in sorted(self._placed.items()):
            instance = instances.get(url)
            if instance is None:
                continue
            pending = {m for (m, _), why in instance.withheld.items() if why in PENDING}
            placed[url] = {name: placement(t) for name, t in sorted(models.items()) if name not in pending}
        return placed

    def seed(self, placements: Mapping[str, Mapping[str, str]]) -> None:
        """Before the first round of a driver taking over from another in the same gateway
        (``upstream.repository_workers``): what that one placed. A model it placed from the
        files on disk now, whose versions the instance holds and has admitted, is not loaded
        again: any load call reloads the model there (and drops a stateful one's sequences)."""
        self._seeded = {url: dict(models) for url, models in placements.items()}

    def _reconcile(self, instance: Instance, name: str, target: Target) -> None:
        key = (instance.url, name)
        if key in self._tasks:
            return
        held = set((instance.loaded or {}).get(name, ()))
        placed = self._placed.get(instance.url, {}).get(name)
        seeded = self._seeded.get(instance.url, {}).pop(name, None)
        if (
            placed is None and seeded == placement(target) and held == set(target.versions)
            and not any(instance.withheld.get((name, v)) in PENDING for v in held)
        ):  # fmt: skip
            placed = self._placed.setdefault(instance.url, {})[name] = target
        if held == set(target.versions) and (placed == target or (not held and placed is None)):
            return
        task = asyncio.create_task(self._apply(instance, name, target))
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("repository: %s on %s: unexpected error", key[1], key[0], exc_info=exc)
            self._placed.get(key[0], {}).pop(key[1], None)  # tried again next round
            self._event(key[0], key[1], "", "load failed", f"unexpected error: {exc!r}; tried again next round")

    def _release_unloaded(self, instance: Instance, scan: Mapping[str, ModelFolder]) -> None:
        """Withheld versions no longer loaded on the instance need no holding back once drained
        (unloaded), or once their folder is gone (a failed one); a failed version still on
        disk stays held back, so a request naming it is told why."""
        for (name, version), why in list(instance.withheld.items()):
            if (instance.url, name) in self._tasks or version in (instance.loaded or {}).get(name, ()):
                continue
            folder = scan.get(name)
            if why == "draining" or folder is None or version not in dict(folder.versions):
                instance.release(name, version)

    def _held_anywhere(self, name: str) -> bool:
        return any(
            (i.loaded or {}).get(name) or name in self._placed.get(i.url, {}) or (i.url, name) in self._tasks
            for i in self.router.instances
        )

    # -- one model on one instance --------------------------------------------------------------

    async def _apply(self, instance: Instance, name: str, target: Target) -> None:
        url = instance.url
        held = set((instance.loaded or {}).get(name, ()))
        placed = self._placed.get(url, {}).get(name)
        keep = set(target.versions)
        # Loaded but not admitted (a load that timed out on our side, a warm-up to try again, a
        # failure since cleared, or held back by a driver before this one): unless it is being
        # drained, it is still arriving, and must be warmed before it is routed.
        pending = {v for v in held if instance.withheld.get((name, v)) not in (None, "draining")}
        leaving = sorted(held - keep, key=int)
        arriving = sorted((keep - held) | (keep & pending), key=int)
        replaced = sorted(
            (v for v in keep & held - pending if placed is not None and placed.versions.get(v) not in (None, target.versions[v])),
            key=int,
        )
        if placed is None and held == keep and keep and await self._placed_before(url, name, target):
            await self._adopt(instance, name, target, arriving)
            return
        for version in arriving:
            instance.withhold(name, version, "loading")
        if arriving and leaving:
            # A version replacing another (a "latest 1" policy): load the new one beside the old
            # one and admit it first, so the model is never without a routable version.
            if not await self._load(instance, name, target, held | keep, arriving + replaced):
                return
            self._loaded(instance, name, held | keep)
            admitted = [v for v in arriving if await self._admit(instance, name, v, target)]
            if len(admitted) < len(arriving):
                return  # a failed one: the next round unloads it, and the old one stays
            arriving = []
        if leaving and keep and not await self._everywhere(instance, name, max(keep, key=int), target):
            return  # the old one stays: the next round tries again
        for version in leaving:
            instance.withhold(name, version, "draining")
        if leaving:
            await self._drain(instance, name, leaving)
        if not await self._load(instance, name, target, keep, arriving + replaced):
            return
        self._loaded(instance, name, keep)
        if keep:
            self._placed.setdefault(url, {})[name] = target
        else:
            self._placed.get(url, {}).pop(name, None)
        for version in leaving:
            failure = self._failed.get((name, version))
            if failure is not None:  # keep saying why, for requests that name it
                instance.withhold(name, version, _failed_why(failure.reason))
            elif placed != target:  # (else a stale index showed what was unloaded already)
                self._event(url, name, version, "unloaded", "drained, then unloaded")
        for version in replaced:
            self._event(url, name, version, "reloaded", "files changed in place; cached answers dropped")
            if self.on_version_reloaded is not None:
                self.on_version_reloaded(name, version)
        for version in arriving:
            await self._admit(instance, name, version, target)

    async def _load(self, instance: Instance, name: str, target: Target, versions: set[str], new: list[str]) -> bool:
        """One load (or, for no versions, unload) call; False, with the failure handled, if it
        failed. Any such call reloads the model there (every version, whatever changed), which
        drops a stateful model's sequences under way: for one, it is made once its sequences
        there are over (``_quiesce``)."""
        held = sorted((instance.loaded or {}).get(name, ()))
        if not held or not _stateful(target, instance, name):
            return await self._call(instance, name, target, versions, new)
        await self._reload_turn(instance, name)
        turns = self._turns.setdefault(name, set())
        turns.add(instance.url)
        instance.quiescing = instance.quiescing | {name}
        try:
            await self._quiesce(instance, name, held)
            instance.reloading = instance.reloading | {name}
            called = await self._call(instance, name, target, versions, new)
        finally:
            instance.quiescing = instance.quiescing - {name}
            instance.reloading = instance.reloading - {name}
            turns.discard(instance.url)
        if called:  # reloaded: whatever was still under way is gone
            instance.forget_sequences(name)
        return called

    async def _reload_turn(self, instance: Instance, name: str) -> None:
        """Wait until quiescing the stateful model there leaves another instance holding it
        that is not: new sequences start there meanwhile. Reloaded everywhere at once, the
        model would have nowhere to start them: under steady traffic they would keep landing
        on instances waiting for their sequences to end, each wait would run to
        ``drain_timeout_s``, and the reloads would drop whatever was under way then. (With a
        single instance holding the model, there is nothing to wait for.)"""
        while True:
            others = [
                i for i in self.router.instances
                if i is not instance and i.routable and name in (i.loaded or {})
            ]  # fmt: skip
            if sum(i.url in self._turns.get(name, ()) for i in others) < len(others) or not others:
                return
            await asyncio.sleep(POLL_S)

    async def _call(self, instance: Instance, name: str, target: Target, versions: set[str], new: list[str]) -> bool:
        try:
            if versions:
                assert target.config is not None
                await self.control.load(instance.grpc, name, pinned_config(target.config, versions, recorded_placement(target)))
            else:
                await self.control.unload(instance.grpc, name)
        except ControlError as exc:
            await self._load_failed(instance, name, target, new, exc)
            return False
        self._last_event.pop((instance.url, name, ""), None)  # a later failure is news again
        return True

    async def _quiesce(self, instance: Instance, name: str, held: list[str]) -> None:
        """Wait (at most ``drain_timeout_s``) until no sequence of the model is under way there,
        this process's, then the other workers'. New ones start on other instances meanwhile
        (``Instance.quiescing``), unless every instance holding the version waits too; those
        still under way at the deadline are dropped."""
        await self._await_idle(instance, name, held, requests=False)

    async def _placed_before(self, url: str, name: str, target: Target) -> bool:
        """Whether the model there was loaded from the files ``target`` was made from (the
        ``recorded_placement`` its load call recorded, in the config Triton serves) and serves
        the instance groups it asks for, loaded by this gateway before it restarted or by
        another driver: then no load call is needed. False where it cannot be told (no
        answer, no record)."""
        try:
            session = self._require_session()
            timeout = aiohttp.ClientTimeout(total=self.config.load_timeout_s)
            async with session.get(f"{url}/v2/models/{quote(name, safe='')}/config", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                config = await resp.json(content_type=None)
            recorded = config["parameters"][PLACEMENT_PARAMETER]["string_value"]
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError):
            return False
        assert target.config is not None
        return recorded == recorded_placement(target) and same_instances(config.get("instance_group"), target.config)

    async def _adopt(self, instance: Instance, name: str, target: Target, arriving: list[str]) -> None:
        """Take over a model the instance holds as ``target`` wants it, loaded before from the
        same files (``_placed_before``), without the load call that would reload it there (every
        version, and a stateful model's sequences dropped). A version routed there stays as it
        is; one still ``arriving`` (withheld as loading, or warming up, when the driver before
        stopped or its warm-up failed) is warmed up and routed as a new one is."""
        url = instance.url
        versions = ",".join(sorted(target.versions, key=int))
        self._event(url, name, versions, "adopted", "already loaded from these files: not reloaded")
        for version in arriving:
            if not await self._admit(instance, name, version, target):
                return  # the next round tries again
        self._placed.setdefault(url, {})[name] = target

    def _loaded(self, instance: Instance, name: str, versions: set[str]) -> None:
        """Triton now holds exactly ``versions`` of the model there."""
        loaded = dict(instance.loaded or {})
        if versions:
            loaded[name] = frozenset(versions)
        else:
            loaded.pop(name, None)
        instance.sync_index(loaded)

    async def _admit(self, instance: Instance, name: str, version: str, target: Target) -> bool:
        """Warm the version up and route it; False if it was not admitted."""
        url = instance.url
        if self.config.warmup:
            instance.withhold(name, version, "warming up")
            error, definite = await self._warm(url, name, version)
            if error is not None:
                self._placed.get(url, {}).pop(name, None)  # the next round unloads it, or warms it again
                if definite:
                    self._fail(instance, name, version, target.versions[version], f"warm-up inference failed: {error}")
                else:
                    instance.withhold(name, version, "warming up")
                    self._event(url, name, version, "load failed", f"warm-up inference: {error}; tried again next round")
                return False
        instance.admit(name, version)
        self._event(url, name, version, "ready", "loaded and warmed up; routed" if self.config.warmup else "loaded; routed")
        return True

    async def _warm(self, url: str, name: str, version: str) -> tuple[str | None, bool]:
        """A warm-up inference: (None, _) when it answered 200; else the error, and whether it
        is the version's own (an error answer) rather than the way there (no answer, 503)."""
        base = f"/v2/models/{quote(name, safe='')}/versions/{version}"
        try:
            session = self._require_session()
            timeout = aiohttp.ClientTimeout(total=self.config.load_timeout_s)
            async with session.get(url + base + "/config", timeout=timeout) as resp:
                if resp.status != 200:
                    return f"config: HTTP {resp.status}: {(await resp.text())[:300]}", False
                config = await resp.json(content_type=None)
            if (config.get("model_transaction_policy") or {}).get("decoupled"):
                return None, True  # a streaming model: its answers do not come back on this request
            body, length = warmup_body(config)
            headers = {v2.HEADER_LENGTH: str(length), "Content-Type": v2.BINARY_CONTENT_TYPE}
            async with session.post(url + base + "/infer", data=body, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}: {(await resp.text())[:300]}", resp.status not in (502, 503, 504)
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}", False
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a config we cannot shape zeros from
            return f"{type(exc).__name__}: {exc}", True
        return None, True

    async def _everywhere(self, instance: Instance, name: str, version: str, target: Target) -> bool:
        """Wait (at most ``load_timeout_s``) until requests naming no version go to ``version``
        or newer: it is routable on every up instance holding the model. Until then the version
        it replaces stays, so no instance is left serving only the old one or only the new one:
        False if the wait ran out, or ``version`` failed on another instance meanwhile (then it
        is withheld here too; the next round, choosing without it, unloads it)."""
        deadline = self.clock() + self.config.load_timeout_s
        while int(self.router.newest_version(name) or 0) < int(version):
            failure = self._failed.get((name, version))
            if failure is not None and failure.stamp == target.versions[version]:
                instance.withhold(name, version, _failed_why(failure.reason))
                return False
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _drain(self, instance: Instance, name: str, versions: list[str]) -> None:
        """Wait (at most ``drain_timeout_s``) until no request is in flight to ``versions`` there
        and no sequence is under way on them (``Instance.sequences``; its later requests still
        go there meanwhile): this process's, then the other workers' (``peers``)."""
        await self._await_idle(instance, name, versions, requests=True)

    async def _await_idle(self, instance: Instance, name: str, versions: list[str], requests: bool) -> None:
        """Wait, within ``drain_timeout_s``, until nothing is ``busy`` on ``versions`` there (its
        requests in flight only with ``requests``): in this process, then in the other workers
        (``peers``). What is left at the deadline is reported: a drain that timed out, or
        sequences a reload drops."""
        deadline = self.clock() + self.config.drain_timeout_s
        left = busy(instance, name, versions, self.clock(), requests)
        while left and self.clock() < deadline:
            await asyncio.sleep(POLL_S)
            left = busy(instance, name, versions, self.clock(), requests)
        where = ""
        if not left and self.peers is not None:
            left = await self.peers.drained(instance.url, name, versions, deadline, requests)
            where = " in other workers"
        if not left:
            return
        what = ",".join(versions)
        if requests:
            self._event(instance.url, name, what, "drain timed out", f"{left} request(s) in flight or sequence(s) under way{where}")
        else:
            self._event(instance.url, name, what, "sequences dropped", f"{left} sequence(s) still under way{where} when reloaded")

    async def _load_failed(self, instance: Instance, name: str, target: Target, new: list[str], exc: ControlError) -> None:
        """Find out which versions failed (Triton marks them UNAVAILABLE with a reason); if none
        did, Triton refused the model itself: its config."""
        url = instance.url
        self._placed.get(url, {}).pop(name, None)
        reasons = None if exc.retry else await self._unavailable(url, name)
        if reasons is None:  # no answer, or no way to tell which version failed: not a verdict
            self._event(url, name, "", "load failed", f"{exc.message}; tried again next round")
            return
        failed = [v for v in new if v in reasons]
        for version in failed:
            self._fail(instance, name, version, target.versions[version], reasons[version])
        if not failed and target.config_stamp is not None:
            self._config_error(name, target.config_stamp, f"Triton refused the model: {exc.message}")
            held = (instance.loaded or {}).get(name, frozenset())
            for version in new:
                if version not in held:  # a loaded one stays as it is
                    instance.withhold(name, version, f"failed: {exc.message}")

    async def _unavailable(self, url: str, name: str) -> dict[str, str] | None:
        """The model's versions Triton marks UNAVAILABLE there, with their reasons; None if the
        index cannot be read."""
        try:
            status, text = await self._post(url, "/v2/repository/index", b"{}")
            entries = json.loads(text) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        if not isinstance(entries, list):
            return None
        return {
            str(e.get("version")): str(e.get("reason") or "failed to load")
            for e in entries
            if isinstance(e, dict) and e.get("name") == name and e.get("state") == "UNAVAILABLE"
        }

    async def _post(self, url: str, path: str, body: bytes) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=self.config.load_timeout_s)
        headers = {"Content-Type": "application/json"}
        async with self._require_session().post(url + path, data=body, headers=headers, timeout=timeout) as resp:
            return resp.status, await resp.text()

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RepositorySync.start() has not run")
        return self._session

    # -- records --------------------------------------------------------------------------------

    def _fail(self, instance: Instance, name: str, version: str, print_: Fingerprint, reason: str) -> None:
        self._failed[(name, version)] = Failure(print_, reason)
        instance.withhold(name, version, _failed_why(reason))
        target = self._targets.get(name)
        if target is not None and target.config is not None and target.usable.get(version) == print_:
            # The policy chooses again from what is left (under "latest 1": the version before).
            usable = {v: p for v, p in target.usable.items() if v != version}
            self._targets[name] = Target.chosen(target.config, target.config_stamp, usable, target.files_stamp)
        self._event(instance.url, name, version, "failed", reason)

    def _config_error(self, name: str, stamp: tuple[int, int], reason: str) -> None:
        self._config_errors[name] = Failure(stamp, reason)
        self._event("", name, "", "config rejected", reason + "; the model stays as it is until config.pbtxt changes")

    def _event(self, url: str, model: str, version: str, what: str, detail: str) -> None:
        """Record and log an event; a load failing again the same way is not repeated (a load
        retried every round against an instance that refuses it, or is unreachable)."""
        key = (url, model, version)
        if what in ("load failed", "adopted") and self._last_event.get(key) == (what, detail):
            return
        self._last_event[key] = (what, detail)
        log.warning("repository: %s%s%s: %s (%s)", model, f" version {version}" if version else "", f" on {url}" if url else "", what, detail)
        self.events.append(
            {"time": round(time.time(), 3), "instance": url, "model": model, "version": version, "event": what, "detail": detail}
        )

    def snapshot(self) -> dict[str, Any]:
        scan = self._last_scan or {}
        models: dict[str, Any] = {}
        for name in sorted(set(scan) | set(self._targets)):
            folder = scan.get(name)
            target = self._targets.get(name)
            instances = {}
            for i in self.router.instances:
                states = {v: "ready" for v in (i.models or {}).get(name, ())}
                for (m, v), why in i.withheld.items():
                    if m == name and (v in (i.loaded or {}).get(name, ()) or why.startswith(("loading", "failed"))):
                        states[v] = why
                instances[i.url] = dict(sorted(states.items(), key=lambda kv: int(kv[0])))
            error = self._config_errors.get(name)
            models[name] = {
                "on_disk": [v for v, _ in folder.versions] if folder else [],
                "serving": sorted(target.versions, key=int) if target else [],
                "config_error": error.reason if error else None,
                "failed": {v: f.reason for (m, v), f in sorted(self._failed.items()) if m == name},
                "instances": instances,
            }
        return {
            "path": str(self.root),
            "scan_error": self._scan_error,
            "models": models,
            "events": list(reversed(self.events)),
        }


