"""Tracing costs only what naming needs: the probes are attached to this process only while a
leak the counters found is being named, never while anything else runs."""

import json
import os
import subprocess
import sys
import threading
import time

import leaky_ext as ext
import pytest

import psleak._backends
from psleak import MemoryLeakError, UnclosedFdError

# psleak's BPF programs (ebpf/src/bpf/*.h).
PROGRAMS = {"alloc_enter", "alloc_exit", "free_enter", "target_exec", "syscall_exit", "thread_start", "thread_exit"}


def attached_programs():
    """The psleak programs attached anywhere on this machine, by name (bpftool)."""
    names = {p["id"]: p.get("name", "") for p in bpftool("prog")}
    return sorted({names.get(link.get("prog_id"), "") for link in bpftool("link")} & PROGRAMS)


def bpftool(what):
    out = subprocess.run(["bpftool", what, "show", "-j"], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


WATCHER = """
import json, subprocess, sys, time
PROGRAMS = set(sys.argv[1:])
def show(what):
    out = subprocess.run(["bpftool", what, "show", "-j"], capture_output=True, text=True).stdout
    return json.loads(out or "[]")
print("watching", flush=True)
while True:
    names = {p["id"]: p.get("name", "") for p in show("prog")}
    seen = {names.get(link.get("prog_id"), "") for link in show("link")} & PROGRAMS
    if seen:
        print(" ".join(sorted(seen)), flush=True)
    time.sleep(0.02)
"""


class Watch:
    """Samples attached_programs() from a process of its own while a test runs: a thread of
    this process would make it one with other threads, which psleak judges otherwise."""

    def __enter__(self):
        command = [sys.executable, "-c", WATCHER, *PROGRAMS]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout.readline() == "watching\n"
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)  # its last sample
        self._process.kill()
        self.seen = set(self._process.stdout.read().split())
        self._process.wait()


@pytest.fixture
def traced(psleak, backend):
    if backend != "trace":
        pytest.skip("only the tracer attaches probes")
    assert attached_programs() == [], "another psleak is attached: this test needs the machine alone"
    psleak.times, psleak.warmup_times = 50, 2
    psleak.verbosity = int(os.environ.get("DEBUG_V", "0"))
    return psleak


def test_a_clean_function_never_runs_under_the_probes(traced):
    with Watch() as watch:
        traced.execute(ext.malloc_and_free, 64)
        traced.execute(ext.build_and_free_list, 20_000)
        traced.execute(ext.open_and_close)
    assert watch.seen == set(), "a clean function cost probe hits"


def test_after_a_leak_is_named_no_probe_is_left_attached(traced):
    with Watch() as watch, pytest.raises(MemoryLeakError) as info:
        traced.execute(ext.forget_free, 1)
    assert "forget_free (leaky_ext.c:" in str(info.value)
    assert {"alloc_enter", "alloc_exit", "free_enter"} <= watch.seen, "the tracer named the leak"
    assert attached_programs() == []
    # And the next leak is named by a session of its own, which it leaves behind too. Only a
    # traced call names the fd's site (a sampler, every 20 ms plus bpftool's time, can miss the
    # few milliseconds that session holds its syscall probe: CI once did).
    for _ in range(200):
        ext.malloc_and_free(64)
    with pytest.raises(UnclosedFdError) as fd:
        traced.execute(ext.forget_close)
    assert attached_programs() == []
    assert "forget_close (leaky_ext.c:" in str(fd.value), "the fd was named by a traced call"


def test_each_question_probes_only_the_allocators_it_can_need(traced, monkeypatch):
    # An attached uprobe costs its trap at every call: an fd's replay probes no allocator, a
    # leak of CPython's blocks alone none of libc's malloc family.
    opened = []

    class Recorded(psleak._backends.TraceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append((self.ready["allocators"], self.ready["probes"]))

    monkeypatch.setattr(psleak._backends, "TraceSession", Recorded)
    with pytest.raises(UnclosedFdError) as fd:
        traced.execute(ext.forget_close)
    assert "forget_close (leaky_ext.c:" in str(fd.value)
    with pytest.raises(MemoryLeakError) as blocks:
        traced.execute(ext.forget_decref_list)
    assert "forget_decref_list (leaky_ext.c:" in str(blocks.value)
    with pytest.raises(MemoryLeakError) as heap:
        traced.execute(ext.forget_free, 1)
    assert "forget_free (leaky_ext.c:" in str(heap.value)
    # Under PYTHONMALLOC=malloc CPython's blocks are libc's.
    pymalloc = os.environ.get("PYTHONMALLOC", "") in ("", "pymalloc")
    assert [allocators for allocators, _ in opened] == ["none", "python" if pymalloc else "all", "all"]
    probes = dict(opened)
    assert probes["none"] < probes.get("python", probes["all"]) <= probes["all"], opened


def busy(stop):
    while not stop.is_set():
        bytes(100)


def idle(stop):
    stop.wait()


@pytest.mark.parametrize("other", [busy, idle])
def test_beside_another_thread(traced, other):
    # A thread that runs during a batch is in every process-wide counter: the calls' own
    # sites judge then, traced. One that sleeps throughout changes nothing.
    stop = threading.Event()
    thread = threading.Thread(target=other, args=(stop,))
    thread.start()
    try:
        with Watch() as watch:
            traced.execute(ext.malloc_and_free, 64)
        assert ("alloc_enter" in watch.seen) == (other is busy), watch.seen
        with pytest.raises(MemoryLeakError) as info:
            traced.execute(ext.forget_free, 1)
        assert "forget_free (leaky_ext.c:" in str(info.value)
    finally:
        stop.set()
        thread.join()
    assert attached_programs() == []
