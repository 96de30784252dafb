"""Which checks a leak test runs."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    from typing_extensions import TypeAlias

CheckerName = Literal["memory", "fds", "handles", "c_threads", "py_threads", "gcgarbage"]
# What ``checkers=`` takes: a Checkers, one checker's name or several (only those run).
CheckersLike: TypeAlias = Union["Checkers", CheckerName, Iterable[CheckerName]]


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
    def _validate(cls, check_names: tuple[str, ...]) -> set[str]:
        all_fields = {f.name for f in fields(cls)}
        invalid = [name for name in check_names if name not in all_fields]
        if invalid:
            said = ", ".join(f"{name!r}{_did_you_mean(name, all_fields)}" for name in invalid)
            msg = f"invalid checker names: {said}; the checkers are {', '.join(f.name for f in fields(cls))}"
            raise ValueError(msg)
        return all_fields

    @classmethod
    def only(cls, *checks: CheckerName) -> Checkers:
        """A config with only the named checkers enabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f in checks for f in all_fields})

    @classmethod
    def exclude(cls, *checks: CheckerName) -> Checkers:
        """A config with the named checkers disabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f not in checks for f in all_fields})

    @classmethod
    def _of(cls, value: object) -> Checkers:
        """What ``checkers=`` was given, as Checkers: itself, or only the checkers it names
        (``"fds"``, ``["fds", "c_threads"]``)."""
        if isinstance(value, Checkers):
            return value
        if isinstance(value, str):
            return cls.only(value)  # type: ignore[arg-type]  # _validate names a wrong one
        if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
            names = tuple(value)
            if all(isinstance(name, str) for name in names):
                return cls.only(*names)
        msg = f"checkers must be a Checkers, a checker's name or a list of names (got {value!r})"
        raise TypeError(msg)


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
