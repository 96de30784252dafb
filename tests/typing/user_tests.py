"""What a user's leak tests look like to a type checker: every line here must type-check under
mypy --strict and pyright (cargo xtask test's lints)."""

from __future__ import annotations

import psleak
from psleak import Checkers, LeakTest, MemoryLeakError, MemoryLeakTestCase

TOLERANCE = {"heap": 4096, "uss": 64 * 1024}
ONLY_FDS = Checkers.only("fds", "c_threads")


def fun(n: int = 1) -> list[int]:
    return [n]


class TestMine(MemoryLeakTestCase):
    tolerance = TOLERANCE
    checkers = Checkers.exclude("gcgarbage")
    times = 100

    @classmethod
    def auto_generate(cls) -> dict[str, LeakTest]:
        return {"fun": LeakTest(fun, 2, times=10, checkers="fds")}

    def test_fun(self) -> None:
        self.execute(fun, 3, tolerance=TOLERANCE, checkers=ONLY_FDS)
        self.execute(fun, tolerance=1024, checkers="memory", retries=3, warmup_times=1)
        self.execute(fun, checkers=["fds", "py_threads"], trim_callback=lambda: None)
        self.execute_w_exc(ZeroDivisionError, lambda: 1 / 0)


def test_with_the_fixture(psleak: MemoryLeakTestCase) -> None:
    psleak.execute(fun, checkers=("fds",))


def test_errors() -> None:
    try:
        TestMine().execute(fun)
    except MemoryLeakError as err:
        sites: list[dict[str, object]] = err.sites
        print(sites)
    except psleak.UnclosedFdError as err:
        count: int = err.count
        print(count, err.extras)
    version: str = psleak.__version__
    print(version)


def test_a_read_only_tolerance() -> None:
    import types

    TestMine().execute(fun, tolerance=types.MappingProxyType({"heap": 4096}), checkers="memory")
