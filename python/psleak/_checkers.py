"""Which checks a leak test runs."""

from __future__ import annotations

from dataclasses import dataclass


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
        all_fields = set(cls.__annotations__.keys())
        invalid = set(check_names) - all_fields
        if invalid:
            msg = f"invalid checker names: {', '.join(sorted(invalid))}"
            raise ValueError(msg)
        return all_fields

    @classmethod
    def only(cls, *checks: str) -> Checkers:
        """A config with only the named checkers enabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f in checks for f in all_fields})

    @classmethod
    def exclude(cls, *checks: str) -> Checkers:
        """A config with the named checkers disabled."""
        all_fields = cls._validate(checks)
        return cls(**{f: f not in checks for f in all_fields})
