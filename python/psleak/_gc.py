"""The uncollectable-garbage check: what only the cycle collector could free."""

from __future__ import annotations

import gc
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from psleak._errors import UncollectableGarbageError
from psleak._format import qualname

if TYPE_CHECKING:
    from typing_extensions import Self


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

    before: list[Any]
    after: list[Any]

    def __enter__(self) -> Self:
        self._old_debug = gc.get_debug()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        self.before = list(gc.garbage)
        self.after = []
        gc.garbage.clear()
        return self

    def __exit__(self, *a: object, **k: object) -> None:
        gc.collect()
        self.after = list(gc.garbage)
        gc.garbage.clear()
        gc.set_debug(self._old_debug)

    def is_transient(self, obj: object, _seen: set[int] | None = None) -> bool:
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

    def leaked_objects(self) -> list[Any]:
        return [obj for obj in self.after if obj not in self.before and not self.is_transient(obj)]

    def check(self, fun: Callable[..., Any]) -> None:
        __tracebackhide__ = True
        leaked = self.leaked_objects()
        if leaked:
            raise UncollectableGarbageError(len(leaked), qualname(fun), extras=leaked)
