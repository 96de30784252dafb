"""Test framework to detect memory and resource leaks in Python C extensions.

A drop-in for psleak 0.1.6's API. When this process may load eBPF probes, the counters come
from an exact tracer (a private collector process) that names the function that created each
leaked block, fd or thread; otherwise from polling procfs and the allocator, as psleak does.
``PSLEAK_BACKEND=auto|trace|poll`` chooses.
"""

import collections
import contextlib
import functools
import gc
import itertools
import linecache
import logging
import os
import sys
import threading
import time
import types
import unittest
import warnings
from dataclasses import dataclass

from psleak import _backends, _native
from psleak._backends import BackendError

__all__ = [
    "BackendError",
    "Checkers",
    "Error",
    "GCDebugger",
    "LeakTest",
    "MemoryLeakError",
    "MemoryLeakTestCase",
    "NativeThread",
    "OpenFd",
    "OpenHandle",
    "PrivateHeap",
    "UnclosedFdError",
    "UnclosedHandleError",
    "UnclosedHeapCreateError",
    "UnclosedNativeThreadError",
    "UnclosedPythonThreadError",
    "UnclosedResourceError",
    "UncollectableGarbageError",
]

# An exact counter must grow in this many batches in a row to be a leak (psleak::verdict).
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


# --- exceptions


class Error(AssertionError):
    """Base class for all psleak exceptions."""


class UnclosedResourceError(Error):
    """Base class for errors raised when some resource created during a
    function call is left unclosed or unfreed afterward.
    """

    resource_name = "resource"
    verb = "unclosed"

    def __init__(self, count, fun_name, extras=None):
        self.count = count
        self.fun_name = fun_name
        self.extras = extras
        name = self.resource_name
        name += "s" if count > 1 else ""  # pluralize
        msg = f"detected {count} {self.verb} {name} after calling {fun_name!r} 1 time"
        if extras:
            msg += ":" + "".join(f"\n* {extra!r}" for extra in extras)
        super().__init__(msg)


class UnclosedFdError(UnclosedResourceError):
    """An fd opened by one call is still open after it (forgotten close()). UNIX only."""

    resource_name = "file descriptor"


class UnclosedHandleError(UnclosedResourceError):
    """A handle opened by one call is still open after it (forgotten CloseHandle()). Windows only."""

    resource_name = "handle"


class UnclosedHeapCreateError(UnclosedResourceError):
    """HeapCreate() without HeapDestroy() in one call. Windows only."""

    resource_name = "HeapCreate() call"


class UnclosedNativeThreadError(UnclosedResourceError):
    """A native thread started by one call still runs after it (pthread_create() without
    pthread_join())."""

    resource_name = "native C thread"


class UnclosedPythonThreadError(UnclosedResourceError):
    """A ``threading.Thread`` started by one call still runs after it."""

    resource_name = "Python thread"


# The counts the Windows checkers compare, and what each raises when it grew.
WINDOWS_COUNTS = {"num_handles": UnclosedHandleError, "heap_count": UnclosedHeapCreateError}


class UncollectableGarbageError(UnclosedResourceError):
    """One call left objects that only the cycle collector can free (reference cycles)."""

    resource_name = "GC object"
    verb = "uncollectable"


class MemoryLeakError(Error):
    """Memory kept growing with the number of calls: ``malloc()`` without ``free()``,
    ``mmap()`` without ``munmap()``, a forgotten ``Py_DECREF``..."""


# --- what the errors list


@dataclass(frozen=True)
class OpenFd:
    """An fd left open by a call: its number, what it refers to (a path, ``socket:[inode]``),
    its kind (``file``, ``pipe``, ``AF_INET SOCK_STREAM``...) and, with the tracer, the
    function that opened it and its stack."""

    fd: int
    path: str
    kind: str
    site: str = ""
    stack: tuple = ()

    def __repr__(self):
        s = f"fd {self.fd}: {self.kind} {self.path}"
        return s + (f", opened by {self.site}" if self.site else "")


@dataclass(frozen=True)
class NativeThread:
    """A native thread left running by a call; with the tracer, the function that started it."""

    tid: int
    name: str
    site: str = ""
    stack: tuple = ()

    def __repr__(self):
        s = f"thread {self.tid} ({self.name})"
        return s + (f", started by {self.site}" if self.site else "")


@dataclass(frozen=True)
class OpenHandle:
    """A Windows handle left open by a call: its value, its object type and name as ETW gave
    them, and the function that opened it and its stack (the ETW tracer only)."""

    handle: int
    kind: str
    site: str = ""
    stack: tuple = ()

    def __repr__(self):
        s = f"handle {self.handle:#x}: {self.kind}"
        return s + (f", opened by {self.site}" if self.site else "")


@dataclass(frozen=True)
class PrivateHeap:
    """A Windows heap a call created and did not destroy; the function that created it and its
    stack (the ETW tracer only)."""

    heap: int
    site: str = ""
    stack: tuple = ()

    def __repr__(self):
        s = f"heap {self.heap:#x}"
        return s + (f", created by {self.site}" if self.site else "")


# --- utils


human_bytes = _native.human_bytes


def format_run_line(idx, diffs, times, blocks=0):
    parts = [f"{k}={'+' + human_bytes(v):<6}" for k, v in diffs.items() if v > 0]
    if blocks > 0:
        parts.append(f"blocks=+{blocks}")
    metrics = " | ".join(parts)
    avg = "0B"
    grown = [k for k, v in diffs.items() if v > 0]
    if grown:
        avg = human_bytes(diffs[grown[0]] // times)
    s = f"Run #{idx:>2}: {metrics:<50} (calls={times:>4}, avg/call=+{avg})"
    if idx == 1:
        s = "\n" + s
    return s


def format_site(site):
    """``leak_list (test_ext.c:42)``: a frame as the collector sends it."""
    if not site:
        return "?"
    fun, file, line = site.get("function"), site.get("file"), site.get("line")
    module = os.path.basename(site.get("module") or "") or "?"
    if fun and file:
        return f"{fun} ({os.path.basename(file)}:{line})" if line else f"{fun} ({os.path.basename(file)})"
    if fun:
        return f"{fun} in {module}"
    return f"{site['addr']} in {module}"


def format_leak_sites(sites, calls):
    lines = ["", f"Leak sites (a traced replay of {calls} calls: created by them, still live, and growing):"]
    for s in sites:
        memory = s["memory"]
        kind = memory.get("domain", memory["kind"]) if isinstance(memory, dict) else memory
        per_call = s["bytes"] / calls if calls else 0
        lines.append(
            f"* {format_site(s['site'])}: {s['count']} blocks, {human_bytes(s['bytes'])} live ({kind}),"
            f" +{human_bytes(max(s['bytes_growth'], 0))} in the last batch, grown {s['streak']} batches in a row,"
            f" ~{per_call:.1f}B per call"
        )
        lines.extend(f"    {format_site(frame)}" for frame in s["stack"][:12])
    return "\n".join(lines)


# What the tracer could not follow, by kind (the replies' "lost"): any of it leaves the ledger
# short of events, and a verdict from it cannot be trusted ("no_stack" only costs a site's name).
_INCOMPLETE_LEDGER = {
    "ring_full": "events dropped in a full ring",
    "untracked_calls": "allocator calls whose result was missed",
    "ledger_full": "blocks past the collector's limit",
    "corrupt": "corrupt records",
}


def _missed_events(before, after, fun):
    """What the tracer lost between two of its "lost" counts, said in a sentence, or ""."""
    missed = [
        f"{after.get(kind, 0) - before.get(kind, 0)} {what}"
        for kind, what in _INCOMPLETE_LEDGER.items()
        if after.get(kind, 0) > before.get(kind, 0)
    ]
    if not missed:
        return ""
    return (
        f"the tracer missed events while calling {qualname(fun)!r} ({', '.join(missed)}): the sites it "
        "names may be incomplete; run the test alone to name them all"
    )


def qualname(obj):
    """A human-readable qualified name for a function, method or class."""
    return getattr(obj, "__qualname__", getattr(obj, "__name__", str(obj)))


def warm_caches():
    """Fill caches that fill slowly with random data, usually on the very first run.
    Taken from cPython's refleak.py."""
    s = bytes(range(256))
    for i in range(256):
        s[i : i + 1]
    [chr(i) for i in range(256)]
    list(range(-5, 257))


def assert_isinstance(name, obj, types):
    if not isinstance(obj, types):
        exp = " or ".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        msg = f"{name!r} must be instance of {exp} (got {obj!r})"
        raise TypeError(msg)


# --- GC debugger


class GCDebugger:
    """Detects objects that reference counting cannot free (reference cycles), with
    gc.DEBUG_SAVEALL: what the cycle collector finds is kept in gc.garbage."""

    # Temporarily part of a cycle, gone once the cycle is broken.
    TRANSIENT_TYPES = (
        types.FrameType,
        types.TracebackType,
        type(threading.current_thread()),
        BaseException,
    )

    # Values that hold no references to other tracked objects: never part of a cycle.
    SCALAR_TYPES = (int, float, bool, str, bytes, bytearray, complex, type(None))

    def __enter__(self):
        self._old_debug = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        self.before = list(gc.garbage)
        self.after = []
        gc.garbage.clear()
        return self

    def __exit__(self, *a, **k):
        gc.collect()
        self.after = list(gc.garbage)
        gc.garbage.clear()
        gc.set_debug(self._old_debug)

    def is_transient(self, obj, _seen=None):
        if _seen is None:
            _seen = set()
        oid = id(obj)
        if oid in _seen:
            return True
        _seen.add(oid)
        if isinstance(obj, (self.TRANSIENT_TYPES, self.SCALAR_TYPES)):
            return True
        if isinstance(obj, (list, tuple, set, frozenset)):
            return all(self.is_transient(o, _seen) for o in obj)
        if isinstance(obj, dict):
            return all(self.is_transient(k, _seen) and self.is_transient(v, _seen) for k, v in obj.items())
        return False

    def leaked_objects(self):
        return [obj for obj in self.after if obj not in self.before and not self.is_transient(obj)]

    def check(self, fun):
        leaked = self.leaked_objects()
        if leaked:
            raise UncollectableGarbageError(len(leaked), qualname(fun), extras=leaked)


# --- checkers config


@dataclass(frozen=True)
class Checkers:
    """Which leak checkers are enabled."""

    # C stuff
    memory: bool = True
    fds: bool = True
    handles: bool = True
    c_threads: bool = True
    # Python stuff
    py_threads: bool = True
    gcgarbage: bool = True

    @classmethod
    def _validate(cls, check_names):
        all_fields = set(cls.__annotations__.keys())
        invalid = set(check_names) - all_fields
        if invalid:
            msg = f"invalid checker names: {', '.join(sorted(invalid))}"
            raise ValueError(msg)
        return all_fields

    @classmethod
    def only(cls, *checks):
        """A config with only the named checkers enabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f in checks for f in all_fields})

    @classmethod
    def exclude(cls, *checks):
        """A config with the named checkers disabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f not in checks for f in all_fields})


# ---

_warnings_emitted = False


def _emit_warnings():
    global _warnings_emitted

    def warn(msg, suffix="memory leak detection may be less reliable"):
        if suffix:
            msg += "; " + suffix
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    if _warnings_emitted:
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
    _warnings_emitted = True


_announced = False


def _announce(backend, verbosity):
    """Says once which backend runs (not through _log: subclasses record what it logs)."""
    global _announced
    if verbosity >= 1 and not _announced:
        print(f"psleak backend: {backend.describe()}", file=sys.stderr)
        _announced = True


class LeakTest:
    """A function and its arguments, for ``MemoryLeakTestCase.auto_generate``."""

    __slots__ = ("args", "execute_kwargs", "fun")

    def __init__(self, fun, *args, **execute_kwargs):
        assert_isinstance("fun", fun, collections.abc.Callable)
        self.fun = fun
        self.args = args
        self.execute_kwargs = dict(execute_kwargs)

    def _make_callable(self):
        if self.args:
            return functools.partial(self.fun, *self.args)
        return self.fun


class MemoryLeakTestCase(unittest.TestCase):
    # Warm-up calls before starting measurement.
    warmup_times = 10
    # Number of times to call the tested function in each iteration.
    times = 200
    # Maximum retries if memory keeps growing.
    retries = 10
    # Allowed memory growth (in bytes or per-metric) before it is considered a leak.
    tolerance = 0
    # Optional callable to free caches before starting measurement.
    trim_callback = None
    # Which checkers to run.
    checkers = Checkers()
    # 0 = no messages; 1 = print diagnostics when memory increases.
    verbosity = 0
    # A tracer session and its measurement's fields, while batches are judged traced.
    _judging_tracer = None

    __doc__ = __doc__

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        warm_caches()

    @property
    def backend(self):
        """The backend the checks run on: "trace" or "poll" (``PSLEAK_BACKEND``)."""
        return _backends.current().name

    @classmethod
    def auto_generate(cls):
        """Return a dict {name: LeakTest}. Override in subclasses."""
        return {}

    def __init_subclass__(cls, **kwargs):
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
        missed = _missed_events(marked.get("lost", {}), created.get("lost", {}), fun)
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
            return [
                OpenFd(
                    f["fd"], f["target"] or "?", f["kind"], format_site(f["site"]), tuple(map(format_site, f["stack"]))
                )
                for f in created["fds"]
            ]
        # Never blame an fd that was open before, even if its number was reused.
        return [OpenFd(fd, path, kind) for fd, (path, kind) in after.items() if before.get(fd) != (path, kind)]

    @staticmethod
    def _new_threads(before, after, created):
        if created is not None and created["threads"]:
            return [
                NativeThread(t["tid"], t["name"] or "?", format_site(t["site"]), tuple(map(format_site, t["stack"])))
                for t in created["threads"]
            ]
        return [NativeThread(tid, name) for tid, name in after.items() if tid not in before]

    @staticmethod
    def _new_windows_resources(what, created):
        # Polling counts them only; the ETW tracer names each, with its site.
        if created is None:
            return []
        if what == "num_handles":
            return [
                OpenHandle(h["handle"], h["kind"], format_site(h["site"]), tuple(map(format_site, h["stack"])))
                for h in created.get("handles", ())
            ]
        return [
            PrivateHeap(h["heap"], format_site(h["site"]), tuple(map(format_site, h["stack"])))
            for h in created.get("heaps", ())
        ]

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
        tolerances = tolerance if isinstance(tolerance, dict) else dict.fromkeys(self._get_mem(), tolerance)
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
        self.last_run["calls"] = self.last_run.get("calls", 0) + self._warmup_calls
        judge = _native.Judge(tolerances, retries, min(CONFIRM_BATCHES, retries))
        can_trace = _backends.current().exact
        messages = []
        first_times = times
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
                missed = _missed_events({}, traced.get("lost_in_batch", {}), fun)
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
                msg = f"memory kept increasing after {idx} runs" + "\n".join(messages)
                if traced is not None and traced["sites"]:
                    msg += format_leak_sites(traced["sites"], calls)
                elif exact:
                    msg += self._name_leak(fun, max(2, first_times // NAMING_SHARE), tolerances, grown)
                raise MemoryLeakError(msg)
            if verdict == "clean":
                if idx > 1 and leaks:
                    self._log("Memory stabilized (growth per call faded)", 1)
                return
            times = int(times * 1.5)

    def _name_leak(self, fun, most_calls, tolerances, grown):
        """The sites that a short traced replay of fun finds growing, as text for the error."""
        backend = _backends.current()
        if not backend.exact:
            return ""
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
            return f"\n\nThe tracer could not name the leak: {err}"
        missed = _missed_events(lost_before, batch.get("lost", {}), fun)
        # Sites that grew in every batch; else in the last (a free list may have served the
        # first batch's calls without an allocation).
        sites = batch["sites"]
        named = [site for site in sites if site["streak"] >= NAMING_BATCHES] or sites
        text = format_leak_sites(named, calls * NAMING_BATCHES) if named else "\n\n" + _native.unnamed(grown or ["uss"])
        return text + (f"\n({missed})" if missed else "")

    def _validate_opts(self, warmup_times, times, retries, tolerance, trim_callback):
        assert_isinstance("warmup_times", warmup_times, int)
        assert_isinstance("times", times, int)
        assert_isinstance("retries", retries, int)
        assert_isinstance("tolerance", tolerance, (int, dict))
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

    def call(self, fun):
        return fun()

    def execute(
        self,
        fun,
        *args,
        warmup_times=None,
        times=None,
        retries=None,
        tolerance=None,
        trim_callback=None,
        checkers=None,
    ):
        """Run a full leak test on a callable. The optional arguments override the class
        attributes with the same name."""
        warmup_times = warmup_times if warmup_times is not None else self.warmup_times
        times = times if times is not None else self.times
        retries = retries if retries is not None else self.retries
        tolerance = tolerance if tolerance is not None else self.tolerance
        checkers = checkers if checkers is not None else self.checkers
        trim_callback = trim_callback if trim_callback is not None else self.trim_callback
        self._validate_opts(warmup_times, times, retries, tolerance, trim_callback)

        backend = _backends.current()
        _announce(backend, self.verbosity)
        if checkers.memory and not backend.exact and os.environ.get("PYTHONMALLOC", "") != "malloc":
            msg = "PYTHONMALLOC=malloc was not set (needed by the polling backend)"
            raise unittest.SkipTest(msg)

        _emit_warnings()
        if args:
            fun = functools.partial(fun, *args)
        self._trim_callback = trim_callback

        # What the last execute() did: its backend, calls of fun, memory batches (benchmarks).
        self.last_run = {"backend": backend.name, "calls": 2, "batches": 0}
        self._warmup_calls = warmup_times
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

    def execute_w_exc(self, exc, fun, *args, **kwargs):
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
