"""What a user sees of the pytest plugin: the header, --psleak-require, checks that run whatever
happens to the memory check, failures trimmed to the user's lines, usage errors, and the JSON
report (its schema, every test that called execute, pytest-xdist). Each runs a real pytest on a
user's test file in a subprocess."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest

import psleak

SCHEMA = os.path.join(os.path.dirname(psleak.__file__), "report.schema.json")

USER_TESTS = """
    import ctypes
    import os
    import unittest

    import pytest
    import psleak

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p

    @pytest.mark.psleak(times=10, warmup_times=1, checkers="fds")
    def test_forgets_an_fd(tmp_path):
        os.open(tmp_path / "kept", os.O_CREAT | os.O_RDONLY)  # FD_LINE

    @pytest.mark.psleak(times=50, checkers=["memory"])
    def test_forgets_a_block():
        libc.malloc(5000)  # BLOCK_LINE

    def test_closes_with_the_fixture(psleak, tmp_path):
        psleak.execute(lambda: os.close(os.open(tmp_path / "x", os.O_CREAT | os.O_RDONLY)))

    class TestCase(psleak.MemoryLeakTestCase):
        def test_clean(self):
            self.execute(lambda: None, checkers=("fds", "c_threads"))

    def test_not_a_leak_test():
        pass
"""


def line_of(marker):
    return next(n for n, line in enumerate(textwrap.dedent(USER_TESTS).splitlines(), 1) if marker in line)


def run_pytest(tmp_path, *args, source=USER_TESTS, env=(), unprivileged=False):
    (tmp_path / "test_user.py").write_text(textwrap.dedent(source))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:instafail", "-rfs", *args]
    if unprivileged:
        command = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", *command]
    environment = {**os.environ, "COLUMNS": "400", **dict(env)}
    for name in ("PSLEAK_REQUIRE", "PSLEAK_SOCKET"):
        if name not in dict(env):
            environment.pop(name, None)
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, check=False)


def test_the_header_names_the_backend_and_why(tmp_path, backend):
    result = run_pytest(tmp_path, "-k", "not_a_leak")
    header = result.stdout
    assert f"psleak {psleak.__version__}: {backend} (" in header, header
    if backend == "trace":
        assert "chosen because this process may load eBPF probes" in header, header
    else:
        assert "chosen because PSLEAK_BACKEND=poll" in header, header


def test_without_privileges_the_header_says_how_to_get_the_tracer(tmp_path):
    result = run_pytest(
        tmp_path, "-k", "not_a_leak", env={"PSLEAK_BACKEND": "auto", "PYTHONMALLOC": ""}, unprivileged=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "psleak 0.2.0: poll (" in result.stdout
    assert "chosen because the tracer cannot work here: loading eBPF probes needs root" in result.stdout
    assert "for exact checks that name each leak's site: run as root, or have root run `psleak daemon`" in result.stdout
    assert "memory checks are skipped: PYTHONMALLOC=malloc is not set" in result.stdout


def test_requiring_the_tracer_without_it_stops_the_session_in_one_line(tmp_path):
    for how in (["--psleak-require=trace"], []):
        env = {"PSLEAK_BACKEND": "auto"} if how else {"PSLEAK_BACKEND": "auto", "PSLEAK_REQUIRE": "trace"}
        result = run_pytest(tmp_path, *how, env=env, unprivileged=True)
        who = "--psleak-require=trace" if how else "PSLEAK_REQUIRE=trace"
        assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
        assert f"ERROR: psleak: {who}, but the tracer cannot work here: loading eBPF probes needs root" in result.stderr
        assert "INTERNALERROR" not in result.stdout + result.stderr
        assert "passed" not in result.stdout, "no test ran"


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"PSLEAK_BACKEND": "trace"}, "ERROR: psleak: PSLEAK_BACKEND=trace, but the tracer cannot work here"),
        ({"PSLEAK_BACKEND": "ptrace"}, "ERROR: psleak: PSLEAK_BACKEND must be auto, trace or poll (got 'ptrace')"),
        (
            {"PSLEAK_BACKEND": "auto", "PSLEAK_SOCKET": "/nonexistent/psleak.sock"},
            "ERROR: psleak: PSLEAK_SOCKET=/nonexistent/psleak.sock, but",
        ),
        ({"PSLEAK_REQUIRE": "everything"}, "ERROR: psleak: PSLEAK_REQUIRE must be checks or trace (got 'everything')"),
    ],
    ids=["trace-unprivileged", "unknown-backend", "nobody-at-the-socket", "unknown-requirement"],
)
def test_a_configuration_mistake_is_one_usage_error(tmp_path, env, said):
    result = run_pytest(tmp_path, env=env, unprivileged=True)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(said), result.stderr
    assert "INTERNALERROR" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("marker", "said"),
    [
        ("times=5, retries=1, time=5", "unknown argument 'time' (did you mean 'times'?)"),
        ('checkers="fd"', "invalid checker names: 'fd' (did you mean 'fds'?)"),
        ("checkers=5", "checkers must be a Checkers, a checker's name or a list of names (got 5)"),
        ("times=1", "times must be >= 2 (got 1)"),
        ("5", "takes keyword arguments only (got (5,))"),
    ],
    ids=["misspelled", "unknown-checker", "checkers-not-names", "bad-value", "positional"],
)
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["alone", "xdist"])
def test_a_wrong_marker_is_refused_at_collection(tmp_path, marker, said, workers):
    # As a test file that does not import: the session stops with the collection error, which
    # names the test and what is wrong (under pytest-xdist, a usage error crashed the workers).
    source = f"import pytest\n@pytest.mark.psleak({marker})\ndef test_x():\n    pass\n\ndef test_y():\n    pass\n"
    result = run_pytest(tmp_path, *workers, source=source)
    # pytest-xdist says a collection error with its own exit status.
    stopped = pytest.ExitCode.TESTS_FAILED if workers else pytest.ExitCode.INTERRUPTED
    assert result.returncode == stopped, result.stdout + result.stderr
    assert "ERROR collecting test_user.py" in result.stdout, result.stdout
    assert f"test_user.py::test_x: @pytest.mark.psleak: {said}" in result.stdout, result.stdout
    assert "INTERNALERROR" not in result.stdout + result.stderr
    assert "passed" not in result.stdout, "no test ran"


def test_checkers_take_what_a_user_would_write():
    assert psleak.Checkers._of("fds") == psleak.Checkers.only("fds")
    assert psleak.Checkers._of(["fds", "c_threads"]) == psleak.Checkers.only("fds", "c_threads")
    assert psleak.Checkers._of(psleak.Checkers.exclude("memory")) == psleak.Checkers.exclude("memory")
    with pytest.raises(TypeError, match="a checker's name or a list of names"):
        psleak.Checkers._of({"fds": True})


def test_fds_are_checked_when_memory_cannot_be(tmp_path):
    """Polling without PYTHONMALLOC=malloc cannot check memory: the fd leak is caught anyway,
    and a test that checks memory is skipped at its own line, saying why."""
    result = run_pytest(tmp_path, env={"PSLEAK_BACKEND": "poll", "PYTHONMALLOC": ""})
    assert "1 failed, 2 passed, 2 skipped" in result.stdout, result.stdout
    assert "FAILED test_user.py::test_forgets_an_fd - psleak.UnclosedFdError: detected 1 unclosed" in result.stdout
    skip = f"SKIPPED [1] test_user.py:{line_of('test_forgets_a_block') - 1}: memory not checked: PYTHONMALLOC=malloc"
    assert skip in result.stdout, result.stdout
    assert "psleak: 1 leak found by polling, which cannot say where; the tracer would name the site" in result.stdout
    if sys.version_info >= (3, 11):
        assert "(found by polling, which cannot say where; the tracer would name" in failure_of(
            result.stdout, "test_forgets_an_fd"
        )


def test_requiring_every_check_fails_what_would_be_skipped(tmp_path):
    result = run_pytest(tmp_path, "--psleak-require=checks", env={"PSLEAK_BACKEND": "poll", "PYTHONMALLOC": ""})
    assert "3 failed, 2 passed" in result.stdout, result.stdout
    expected = (
        "FAILED test_user.py::test_forgets_a_block - psleak.Error: the memory check of 'test_forgets_a_block' "
        "could not run: PYTHONMALLOC=malloc was not set (needed by the polling backend); "
        "--psleak-require=checks makes that a failure"
    )
    assert expected in result.stdout, result.stdout


def failure_of(stdout, test):
    return stdout.split(f"_ {test} _", 1)[1].split("\n_", 1)[0].split("=====", 1)[0]


def test_a_failure_shows_the_users_lines_and_the_summary_names_the_site(tmp_path, backend):
    result = run_pytest(tmp_path, env={"PYTHONMALLOC": "malloc"})
    assert "2 failed, 3 passed" in result.stdout, result.stdout + result.stderr
    fd_failure = failure_of(result.stdout, "test_forgets_an_fd")
    source_lines = [line for line in fd_failure.splitlines() if line.startswith(">")]
    assert source_lines == ['>   @pytest.mark.psleak(times=10, warmup_times=1, checkers="fds")'], fd_failure
    assert "psleak/" not in fd_failure, "none of psleak's own frames"
    assert len(fd_failure.splitlines()) < 12, fd_failure
    if backend == "trace":
        summary = re.search(r"FAILED test_user.py::test_forgets_an_fd - (.*)", result.stdout)[1]
        assert f"the first opened by test_forgets_an_fd (test_user.py:{line_of('FD_LINE')})" in summary
        summary = re.search(r"FAILED test_user.py::test_forgets_a_block - (.*)", result.stdout)[1]
        assert f"top site: test_forgets_a_block (test_user.py:{line_of('BLOCK_LINE')})" in summary
        memory_failure = failure_of(result.stdout, "test_forgets_a_block")
        assert "_pytest" not in memory_failure and "pluggy" not in memory_failure, "nor the runner's below the test"


def test_a_failure_through_the_fixture_shows_the_call(tmp_path):
    source = """
        import os

        def test_fixture(psleak, tmp_path):
            psleak.execute(lambda: os.open(tmp_path / "x", os.O_CREAT | os.O_RDONLY), checkers="fds")
    """
    result = run_pytest(tmp_path, source=source)
    failure = failure_of(result.stdout, "test_fixture")
    assert [line for line in failure.splitlines() if line.startswith(">")] == [
        '>       psleak.execute(lambda: os.open(tmp_path / "x", os.O_CREAT | os.O_RDONLY), checkers="fds")'
    ], failure
    assert "psleak/" not in failure


def check_report(path, backend):
    report = json.loads(path.read_text())
    with open(SCHEMA) as f:
        jsonschema.validate(report, json.load(f))
    assert (report["schema"], report["psleak"], report["backend"]["name"]) == (1, psleak.__version__, backend)
    return {finding["test"].split("::", 1)[1]: finding for finding in report["findings"]}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["alone", "xdist"])
def test_the_report_has_every_test_that_called_execute(tmp_path, backend, workers):
    report = tmp_path / "report.json"
    result = run_pytest(tmp_path, f"--psleak-report={report}", *workers, env={"PYTHONMALLOC": "malloc"})
    assert "2 failed, 3 passed" in result.stdout, result.stdout + result.stderr
    findings = check_report(report, backend)
    assert sorted(findings) == [
        "TestCase::test_clean",
        "test_closes_with_the_fixture",
        "test_forgets_a_block",
        "test_forgets_an_fd",
    ]
    assert findings["TestCase::test_clean"]["outcome"] == "passed"
    assert findings["TestCase::test_clean"]["executions"][0]["function"] == "TestCase.test_clean.<locals>.<lambda>"
    fd = findings["test_forgets_an_fd"]
    assert (fd["outcome"], fd["error"]["type"], fd["error"]["count"]) == ("failed", "UnclosedFdError", 1)
    (resource,) = fd["error"]["resources"]
    assert (resource["type"], resource["kind"]) == ("OpenFd", "file") and resource["path"].endswith("kept")
    block = findings["test_forgets_a_block"]["error"]
    if backend == "trace":
        assert resource["called_from"] == {
            "function": "test_forgets_an_fd",
            "file": str(tmp_path / "test_user.py"),
            "line": line_of("FD_LINE"),
            "text": f"test_forgets_an_fd (test_user.py:{line_of('FD_LINE')})",
        }, resource
        top = block["sites"][0]
        assert top["called_from"]["line"] == line_of("BLOCK_LINE"), top
        assert top["memory"] == {"kind": "heap", "domain": "libc"} and top["stack"][0]["module"], top
    else:
        assert resource["site"] is None and block["sites"] == []


def test_the_report_says_why_a_test_was_skipped(tmp_path):
    report = tmp_path / "report.json"
    run_pytest(tmp_path, f"--psleak-report={report}", env={"PSLEAK_BACKEND": "poll", "PYTHONMALLOC": ""})
    skipped = check_report(report, "poll")["test_forgets_a_block"]
    assert skipped["outcome"] == "skipped"
    assert skipped["skip_reason"].startswith("memory not checked: PYTHONMALLOC=malloc was not set"), skipped


def test_tolerance_takes_any_mapping(psleak):
    """The types say Mapping: a read-only one is a tolerance per metric like a dict."""
    import types

    psleak.execute(lambda: None, tolerance=types.MappingProxyType({"heap": 4096}), checkers="fds")
    with pytest.raises(ValueError, match="invalid tolerance key 'heap_bytes'"):
        psleak.execute(lambda: None, tolerance=types.MappingProxyType({"heap_bytes": 1}))
