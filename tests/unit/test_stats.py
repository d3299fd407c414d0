"""Triton statistics summed across the fleet."""

from test_metrics import empty_services

from gateway.metrics import GatewayCollector, InferCounts, cache_answers, registry_of
from gateway.upstream.stats import add_cache_answers, merge_statistics


def stats(name: str, count: int, ns: int, last: int, batch1: int) -> dict:
    return {
        "model_stats": [
            {
                "name": name,
                "version": "1",
                "last_inference": last,
                "inference_count": count,
                "inference_stats": {"success": {"count": count, "ns": ns}},
                "batch_stats": [{"batch_size": 1, "compute_infer": {"count": batch1, "ns": 10}}],
            }
        ]
    }


def test_counts_and_times_add_up_and_last_inference_is_the_latest() -> None:
    merged = merge_statistics([stats("m", 3, 300, 1000, 2), stats("m", 5, 500, 2000, 4), stats("n", 1, 1, 5, 1)])
    by_name = {s["name"]: s for s in merged["model_stats"]}
    m = by_name["m"]
    assert m["inference_count"] == 8
    assert m["inference_stats"]["success"] == {"count": 8, "ns": 800}
    assert m["last_inference"] == 2000
    assert m["batch_stats"] == [{"batch_size": 1, "compute_infer": {"count": 6, "ns": 20}}]
    assert by_name["n"]["inference_count"] == 1


def test_the_gateways_cache_answers_count_as_triton_counts_its_cache_hits() -> None:
    merged = merge_statistics([stats("m", 3, 300, 1000, 2)])
    add_cache_answers(merged, {("m", "1"): (90.0, 0.0045), ("m", "2"): (7.0, 1.0), ("other", "1"): (5.0, 1.0)})
    m = merged["model_stats"][0]
    assert m["inference_stats"]["success"] == {"count": 93, "ns": 300 + 4_500_000}
    assert m["inference_stats"]["queue"] == {"count": 90, "ns": 0}
    assert m["inference_stats"]["cache_hit"] == {"count": 90, "ns": 4_500_000}
    assert m["inference_count"] == 3  # nothing ran for them


def test_cache_answers_are_read_per_version_from_the_metrics() -> None:
    counts = InferCounts()
    for _ in range(3):
        counts.record("m", "1", 200, 0.002, "hit")
    counts.record("m", "1", 200, 0.004, "coalesced")
    counts.record("m", "1", 200, 0.010, "miss")  # computed: Triton counted it
    counts.record("m", "2", 200, 0.001, "hit")
    counts.record("m", "1", 504, 0.5, "")  # not an answer
    found = cache_answers(registry_of(GatewayCollector(counts, empty_services())))
    assert found.keys() == {("m", "1"), ("m", "2")}
    assert found[("m", "1")][0] == 4 and abs(found[("m", "1")][1] - 0.010) < 1e-9
    assert found[("m", "2")][0] == 1
