"""Every deliberate leak of leaky_ext fails with the right error and, with the tracer, names the
leaking C function; every clean twin passes. Runs under whichever backend PSLEAK_BACKEND picks
(`cargo xtask test` runs it under trace, trace without PYTHONMALLOC=malloc, and poll)."""

import os

import leaky_ext as ext
import pytest

from psleak import MemoryLeakError, UnclosedFdError, UnclosedNativeThreadError

PYMALLOC = os.environ.get("PYTHONMALLOC") != "malloc"

# (leaking function, its arguments, clean twin, error, execute() arguments)
CASES = [
    ("forget_free", (1,), "malloc_and_free", MemoryLeakError, {}),
    ("forget_free", (1024,), "malloc_and_free", MemoryLeakError, {}),
    ("forget_free", (16 * 1024,), "malloc_and_free", MemoryLeakError, {}),
    # Few calls: under polling, the leaking side holds every MiB it leaks until the verdict.
    ("forget_free", (1 << 20,), "malloc_and_free", MemoryLeakError, {"times": 20, "retries": 4}),
    ("forget_munmap", (4096,), "mmap_and_munmap", MemoryLeakError, {}),
    ("forget_decref_list", (), "decref_list", MemoryLeakError, {}),
    ("forget_decref_int", (), "decref_int", MemoryLeakError, {}),
    ("forget_decref_tuple", (), "decref_tuple", MemoryLeakError, {}),
    ("forget_decref_dict", (), "decref_dict", MemoryLeakError, {}),
    ("forget_decref_cycle", (), "decref_cycle", MemoryLeakError, {}),
    ("forget_pymem_free", (64,), "pymem_malloc_and_free", MemoryLeakError, {}),
    ("forget_pyobject_free", (64,), "pyobject_malloc_and_free", MemoryLeakError, {}),
    # Allocation-heavy: 20,000 mallocs and frees a call, one node kept by the leaky twin.
    ("forget_free_of_a_node", (20_000,), "build_and_free_list", MemoryLeakError, {}),
    ("forget_pthread_join", (), "pthread_create_and_join", UnclosedNativeThreadError, {}),
    ("forget_close", (), "open_and_close", UnclosedFdError, {}),
]

IDS = [f"{leak}{args[0] if args else ''}" for leak, args, *_ in CASES]


def memory_is_checked(backend):
    return backend == "trace" or not PYMALLOC


@pytest.fixture(autouse=True)
def _stop_leaked_threads():
    # Left spinning, they would make every later test one with other threads running, which
    # psleak judges by tracing.
    yield
    ext.stop_leaked_threads()


@pytest.mark.parametrize(("leak", "args", "twin", "error", "kwargs"), CASES, ids=IDS)
def test_leak_is_caught_and_named(psleak, backend, leak, args, twin, error, kwargs):
    if error is MemoryLeakError and not memory_is_checked(backend):
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    psleak.times, psleak.retries, psleak.warmup_times = 50, 10, 2
    with pytest.raises(error) as info:
        psleak.execute(getattr(ext, leak), *args, **kwargs)
    message = str(info.value)
    if backend == "trace":
        assert f"{leak} (leaky_ext.c:" in message, message
    if error is UnclosedFdError:
        assert "/dev/null" in message, message
    assert info.value.__class__ is error


# The flakiness check: `PSLEAK_TWIN_ROUNDS=20` runs every clean twin 20 times in one session.
ROUNDS = range(int(os.environ.get("PSLEAK_TWIN_ROUNDS", "1")))


@pytest.mark.parametrize("round_", ROUNDS, ids=[f"round{r}" for r in ROUNDS])
@pytest.mark.parametrize(("leak", "args", "twin", "error", "kwargs"), CASES, ids=IDS)
def test_clean_twin_passes(psleak, backend, leak, args, twin, error, kwargs, round_):
    if error is MemoryLeakError and not memory_is_checked(backend):
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    psleak.times, psleak.retries, psleak.warmup_times = 50, 10, 2
    # The twins run with the class defaults: at 20 calls a batch, polling's noise per call (Python's
    # own mallocs under PYTHONMALLOC=malloc) can outlast 4 retries of a clean function.
    psleak.execute(getattr(ext, twin), *args)


def test_leak_on_error_path_only(psleak, backend):
    if not memory_is_checked(backend):
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    psleak.times, psleak.warmup_times = 50, 2
    psleak.execute(ext.leak_on_error_path, 7)  # the happy path frees
    with pytest.raises(MemoryLeakError) as info:
        psleak.execute_w_exc(ValueError, ext.leak_on_error_path, 0)
    if backend == "trace":
        assert "leak_on_error_path (leaky_ext.c:" in str(info.value)
    psleak.execute_w_exc(ValueError, ext.free_on_error_path, 0)


@pytest.mark.parametrize("control", ["fill_cache_once", "churn"])
def test_controls_pass(psleak, backend, control):
    """A cache that fills once and a function that allocates and frees a lot are not leaks."""
    if not memory_is_checked(backend):
        pytest.skip("the polling backend checks memory only with PYTHONMALLOC=malloc")
    psleak.execute(getattr(ext, control))
