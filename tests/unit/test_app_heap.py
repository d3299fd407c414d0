"""settle_heap: start-up objects leave the cyclic collector's generations; young collections
run less often; the collector stays on."""

from __future__ import annotations

import gc

from gateway.app import GC_YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    built_at_start_up = [{"an": "object"} for _ in range(100)]
    try:
        settle_heap()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(built_at_start_up)
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert all(not any(obj is g for g in gc.get_objects(generation=2)) for obj in built_at_start_up[:3])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
