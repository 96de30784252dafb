"""What is left of formatting on the Python side: the run lines and the leak-sites block of a
memory error, around what the collector rendered (sizes with its ``human_bytes``, each site's
line and frames as its replies carry them)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from psleak import _native

human_bytes = _native.human_bytes

# psleak's own frames drive the calls: they are between the tested function and the test in
# every stack, and say nothing to the user; nor do the test runner's below the test.
_PSLEAK_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RUNNER_PACKAGES = ("_pytest", "pluggy", "unittest")


def _not_the_users() -> tuple[str, ...]:
    """The directories of psleak and of the test runners this process imported."""
    dirs = [_PSLEAK_DIR]
    for name in _RUNNER_PACKAGES:
        module = sys.modules.get(name)
        if getattr(module, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(dirs)


def format_run_line(idx: int, diffs: dict[str, int], times: int, blocks: int = 0) -> str:
    """``Run # 1: heap=+2.0K  (calls= 100, avg/call=+20B)``: a batch whose counters grew."""
    parts = [f"{k}={'+' + human_bytes(v):<6}" for k, v in diffs.items() if v > 0]
    if blocks > 0:
        parts.append(f"blocks=+{blocks}")
    metrics = " | ".join(parts)
    grown = [k for k, v in diffs.items() if v > 0]
    # Only CPython's blocks may have grown (its allocator's pools hide them from the heap).
    avg = human_bytes(diffs[grown[0]] // times) if grown else f"{blocks / times:.2g} blocks"
    s = f"Run #{idx:>2}: {metrics:<50} (calls={times:>4}, avg/call=+{avg})"
    if idx == 1:
        s = "\n" + s
    return s


def format_leak_sites(sites: list[dict[str, Any]], calls: int) -> str:
    """The sites of a traced batch's reply, each its line, its first native frames and the
    Python frames that called them (not psleak's)."""
    not_the_users = _not_the_users()
    lines = ["", f"Leak sites (a traced replay of {calls} calls: created by them, still live, and growing):"]
    for site in sites:
        lines.append(f"* {site['text']}")
        lines.extend(f"    {frame['text']}" for frame in site["stack"][:12])
        python = [frame for frame in site.get("python", ()) if not frame["file"].startswith(not_the_users)]
        lines.extend(f"    {frame['text']}" for frame in python[:8])
    return "\n".join(lines)


def missed_events(before: dict[str, int], after: dict[str, int], fun: object) -> str:
    """What the tracer lost between two of its "lost" counts, said in a sentence, or ""."""
    missed = _native.missed_events(before, after)
    if not missed:
        return ""
    return (
        f"the tracer missed events while calling {qualname(fun)!r} ({missed}): the sites it "
        "names may be incomplete; run the test alone to name them all"
    )


def qualname(obj: object) -> str:
    """A human-readable qualified name for a function, method or class; for execute(fun, *args),
    fun's (``functools.partial`` has none of its own)."""
    if isinstance(obj, functools.partial):
        return qualname(obj.func)
    return getattr(obj, "__qualname__", getattr(obj, "__name__", str(obj)))
