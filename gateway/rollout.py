"""Traffic split between model versions: which version serves a request that names none.

The rollout file (TOML, ``[rollout] file`` in the gateway config) holds one table per model:

    [models.digits_cnn]
    stable = "1"             # the version that serves by default
    canary = "2"             # optional: a version under trial...
    canary_share = 0.1       # ...and the share of requests it gets, 0..1
    sticky_header = "x-user" # optional: a request header whose value pins a client to a version

A request naming a version (``/v2/models/{m}/versions/{v}/infer``) bypasses the rollout; a model
without a table is served by the newest version READY in the fleet. With a sticky header, the
choice is a hash of the model and the header's value: the same client always gets the same
version for a given share, and raising the share only moves clients from stable to canary. A
request without the header is drawn at random.

The file is read at start and again whenever it changes (``Rollouts.reload_if_changed``, polled
by the app). A file that does not parse or validate is rejected with a message naming the
problem, and the rollout in force stays. (Ramp schedules, automatic rollback and the admin API
that changes shares come with the rest of the rollout feature.)
"""

from __future__ import annotations

import hashlib
import logging
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_KEYS = {"stable", "canary", "canary_share", "sticky_header"}


class RolloutError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelRollout:
    stable: str
    canary: str = ""
    canary_share: float = 0.0
    sticky_header: bytes = b""  # lower-case, as ASGI gives header names

    def choose(self, model: str, sticky: bytes | None, rng: random.Random) -> str:
        if not self.canary or self.canary_share <= 0.0:
            return self.stable
        if sticky is not None:
            digest = hashlib.blake2b(model.encode() + b"\0" + sticky, digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        else:
            point = rng.random()
        return self.canary if point < self.canary_share else self.stable


def _version(value: Any, where: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        raise RolloutError(f"{where} must be a version number such as \"2\", got {value!r}")
    return text


def parse_rollouts(data: dict[str, Any]) -> dict[str, ModelRollout]:
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise RolloutError(f"unknown section(s): {', '.join(unknown)} (expected [models.<name>] tables)")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise RolloutError("'models' must hold one table per model: [models.<name>]")
    out: dict[str, ModelRollout] = {}
    for name, table in models.items():
        where = f"models.{name}"
        if not isinstance(table, dict):
            raise RolloutError(f"[{where}] must be a table")
        bad = sorted(set(table) - _KEYS)
        if bad:
            raise RolloutError(f"unknown key(s) in [{where}]: {', '.join(bad)}")
        if "stable" not in table:
            raise RolloutError(f"[{where}] needs a stable version")
        stable = _version(table["stable"], f"{where}.stable")
        canary = _version(table["canary"], f"{where}.canary") if "canary" in table else ""
        share = table.get("canary_share", 0.0)
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
            raise RolloutError(f"{where}.canary_share must be a number in 0..1, got {share!r}")
        if share and not canary:
            raise RolloutError(f"{where}.canary_share is set but there is no canary version")
        if canary == stable:
            raise RolloutError(f"{where}: the canary is the stable version ({stable})")
        sticky = table.get("sticky_header", "")
        if not isinstance(sticky, str) or (sticky and not sticky.replace("-", "").isalnum()):
            raise RolloutError(f"{where}.sticky_header must be a header name, got {sticky!r}")
        out[name] = ModelRollout(stable, canary, float(share), sticky.lower().encode())
    return out


def load_rollouts(path: Path) -> dict[str, ModelRollout]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RolloutError(f"rollout file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RolloutError(f"{path}: invalid TOML: {exc}") from None
    return parse_rollouts(data)


@dataclass(slots=True)
class Rollouts:
    """The rollout in force, reloaded when its file changes; a bad file keeps the old one."""

    path: Path | None = None
    models: dict[str, ModelRollout] = field(default_factory=dict)
    error: str = ""  # why the file on disk is not the rollout in force, if it is not
    _stamp: tuple[int, int] | None = None
    _rng: random.Random = field(default_factory=random.Random)
    served: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, version) -> requests

    # The header names any rollout pins clients by: the infer endpoint keeps only these.
    pin_headers: frozenset[bytes] = frozenset()

    def set_models(self, models: dict[str, ModelRollout]) -> None:
        self.models = models
        self.pin_headers = frozenset(r.sticky_header for r in models.values() if r.sticky_header)

    @classmethod
    def from_file(cls, path: Path) -> Rollouts:
        """The rollout of ``path``; RolloutError if the file is missing or invalid."""
        rollouts = cls(path)
        stat = path.stat() if path.exists() else None
        rollouts.set_models(load_rollouts(path))
        rollouts._stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
        return rollouts

    def choose(self, model: str, headers: dict[bytes, bytes] | None = None) -> str:
        """The version for a request that names none; "" when the model has no rollout."""
        rollout = self.models.get(model)
        if rollout is None:
            return ""
        sticky = headers.get(rollout.sticky_header) if headers and rollout.sticky_header else None
        return rollout.choose(model, sticky, self._rng)

    def count(self, model: str, version: str) -> None:
        """One request of ``model`` served by ``version`` through the rollout."""
        key = (model, version)
        self.served[key] = self.served.get(key, 0) + 1

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed; True if a new rollout is now in force."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            stamp = None
            if self.error != str(exc):
                log.error("rollout file %s: %s; the rollout in force stays", self.path, exc)
                self.error = str(exc)
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            models = load_rollouts(self.path)
        except RolloutError as exc:
            self.error = str(exc)
            log.error("rejected rollout file: %s; the rollout in force stays", exc)
            return False
        self.set_models(models)
        self.error = ""
        log.warning("rollout loaded from %s: %s", self.path, ", ".join(sorted(models)) or "no models")
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "file": str(self.path) if self.path else None,
            "error": self.error or None,
            "models": {
                name: {
                    "stable": r.stable,
                    "canary": r.canary or None,
                    "canary_share": r.canary_share,
                    "sticky_header": r.sticky_header.decode() or None,
                    "served": {v: n for (m, v), n in sorted(self.served.items()) if m == name},
                }
                for name, r in sorted(self.models.items())
            },
        }
