"""The Windows checkers, handles and HeapCreate. Windows cannot run here: these tests stand in
for it with a mock of what only Windows has (the platform flags and the two native counters,
``handle_count`` and ``heap_count``), and check that the package turns their growth into
psleak's errors, and their stability into a pass."""

import contextlib

import pytest

import psleak
import psleak._testcase
from psleak import Checkers, MemoryLeakTestCase, OpenHandle, PrivateHeap, UnclosedHandleError, UnclosedHeapCreateError


@pytest.fixture
def windows(monkeypatch):
    """The counters of a pretend Windows process: each a one-element list a test can bump."""
    counts = {"handles": [40], "heaps": [3]}
    monkeypatch.setattr(psleak._testcase, "WINDOWS", True)
    monkeypatch.setattr(psleak._testcase, "POSIX", False)
    monkeypatch.setattr(psleak._native, "handle_count", lambda: counts["handles"][0], raising=False)
    monkeypatch.setattr(psleak._native, "heap_count", lambda: counts["heaps"][0], raising=False)
    # The memory checker's counters come before its measurements, which need this.
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    return counts


def test_a_handle_left_open_is_an_unclosed_handle_error(windows):
    def open_handle():
        windows["handles"][0] += 1

    with pytest.raises(UnclosedHandleError) as caught:
        MemoryLeakTestCase().execute(open_handle, checkers=Checkers.only("handles"))
    assert caught.value.count == 1
    assert str(caught.value).startswith("detected 1 unclosed handle after calling '")


def test_a_heap_left_undestroyed_is_an_unclosed_heap_create_error(windows):
    def create_heaps():
        windows["heaps"][0] += 2

    with pytest.raises(UnclosedHeapCreateError) as caught:
        MemoryLeakTestCase().execute(create_heaps, checkers=Checkers.only("memory"))
    assert caught.value.count == 2
    assert "2 unclosed HeapCreate() calls" in str(caught.value)


def test_handles_opened_and_closed_pass(windows):
    def open_and_close():
        windows["handles"][0] += 1
        windows["handles"][0] -= 1

    MemoryLeakTestCase().execute(open_and_close, checkers=Checkers.only("handles"))


def test_fds_are_not_counted_on_windows(windows, monkeypatch):
    monkeypatch.delattr(psleak._native, "open_fds")
    MemoryLeakTestCase().execute(lambda: None, checkers=Checkers.only("fds", "handles"))


SITE = {
    "addr": "0x7ff900003000",
    "function": "open_device",
    "module": r"C:\src\leaky.pyd",
    "file": "leaky.c",
    "line": 31,
    "text": "open_device (leaky.c:31)",
}


class EtwCollectorStandIn:
    """Stands in for the ETW tracer, which only Windows can run: its session replies to
    ``created`` with what the Rust collector answers for ETW records of a handle and a heap
    left by a call (that answer is tested on Linux: userspace/src/backends/etw/translate.rs,
    the_collector_names_what_a_call_left_from_etw_records), frames and sites rendered by it."""

    name = "trace"
    exact = True

    def __init__(self, handles=(), heaps=()):
        self.created = {"fds": [], "threads": [], "handles": list(handles), "heaps": list(heaps)}

    def describe(self):
        return "trace (ETW stand-in)"

    @contextlib.contextmanager
    def session(self, allocators="all"):
        yield self

    def request(self, op, **fields):
        return {"mark": 1} if op == "mark" else self.created


def test_with_the_etw_collector_the_handle_left_open_is_named(windows, monkeypatch):
    handle = {
        "handle": 0x1A4,
        "kind": r"type 37 \Device\Afd",
        "age_s": 0.0,
        "site": SITE,
        "stack": [SITE],
        "site_text": SITE["text"],
    }
    monkeypatch.setattr(psleak._backends, "_backend", EtwCollectorStandIn(handles=[handle]))

    def open_handle():
        windows["handles"][0] += 1

    with pytest.raises(UnclosedHandleError) as caught:
        MemoryLeakTestCase().execute(open_handle, checkers=Checkers.only("handles"))
    site = "open_device (leaky.c:31)"
    assert caught.value.extras == [OpenHandle(0x1A4, r"type 37 \Device\Afd", site, (site,))]
    assert r"* handle 0x1a4: type 37 \Device\Afd, opened by open_device (leaky.c:31)" in str(caught.value)


def test_with_the_etw_collector_the_heap_left_is_named(windows, monkeypatch):
    heap = {"heap": 0x2A0000, "age_s": 0.0, "site": SITE, "stack": [SITE], "site_text": SITE["text"]}
    monkeypatch.setattr(psleak._backends, "_backend", EtwCollectorStandIn(heaps=[heap]))

    def create_heap():
        windows["heaps"][0] += 1

    with pytest.raises(UnclosedHeapCreateError) as caught:
        MemoryLeakTestCase()._check_counters(create_heap, Checkers.only("memory"))
    assert caught.value.extras == [PrivateHeap(0x2A0000, "open_device (leaky.c:31)", ("open_device (leaky.c:31)",))]
    assert "* heap 0x2a0000, created by open_device (leaky.c:31)" in str(caught.value)
