"""What must not be reported (first-call effects, a cache that fills once, churn) and what must
(a slow Python-level leak), under whichever backend runs."""

import os
import subprocess
import sys

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
            import xml.dom.minidom

            state["doc"] = xml.dom.minidom.parseString("<a><b/></a>")
            cycle = []
            cycle.append(cycle)
        return len(state)

    quick.execute(lazy)


def helpers_whose_caches_fill_in_batches(batches):
    """Functions of many global and attribute loads, each called so far that its next
    ``calls`` calls reach its 1024th: where CPython 3.10 makes a code object's opcache (~1 KiB
    here), once. One fills in each of the judged batches; 3.11+ has no such cache."""
    helpers = []
    for calls in batches:
        namespace = {"os": os, "sys": sys}
        body = "".join(f"    os.sep, sys.maxsize, os.linesep, len  # {i}\n" for i in range(12))
        exec(f"def helper():\n{body}", namespace)  # a code object of its own
        for _ in range(1024 - calls):
            namespace["helper"]()
        helpers.append(namespace["helper"])
    return helpers


def test_caches_the_interpreter_fills_at_its_nth_call_are_not_a_leak(psleak, backend):
    """Counters grow in three batches in a row, by as much per call each time, with the 3.10
    opcaches of one, two, then three code objects: the tracer sees that no site keeps growing,
    and the traced batches that follow judge."""
    if backend == "poll" and POLL_WITHOUT_MALLOC:
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    # Calls before each judged batch's middle: the first call, the counters' call, 10 of
    # warm-up, then batches of 200, 300 and 450.
    middles = [12 + 100] + [212 + 150] * 2 + [512 + 225] * 3
    helpers = helpers_whose_caches_fill_in_batches(middles)

    def clean():
        for helper in helpers:
            helper()

    psleak.execute(clean, times=200, warmup_times=10)


def test_allocating_and_freeing_a_lot_is_not_a_leak(quick):
    def churn():
        blocks = [bytearray(100 * i) for i in range(200)]
        return sum(map(len, {i: str(i) * 10 for i in range(300)}.values())) + len(blocks)

    quick.execute(churn)


HEAP_GROWTH_PER_BATCH = """
from psleak import MemoryLeakTestCase

class RecordsHeapGrowth(MemoryLeakTestCase):
    def _call_ntimes(self, fun, times):
        diffs = super()._call_ntimes(fun, times)
        print(diffs["heap"])
        return diffs

def keeps_nothing():
    return [1, 2, {"a": (3, 4)}, "x" * 100]

case = RecordsHeapGrowth()
for _ in range(20):
    case.execute(keeps_nothing, times=100)
"""


def test_a_batch_that_keeps_nothing_grows_the_heap_by_nothing(backend):
    # What glibc's thread cache happens to hold, and our own reading of the heap, once moved
    # the figure by hundreds of bytes per batch: enough to fail clean tests now and then.
    if backend == "trace":
        pytest.skip("the tracer judges memory from its ledger; the heap figure is only shown")
    # In an interpreter of its own: run after test_leaky_ext.py in this one, one run in four to
    # seven read +176 B once, at some batch, kept for good — a leftover of those tests, not of
    # the reading (alone, 0 such batches in 2 400; the tracer, watching 120 batches after that
    # file, saw nothing of theirs left live).
    script = [sys.executable, "-c", HEAP_GROWTH_PER_BATCH]
    run = subprocess.run(script, capture_output=True, text=True, check=True)
    growth = [int(line) for line in run.stdout.split()]
    assert len(growth) >= 20, run.stdout
    assert growth == [0] * len(growth)


HEAP_TOP_AND_MAPPINGS = """
import ctypes, mmap
from psleak import _native

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
blocks = (ctypes.c_void_p * 20)()
_native.heap_trim()
_native.mark_memory()
for i in range(20):
    blocks[i] = libc.malloc(100_000)  # under glibc's mmap threshold: the heap's top, brk, moves
diffs, exact, _ = _native.memory_since_mark()
print(diffs["vms"], exact["mapped"])
_native.mark_memory()
kept = mmap.mmap(-1, 1 << 20)
diffs, exact, _ = _native.memory_since_mark()
print(diffs["vms"], exact["mapped"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap and mallinfo2")
def test_the_heaps_top_moves_vms_but_not_the_codes_mappings():
    # In CI, a clean function's batches left glibc's heap 4, 8 and 8 KiB further up, its bytes
    # in use unchanged: vms, judged exact then, called that a leak. The exact counter is now
    # the code's own mappings, vms less all the allocator holds from the system.
    run = subprocess.run([sys.executable, "-c", HEAP_TOP_AND_MAPPINGS], capture_output=True, text=True, check=True)
    (heap_vms, heap_mapped), (mmap_vms, mmap_mapped) = (map(int, line.split()) for line in run.stdout.splitlines())
    assert heap_vms >= 1 << 20 and heap_mapped == 0, run.stdout
    # vms may also hold the heap's top, moved by what Python allocated around the mmap (132 KiB
    # in one CI run): the mapping is the code's own, exactly, whatever the heap did.
    assert mmap_mapped == 1 << 20 <= mmap_vms, run.stdout


def test_a_python_level_leak_is_caught(quick, backend):
    kept = []

    def leak():
        kept.append(bytearray(512))

    with pytest.raises(MemoryLeakError) as info:
        quick.execute(leak)
    assert "runs of 'test_a_python_level_leak_is_caught.<locals>.leak'" in str(info.value), "the tested function"
    if backend == "trace":
        assert "Leak sites" in str(info.value)
        line = leak.__code__.co_firstlineno + 1
        assert f"* leak (test_verdicts.py:{line}) → " in str(info.value), "the Python line leads the site"
    assert "Run # 1:" in str(info.value)


LOSSY_LEDGER = """
import psleak

def leak(kept=[]):
    kept.extend(bytearray(64) for _ in range(100))

try:
    psleak.MemoryLeakTestCase().execute(leak, times=10, warmup_times=1)
except psleak.MemoryLeakError as e:
    print("leak:", e)
except psleak.Error as e:
    print("error:", e)
"""


def test_a_tracer_that_missed_events_says_its_names_may_be_incomplete(backend):
    # A collector whose ledger is full (or whose ring overflowed) may miss a leak's site: the
    # counters judge all the same, and the error says the names may be incomplete.
    if backend != "trace":
        pytest.skip("only the tracer follows events; polling has nothing to miss")
    env = {**os.environ, "PSLEAK_MAX_LIVE": "1000"}
    run = subprocess.run([sys.executable, "-c", LOSSY_LEDGER], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.startswith("leak: memory kept increasing"), run.stdout + run.stderr
    assert "(the tracer missed events while calling 'leak' (" in run.stdout
    assert "blocks past the ledger's limit): the sites it names may be incomplete" in run.stdout
