"""A leak in an extension built as wheels are (-O2 without frame pointers, stripped): the message
names the test's own line, then the extension's frames as module+offset (issue 16)."""

import re
import sys

import pytest

from psleak import MemoryLeakError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the extension is built for Linux")


def test_a_stripped_extensions_leak_is_named_by_the_line_that_called_it(psleak, backend):
    import stripped_ext

    def leaks_blocks():
        stripped_ext.leak_blocks(1)

    psleak.times, psleak.warmup_times = 50, 2
    with pytest.raises(MemoryLeakError) as info:
        psleak.execute(leaks_blocks)
    message = str(info.value)
    assert "runs of 'test_a_stripped_extensions_leak_is_named_by_the_line_that_called_it.<locals>.leaks_blocks'" in (
        message
    ), message
    if backend == "trace":
        line = leaks_blocks.__code__.co_firstlineno + 1
        assert f"* leaks_blocks (test_stripped_ext.py:{line}) → stripped_ext." in message, message
        # The static helper that called malloc, the one that called it, and the module function.
        frames = re.findall(r"^ +stripped_ext\.\S+\.so\+0x[0-9a-f]+$", message, re.MULTILINE)
        assert len(frames) >= 3, message
        # Then the Python frames: the tested function's and the test's, not psleak's between them.
        assert (
            "    test_a_stripped_extensions_leak_is_named_by_the_line_that_called_it (test_stripped_ext.py:" in message
        )
        assert "_testcase.py" not in message, message
