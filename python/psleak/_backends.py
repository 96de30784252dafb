"""Who names a leak. Counters judge every backend's batches (``_native``: the allocator's
figures, CPython's blocks, the fd table, the task list), read without any probe. ``Tracer``
brings in, only once those counters have grown, a collector that follows this process with
eBPF probes (ETW on Windows) and names the site of every block, fd or thread a replay of the
calls leaves: a ``TraceSession``, begun for that and ended with it, so that no probe is attached
while anything else runs, and probing no allocator whose events cannot matter to its question
(an attached uprobe costs its trap at every call). ``PollBackend`` names nothing: it only has
the counters."""

import contextlib
import json
import os
import socket
import subprocess
import sys

from psleak import _native

PROTOCOL_VERSION = _native.PROTOCOL_VERSION
# Attaching takes ~0.1 s; a loaded CI machine may be much slower.
READY_TIMEOUT = 60.0
REPLY_TIMEOUT = 300.0


class BackendError(RuntimeError):
    """The backend that was asked for cannot work here."""


class PollBackend:
    name = "poll"
    exact = False

    def __init__(self, why="PSLEAK_BACKEND=poll"):
        self.why = why

    def describe(self):
        return "poll (the OS's counters and the allocator's statistics; memory checks need PYTHONMALLOC=malloc)"


DEFAULT_SOCKET = _native.DEFAULT_SOCKET


class Tracer:
    """The exact tracer, attached only to name what the counters found. Each ``session()`` is
    a collector of its own: a private one (``daemon=None``) or the ``psleak daemon`` at that
    socket; its end detaches the probes."""

    name = "trace"
    exact = True

    def __init__(self, daemon=None, why="this process may load eBPF probes"):
        self.daemon = daemon
        self.why = why

    def describe(self):
        where = f"the daemon at {self.daemon}" if self.daemon else "a private collector"
        kind = "ETW" if sys.platform == "win32" else "eBPF"
        return f"trace ({kind} probes, attached by {where} only to name what the counters found)"

    @contextlib.contextmanager
    def session(self, allocators="all"):
        """A session whose probes follow the ``allocators`` families: "all" (libc's malloc
        family and CPython's API), "python" (CPython's only), "none" (fds and threads only)."""
        session = TraceSession(self.daemon, allocators)
        try:
            yield session
        finally:
            session.close()


class TraceSession:
    """A session with a collector that follows this process: a private one, started for this
    session and ended with it (``daemon=None``), or a ``psleak daemon`` reached at that socket."""

    def __init__(self, daemon=None, allocators="all"):
        self._process = None
        self.daemon = daemon
        if daemon is None:
            # A Unix socket pair; on Windows, a loopback TCP pair.
            ours, theirs = socket.socketpair()
            with theirs:
                self._process = _start_collector(theirs, allocators)
        else:
            ours = _connect(daemon)
        self._sock = ours
        # Replies are read into it (see _reply); it grows for a long one.
        self._buffer = bytearray(64 * 1024)
        self._sock.settimeout(READY_TIMEOUT)
        try:
            if daemon is not None:
                self.ready = self._attach(allocators)
            else:
                self.ready = self._reply()
        except BackendError:
            self.close()
            raise
        self._sock.settimeout(REPLY_TIMEOUT)
        self.request("hello", version=PROTOCOL_VERSION)

    def _attach(self, allocators):
        """Attaches the daemon's session. A daemon older than the allocator choice refuses the
        field: its session probes every allocator then, which costs more but answers the same."""
        fields = {} if allocators == "all" else {"allocators": allocators}
        self._sock.sendall(self.encode("attach", pid=os.getpid(), version=PROTOCOL_VERSION, **fields))
        try:
            return self._reply()
        except BackendError as err:
            if "unknown field `allocators`" not in str(err):
                raise
        self._sock.sendall(self.encode("attach", pid=os.getpid(), version=PROTOCOL_VERSION))
        return self._reply()

    def describe(self):
        where = f"daemon at {self.daemon}" if self.daemon else f"collector pid {self._process.pid}"
        missing = "".join(f"; {what}" for what in self.ready.get("missing", ()))
        return f"trace ({self.ready['backend']}, {where}, {self.ready['probes']} probes{missing})"

    def _reply(self):
        """The next reply. Nothing is allocated until its first bytes arrive: the collector
        answers a request only after marking where it stands in this process's events, and
        what this process made while waiting (a reader's buffers, a list that goes to its free
        list) would count on the near side of that mark."""
        buffer = self._buffer
        try:
            read = self._sock.recv_into(buffer)
            while read and buffer[read - 1] != ord("\n"):
                if read == len(buffer):
                    buffer.extend(bytes(len(buffer)))
                more = self._sock.recv_into(memoryview(buffer)[read:])
                if not more:
                    break
                read += more
        except OSError as err:
            raise BackendError(f"the psleak collector did not answer: {err}") from None
        if not read:
            why = "the daemon closed the session"
            if self._process is not None:
                self._process.wait(timeout=10)
                why = self._process.stderr.read().decode(errors="replace").strip()
            raise BackendError(f"the psleak collector ended: {why or 'no reason given'}")
        reply = json.loads(bytes(buffer[:read]))
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

    def close(self):
        """Ends the session: the collector detaches its probes and exits (the daemon's session
        ends when the socket closes)."""
        self._sock.close()
        if self._process is None:
            return
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stderr.close()


def _connect(daemon):
    """A socket connected to the daemon at ``daemon``; BackendError if none listens there or it
    does not admit this user (whether it may trace this process, a session's attach tells)."""
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
    return ours


def _start_collector(theirs, allocators):
    """The private collector, given the other end of our socket pair: as an inherited fd, or
    on Windows, where a child inherits no socket, as ``socket.share()`` data on its stdin."""
    # Isolated (-I: no PYTHON* variables, no user site; -S: no site): it needs nothing but
    # psleak._native, which it loads from beside itself (see _collector).
    command = [sys.executable, "-I", "-S", os.path.join(os.path.dirname(__file__), "_collector.py")]
    if sys.platform != "win32":
        return subprocess.Popen(
            [*command, str(theirs.fileno()), str(os.getpid()), allocators],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    process = subprocess.Popen(
        [*command, "-", str(os.getpid()), allocators],
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


# What a user does to get the tracer where this process cannot load probes.
TRACER_HINT = f"have root run `psleak daemon` and set PSLEAK_SOCKET to its socket (default {DEFAULT_SOCKET})"

# What a run may require (--psleak-require, PSLEAK_REQUIRE): "checks", every check that is
# enabled runs (none is skipped); "trace", the same, with the tracer judging.
REQUIREMENTS = ("checks", "trace")

_backend = None
_requirement = None


def require(level, source):
    """Makes ``level`` (None or one of REQUIREMENTS) this process's requirement, as ``source``
    (``--psleak-require=trace``) asked; before the backend is chosen."""
    global _requirement
    if level is not None and level not in REQUIREMENTS:
        msg = f"{source.split('=')[0]} must be {' or '.join(REQUIREMENTS)} (got {level!r})"
        raise BackendError(msg)
    _requirement = (level, source) if level else None


def requirement():
    """(level, who asked) of this process's requirement, or None: ``require``'s, else
    ``PSLEAK_REQUIRE``'s."""
    if _requirement is None:
        level = os.environ.get("PSLEAK_REQUIRE", "").strip().lower()
        if level:
            require(level, f"PSLEAK_REQUIRE={level}")
    return _requirement


def current():
    """The backend of this process, chosen on first use: ``PSLEAK_BACKEND`` (auto, trace or
    poll) says which; auto takes the tracer when a psleak daemon answers (``PSLEAK_SOCKET``, else
    /run/psleak.sock) or this process may load probes itself, and must when the requirement is
    "trace". Nothing is attached yet. Its ``why`` says why it was chosen."""
    global _backend
    if _backend is None:
        wanted = os.environ.get("PSLEAK_BACKEND", "auto").strip().lower() or "auto"
        required = requirement()
        _backend = _choose(wanted, required[1] if required and required[0] == "trace" else None)
    return _backend


def _choose(wanted, trace_required_by=None):
    if wanted not in {"auto", "trace", "poll"}:
        msg = f"PSLEAK_BACKEND must be auto, trace or poll (got {wanted!r})"
        raise BackendError(msg)
    if wanted == "poll":
        if trace_required_by:
            msg = f"{trace_required_by} asks for the tracer, and PSLEAK_BACKEND=poll refuses it"
            raise BackendError(msg)
        return PollBackend()
    daemon = os.environ.get("PSLEAK_SOCKET") or (DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None)
    daemon_error = None
    if daemon:
        try:
            _connect(daemon).close()
        except BackendError as err:
            if os.environ.get("PSLEAK_SOCKET"):
                msg = f"PSLEAK_SOCKET={daemon}, but the daemon cannot trace this process: {err}"
                raise BackendError(msg) from None
            daemon_error = err
        else:
            return Tracer(daemon, why=f"the psleak daemon at {daemon} answers")
    why = _native.tracer_unavailable()
    if why is None:
        return Tracer()
    if wanted == "trace" or trace_required_by:
        msg = f"{trace_required_by or 'PSLEAK_BACKEND=trace'}, but the tracer cannot work here: {why}"
        if daemon_error is not None:
            msg += f"; and {daemon_error}"
        elif not daemon and sys.platform != "win32":
            msg += f"; or {TRACER_HINT}"
        raise BackendError(msg)
    because = f"the tracer cannot work here: {why}"
    if daemon_error is not None:
        because += f"; and {daemon_error}"
    return PollBackend(because)
