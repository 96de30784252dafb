"""Test framework to detect memory and resource leaks in Python C extensions.

A drop-in for psleak 0.1.6's API. When this process may load eBPF probes, the counters come
from an exact tracer (a private collector process) that names the function that created each
leaked block, fd or thread; otherwise from polling procfs and the allocator, as psleak does.
``PSLEAK_BACKEND=auto|trace|poll`` chooses.

The public names are here; each module behind them owns one idea: ``_errors`` (what a test
raises), ``_resources`` (what the errors list), ``_checkers``, ``_gc`` (uncollectable garbage),
``_testcase`` (the test case and its measurement), ``_format`` (the messages' lines),
``_backends`` (polling or the collector).
"""

# Re-exported (`X as X`) beside __all__: what psleak 0.1.6 had, tests reach, or the collector shares.
from psleak import _backends as _backends, _native as _native
from psleak._backends import BackendError
from psleak._checkers import Checkers
from psleak._errors import (
    Error,
    MemoryLeakError,
    UnclosedFdError,
    UnclosedHandleError,
    UnclosedHeapCreateError,
    UnclosedNativeThreadError,
    UnclosedPythonThreadError,
    UnclosedResourceError,
    UncollectableGarbageError,
)
from psleak._format import format_run_line as format_run_line, human_bytes as human_bytes, qualname as qualname
from psleak._gc import GCDebugger
from psleak._resources import NativeThread, OpenFd, OpenHandle, PrivateHeap
from psleak._testcase import (
    CONFIRM_BATCHES as CONFIRM_BATCHES,
    NAMING_BATCHES as NAMING_BATCHES,
    NAMING_BUDGET as NAMING_BUDGET,
    NAMING_SHARE as NAMING_SHARE,
    PACE_CALLS as PACE_CALLS,
    LeakTest,
    MemoryLeakTestCase,
    _emit_warnings as _emit_warnings,
)

# The workspace's version (Cargo.toml), the same as `psleak --version` and the metadata's.
__version__: str = _native.__version__

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

# Whether the warnings of _emit_warnings were given: psleak 0.1.6's tests set it here.
_warnings_emitted = False

# Where users meet them (tracebacks, pytest's report, reprs), the public names are psleak's, not
# their private module's: psleak.MemoryLeakError, as in psleak 0.1.6.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
