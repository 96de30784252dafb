"""The `psleak` command (`psleak trace --pid PID`, `psleak daemon`...), installed with the
package as a script and as ``python -m psleak``: the same command line as the Rust binary."""

import signal
import sys

from psleak import _native


def main():
    if not hasattr(_native, "cli"):
        sys.exit("psleak: `trace` needs Linux (eBPF) or Windows (ETW); MemoryLeakTestCase polls here")
    # The Rust side handles Ctrl-C itself (a final report, probes detached); Python's own
    # handler, which it would chain to, must not turn the same signal into a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_native.cli(["psleak", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
