"""The leak test: ``MemoryLeakTestCase`` and its ``LeakTest`` entries. The counters judge (the
collector's exact ones when it runs, polling's otherwise); the tracer names what they found."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import itertools
import linecache
import logging
import os
import sys
import threading
import time
import unittest
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

from psleak import _backends, _native
from psleak._backends import BackendError
from psleak._checkers import Checkers, CheckersLike
from psleak._errors import (
    Error,
    MemoryLeakError,
    UnclosedFdError,
    UnclosedHandleError,
    UnclosedHeapCreateError,
    UnclosedNativeThreadError,
    UnclosedPythonThreadError,
)
from psleak._format import format_leak_sites, format_run_line, missed_events, qualname
from psleak._gc import GCDebugger
from psleak._resources import NativeThread, OpenFd, OpenHandle, PrivateHeap, named

if TYPE_CHECKING:
    from typing_extensions import TypeAlias

    # A number of bytes for every metric, or per metric (heap, mmap, uss, rss, vms): a plain
    # ``{"heap": 4096}`` a user keeps in a variable is a dict[str, int].
    Tolerance: TypeAlias = "int | Mapping[str, int]"

# Under pytest, a failure shows the user's test line and psleak's message: each psleak frame
# between them has a local __tracebackhide__, which pytest leaves out.

# An exact counter must grow in this many batches in a row to be a leak (psleak::model::verdict).
CONFIRM_BATCHES = 3

# Naming a leak the counters found: a traced call sets the pace (every allocation is a probe
# hit), then two traced batches of as many calls as NAMING_BUDGET seconds allow at that pace
# (two calls each at least: a leak may be of a block every other call), at most a quarter of
# the first judged batch (naming needs no more). A site that grew in both is named first (one
# that grew once may be a free list filling).
PACE_CALLS = 1
NAMING_BATCHES = 2
NAMING_SHARE = 4
NAMING_BUDGET = 0.25

POSIX = os.name == "posix"
WINDOWS = os.name == "nt"

# What execute() takes beside the function and its arguments (the pytest marker's arguments).
EXECUTE_OPTIONS = ("warmup_times", "times", "retries", "tolerance", "trim_callback", "checkers")

# Said below a failure the polling backend found: it counts, and cannot say where.
POLL_HINT = f"the tracer would name the site of each: it needs root, or {_backends.TRACER_HINT}"

# The counts the Windows checkers compare, and what each raises when it grew.
WINDOWS_COUNTS = {"num_handles": UnclosedHandleError, "heap_count": UnclosedHeapCreateError}


class Unchecked(unittest.SkipTest):
    """A check could not run: the test is skipped (pytest's report points at the test)."""


class LastRun(TypedDict):
    function: str
    backend: Literal["trace", "poll"]
    calls: int
    batches: int


# Every execute() of the test that runs, as its last_run, when the pytest plugin asks (it sets
# a list at each test's setup): which tests called it, and how many calls it made.
executions: list[LastRun] | None = None


def warm_caches() -> None:
    """Fill caches that fill slowly with random data, usually on the very first run.
    Taken from cPython's refleak.py."""
    s = bytes(range(256))
    for i in range(256):
        s[i : i + 1]
    [chr(i) for i in range(256)]
    list(range(-5, 257))


def assert_isinstance(name: str, obj: object, types: type | tuple[type, ...]) -> None:
    if not isinstance(obj, types):
        exp = " or ".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        msg = f"{name!r} must be instance of {exp} (got {obj!r})"
        raise TypeError(msg)


def _emit_warnings() -> None:
    """Warns once of what makes the counters less reliable in this process. Whether it did is
    ``psleak._warnings_emitted``, where psleak 0.1.6's tests set it."""
    package = sys.modules["psleak"]

    def warn(msg, suffix="memory leak detection may be less reliable"):
        if suffix:
            msg += "; " + suffix
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    if package._warnings_emitted:
        return
    if _native.memory()["heap"] == 0:
        warn("the allocator reports no heap in use (mallinfo2)")
    if os.environ.get("PYTHONUNBUFFERED") != "1":
        warn("PYTHONUNBUFFERED=1 environment variable was not set")
    if threading.active_count() > 1:
        warn(
            f"active Python threads exist before test; memory/thread counts may be unreliable: {threading.enumerate()}",
            suffix="",
        )
    package._warnings_emitted = True


_announced = False


def _announce(backend: _backends.PollBackend | _backends.Tracer, verbosity: int) -> None:
    """Says once which backend runs (not through _log: subclasses record what it logs)."""
    global _announced
    if verbosity >= 1 and not _announced:
        print(f"psleak backend: {backend.describe()}", file=sys.stderr)
        _announced = True


class LeakTest:
    """A function and its arguments, for ``MemoryLeakTestCase.auto_generate``."""

    __slots__ = ("args", "execute_kwargs", "fun")

    def __init__(self, fun: Callable[..., Any], *args: Any, **execute_kwargs: Any) -> None:
        assert_isinstance("fun", fun, collections.abc.Callable)
        self.fun = fun
        self.args = args
        self.execute_kwargs = dict(execute_kwargs)

    def _make_callable(self) -> Callable[[], Any]:
        if self.args:
            return functools.partial(self.fun, *self.args)
        return self.fun


class MemoryLeakTestCase(unittest.TestCase):
    """Test framework to detect memory and resource leaks in Python C extensions (see the
    ``psleak`` package)."""

    # Warm-up calls before starting measurement.
    warmup_times: ClassVar[int] = 10
    # Number of times to call the tested function in each iteration.
    times: ClassVar[int] = 200
    # Maximum retries if memory keeps growing.
    retries: ClassVar[int] = 10
    # Allowed memory growth (in bytes or per-metric) before it is considered a leak.
    tolerance: ClassVar[Tolerance] = 0
    # Optional callable to free caches before starting measurement.
    trim_callback: ClassVar[Callable[[], Any] | None] = None
    # Which checkers to run.
    checkers: ClassVar[CheckersLike] = Checkers()
    # 0 = no messages; 1 = print diagnostics when memory increases.
    verbosity: ClassVar[int] = 0
    # What the last execute() did: its backend, calls of fun, memory batches (benchmarks).
    last_run: LastRun
    # A tracer session and its measurement's fields, while batches are judged traced.
    _judging_tracer = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        warm_caches()

    @property
    def backend(self) -> Literal["trace", "poll"]:
        """The backend the checks run on: "trace" or "poll" (``PSLEAK_BACKEND``)."""
        return _backends.current().name

    @classmethod
    def auto_generate(cls) -> dict[str, LeakTest]:
        """Return a dict {name: LeakTest}. Override in subclasses."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        calls = cls.auto_generate()
        if not isinstance(calls, dict):
            msg = f"{cls.__name__}.auto_generate must return a dict"
            raise TypeError(msg)
        for name, entry in calls.items():
            if not isinstance(entry, LeakTest):
                msg = f"{cls.__name__}.auto_generate()[{name!r}] must be a LeakTest"
                raise TypeError(msg)
            test_name = f"test_leak_{name}"
            if test_name in cls.__dict__:
                msg = f"{cls.__name__} already defines {test_name}"
                raise RuntimeError(msg)

            def make_test(fun, execute_kwargs, test_name=test_name, name=name):
                def test(self):
                    __tracebackhide__ = True
                    self.execute(fun, **execute_kwargs)

                test.__name__ = test_name
                test.__qualname__ = test_name
                test.__doc__ = f"Auto-generated leak test for {name}"
                return test

            setattr(cls, test_name, make_test(entry._make_callable(), dict(entry.execute_kwargs)))

    def _log(self, msg, level):
        if level <= self.verbosity:
            print(f"\x1b[33m{msg}\x1b[0m" if sys.stdout.isatty() else msg)
            sys.stdout.flush()

    def _trim_mem(self):
        """Release unused memory, so that what stays is what is held."""
        if self._trim_callback is not None:
            self._trim_callback()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        for handler in logging.root.handlers:
            handler.flush()
        sys.path_importer_cache.clear()
        linecache.cache.clear()
        gc.collect()
        if gc.garbage:
            msg = f"GC garbage is not empty: {gc.garbage}"
            raise AssertionError(msg)
        if hasattr(sys, "_clear_internal_caches"):  # python 3.13
            sys._clear_internal_caches()
        elif hasattr(sys, "_clear_type_cache"):
            sys._clear_type_cache()
        _native.heap_trim()

    def _warmup(self, fun, warmup_times):
        for _ in range(warmup_times):
            self.call(fun)

    # --- getters

    def _get_fds(self):
        return {fd: (path, kind) for fd, path, kind in _native.open_fds()}

    def _get_threads(self):
        return dict(_native.threads())

    def _get_counters(self, checkers):
        # order matters: the first checker that finds something raises
        d = {}
        if checkers.py_threads:
            d["py_threads"] = (threading.active_count(), threading.enumerate())
        if POSIX and checkers.fds:
            fds = self._get_fds()
            d["num_fds"] = (len(fds), fds)
        if WINDOWS and checkers.handles:
            d["num_handles"] = (_native.handle_count(), [])
        if checkers.c_threads:
            threads = self._get_threads()
            d["c_threads"] = (len(threads), threads)
        if WINDOWS and checkers.memory:
            d["heap_count"] = (_native.heap_count(), [])
        return d

    def _get_mem(self):
        return _native.memory()

    # --- checkers

    def _check_counters(self, fun, checkers):
        __tracebackhide__ = True
        before = self._get_counters(checkers)
        self.call(fun)
        after = self._get_counters(checkers)
        # Counters judge, untraced; the tracer only names what one call more leaves.
        created = self._traced_replay(fun) if self._changed(before, after) else None

        for what, (count_before, extras_before) in before.items():
            count_after, extras_after = after[what]
            diff = count_after - count_before
            if what == "num_fds":
                leaked = self._new_fds(extras_before, extras_after, created)
                error = UnclosedFdError
            elif what == "c_threads":
                leaked = self._new_threads(extras_before, extras_after, created)
                error = UnclosedNativeThreadError
            elif what in WINDOWS_COUNTS:
                leaked, error = self._new_windows_resources(what, created), WINDOWS_COUNTS[what]
            else:
                leaked = self._new_py_threads(extras_before, extras_after)
                error = UnclosedPythonThreadError
            if diff < 0 and not leaked:
                self._log(f"WARNING: {what!r} decreased by {abs(diff)} after calling {qualname(fun)!r} once", 0)
            elif leaked or diff > 0:
                raise error(max(len(leaked), diff), qualname(fun), extras=leaked)

    def _traced_replay(self, fun):
        """What one more call of fun leaves, as the tracer names it ("created"), or None where
        no tracer can run (what went wrong is warned: the counters' error stands anyway)."""
        backend = _backends.current()
        if not backend.exact:
            return None
        try:
            # Fds and threads are the question: no allocator needs probing.
            with backend.session(allocators="none") as tracer:
                marked = tracer.request("mark")
                self.call(fun)
                created = tracer.request("created", since=marked["mark"])
        except BackendError as err:
            warnings.warn(
                f"psleak: the tracer could not name what {qualname(fun)!r} left: {err}", RuntimeWarning, stacklevel=2
            )
            return None
        missed = missed_events(marked.get("lost", {}), created.get("lost", {}), fun)
        if missed:
            warnings.warn(f"psleak: {missed}", RuntimeWarning, stacklevel=2)
        return created

    # These helpers keep comprehensions out of _check_counters: a comprehension that reads a
    # local turns it into a cell, and the cell would show up as the call's GC garbage.
    @staticmethod
    def _changed(before, after):
        """Whether a count moved, or an fd, thread or handle was replaced by another (Python
        threads are named by threading itself)."""
        return any(
            after[what][0] != count or (what != "py_threads" and after[what][1] != extras)
            for what, (count, extras) in before.items()
        )

    @staticmethod
    def _new_py_threads(before, after):
        return [t for t in after if t not in before]

    @staticmethod
    def _new_fds(before, after, created):
        if created is not None and created["fds"]:
            return [OpenFd(f["fd"], f["target"] or "?", f["kind"], *named(f)) for f in created["fds"]]
        # Never blame an fd that was open before, even if its number was reused.
        return [OpenFd(fd, path, kind) for fd, (path, kind) in after.items() if before.get(fd) != (path, kind)]

    @staticmethod
    def _new_threads(before, after, created):
        if created is not None and created["threads"]:
            return [NativeThread(t["tid"], t["name"] or "?", *named(t)) for t in created["threads"]]
        return [NativeThread(tid, name) for tid, name in after.items() if tid not in before]

    @staticmethod
    def _new_windows_resources(what, created):
        # Polling counts them only; the ETW tracer names each, with its site.
        if created is None:
            return []
        if what == "num_handles":
            return [OpenHandle(h["handle"], h["kind"], *named(h)) for h in created.get("handles", ())]
        return [PrivateHeap(h["heap"], *named(h)) for h in created.get("heaps", ())]

    def _call_ntimes(self, fun, times):
        """Memory samples before and after calling fun repeatedly, as a dict of diffs. The
        counters only psleak reads (CPython's blocks, the mappings outside the allocator), read
        with them, are kept in ``_exact``: the judge trusts the readings as exact only when they
        are psleak's own (a subclass may return others), and only when no other thread ran
        during the batch (``_alone``)."""
        diffs, self._exact, self._alone = self._measure_batch(fun, times, self._judging_tracer)
        return diffs

    def _measure_batch(self, fun, times, tracer=None):
        """(growth of each memory metric, growth of the counters only psleak reads, whether no
        other thread ran) over a batch of calls; with ``tracer`` (a session and its batch's
        fields), its reply to the batch in ``_traced``."""
        self._trim_mem()
        if tracer is not None:
            session, fields = tracer
            # Made before the batch: after the last trim, the batch may create nothing of ours
            # (an object the trim did not free would be counted, and reused by later replies).
            end_batch = session.encode("batch", calls=times, **fields)
            session.request("window", measurement=fields["measurement"])
        # The reading is kept natively and the loop binds no new int: nothing of ours made
        # after the mark may outlive the batch, or it would count as growth.
        _native.mark_memory()
        for _ in itertools.repeat(None, times):
            self.call(fun)
        self._trim_mem()
        if tracer is None:
            return _native.memory_since_mark()
        # The window closes first: the readings' own objects (a dict, its keys, which free
        # lists keep) must not count as the batch's. The counters are not what judges a
        # traced batch.
        self._traced = session.send(end_batch)
        return _native.memory_since_mark()

    def _check_mem(self, fun, times, retries, tolerance):
        __tracebackhide__ = True
        # Any mapping of metric to bytes (the types say Mapping), else one number for all.
        tolerances = dict(tolerance) if isinstance(tolerance, Mapping) else dict.fromkeys(self._get_mem(), tolerance)
        with contextlib.ExitStack() as sessions:
            self._sessions = sessions
            try:
                self._judge_batches(fun, times, retries, tolerances)
            finally:
                self._judging_tracer = None

    def _judge_by_sites(self, tolerances, retries):
        """From now on, batches run traced and their sites judge. Another thread ran during a
        batch: its allocations and frees are in every process-wide counter (one that frees as
        fast as the calls leak hides the leak), never in the calls' own sites."""
        session = self._sessions.enter_context(_backends.current().session())
        self._judging_tracer = (session, self._begin_measurement(session, tolerances, min(CONFIRM_BATCHES, retries)))

    @staticmethod
    def _begin_measurement(session, tolerances, confirm):
        """Begins a measurement in a tracer session: the fields of its batch requests (the
        session's end ends it)."""
        return {
            "measurement": session.request("begin")["measurement"],
            "tolerance": {"heap": tolerances.get("heap", 0), "mmap": tolerances.get("mmap", 0)},
            "confirm": confirm,
        }

    def _judge_batches(self, fun, times, retries, tolerances):
        __tracebackhide__ = True
        self.last_run["calls"] = self.last_run.get("calls", 0) + self._warmup_calls
        judge = _native.Judge(tolerances, retries, min(CONFIRM_BATCHES, retries))
        can_trace = _backends.current().exact
        messages = []
        first_times = times
        remeasured = False
        calls = idx = 0
        while idx < retries:
            self._exact = self._traced = None
            self._alone = True
            diffs = self._call_ntimes(fun, times)
            self.last_run.update(calls=self.last_run["calls"] + times)
            exact = self._exact is not None
            traced = self._traced
            if exact and not self._alone and traced is None and can_trace:
                self._log(f"another thread ran during the batch: the tracer judges {qualname(fun)!r} now", 1)
                self._judge_by_sites(tolerances, retries)
                continue
            idx += 1
            calls += times
            self.last_run["batches"] = idx
            if traced is not None:
                missed = missed_events({}, traced.get("lost_in_batch", {}), fun)
                if missed:
                    raise Error(missed.replace("the sites it names may be incomplete", "its verdict cannot be trusted"))
            exact = exact and self._alone
            growth = dict(diffs, **self._exact) if exact else diffs
            verdict, grown, _ = judge.batch(times, growth, exact, traced and traced["verdict"])
            leaks = {k: v for k, v in diffs.items() if v > 0}
            blocks = self._exact["py_blocks"] if exact else 0
            if leaks or blocks > 0:
                line = format_run_line(idx, leaks, times, blocks)
                messages.append(line)
                self._log(line, 1)
            if verdict == "leak":
                sites, text = [], ""
                if traced is not None and traced["sites"]:
                    sites, text = traced["sites"], format_leak_sites(traced["sites"], calls)
                elif exact:
                    sites, text = self._name_leak(fun, max(2, first_times // NAMING_SHARE), tolerances, grown)
                    if not remeasured and idx < retries and self._nothing_kept_growing(sites):
                        # What the replays saw grow once, or not at all, may be caches that
                        # filled once (3.10 makes a code object's opcache at its 1024th
                        # call): the counters judge again, afresh, on the batches to come.
                        self._log(f"no site of {qualname(fun)!r} kept growing: measuring again", 1)
                        remeasured = True
                        judge = _native.Judge(tolerances, retries - idx, min(CONFIRM_BATCHES, retries - idx))
                        times = int(times * 1.5)
                        continue
                msg = f"memory kept increasing after {idx} runs of {qualname(fun)!r}"
                # The first line is what pytest's summary shows: it names the top site.
                if sites:
                    msg += f"; top site: {sites[0]['text']}"
                raise MemoryLeakError(msg + "\n".join(messages) + text, sites=sites)
            if verdict == "clean":
                if idx > 1 and leaks:
                    self._log("Memory stabilized (growth per call faded)", 1)
                return
            times = int(times * 1.5)

    @staticmethod
    def _nothing_kept_growing(sites):
        """Whether no site a naming replay found grew in each of its batches. Growth out of the
        probes' sight (an inlined allocator) looks the same: measured again, it grows again,
        and the counters' verdict stands."""
        return all(site["streak"] < NAMING_BATCHES for site in sites)

    def _name_leak(self, fun, most_calls, tolerances, grown):
        """The sites that a short traced replay of fun finds growing, and the text for the
        error."""
        backend = _backends.current()
        if not backend.exact:
            return [], ""
        # Only CPython's blocks grew: libc's malloc family need not be probed.
        allocators = "python" if grown and set(grown) <= {"py_blocks"} else "all"
        try:
            with backend.session(allocators) as session:
                fields = self._begin_measurement(session, tolerances, NAMING_BATCHES)
                lost_before = session.request("mark").get("lost", {})
                started = time.perf_counter()
                for _ in range(PACE_CALLS):
                    self.call(fun)
                pace = (time.perf_counter() - started) / PACE_CALLS
                calls = max(2, min(most_calls, int(NAMING_BUDGET / NAMING_BATCHES / max(pace, 1e-6))))
                for _ in range(NAMING_BATCHES):
                    self._measure_batch(fun, calls, (session, fields))
                batch = self._traced
        except BackendError as err:
            return [], f"\n\nThe tracer could not name the leak: {err}"
        missed = missed_events(lost_before, batch.get("lost", {}), fun)
        # Sites that grew in every batch; else in the last (a free list may have served the
        # first batch's calls without an allocation).
        sites = batch["sites"]
        named = [site for site in sites if site["streak"] >= NAMING_BATCHES] or sites
        text = format_leak_sites(named, calls * NAMING_BATCHES) if named else "\n\n" + _native.unnamed(grown or ["uss"])
        return named, text + (f"\n({missed})" if missed else "")

    def _validate_opts(self, warmup_times, times, retries, tolerance, trim_callback):
        assert_isinstance("warmup_times", warmup_times, int)
        assert_isinstance("times", times, int)
        assert_isinstance("retries", retries, int)
        assert_isinstance("tolerance", tolerance, (int, Mapping))
        if trim_callback is not None:
            assert_isinstance("trim_callback", trim_callback, collections.abc.Callable)
        if warmup_times < 0:
            msg = f"warmup_times must be >= 0 (got {warmup_times})"
            raise ValueError(msg)
        if times < 2:
            # int(1 * 1.5) == 1: with times=1 the escalation would be a no-op
            msg = f"times must be >= 2 (got {times})"
            raise ValueError(msg)
        if retries < 1:
            msg = f"retries must be >= 1 (got {retries})"
            raise ValueError(msg)
        if isinstance(tolerance, int):
            if tolerance < 0:
                msg = f"tolerance must be >= 0 (got {tolerance!r})"
                raise ValueError(msg)
        else:
            mem_keys = self._get_mem().keys()
            for k, v in tolerance.items():
                if k not in mem_keys:
                    msg = f"invalid tolerance key {k!r}"
                    raise ValueError(msg)
                if v < 0:
                    msg = f"{k!r} tolerance must be >= 0 (got {v})"
                    raise ValueError(msg)

    # ---

    def call(self, fun: Callable[[], Any]) -> Any:
        __tracebackhide__ = True
        return fun()

    def execute(
        self,
        fun: Callable[..., Any],
        *args: Any,
        warmup_times: int | None = None,
        times: int | None = None,
        retries: int | None = None,
        tolerance: Tolerance | None = None,
        trim_callback: Callable[[], Any] | None = None,
        checkers: CheckersLike | None = None,
    ) -> None:
        """Run a full leak test on a callable. The optional arguments override the class
        attributes with the same name. ``checkers``: a Checkers, or the names of the only
        checkers to run (``"fds"``, ``["fds", "c_threads"]``)."""
        __tracebackhide__ = True
        warmup_times = warmup_times if warmup_times is not None else self.warmup_times
        times = times if times is not None else self.times
        retries = retries if retries is not None else self.retries
        tolerance = tolerance if tolerance is not None else self.tolerance
        checkers = Checkers._of(checkers if checkers is not None else self.checkers)
        trim_callback = trim_callback if trim_callback is not None else self.trim_callback
        self._validate_opts(warmup_times, times, retries, tolerance, trim_callback)

        backend = _backends.current()
        _announce(backend, self.verbosity)
        # What cannot be checked here is skipped after the rest was (or fails the test, when
        # the run requires every check).
        unchecked = None
        if checkers.memory and not backend.exact and os.environ.get("PYTHONMALLOC", "") != "malloc":
            unchecked = "PYTHONMALLOC=malloc was not set (needed by the polling backend)"
            checkers = dataclasses.replace(checkers, memory=False)

        _emit_warnings()
        if args:
            fun = functools.partial(fun, *args)
        self._trim_callback = trim_callback

        self.last_run = {"function": qualname(fun), "backend": backend.name, "calls": 2, "batches": 0}
        if executions is not None:
            executions.append(self.last_run)
        self._warmup_calls = warmup_times
        try:
            # First-call effects (lazy imports, caches, module-level cycles) are not leaks.
            self.call(fun)
            if checkers.gcgarbage:
                with GCDebugger() as gcdbg:
                    self._check_counters(fun, checkers)
                gcdbg.check(fun)
            else:
                self._check_counters(fun, checkers)

            if checkers.memory:
                self._warmup(fun, warmup_times)
                self._check_mem(fun, times=times, retries=retries, tolerance=tolerance)
        except Error as err:
            # A note, not the message: psleak 0.1.6's users match the message (Python 3.11+
            # shows notes; pytest's summary says it on every version).
            if not backend.exact and hasattr(err, "add_note"):
                err.add_note(f"(found by polling, which cannot say where; {POLL_HINT})")
            raise
        if unchecked is not None:
            self._could_not_check("memory", fun, unchecked)

    @staticmethod
    def _could_not_check(what, fun, why):
        """A check that could not run: the test is skipped, saying so, or fails when the run
        requires every check (``--psleak-require``, ``PSLEAK_REQUIRE``)."""
        __tracebackhide__ = True
        required = _backends.requirement()
        if required is not None:
            msg = f"the {what} check of {qualname(fun)!r} could not run: {why}; {required[1]} makes that a failure"
            raise Error(msg)
        msg = f"{what} not checked: {why}; the other checks of {qualname(fun)!r} passed"
        raise Unchecked(msg)

    def execute_w_exc(self, exc: type[BaseException], fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``execute()`` expecting fun() to raise exc on every call. If it does not, the
        test fails."""

        def call():
            try:
                self.call(fun)
            except exc:
                pass
            else:
                return self.fail(f"{qualname(fun)!r} did not raise {exc}")

        if args:
            fun = functools.partial(fun, *args)
        self.execute(call, **kwargs)
