"""The private collector: ``python -I -S .../psleak/_collector.py FD PID ALLOCATORS``, started by
the backend of a privileged test process. It attaches the probes to PID (the ETW sessions on
Windows), the allocator families ALLOCATORS says (all, python or none), and answers on the socket
FD (``-``: a socket shared on stdin) until the test process hangs up or exits.

It is run as a file, not as ``-m psleak._collector``: importing the psleak package (unittest,
logging...) was a fifth of the time a leak's naming waited for its collector."""

import importlib.machinery
import importlib.util
import os
import socket
import sys


def load_native():
    """psleak._native, from beside this file, without importing the psleak package."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_native" + suffix)
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("psleak._native", path)
            native = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(native)
            return native
    msg = f"no psleak._native beside {here}"
    raise ImportError(msg)


def main():
    where, pid, allocators = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # On Windows the socket comes as socket.share() data on stdin ("-").
    sock = socket.fromshare(sys.stdin.buffer.read()).detach() if where == "-" else int(where)
    try:
        load_native().serve_collector(sock, pid, allocators)
    except (ImportError, RuntimeError, ValueError) as err:
        # Said in one line: the client reads it as the reason when no ready line came.
        print(f"psleak collector: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
