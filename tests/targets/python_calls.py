"""A Python program that leaks through ctypes' malloc, for the tests of Python frames:
`first N`, `second N` and `a_function_with_a_long_name N` leak N blocks of 3000 bytes each from
that function; `generated N` leaks one block of 3000 + i bytes from each of N functions made
and dropped one after another (a method of class gen_i, gen_i or generated_function_number_i)."""

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


def a_function_with_a_long_name(n):
    for _ in range(n):
        kept.append(libc.malloc(3000))  # LONG_LINE


def generated(n):
    # Each function's code object, name and file are freed before the next is made, which may
    # take their addresses before psleak reads them.
    for i in range(n):
        if i % 3 == 0:  # a method: its qualname, "gen_3.method", has no hash until asked
            name = f"gen_{i}"
            source = f"class {name}:\n    def method(self, malloc):\n        return malloc({3000 + i})\n"
        else:  # names short, or long and the same at their start
            name = f"gen_{i}" if i % 3 == 1 else f"generated_function_number_{i}"
            source = f"def {name}(malloc):\n    return malloc({3000 + i})\n"
        namespace = {}
        exec(compile(source, f"{name}.py", "exec"), namespace)
        made = namespace[name]
        leak = made().method if i % 3 == 0 else made
        kept.append(leak(libc.malloc))  # GENERATED_LINE
        del namespace, made, leak
        gc.collect()


print("ready", flush=True)
for command in sys.stdin:
    name, _, count = command.partition(" ")
    if name in ("first", "second", "a_function_with_a_long_name", "generated"):
        globals()[name](int(count))
    print("ok", flush=True)
