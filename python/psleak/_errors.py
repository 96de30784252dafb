"""The errors a leak test raises: psleak 0.1.6's classes, with their messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class Error(AssertionError):
    """Base class for all psleak exceptions."""


class UnclosedResourceError(Error):
    """Base class for errors raised when some resource created during a
    function call is left unclosed or unfreed afterward.
    """

    resource_name: ClassVar[str] = "resource"
    verb: ClassVar[str] = "unclosed"

    def __init__(self, count: int, fun_name: str, extras: Iterable[Any] | None = None) -> None:
        self.count = count
        self.fun_name = fun_name
        self.extras = extras
        name = self.resource_name
        name += "s" if count > 1 else ""  # pluralize
        msg = f"detected {count} {self.verb} {name} after calling {fun_name!r} 1 time"
        # The first line is what pytest's summary shows: it names where the first one was made.
        first = extras[0] if isinstance(extras, (list, tuple)) and extras else None
        if getattr(first, "site", ""):
            msg += f", the first {first.made_by} by {first.site}"
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


class UncollectableGarbageError(UnclosedResourceError):
    """One call left objects that only the cycle collector can free (reference cycles)."""

    resource_name = "GC object"
    verb = "uncollectable"


class MemoryLeakError(Error):
    """Memory kept growing with the number of calls: ``malloc()`` without ``free()``,
    ``mmap()`` without ``munmap()``, a forgotten ``Py_DECREF``... ``sites``: where, as the
    tracer named them (the collector's sites, top first, each with its frames), else empty."""

    def __init__(self, msg: str = "", sites: list[dict[str, Any]] | tuple[()] = ()) -> None:
        self.sites = list(sites)
        super().__init__(msg)
