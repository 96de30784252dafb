"""The pytest plugin (marker, fixture, JSON report) and how the backend is chosen."""

import json
import os
import re
import subprocess
import sys
import textwrap

import psleak

HERE = os.path.dirname(__file__)

LEAKY_TESTS = """
    import os
    import pytest
    from psleak import Checkers

    @pytest.mark.psleak(times=10, warmup_times=1, checkers=Checkers.only("fds"))
    def test_opens_and_forgets(tmp_path):
        os.open(tmp_path / "kept", os.O_CREAT | os.O_RDONLY)

    @pytest.mark.psleak(times=10, warmup_times=1, checkers=Checkers.only("fds"))
    def test_opens_and_closes(tmp_path):
        os.close(os.open(tmp_path / "kept", os.O_CREAT | os.O_RDONLY))

    def test_with_the_fixture(psleak):
        psleak.execute(lambda: None, checkers=Checkers.only("fds", "c_threads"))
"""


def run_pytest(tmp_path, source, *args, env=None):
    test_file = tmp_path / "test_user.py"
    test_file.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env or os.environ,
        check=False,
    )


def test_marker_fixture_and_report(tmp_path, backend):
    report = tmp_path / "findings.json"
    result = run_pytest(tmp_path, LEAKY_TESTS, f"--psleak-report={report}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 2 passed" in result.stdout, result.stdout
    findings = {f["test"].split("::")[1]: f for f in json.loads(report.read_text())["findings"]}
    leak = findings["test_opens_and_forgets"]
    error = leak["error"]
    assert (leak["outcome"], error["type"], error["count"], leak["backend"]) == (
        "failed",
        "UnclosedFdError",
        1,
        backend,
    )
    assert error["resources"][0]["path"].endswith("kept")
    if backend == "trace":
        assert error["resources"][0]["called_from"]["function"] == "test_opens_and_forgets", leak
    assert findings["test_opens_and_closes"]["outcome"] == "passed"
    assert findings["test_with_the_fixture"]["outcome"] == "passed"
    assert findings["test_with_the_fixture"]["calls"] == 2, "a first call, then the counted one"


def test_marker_rejects_positional_arguments(tmp_path):
    result = run_pytest(tmp_path, "import pytest\n@pytest.mark.psleak(5)\ndef test_x():\n    pass\n")
    assert result.returncode != 0
    assert "keyword arguments only" in result.stdout + result.stderr


def test_the_backend_is_visible(backend):
    class Case(psleak.MemoryLeakTestCase):
        def runTest(self):
            pass

    assert Case().backend == backend
    wanted = os.environ.get("PSLEAK_BACKEND", "auto")
    assert wanted == "auto" or wanted == backend


SCRIPT = """
import psleak
class Case(psleak.MemoryLeakTestCase):
    def runTest(self):
        pass
case = Case()
print(case.backend)
case.execute(lambda: None, checkers=psleak.Checkers.only("fds"))
"""


def without_cap_sys_admin(env):
    """Runs this Python without CAP_SYS_ADMIN, as an unprivileged test process would be."""
    cmd = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", sys.executable, "-c", SCRIPT]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)


def test_auto_falls_back_to_polling_without_privileges():
    result = without_cap_sys_admin({"PSLEAK_BACKEND": "auto"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["poll"]


def test_forcing_the_tracer_without_privileges_says_why():
    result = without_cap_sys_admin({"PSLEAK_BACKEND": "trace"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "BackendError: PSLEAK_BACKEND=trace, but the tracer cannot work here: loading eBPF probes needs root" in last


def test_forcing_the_tracer_without_privileges_points_at_the_daemon():
    result = without_cap_sys_admin({"PSLEAK_BACKEND": "trace"})
    assert "or have root run `psleak daemon` and set PSLEAK_SOCKET" in result.stderr


def test_a_psleak_socket_that_nobody_answers_is_an_error(tmp_path):
    socket_path = tmp_path / "psleak.sock"
    result = without_cap_sys_admin({"PSLEAK_BACKEND": "auto", "PSLEAK_SOCKET": str(socket_path)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    expected = (
        f"BackendError: PSLEAK_SOCKET={socket_path}, but the daemon cannot trace this process: no psleak daemon answers"
    )
    assert expected in last


def test_an_unknown_backend_is_refused():
    result = without_cap_sys_admin({"PSLEAK_BACKEND": "ptrace"})
    assert "PSLEAK_BACKEND must be auto, trace or poll (got 'ptrace')" in result.stderr


def test_auto_takes_the_tracer_when_privileged():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "PSLEAK_BACKEND": "auto"},
        check=False,
    )
    assert result.stdout.split() == ["trace"], result.stderr


def test_the_tracer_says_what_it_is():
    script = "from psleak import _backends; print(_backends.TraceSession().describe())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert re.fullmatch(r"trace \(eBPF, collector pid \d+, \d+ probes\)\n", result.stdout), (
        result.stdout + result.stderr
    )


def test_the_psleak_command_comes_with_the_package():
    psleak_script = os.path.join(os.path.dirname(sys.executable), "psleak")
    version = subprocess.run([psleak_script, "--version"], capture_output=True, text=True, check=False)
    assert (version.returncode, version.stdout.split()[0]) == (0, "psleak"), version
    refused = subprocess.run(
        [sys.executable, "-m", "psleak", "daemon", "--status", "--socket", "/nonexistent/psleak.sock"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "psleak: no psleak daemon answers on /nonexistent/psleak.sock: No such file or directory (os error 2)"
    ]


LEAKY_SCRIPT = """
import unittest, psleak
kept = []
class Case(psleak.MemoryLeakTestCase):
    def runTest(self):
        pass
try:
    Case().execute(lambda: kept.append(len(kept) * 1000003))
    print("no leak found")
except unittest.SkipTest as e:
    print("skipped:", e)
except psleak.MemoryLeakError as e:
    print("leak:", str(e).splitlines()[0])
"""


def run_leaky_script(python, pythonmalloc):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    env.update({"PYTHONPATH": os.path.dirname(os.path.dirname(psleak.__file__)), "PSLEAK_BACKEND": "trace"})
    if pythonmalloc:
        env["PYTHONMALLOC"] = pythonmalloc
    result = subprocess.run([python, "-c", LEAKY_SCRIPT], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_python_that_inlines_its_allocator_is_judged_by_its_block_count():
    """Debian's python3 (built with LTO) makes objects out of the probes' sight unless
    PYTHONMALLOC=malloc; CPython's block count sees them all the same, and judges."""
    debian = "/usr/bin/python3"  # installed by `cargo xtask setup`
    for python in (debian, sys.executable):
        for pythonmalloc in (None, "malloc"):
            outcome = run_leaky_script(python, pythonmalloc)
            assert outcome.startswith("leak: memory kept increasing"), (python, pythonmalloc, outcome)


def test_a_daemon_older_than_the_allocator_choice_still_serves(tmp_path):
    # A psleak daemon built before sessions could leave allocators unprobed refuses the field
    # (its Opening denies unknown fields, keeping the connection): the client attaches again
    # without it. The server speaks that daemon's replies verbatim; no daemon of that build is
    # installed here.
    import socket
    import threading

    import psleak._backends as backends

    path = str(tmp_path / "old.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    asked = []

    def serve():
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                request = json.loads(line)
                asked.append(request)
                if request["op"] == "attach" and "allocators" in request:
                    reply = {
                        "ok": False,
                        "error": "bad request: unknown field `allocators`, expected `pid` or "
                        "`version` at line 1 column 60 (a connection starts with attach or status)",
                    }
                elif request["op"] == "attach":
                    reply = {"ok": True, "version": 1, "pid": request["pid"], "backend": "eBPF", "probes": 46}
                else:
                    reply = {"ok": True}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    session = backends.TraceSession(path, "none")
    try:
        assert session.ready["probes"] == 46
    finally:
        session.close()
    thread.join(timeout=10)
    server.close()
    assert [r["op"] for r in asked] == ["attach", "attach", "hello"]
    assert asked[0]["allocators"] == "none" and "allocators" not in asked[1]


def test_public_names_are_psleaks_where_users_meet_them():
    # The implementation lives in private modules; a traceback says psleak.MemoryLeakError.
    assert {getattr(psleak, name).__module__ for name in psleak.__all__} == {"psleak"}
    assert repr(psleak.MemoryLeakError) == "<class 'psleak.MemoryLeakError'>"


def test_sizes_are_printed_as_the_collector_prints_them():
    # One format, Rust's (psleak::report::text::human_bytes), in the messages and in `psleak trace`.
    assert [psleak.human_bytes(n) for n in (928, 1024, 1536, 3 << 20)] == ["928B", "1.0K", "1.5K", "3.0M"]
    assert "heap=+2.0K" in psleak.format_run_line(1, {"heap": 2048}, 100)
