"""pytest plugin (registered by the package): leak-check plain pytest functions.

* ``@pytest.mark.psleak(times=..., checkers=..., ...)`` runs the marked test function through
  ``MemoryLeakTestCase.execute`` with those arguments (its fixtures are set up once); the
  arguments are checked when the tests are collected: a wrong one is a collection error.
* The ``psleak`` fixture is a ``MemoryLeakTestCase`` whose ``execute`` a test may call itself.
* ``--psleak-require=checks|trace`` (or ``PSLEAK_REQUIRE``): a check that cannot run fails the
  test instead of skipping it; ``trace``: and the session stops at once without the tracer.
* ``--psleak-report=PATH`` writes every test that called ``execute`` as JSON (the schema:
  ``report.schema.json`` beside this file); under pytest-xdist, the controller writes the
  workers' tests.
* The session's header says which backend judges, why, and how to get the tracer.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os

import pytest

import psleak as _psleak
from psleak import _backends, _testcase
from psleak._checkers import Checkers

# The report's layout: a reader checks it before anything else (report.schema.json).
REPORT_SCHEMA = 1


def pytest_addoption(parser):
    group = parser.getgroup("psleak")
    group.addoption(
        "--psleak-report",
        metavar="PATH",
        default=None,
        help="write every test that called psleak's execute() (outcome, backend, sites) to PATH as JSON",
    )
    group.addoption(
        "--psleak-require",
        choices=_backends.REQUIREMENTS,
        default=None,
        help="checks: a leak check that cannot run fails its test instead of skipping it; trace: the same, "
        "and the session stops unless the exact tracer can run (default: PSLEAK_REQUIRE, else nothing)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "psleak(**execute_kwargs): run the test function through psleak's MemoryLeakTestCase.execute"
        f" ({', '.join(_testcase.EXECUTE_OPTIONS)})",
    )
    config._psleak_findings = _Findings()
    config.pluginmanager.register(config._psleak_findings, "psleak-findings")
    level = config.getoption("psleak_require")
    try:
        if level is not None:
            _backends.require(level, f"--psleak-require={level}")
        # Chosen now, so that a wrong PSLEAK_BACKEND or PSLEAK_SOCKET is one usage error.
        config._psleak_backend = _backends.current()
    except _backends.BackendError as err:
        raise pytest.UsageError(f"psleak: {err}") from None


def pytest_report_header(config):
    backend = config._psleak_backend
    lines = [f"psleak {_psleak.__version__}: {backend.describe()}", f"  chosen because {backend.why}"]
    if not backend.exact:
        lines.append(f"  for exact checks that name each leak's site: run as root, or {_backends.TRACER_HINT}")
        if os.environ.get("PYTHONMALLOC") != "malloc":
            lines.append("  memory checks are skipped: PYTHONMALLOC=malloc is not set")
    required = _backends.requirement()
    if required is not None:
        lines.append(f"  {required[1]}: a check that cannot run fails its test")
    return lines


class _Case(_psleak.MemoryLeakTestCase):
    def runTest(self):
        pass


@pytest.fixture(name="psleak")
def psleak_fixture():
    """A ``MemoryLeakTestCase`` to call ``execute`` on from a plain test."""
    return _Case()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test file whose psleak markers execute() would refuse does not collect: the session
    stops at collection with its error, which names each of them. (A usage error raised in a
    pytest-xdist worker would crash it.)"""
    outcome = yield
    report = outcome.get_result()
    if not report.passed:
        return
    problems = []
    for item in report.result:
        marker = item.get_closest_marker("psleak") if isinstance(item, pytest.Item) else None
        problem = marker and _marker_problem(marker)
        if problem:
            problems.append(f"{item.nodeid}: @pytest.mark.psleak: {problem}")
    if problems:
        report.outcome, report.longrepr, report.result = "failed", "\n".join(problems), []


def _marker_problem(marker):
    """What is wrong with a psleak marker's arguments, or None."""
    if marker.args:
        return f"takes keyword arguments only (got {marker.args!r})"
    for name in marker.kwargs:
        if name not in _testcase.EXECUTE_OPTIONS:
            close = difflib.get_close_matches(name, _testcase.EXECUTE_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown argument {name!r}{hint}; it takes {', '.join(_testcase.EXECUTE_OPTIONS)}"
    options = {name: getattr(_Case, name) for name in _testcase.EXECUTE_OPTIONS}
    options.update(marker.kwargs)
    try:
        Checkers._of(options.pop("checkers"))
        _Case()._validate_opts(**options)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    __tracebackhide__ = True
    marker = pyfuncitem.get_closest_marker("psleak")
    if marker is None:
        return None
    funcargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    test = pyfuncitem.obj

    def fun():
        __tracebackhide__ = True
        test(**funcargs)

    fun.__qualname__ = getattr(test, "__qualname__", pyfuncitem.name)
    try:
        _Case().execute(fun, **marker.kwargs)
    except _psleak.Error as err:
        _raise_at_the_test(err, test)
    return True


def _raise_at_the_test(err, test):
    """Raises ``err`` from the marked test's own lines: the test's file and first line are
    what pytest then shows above psleak's message (the test itself only returned)."""
    __tracebackhide__ = True
    try:
        path, line = inspect.getsourcefile(test), inspect.getsourcelines(test)[1]
    except (OSError, TypeError):
        raise err from None
    # A raise on the test's first line (its marker), the only line pytest then shows.
    code = compile("raise psleak_error", path, "exec").replace(co_firstlineno=line)
    exec(code, {"psleak_error": err})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if call.when == "setup":
        _testcase.executions = []
    # Seen before pytest's unittest support replaces it by its own skip.
    unchecked = call.excinfo is not None and isinstance(call.excinfo.value, _testcase.Unchecked)
    outcome = yield
    if call.when != "call":
        return
    report = outcome.get_result()
    if report.skipped and unchecked:
        # At the test, not at psleak's raise.
        path, line, _ = item.reportinfo()
        report.longrepr = (str(path), (line or 0) + 1, f"Skipped: {call.excinfo.value}")
    marked = item.get_closest_marker("psleak") is not None or "psleak" in getattr(item, "fixturenames", ())
    if not (marked or _testcase.executions):
        return
    finding = _finding(item, call, report)
    # A report's user_properties reach the controller under pytest-xdist.
    report.user_properties.append(("psleak", finding))


def _finding(item, call, report):
    """A test's entry in the report (report.schema.json)."""
    runs = list(_testcase.executions or ())
    finding = {
        "test": item.nodeid,
        "outcome": report.outcome,
        "duration_s": round(report.duration, 6),
        "backend": item.config._psleak_backend.name,
        "skip_reason": None,
        "calls": sum(run["calls"] for run in runs),
        "batches": sum(run["batches"] for run in runs),
        "executions": [dict(run) for run in runs],
        "error": None,
    }
    if report.skipped and isinstance(report.longrepr, tuple):
        finding["skip_reason"] = report.longrepr[2].removeprefix("Skipped: ")
    if call.excinfo is not None and isinstance(call.excinfo.value, _psleak.Error):
        finding["error"] = _error(call.excinfo.value)
    return finding


def _error(err):
    """A psleak error, structured: its type, message, and what it found where."""
    error = {"type": type(err).__name__, "message": str(err), "count": None, "sites": [], "resources": []}
    if isinstance(err, _psleak.MemoryLeakError):
        error["sites"] = err.sites
    if isinstance(err, _psleak.UnclosedResourceError):
        error["count"] = err.count
        error["resources"] = [_resource(extra) for extra in err.extras or ()]
    return error


def _resource(extra):
    """An fd, thread, handle or heap of an error's list, with the collector's frames where the
    tracer named them; any other object (GC garbage, a Python thread) as its repr."""
    if not isinstance(extra, _psleak._resources._Sited):
        return {"type": type(extra).__name__, "repr": repr(extra)}
    fields = {name: value for name, value in vars(extra).items() if name not in {"site", "stack", "origin"}}
    origin = extra.origin or {}
    return {
        "type": type(extra).__name__,
        "repr": repr(extra),
        **fields,
        "site_text": extra.site or None,
        **{name: origin.get(name) for name in _psleak._resources.ORIGIN_FIELDS},
    }


class _Findings:
    """The session's findings, as the reports of its tests bring them (the workers' too, under
    pytest-xdist)."""

    def __init__(self):
        self.findings = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.findings.extend(value for name, value in report.user_properties if name == "psleak")


def pytest_terminal_summary(terminalreporter, config):
    found = [f for f in config._psleak_findings.findings if f["error"] and f["backend"] == "poll"]
    if found:
        leaks = f"{len(found)} leak" + ("s" if len(found) > 1 else "")
        said = f"psleak: {leaks} found by polling, which cannot say where; {_testcase.POLL_HINT}"
        terminalreporter.write_line(said)


def pytest_sessionfinish(session):
    path = session.config.getoption("psleak_report")
    # Under pytest-xdist only the controller writes: its findings are the workers'.
    if not path or hasattr(session.config, "workerinput"):
        return
    backend = session.config._psleak_backend
    report = {
        "schema": REPORT_SCHEMA,
        "psleak": _psleak.__version__,
        "backend": {"name": backend.name, "why": backend.why},
        "findings": session.config._psleak_findings.findings,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=repr)
