"""One run of one benchmark case under one contender, for `cargo xtask bench`.

    python leak_case.py --list                 the cases, one JSON object per line
    python leak_case.py CONTENDER CASE         runs CASE, prints {"verdict", "right", "calls"}
    python leak_case.py CONTENDER --all        every case in this process, a line each, timed

CONTENDER is `psleak` (whichever psleak this interpreter imports: ours, with PSLEAK_BACKEND
choosing the backend, or psleak 0.1.6 from PyPI) or `memray` (pytest-memray's limit_leaks).
Each uses its defaults: psleak's times=200, retries=10, warmup_times=10; for pytest-memray the
pattern its documentation gives (call in a loop, here psleak's 10 warm-up and 200 calls) with a
per-stack limit of MEMRAY_LIMIT. CASE is a name from the table, or `forget_free/N` for a leak of
N bytes per call. The verdict is `pass`, the error class's name, or `skip`.
"""

import json
import os
import sys
import tempfile
import time

# (case, leaky_ext function, its arguments, expected verdict, exception the call raises)
CASES = [
    ("forget_free/1", "forget_free", (1,), "MemoryLeakError", None),
    ("forget_free/1024", "forget_free", (1024,), "MemoryLeakError", None),
    ("forget_free/16384", "forget_free", (16384,), "MemoryLeakError", None),
    ("forget_free/1048576", "forget_free", (1 << 20,), "MemoryLeakError", None),
    ("forget_munmap", "forget_munmap", (4096,), "MemoryLeakError", None),
    ("forget_decref_list", "forget_decref_list", (), "MemoryLeakError", None),
    ("forget_decref_int", "forget_decref_int", (), "MemoryLeakError", None),
    ("forget_decref_tuple", "forget_decref_tuple", (), "MemoryLeakError", None),
    ("forget_decref_dict", "forget_decref_dict", (), "MemoryLeakError", None),
    ("forget_decref_cycle", "forget_decref_cycle", (), "MemoryLeakError", None),
    ("forget_pymem_free", "forget_pymem_free", (64,), "MemoryLeakError", None),
    ("forget_pyobject_free", "forget_pyobject_free", (64,), "MemoryLeakError", None),
    ("leak_on_error_path", "leak_on_error_path", (0,), "MemoryLeakError", ValueError),
    ("forget_pthread_join", "forget_pthread_join", (), "UnclosedNativeThreadError", None),
    ("forget_close", "forget_close", (), "UnclosedFdError", None),
    ("malloc_and_free/1", "malloc_and_free", (1,), "pass", None),
    ("malloc_and_free/1024", "malloc_and_free", (1024,), "pass", None),
    ("malloc_and_free/16384", "malloc_and_free", (16384,), "pass", None),
    ("malloc_and_free/1048576", "malloc_and_free", (1 << 20,), "pass", None),
    ("mmap_and_munmap", "mmap_and_munmap", (4096,), "pass", None),
    ("decref_list", "decref_list", (), "pass", None),
    ("decref_int", "decref_int", (), "pass", None),
    ("decref_tuple", "decref_tuple", (), "pass", None),
    ("decref_dict", "decref_dict", (), "pass", None),
    ("decref_cycle", "decref_cycle", (), "pass", None),
    ("pymem_malloc_and_free", "pymem_malloc_and_free", (64,), "pass", None),
    ("pyobject_malloc_and_free", "pyobject_malloc_and_free", (64,), "pass", None),
    ("free_on_error_path", "free_on_error_path", (0,), "pass", ValueError),
    ("pthread_create_and_join", "pthread_create_and_join", (), "pass", None),
    ("open_and_close", "open_and_close", (), "pass", None),
    ("control: cache fills once", "fill_cache_once", (), "pass", None),
    ("control: allocates and frees a lot", "churn", (), "pass", None),
    ("list: build and free 20000 nodes", "build_and_free_list", (20_000,), "pass", None),
    ("list: forget a node of 20000", "forget_free_of_a_node", (20_000,), "MemoryLeakError", None),
]

# pytest-memray can only judge memory: fds and threads are not what it sees.
MEMRAY_CASES_EXCLUDED = {"forget_pthread_join", "forget_close", "pthread_create_and_join", "open_and_close"}
MEMRAY_LIMIT = "1 KB"
MEMRAY_LEAK = "leaks over limit"
WARMUP, TIMES = 10, 200


def case(name):
    for row in CASES:
        if row[0] == name:
            return row
    function, _, size = name.partition("/")
    if function == "forget_free" and size.isdigit():
        return (name, function, (int(size),), "MemoryLeakError", None)
    raise SystemExit(f"leak_case: no such case {name!r}")


def run_psleak(function, args, exc):
    import unittest

    import psleak

    calls = [0]

    def call(*a):
        calls[0] += 1
        return function(*a)

    class Case(psleak.MemoryLeakTestCase):
        def test(self):
            if exc:
                self.execute_w_exc(exc, call, *args)
            else:
                self.execute(call, *args)

    class Result(unittest.TestResult):
        verdict = "pass"

        def addFailure(self, test, err):
            self.verdict = err[0].__name__

        addError = addFailure

        def addSkip(self, test, reason):
            self.verdict = "skip"

    result = Result()
    unittest.defaultTestLoader.loadTestsFromTestCase(Case).run(result)
    return result.verdict, calls[0]


MEMRAY_TEST = """
import pytest
from leak_case import case
import leaky_ext

_, name, args, _, exc = case({case!r})
function = getattr(leaky_ext, name)


def call():
    try:
        function(*args)
    except exc or ():
        pass


@pytest.fixture
def warmed_up():
    for _ in range({warmup}):
        call()


@pytest.mark.limit_leaks({limit!r})
def test_case(warmed_up):
    for _ in range({times}):
        call()
"""


def run_memray(name):
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        # A module name of its own, for runs of many cases in one process.
        path = os.path.join(tmp, f"test_case_{abs(hash(name))}.py")
        with open(path, "w") as f:
            f.write(MEMRAY_TEST.format(case=name, warmup=WARMUP, times=TIMES, limit=MEMRAY_LIMIT))
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                args = [path, "--memray", "-q", "-p", "no:cacheprovider", "--rootdir", tmp, "--import-mode=importlib"]
                code = pytest.main(args)
            finally:
                sys.stdout = stdout
    verdict = {0: "pass", 1: MEMRAY_LEAK}.get(int(code), f"pytest exit {int(code)}")
    return verdict, WARMUP + TIMES


def main():
    if sys.argv[1:] == ["--list"]:
        for name, _, _, expected, _ in CASES:
            memray = name not in MEMRAY_CASES_EXCLUDED
            print(json.dumps({"case": name, "expected": expected, "memray": memray}))
        return
    import leaky_ext

    contender, name = sys.argv[1:]
    try:
        if name != "--all":
            print(json.dumps(run_case(contender, name)))
            return
        # Steady state: every case in this one process, after one untimed case that pays for
        # the one-time costs (imports, the collector's start and attach).
        run_case(contender, "malloc_and_free/1")
        for row in CASES:
            if contender == "memray" and row[0] in MEMRAY_CASES_EXCLUDED:
                continue
            started = time.perf_counter()
            result = run_case(contender, row[0])
            result.update(case=row[0], seconds=time.perf_counter() - started)
            print(json.dumps(result), flush=True)
    finally:
        leaky_ext.stop_leaked_threads()


def run_case(contender, name):
    import leaky_ext

    _, function_name, args, expected, exc = case(name)
    if contender == "memray":
        verdict, calls = run_memray(name)
    else:
        verdict, calls = run_psleak(getattr(leaky_ext, function_name), args, exc)
    right = verdict == expected or (verdict == MEMRAY_LEAK and expected == "MemoryLeakError")
    return {"verdict": verdict, "right": right, "calls": calls}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
