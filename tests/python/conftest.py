"""Builds the deliberately leaking extension (tests/python/ext) for this session and makes it
importable as ``leaky_ext``."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

EXT_DIR = os.path.join(os.path.dirname(__file__), "ext")
BUILD_DIR = tempfile.mkdtemp(prefix="psleak-leaky-ext-")
atexit.register(shutil.rmtree, BUILD_DIR, ignore_errors=True)
subprocess.run(
    [
        sys.executable,
        "setup.py",
        "-q",
        "build_ext",
        "--build-lib",
        BUILD_DIR,
        "--build-temp",
        os.path.join(BUILD_DIR, "tmp"),
    ],
    cwd=EXT_DIR,
    check=True,
    stdout=subprocess.DEVNULL,
)
sys.path.insert(0, BUILD_DIR)


@pytest.fixture(scope="session")
def backend():
    from psleak import _backends

    return _backends.current().name
