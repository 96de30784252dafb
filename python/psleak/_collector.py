"""The private collector: ``python -m psleak._collector FD PID``, started by the backend of a
privileged test process. It attaches the probes to PID and answers on the socket FD until the
test process hangs up or exits."""

import sys

from psleak import _native


def main():
    fd, pid = int(sys.argv[1]), int(sys.argv[2])
    try:
        _native.serve_collector(fd, pid)
    except RuntimeError as err:
        # The client already got the reason as the attach reply; this is for the logs.
        print(f"psleak collector: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
