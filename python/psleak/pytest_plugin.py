"""pytest plugin (registered by the package): leak-check plain pytest functions.

* ``@pytest.mark.psleak(times=..., checkers=..., ...)`` runs the marked test function through
  ``MemoryLeakTestCase.execute`` with those arguments (its fixtures are set up once).
* The ``psleak`` fixture is a ``MemoryLeakTestCase`` whose ``execute`` a test may call itself.
* ``--psleak-report=PATH`` writes the findings of the session as JSON.
"""

import json
import unittest

import pytest

import psleak as _psleak
from psleak import _backends


def pytest_addoption(parser):
    group = parser.getgroup("psleak")
    group.addoption(
        "--psleak-report",
        metavar="PATH",
        default=None,
        help="write the psleak findings of this session (one entry per leak-checked test) as JSON",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "psleak(**execute_kwargs): run the test function through psleak's MemoryLeakTestCase.execute"
        " (times, retries, warmup_times, tolerance, trim_callback, checkers)",
    )
    config._psleak_findings = []


class _Case(_psleak.MemoryLeakTestCase):
    def runTest(self):
        pass


@pytest.fixture(name="psleak")
def psleak_fixture():
    """A ``MemoryLeakTestCase`` to call ``execute`` on from a plain test."""
    return _Case()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("psleak")
    if marker is None:
        return None
    if marker.args:
        msg = f"{pyfuncitem.nodeid}: @pytest.mark.psleak takes keyword arguments only (got {marker.args!r})"
        raise pytest.UsageError(msg)
    funcargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    test = pyfuncitem.obj

    def fun():
        test(**funcargs)

    fun.__qualname__ = getattr(test, "__qualname__", pyfuncitem.name)
    pyfuncitem._psleak_case = case = _Case()
    try:
        case.execute(fun, **marker.kwargs)
    except unittest.SkipTest as skip:
        pytest.skip(str(skip))
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    checked = item.get_closest_marker("psleak") is not None or "psleak" in getattr(item, "fixturenames", ())
    if call.when != "call" or not checked:
        return
    finding = {"test": item.nodeid, "outcome": report.outcome, "backend": _backends.current().name}
    case = getattr(item, "funcargs", {}).get("psleak") or getattr(item, "_psleak_case", None)
    if case is not None and hasattr(case, "last_run"):
        finding["calls"] = case.last_run["calls"]
        finding["batches"] = case.last_run["batches"]
    if call.excinfo is not None and isinstance(call.excinfo.value, _psleak.Error):
        err = call.excinfo.value
        finding["error"] = type(err).__name__
        finding["message"] = str(err)
        if isinstance(err, _psleak.UnclosedResourceError):
            finding["count"] = err.count
            finding["extras"] = [repr(e) for e in err.extras or ()]
    item.config._psleak_findings.append(finding)


def pytest_sessionfinish(session):
    path = session.config.getoption("psleak_report")
    if path:
        with open(path, "w") as f:
            json.dump({"findings": session.config._psleak_findings}, f, indent=2)
