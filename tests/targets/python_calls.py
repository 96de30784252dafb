"""A Python program that leaks through ctypes' malloc from two functions, for the tests of
Python frames: `first N` / `second N` leak N blocks of 3000 bytes each from one or the other."""

import ctypes
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


print("ready", flush=True)
for command in sys.stdin:
    name, _, count = command.partition(" ")
    if name in ("first", "second"):
        globals()[name](int(count))
    print("ok", flush=True)
