"""Triton statistics summed across the fleet."""

from gateway.upstream.stats import merge_statistics


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
