import unittest
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict

from typing_extensions import Self, TypeAlias

from psleak._backends import BackendError as BackendError

Tolerance: TypeAlias = int | dict[Literal["heap", "mmap", "uss", "rss", "vms"], int]

CONFIRM_BATCHES: int
NAMING_BATCHES: int
NAMING_SHARE: int
NAMING_BUDGET: float
PACE_CALLS: int

class Error(AssertionError): ...

class UnclosedResourceError(Error):
    resource_name: ClassVar[str]
    verb: ClassVar[str]
    count: int
    fun_name: str
    extras: Any
    def __init__(self, count: int, fun_name: str, extras: Iterable[Any] | None = ...) -> None: ...

class UnclosedFdError(UnclosedResourceError): ...
class UnclosedHandleError(UnclosedResourceError): ...
class UnclosedHeapCreateError(UnclosedResourceError): ...
class UnclosedNativeThreadError(UnclosedResourceError): ...
class UnclosedPythonThreadError(UnclosedResourceError): ...
class UncollectableGarbageError(UnclosedResourceError): ...
class MemoryLeakError(Error): ...

@dataclass(frozen=True)
class OpenFd:
    fd: int
    path: str
    kind: str
    site: str = ...
    stack: tuple[str, ...] = ...

@dataclass(frozen=True)
class NativeThread:
    tid: int
    name: str
    site: str = ...
    stack: tuple[str, ...] = ...

@dataclass(frozen=True)
class OpenHandle:
    handle: int
    kind: str
    site: str = ...
    stack: tuple[str, ...] = ...

@dataclass(frozen=True)
class PrivateHeap:
    heap: int
    site: str = ...
    stack: tuple[str, ...] = ...

@dataclass(frozen=True)
class Checkers:
    memory: bool = ...
    fds: bool = ...
    handles: bool = ...
    c_threads: bool = ...
    py_threads: bool = ...
    gcgarbage: bool = ...
    @classmethod
    def only(cls, *checks: str) -> Checkers: ...
    @classmethod
    def exclude(cls, *checks: str) -> Checkers: ...

class GCDebugger:
    before: list[Any]
    after: list[Any]
    def __enter__(self) -> Self: ...
    def __exit__(self, *a: object, **k: object) -> None: ...
    def is_transient(self, obj: object, _seen: set[int] | None = ...) -> bool: ...
    def leaked_objects(self) -> list[Any]: ...
    def check(self, fun: Callable[..., Any]) -> None: ...

class LeakTest:
    fun: Callable[..., Any]
    args: tuple[Any, ...]
    execute_kwargs: dict[str, Any]
    def __init__(self, fun: Callable[..., Any], *args: Any, **execute_kwargs: Any) -> None: ...

class LastRun(TypedDict):
    backend: Literal["trace", "poll"]
    calls: int
    batches: int

class MemoryLeakTestCase(unittest.TestCase):
    warmup_times: ClassVar[int]
    times: ClassVar[int]
    retries: ClassVar[int]
    tolerance: ClassVar[Tolerance]
    trim_callback: ClassVar[Callable[[], Any] | None]
    checkers: ClassVar[Checkers]
    verbosity: ClassVar[int]
    last_run: LastRun
    @property
    def backend(self) -> Literal["trace", "poll"]: ...
    @classmethod
    def auto_generate(cls) -> dict[str, LeakTest]: ...
    def call(self, fun: Callable[[], Any]) -> Any: ...
    def execute(
        self,
        fun: Callable[..., Any],
        *args: Any,
        warmup_times: int | None = ...,
        times: int | None = ...,
        retries: int | None = ...,
        tolerance: Tolerance | None = ...,
        trim_callback: Callable[[], Any] | None = ...,
        checkers: Checkers | None = ...,
    ) -> None: ...
    def execute_w_exc(self, exc: type[BaseException], fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...
