"""What must not be reported (first-call effects, a cache that fills once, churn) and what must
(a slow Python-level leak), under whichever backend runs."""

import os

import pytest

from psleak import MemoryLeakError

POLL_WITHOUT_MALLOC = os.environ.get("PYTHONMALLOC") != "malloc"


@pytest.fixture
def quick(psleak, backend):
    if backend == "poll" and POLL_WITHOUT_MALLOC:
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    psleak.times, psleak.warmup_times = 50, 2
    return psleak


def test_a_cache_that_fills_once_is_not_a_leak(quick):
    cache = {}

    def lookup():
        # fills during the first calls, then only reads
        return cache.setdefault(len(cache) % 1, bytearray(4096))

    quick.execute(lookup)


def test_first_call_effects_are_not_leaks(quick):
    state = {}

    def lazy():
        if not state:
            # A lazy import, a module-level cache and a cycle the GC collects, all on the first call.
            import xml.dom.minidom  # noqa: PLC0415

            state["doc"] = xml.dom.minidom.parseString("<a><b/></a>")
            cycle = []
            cycle.append(cycle)
        return len(state)

    quick.execute(lazy)


def test_allocating_and_freeing_a_lot_is_not_a_leak(quick):
    def churn():
        blocks = [bytearray(100 * i) for i in range(200)]
        return sum(map(len, {i: str(i) * 10 for i in range(300)}.values())) + len(blocks)

    quick.execute(churn)


def test_a_python_level_leak_is_caught(quick, backend):
    kept = []

    def leak():
        kept.append(bytearray(512))

    with pytest.raises(MemoryLeakError) as info:
        quick.execute(leak)
    if backend == "trace":
        assert "Leak sites" in str(info.value)
    assert "Run # 1:" in str(info.value)
