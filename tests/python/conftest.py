"""Builds the deliberately leaking extensions for this session and makes them importable:
``leaky_ext`` (tests/python/ext) and, on Linux, ``stripped_ext`` (tests/python/ext/stripped_ext.cpp,
built as wheels are: -O2, no frame pointers, stripped)."""

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
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
if sys.platform.startswith("linux"):
    STRIPPED_EXT = os.path.join(BUILD_DIR, "stripped_ext" + sysconfig.get_config_var("EXT_SUFFIX"))
    SOURCE = os.path.join(EXT_DIR, "stripped_ext.cpp")
    FLAGS = ["-O2", "-fomit-frame-pointer", "-fPIC", "-shared", "-pthread", "-I", sysconfig.get_paths()["include"]]
    subprocess.run(["g++", *FLAGS, "-o", STRIPPED_EXT, SOURCE], check=True)
    subprocess.run(["strip", "-s", STRIPPED_EXT], check=True)
sys.path.insert(0, BUILD_DIR)


@pytest.fixture(scope="session")
def backend():
    from psleak import _backends

    return _backends.current().name
