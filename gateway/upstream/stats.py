"""Triton's per-model statistics summed over the fleet, so the gateway answers ``/stats`` as one
big Triton would (perf_analyzer reads them for its server-side breakdown).
"""

from __future__ import annotations

from typing import Any

# Keys that identify an entry (merged entries share them): kept, never summed.
IDENTITY_KEYS = frozenset({"name", "version", "batch_size"})


def _merge(a: Any, b: Any, key: str = "") -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a[k], v, k) if k in a else v
        return out
    if isinstance(a, list) and isinstance(b, list):
        return _merge_list(a, b)
    if isinstance(a, bool) or isinstance(b, bool) or key in IDENTITY_KEYS:
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return max(a, b) if key == "last_inference" else a + b
    return a


def _identity(item: Any) -> Any:
    if isinstance(item, dict):
        for k in ("batch_size", "name"):
            if k in item:
                return (k, item[k], item.get("version"))
    return None


def _merge_list(a: list[Any], b: list[Any]) -> list[Any]:
    out = list(a)
    index = {_identity(x): i for i, x in enumerate(out) if _identity(x) is not None}
    for item in b:
        ident = _identity(item)
        if ident is not None and ident in index:
            out[index[ident]] = _merge(out[index[ident]], item)
        else:
            if ident is not None:
                index[ident] = len(out)
            out.append(item)
    return out


def add_cache_answers(stats: dict[str, Any], answers: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Count the requests the gateway answered from its cache (or by sharing an identical
    request's computation) as Triton counts its own cache hits: in ``success``, ``queue`` and
    ``cache_hit`` (not in ``inference_count`` or ``execution_count``: nothing ran). One big
    Triton would have counted them, and perf_analyzer, asked for no version, reads the version
    it measured from whose ``queue`` count grew."""
    for entry in stats.get("model_stats", []):
        found = answers.get((entry.get("name"), entry.get("version")))
        if not found or not found[0]:
            continue
        count, ns = int(found[0]), int(found[1] * 1e9)
        inference = entry.setdefault("inference_stats", {})
        for key, add_ns in (("success", ns), ("queue", 0), ("cache_hit", ns)):
            item = inference.setdefault(key, {"count": 0, "ns": 0})
            item["count"] = item.get("count", 0) + count
            item["ns"] = item.get("ns", 0) + add_ns


def merge_statistics(answers: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"model_stats": []}
    for answer in answers:
        merged["model_stats"] = _merge_list(merged["model_stats"], answer.get("model_stats", []))
    return merged
