"""The native half of psleak (Rust, PyO3)."""

import sys

__version__: str
PROTOCOL_VERSION: int
"""The version of the protocol spoken to the collector and the daemon (psleak::serve::protocol)."""
DEFAULT_SOCKET: str
"""Where the daemon listens unless told otherwise."""

def memory() -> dict[str, int]:
    """heap, mmap, uss, rss and vms of this process, in bytes (see psleak::backends::poll per platform)."""

def mark_memory() -> None:
    """Take the reading that memory_since_mark() compares with (kept natively, so that
    nothing made after it counts as growth)."""

def memory_since_mark() -> tuple[dict[str, int], dict[str, int], bool]:
    """How much each of memory()'s metrics grew since mark_memory(), in bytes; how much the
    counters only psleak reads grew (``py_blocks``: blocks CPython's allocator handed out and
    kept; ``mapped``: bytes of mappings outside the allocator); and whether no other thread ran."""

class Judge:
    """One execute()'s memory verdict (psleak::model::verdict::Judge), fed a batch at a time."""

    def __init__(self, tolerance: dict[str, int], retries: int, confirm: int) -> None: ...
    def batch(
        self, calls: int, growth: dict[str, int], exact: bool, sites: str | None = None
    ) -> tuple[str, list[str], bool]:
        """("leak" | "clean" | "undecided", the exact counters that grew, whether the batches ran
        out). ``sites``: the tracer's verdict on a traced batch's sites, which then judges."""

def human_bytes(n: int) -> str:
    """A size (at least 0) as psleak prints it everywhere: ``928B``, ``1.0K``, ``1.5M``."""

def missed_events(before: dict[str, int], after: dict[str, int]) -> str:
    """What leaves the tracer's ledger incomplete between two of its replies' ``lost`` counts,
    as text (``3 events dropped in a full ring``), or "" when nothing does."""

def unnamed(grown: list[str]) -> str:
    """What to say when the tracer saw no site grow while these counters did."""

def heap_trim() -> None:
    """Give free heap memory back to the system (malloc_trim, HeapCompact...)."""

if sys.platform != "win32":
    def open_fds() -> list[tuple[int, str, str]]:
        """(fd, what it refers to, kind) for each open fd of this process."""
else:
    def handle_count() -> int:
        """The number of open handles of this process."""

    def heap_count() -> int:
        """The number of heaps of this process (one more per HeapCreate not destroyed)."""

def threads() -> list[tuple[int, str]]:
    """(tid, name) for each thread of this process."""

def tracer_unavailable() -> str | None:
    """Why this process cannot trace itself (eBPF probes; ETW sessions on Windows), or None."""

if sys.platform == "linux" or sys.platform == "win32":
    def serve_collector(fd: int, pid: int, allocators: str) -> None:
        """Run a private collector for `pid` on the connected socket `fd` (a Unix socket; on
        Windows a loopback socket's handle) until hang-up, probing the `allocators` families
        ("all", "python" or "none"; not looked at on Windows)."""

    def cli(argv: list[str]) -> int:
        """Run the `psleak` command line (`argv[0]` is the program name); return its exit status."""
