"""A Python program that leaks through the stripped C++ extension (tests/python/ext/stripped_ext.cpp),
for the tests of whole native stacks: `blocks N`, `fds N` and `threads N` leak N of each. The
extension is imported from the directory given as the first argument."""

import sys

sys.path.insert(0, sys.argv[1])
import stripped_ext


def blocks(n):
    stripped_ext.leak_blocks(n)  # BLOCKS_LINE


def fds(n):
    stripped_ext.leak_fds(n)  # FDS_LINE


def threads(n):
    stripped_ext.leak_threads(n)  # THREADS_LINE


print("ready", flush=True)
for command in sys.stdin:
    name, _, count = command.partition(" ")
    if name in ("blocks", "fds", "threads"):
        globals()[name](int(count))
    print("ok", flush=True)
