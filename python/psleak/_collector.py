"""The private collector: ``python -m psleak._collector FD PID``, started by the backend of a
privileged test process. It attaches the probes to PID (the ETW sessions on Windows) and answers
on the socket FD (``-``: a socket shared on stdin) until the test process hangs up or exits."""

import socket
import sys

from psleak import _native


def main():
    where, pid = sys.argv[1], int(sys.argv[2])
    # On Windows the socket comes as socket.share() data on stdin ("-").
    sock = socket.fromshare(sys.stdin.buffer.read()).detach() if where == "-" else int(where)
    try:
        _native.serve_collector(sock, pid)
    except RuntimeError as err:
        # The client already got the reason as the attach reply; this is for the logs.
        print(f"psleak collector: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
