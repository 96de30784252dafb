"""Target of the probe cost table of `cargo xtask bench-cost`. Waits for a line on stdin (so that
a tracer can attach first), then times alloc/free pairs of each allocation function psleak
probes (leaky_ext.time_allocator) and Python calls of a small function, and prints the
nanoseconds per pair or call as one JSON list of [name, ns]. Waits for another line before it exits."""

import json
import sys
import time

import leaky_ext

LIBC = [
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "reallocarray",
]
PYTHON = [f"{family}{op}" for family in ("PyMem_Raw", "PyMem_", "PyObject_") for op in ("Malloc", "Calloc", "Realloc")]
PAIRS = 20_000
CALLS = 20_000
SMALL_CALL = "Python call of a small function"


def small(i):
    return {"k": [i, str(i)]}


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    ns = [[name, leaky_ext.time_allocator(name, PAIRS)] for name in LIBC + PYTHON]
    started = time.perf_counter_ns()
    for i in range(CALLS):
        small(i)
    ns.append([SMALL_CALL, (time.perf_counter_ns() - started) / CALLS])
    print(json.dumps(ns), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
