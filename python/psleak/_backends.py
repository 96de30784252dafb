"""Where the counters come from. ``TraceBackend`` asks a collector process that follows this
process with eBPF probes, or ETW on Windows (exact, with the site of every resource);
``PollBackend`` reads procfs and the allocator's statistics, psutil-style. Both measure the
classic metrics natively (``_native.memory``)."""

import atexit
import json
import os
import socket
import subprocess
import sys
import warnings

from psleak import _native

PROTOCOL_VERSION = 1
# Attaching takes ~0.1 s; a loaded CI machine may be much slower.
READY_TIMEOUT = 60.0
REPLY_TIMEOUT = 300.0
# Objects made to check that the probes see CPython's allocations.
CALIBRATION_OBJECTS = 200


class BackendError(RuntimeError):
    """The backend that was asked for cannot work here."""


class PollBackend:
    name = "poll"
    exact = False

    def describe(self):
        return "poll (the OS's counters and the allocator's statistics; memory checks need PYTHONMALLOC=malloc)"


DEFAULT_SOCKET = "/run/psleak.sock"


class TraceBackend:
    """A session with a collector that follows this process: a private one, started for this
    process and ended with it (``daemon=None``), or a ``psleak daemon`` reached at that socket."""

    name = "trace"
    exact = True

    def __init__(self, daemon=None):
        self._process = None
        self._sees_python = None
        self.daemon = daemon
        if daemon is None:
            # A Unix socket pair; on Windows, a loopback TCP pair.
            ours, theirs = socket.socketpair()
            with theirs:
                self._process = _start_collector(theirs)
        else:
            ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                ours.connect(daemon)
            except PermissionError:
                ours.close()
                msg = (
                    f"the psleak daemon on {daemon} does not admit this user: its --socket-mode and "
                    "--socket-group say who may connect"
                )
                raise BackendError(msg) from None
            except OSError as err:
                ours.close()
                raise BackendError(f"no psleak daemon answers on {daemon}: {err.strerror}") from None
        self._sock = ours
        self._sock.settimeout(READY_TIMEOUT)
        self._replies = ours.makefile("rb")
        try:
            if daemon is not None:
                self._sock.sendall(self.encode("attach", pid=os.getpid(), version=PROTOCOL_VERSION))
            self.ready = self._reply()
        except BackendError:
            self.close()
            raise
        self._sock.settimeout(REPLY_TIMEOUT)
        self.request("hello", version=PROTOCOL_VERSION)

    def describe(self):
        where = f"daemon at {self.daemon}" if self.daemon else f"collector pid {self._process.pid}"
        missing = "".join(f"; {what}" for what in self.ready.get("missing", ()))
        return f"trace ({self.ready['backend']}, {where}, {self.ready['probes']} probes{missing})"

    def _reply(self):
        try:
            line = self._replies.readline()
        except OSError as err:
            raise BackendError(f"the psleak collector did not answer: {err}") from None
        if not line:
            why = "the daemon closed the session"
            if self._process is not None:
                self._process.wait(timeout=10)
                why = self._process.stderr.read().decode(errors="replace").strip()
            raise BackendError(f"the psleak collector ended: {why or 'no reason given'}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise BackendError(reply["error"])
        return reply

    @staticmethod
    def encode(op, **fields):
        """A request line, made ahead when sending it must not allocate."""
        fields["op"] = op
        return json.dumps(fields).encode() + b"\n"

    def send(self, line):
        """Sends an encoded request and returns its reply."""
        self._sock.sendall(line)
        return self._reply()

    def request(self, op, **fields):
        return self.send(self.encode(op, **fields))

    def sees_python_allocations(self):
        """Whether the probes see CPython's own object allocations. A CPython built with LTO
        (Debian's python3) inlines its allocator into its callers, out of the probes' reach,
        unless PYTHONMALLOC=malloc routes it through malloc. Asked once: 200 new ints must be
        seen live."""
        if self._sees_python is None:
            measurement = self.request("begin")["measurement"]
            end_batch = self.encode("batch", measurement=measurement, calls=1, confirm=3, top=0)
            self.request("window", measurement=measurement)
            ints = [i * 1000003 for i in range(CALIBRATION_OBJECTS)]
            seen = self.send(end_batch)["live"]["heap_blocks"]
            del ints
            self.request("end", measurement=measurement)
            self._sees_python = seen >= CALIBRATION_OBJECTS
        return self._sees_python

    def close(self, wait=True):
        """Ends the session: the collector detaches its probes and exits. At interpreter exit
        there is no need to wait for that (~0.3 s of kernel RCU waits)."""
        self._replies.close()
        self._sock.close()
        if not wait or self._process is None:
            return
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stderr.close()


def _start_collector(theirs):
    """The private collector, given the other end of our socket pair: as an inherited fd, or
    on Windows, where a child inherits no socket, as ``socket.share()`` data on its stdin."""
    command = [sys.executable, "-m", "psleak._collector"]
    if sys.platform != "win32":
        return subprocess.Popen(
            [*command, str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    process = subprocess.Popen(
        [*command, "-", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        process.stdin.write(theirs.share(process.pid))
        process.stdin.close()
    except OSError:
        pass  # it ended already: its reason comes with the ready line's absence
    return process


_backend = None


def current():
    """The backend of this process, chosen on first use: ``PSLEAK_BACKEND`` (auto, trace or
    poll) says which; auto takes the tracer when a psleak daemon answers (``PSLEAK_SOCKET``, else
    /run/psleak.sock) or this process may load probes itself."""
    global _backend  # noqa: PLW0603
    if _backend is None:
        _backend = _choose(os.environ.get("PSLEAK_BACKEND", "auto").strip().lower() or "auto")
    return _backend


def _ended_at_exit(backend):
    """Registers the session's end at interpreter exit, without waiting for the detach."""
    atexit.register(backend.close, wait=False)
    return backend


def _choose(wanted):
    if wanted not in {"auto", "trace", "poll"}:
        msg = f"PSLEAK_BACKEND must be auto, trace or poll (got {wanted!r})"
        raise BackendError(msg)
    if wanted == "poll":
        return PollBackend()
    daemon = os.environ.get("PSLEAK_SOCKET") or (DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None)
    daemon_error = None
    if daemon:
        try:
            backend = TraceBackend(daemon)
        except BackendError as err:
            if os.environ.get("PSLEAK_SOCKET"):
                msg = f"PSLEAK_SOCKET={daemon}, but the daemon cannot trace this process: {err}"
                raise BackendError(msg) from None
            daemon_error = err
        else:
            return _ended_at_exit(backend)
    why = _native.tracer_unavailable()
    if why is None:
        try:
            backend = TraceBackend()
        except BackendError as err:
            why = str(err)
        else:
            return _ended_at_exit(backend)
        # Privileged, yet the probes could not be had: worth saying, unlike a plain user.
        msg = f"psleak: using the polling backend; the tracer failed: {why}"
        if wanted == "auto":
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if wanted == "trace":
        msg = f"PSLEAK_BACKEND=trace, but the tracer cannot work here: {why}"
        if daemon_error is not None:
            msg += f"; and {daemon_error}"
        elif not daemon and sys.platform != "win32":
            msg += f"; or have root run `psleak daemon` and set PSLEAK_SOCKET to its socket (default {DEFAULT_SOCKET})"
        raise BackendError(msg)
    return PollBackend()
