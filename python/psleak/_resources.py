"""What the errors list: the fds, threads, handles and heaps a call left. With the tracer, each
carries where it was made, as the collector named it: the function to blame (``site``) and the
native stack, innermost first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


class _Sited:
    """The site and stack of a resource, and a repr that names it and, if known, its site."""

    made_by: ClassVar[str]
    site: str
    stack: tuple[str, ...]

    def _what(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self._what() + (f", {self.made_by} by {self.site}" if self.site else "")


def named(reply: dict[str, Any]) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The site and stack of a resource in a collector's reply, as the collector wrote them:
    the native frames, innermost first, then the Python frames that called into them; and the
    reply's frames themselves (``origin``)."""
    frames = [*reply["stack"], *reply.get("python", ())]
    origin = {key: reply.get(key) for key in ORIGIN_FIELDS}
    return reply["site_text"], tuple(frame["text"] for frame in frames), origin


# What ``origin`` keeps of a collector's reply: the blamed frame, the native and Python stacks,
# the Python frame that made the call (each frame with its function, file, line, module,
# offset and build-id).
ORIGIN_FIELDS = ("site", "stack", "python", "called_from")


@dataclass(frozen=True, repr=False)
class OpenFd(_Sited):
    """An fd left open by a call: its number, what it refers to (a path, ``socket:[inode]``),
    its kind (``file``, ``pipe``, ``AF_INET SOCK_STREAM``...) and, with the tracer, the
    function that opened it and its stack."""

    made_by = "opened"
    fd: int
    path: str
    kind: str
    site: str = ""
    stack: tuple[str, ...] = ()
    # The collector's frames, structured (named's origin); not part of what the resource is.
    origin: dict[str, Any] | None = field(default=None, compare=False)

    def _what(self) -> str:
        return f"fd {self.fd}: {self.kind} {self.path}"


@dataclass(frozen=True, repr=False)
class NativeThread(_Sited):
    """A native thread left running by a call; with the tracer, the function that started it."""

    made_by = "started"
    tid: int
    name: str
    site: str = ""
    stack: tuple[str, ...] = ()
    # The collector's frames, structured (named's origin); not part of what the resource is.
    origin: dict[str, Any] | None = field(default=None, compare=False)

    def _what(self) -> str:
        return f"thread {self.tid} ({self.name})"


@dataclass(frozen=True, repr=False)
class OpenHandle(_Sited):
    """A Windows handle left open by a call: its value, its object type and name as ETW gave
    them, and the function that opened it and its stack (the ETW tracer only)."""

    made_by = "opened"
    handle: int
    kind: str
    site: str = ""
    stack: tuple[str, ...] = ()
    # The collector's frames, structured (named's origin); not part of what the resource is.
    origin: dict[str, Any] | None = field(default=None, compare=False)

    def _what(self) -> str:
        return f"handle {self.handle:#x}: {self.kind}"


@dataclass(frozen=True, repr=False)
class PrivateHeap(_Sited):
    """A Windows heap a call created and did not destroy; the function that created it and its
    stack (the ETW tracer only)."""

    made_by = "created"
    heap: int
    site: str = ""
    stack: tuple[str, ...] = ()
    # The collector's frames, structured (named's origin); not part of what the resource is.
    origin: dict[str, Any] | None = field(default=None, compare=False)

    def _what(self) -> str:
        return f"heap {self.heap:#x}"
