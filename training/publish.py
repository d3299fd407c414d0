"""Publish a checkpoint as the next version of a model in a Triton model repository.

    <parent of repository>/.<repository>-publish-<pid>-<token>.tmp/   written first, unseen by Triton
        model.py        the self-contained served model (training/templates/model.py)
        __pycache__/    model.py compiled ahead
        model.pt        the checkpoint, byte for byte (float, pruned, distilled or int8)
        metadata.json   source checkpoint and its hash, metrics, gate decision, time
    then one rename to <repository>/<model>/<N+1>/   (Triton polls and loads it)

Triton in poll mode reloads a model whenever anything in its folder changes, so nothing is
written there but the final rename: the staging folder sits beside the repository (on the same
file system, so the rename stays atomic; inside the model's folder, under a name Triton ignores,
when that is not possible), and model.py is compiled ahead, since the backend's first import
would otherwise write `__pycache__/` into the new version and cause a second reload.

Before the rename, the staged folder is run the way Triton will run it (its own model.py, see
`training.harness`) on the test split; its accuracy is compared with the stable version's,
measured the same way on that version's own files, on the test split of the seed the candidate
was trained with. The stable version is the one a rollout config names as `stable` for this
model (which must load), else the newest version in the repository that loads (the gateway
never routes to one that does not; each one skipped is logged). A candidate more than `margin`
below it is refused (the staging folder is removed) unless forced; so is one trained on another
split than the stable version, since no test split is then held out from both.

Optionally a canary entry is written into a rollout config (TOML), touching only this model's
table:

    [models.digits_cnn]
    stable = "1"          # the version that takes the rest of the traffic
    canary = "2"          # the version just published
    canary_share = 0.1    # share of requests for the canary
"""

from __future__ import annotations

import datetime as dt
import fcntl
import importlib.util
import json
import os
import py_compile
import re
import secrets
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.compress import sha256
from training.harness import served_version, version_network
from training.measure import Metrics, accuracy, measure
from training.quantize import model_from_payload, read_source, split_seed
from training.specs import UsageError, check_output_file, spec

TEMPLATE = Path(__file__).resolve().parent / "templates" / "model.py"
OUTPUT_ATOL = 1e-4


class GateRefused(RuntimeError):
    """The candidate's accuracy is too far below the stable version's (exit status 3)."""


@dataclass
class PublishResult:
    model: str
    version: int
    path: Path
    metrics: Metrics
    stable_version: int | None
    stable_accuracy: float | None
    forced: bool
    canary_config: Path | None
    metadata: dict[str, Any]


def versions(model_dir: Path) -> list[int]:
    """The version numbers present (folders named by a positive integer), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0)


def named_stable(model_dir: Path, model: str, canary_config: Path | None) -> int | None:
    """The `stable` version the rollout config names for this model, which must be a version
    present in `model_dir` (a UsageError naming the file otherwise); None when the file, its
    table or its `stable` is absent, or when no version is present yet (the first version is
    written as stable, replacing whatever was named)."""
    if canary_config is None or not canary_config.exists():
        return None
    data = read_rollout(canary_config)
    models = data.get("models", {})
    table = models.get(model, {}) if isinstance(models, dict) else None
    if not isinstance(table, dict):
        raise UsageError(f"--canary-config {canary_config}: {'models' if table is None else f'models.{model}'} is not a table")
    if "stable" not in table:
        return None
    present = versions(model_dir)
    if not present:
        return None
    named = table["stable"]
    text = str(named) if isinstance(named, int) and not isinstance(named, bool) else named
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and int(text) > 0):
        raise UsageError(f"--canary-config {canary_config}: the stable version of {model} is {named!r}, not a version number")
    if int(text) not in present:
        raise UsageError(
            f"--canary-config {canary_config}: the stable version {named!r} of {model} is not in {model_dir} "
            f"(versions present: {', '.join(map(str, present))})"
        )
    return int(text)


def _stable(model_dir: Path, model: str, canary_config: Path | None, log: Any) -> tuple[int, nn.Module, int] | None:
    """The version the gate compares with, the network it serves and the split seed it was
    trained on; None before the first version. The `stable` a rollout config names must be a
    version present and load (see `named_stable`); otherwise it is the newest version that loads."""
    present = versions(model_dir)
    named = named_stable(model_dir, model, canary_config)
    if named is not None:
        try:
            net, payload = served_version(model_dir, named, model)
        except UsageError as exc:
            raise UsageError(f"the stable {exc} (named in {canary_config})") from None
        return named, net, split_seed(payload, model_dir / str(named), None)
    broken = []
    for version in reversed(present):
        try:
            net, payload = served_version(model_dir, version, model)
        except UsageError as exc:
            log(f"{model}: {exc}; the gate compares with the newest version that loads")
            broken.append(str(version))
            continue
        return version, net, split_seed(payload, model_dir / str(version), None)
    if broken:
        raise UsageError(f"no version of {model} in {model_dir} loads ({', '.join(broken)}): nothing to compare with")
    return None


def publish(
    model: str,
    source: Path,
    repository: Path,
    *,
    margin: float = 0.01,
    force: bool = False,
    canary_config: Path | None = None,
    canary_share: float | None = None,
    seed: int | None = None,
    latency_runs: int = 50,
    log: Any = print,
) -> PublishResult:
    """`seed`: the split to measure on; None (the default) takes the one the checkpoint was
    trained on, and another one is refused (see `split_seed`)."""
    s = spec(model)
    source, repository = Path(source), Path(repository)
    model_dir = repository / model
    if not (model_dir / "config.pbtxt").is_file():
        raise UsageError(f"{model_dir} is not a model of the repository (no config.pbtxt)")
    payload = read_source(source, model)
    seed = split_seed(payload, source, seed)
    if not 0.0 <= margin <= 1.0:
        raise UsageError(f"--margin must be in [0, 1], got {margin}")
    if canary_share is not None and canary_config is None:
        raise UsageError("--canary-share needs --canary-config FILE")
    if canary_config is not None:
        canary_share = 0.1 if canary_share is None else canary_share
        if not 0.0 < canary_share <= 1.0:
            raise UsageError(f"--canary-share must be in (0, 1], got {canary_share}")
        # Fail before publishing if the file cannot be read, written or names a stable that is not there.
        check_output_file(canary_config, "--canary-config")
        if canary_config.exists():
            named_stable(model_dir, model, canary_config)
            rollout_text(canary_config, model, {"stable": "0", "canary": "0", "canary_share": 0.1})

    splits = s.splits(seed)
    staging = _staging_folder(repository, model_dir)
    try:
        shutil.copyfile(TEMPLATE, staging / "model.py")
        shutil.copyfile(source, staging / "model.pt")
        # What Triton will run: the staged model.py building the network from the staged file.
        served = version_network(staging.parent, staging.name, model)
        reference = model_from_payload(payload)
        probe = torch.from_numpy(splits.x_test[:64])
        with torch.inference_mode():
            diff = float((served(probe) - reference(probe)).abs().max())
        if diff > OUTPUT_ATOL:
            raise RuntimeError(f"the staged model.py disagrees with the checkpoint (max |diff| {diff:.2e})")
        metrics = measure(served, splits, staging / "model.pt", runs=latency_runs)
        log(f"{model}: candidate test accuracy {metrics.test_accuracy:.4f} (measured on the staged version folder)")

        compared = _stable(model_dir, model, canary_config, log)
        stable = stable_seed = stable_acc = message = None
        if compared is not None:
            stable, stable_net, stable_seed = compared
            if stable_seed != seed:
                message = (
                    f"refusing to publish {model}: it was trained on the seed-{seed} split and stable version "
                    f"{stable} on the seed-{stable_seed} split, so no test split is held out from both and their "
                    f"accuracies cannot be compared; train it with --seed {stable_seed}"
                )
            else:
                stable_acc = accuracy(stable_net, splits.x_test, splits.y_test)
                log(f"{model}: stable version {stable} test accuracy {stable_acc:.4f}")
                below = stable_acc - metrics.test_accuracy
                if below > margin + 1e-12:
                    message = (
                        f"refusing to publish {model}: test accuracy {metrics.test_accuracy:.4f} is "
                        f"{below * 100:.2f} points below stable version {stable} ({stable_acc:.4f}), "
                        f"more than the margin of {margin * 100:.2f} points"
                    )
            if message is not None:
                if not force:
                    raise GateRefused(message + "; --force publishes it anyway")
                log("warning: " + message + "; publishing anyway (--force)")

        metadata = {
            "model": model,
            "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(source.resolve()), "sha256": sha256(source), "bytes": source.stat().st_size},
            "format": payload.get("quantization") or "float32",
            "config": payload["config"],
            "seed": seed,
            "metrics": metrics.as_dict(),
            "gate": {
                "stable_version": stable,
                "stable_test_accuracy": stable_acc,
                "stable_seed": stable_seed,
                "margin": margin,
                "forced": message is not None,
            },
            "lineage": {k: payload[k] for k in ("training", "compression", "source", "metrics", "created") if k in payload},
            "torch_version": str(torch.__version__),
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        _compile_ahead(staging / "model.py")
        if canary_config is not None:  # a rollout file this cannot be written into: said before publishing
            keys = ("stable", "canary", "canary_share") if stable is not None else ("stable",)
            rollout_text(canary_config, model, dict.fromkeys(keys, "0"))
        version = _commit(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    metadata["version"] = version
    final = model_dir / str(version)
    log(f"{model}: published version {version} -> {final}")
    if canary_config is not None:
        assert canary_share is not None
        if stable is None:
            write_rollout(canary_config, model, {"stable": str(version)})
            log(f"{model}: {canary_config}: no earlier version, version {version} written as stable")
        else:
            values = canary_entry(canary_config, model, stable, version, canary_share)
            write_rollout(canary_config, model, values)
            share = f"for {canary_share:.0%} of requests" if "canary_share" in values else "on the table's ramp"
            log(f"{model}: {canary_config}: canary version {version} {share}, stable {stable}")
    return PublishResult(model, version, final, metrics, stable, stable_acc, bool(metadata["gate"]["forced"]), canary_config, metadata)


def _staging_folder(repository: Path, model_dir: Path) -> Path:
    """A fresh folder outside the model's folder, on its file system (see the module's doc)."""
    name = f"-publish-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    beside = repository.resolve().parent / f".{repository.resolve().name}{name}"
    try:
        beside.mkdir()
    except OSError:
        pass
    else:
        if os.stat(beside).st_dev == os.stat(model_dir).st_dev:
            return beside
        beside.rmdir()
    inside = model_dir / f".{name.lstrip('-')}"  # Triton ignores (and logs) a non-numeric folder
    inside.mkdir()
    return inside


def _compile_ahead(source: Path) -> None:
    """Write model.py's bytecode where the Python backend looks for it. Valid for a backend
    running this Python version (the local fleet's); another version ignores it."""
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# In a model's folder: the highest version number ever published there, so that a number is
# never given twice, even after its folder was removed (a rolled-back version: the gateway
# remembers what it decided about a number). Triton reads only a model's numbered folders.
PUBLISHED = ".published"
PUBLISHED_LOCK = ".published.lock"  # held while a number is chosen, taken and recorded


def _published_before(model_dir: Path) -> int:
    try:
        return int((model_dir / PUBLISHED).read_text())
    except (OSError, ValueError):
        return 0


def _commit(staging: Path, model_dir: Path) -> int:
    """Rename the staged folder to the next version number, one above any present or ever
    published there (``PUBLISHED``): one atomic step, so Triton sees either nothing or the
    complete version. Publishers of one model take turns (an exclusive lock on
    ``PUBLISHED_LOCK``): otherwise one that chose a lower number could record it last and move
    ``PUBLISHED`` back. Retries if a folder appeared under the number by other means."""
    _fsync_tree(staging)
    fd = os.open(model_dir / PUBLISHED_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for _ in range(10):
            version = max((versions(model_dir) or [0])[-1], _published_before(model_dir)) + 1
            target = model_dir / str(version)
            if target.exists():
                continue
            try:
                os.rename(staging, target)  # fails if a non-empty folder appeared meanwhile
            except OSError:
                continue
            mark = model_dir / f".{PUBLISHED}.{os.getpid()}.tmp"
            mark.write_text(str(max(version, _published_before(model_dir))))
            os.replace(mark, model_dir / PUBLISHED)
            _fsync_dir(model_dir)
            return version
    finally:
        os.close(fd)
    raise RuntimeError(f"could not claim a new version number in {model_dir}")


# --- the rollout config (TOML) ------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The rollout file's text; a UsageError when it is not a readable UTF-8 text file."""
    if path.is_dir():
        raise UsageError(f"--canary-config {path} is a folder, not a rollout file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--canary-config {path}: not UTF-8 text (byte {exc.start}); a rollout file is TOML") from None
    except OSError as exc:
        raise UsageError(f"--canary-config {path}: cannot read it ({exc.strerror or exc})") from None


def read_rollout(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--canary-config {path}: not valid TOML ({exc})") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v)


def canary_entry(path: Path, model: str, stable: int, version: int, share: float) -> dict[str, Any]:
    """What publish sets in the model's table of the rollout file: the stable and canary
    versions, and the canary's share, unless the table has a ramp (whose first step is then the
    share: the gateway refuses a table with both)."""
    table = read_rollout(path).get("models", {}).get(model, {}) if path.exists() else {}
    values: dict[str, Any] = {"stable": str(stable), "canary": str(version)}
    if not (isinstance(table, dict) and "ramp" in table):
        values["canary_share"] = share
    return values


def write_rollout(path: Path, model: str, values: dict[str, Any]) -> None:
    """Set `values` in the `[models.<model>]` table of the TOML file at `path`, creating the
    file or the table as needed; every other line of the file is kept as it was. Written
    atomically (temporary file, then rename), under an exclusive lock on `.<name>.lock` beside
    it, so that two publishes at once (two models) both keep their table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_rollout(path, model, values)
    finally:
        os.close(fd)


def _write_rollout(path: Path, model: str, values: dict[str, Any]) -> None:
    new_text = rollout_text(path, model, values)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new_text)
    os.replace(tmp, path)


def rollout_text(path: Path, model: str, values: dict[str, Any]) -> str:
    """The file at `path` (if any) with `values` set in `[models.<model>]`; UsageError if the
    result would not be a rollout file the gateway can read."""
    text = _read_text(path) if path.exists() else ""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*models\s*\.\s*(\"?)" + re.escape(model) + r"\1\s*\]\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines.append(f"[models.{model}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        remaining = dict(values)
        for i in range(start + 1, end):
            m = re.match(r"^(\s*)([A-Za-z0-9_-]+)\s*=", lines[i])
            if m and m.group(2) in remaining:
                lines[i] = f"{m.group(1)}{m.group(2)} = {_toml_value(remaining.pop(m.group(2)))}"
        last = max([i for i in range(start, end) if lines[i].strip()] or [start])
        lines[last + 1 : last + 1] = [f"{k} = {_toml_value(v)}" for k, v in remaining.items()]
    new_text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(new_text)  # never write a file the gateway could not read
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot set [models.{model}] in {path} ({exc}); edit it by hand") from None
    return new_text
