"""Mistakes a type checker must refuse: mypy and pyright must report an error on each line marked
MISTAKE, and on no other (cargo xtask test's lints)."""

from psleak import Checkers, MemoryLeakTestCase

Checkers.only("fd")  # MISTAKE: not a checker's name
Checkers.exclude("memory", "heap")  # MISTAKE: not a checker's name
MemoryLeakTestCase().execute(print, times="10")  # MISTAKE: times is an int
MemoryLeakTestCase().execute(print, checkers="fd")  # MISTAKE: not a checker's name
MemoryLeakTestCase().execute(print, tolerance="4K")  # MISTAKE: bytes, or bytes per metric
