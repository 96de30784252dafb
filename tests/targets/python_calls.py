"""A Python program that leaks through ctypes' malloc from two functions, for the tests of
Python frames: `first N` / `second N` leak N blocks of 3000 bytes each from one or the other;
`generated N` leaks one block of 3000 + i bytes from each of N functions gen_i made and
dropped one after another."""

import ctypes
import gc
import sys

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
kept = []


def first(n):
    for _ in range(n):
        kept.append(libc.malloc(3000))  # FIRST_LINE


def second(n):
    for _ in range(n):
        kept.append(libc.malloc(3000))  # SECOND_LINE


def generated(n):
    # Each function's code object, name and file are freed before the next is made, which may
    # take their addresses before psleak reads them.
    for i in range(n):
        namespace = {}
        exec(compile(f"def gen_{i}(malloc):\n    return malloc({3000 + i})\n", f"gen_{i}.py", "exec"), namespace)
        kept.append(namespace[f"gen_{i}"](libc.malloc))  # GENERATED_LINE
        del namespace
        gc.collect()


print("ready", flush=True)
for command in sys.stdin:
    name, _, count = command.partition(" ")
    if name in ("first", "second", "generated"):
        globals()[name](int(count))
    print("ok", flush=True)
