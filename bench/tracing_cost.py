"""What tracing costs the code around a leak test, for `cargo xtask bench-cost`.

    python tracing_cost.py session OUT.json     one pytest session (run by the contender's
                                                Python, PSLEAK_BACKEND set by the caller):
                                                20 ordinary tests and 5 leak tests interleaved;
                                                writes each ordinary test's own time to OUT.json

The ordinary tests are what a user's suite is mostly made of: code that never asked to be
traced (here, building 100,000 small dicts). The leak tests are leaky_ext's: two leaks, three
clean functions, one of them allocation-heavy.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

SESSION = """
    import json, os, time
    import pytest
    import psleak
    import leaky_ext as ext

    TIMES = {}

    def ordinary():
        started = time.perf_counter()
        rows = [{"id": i, "name": str(i), "tags": [i, i + 1]} for i in range(100_000)]
        assert len(rows) == 100_000
        return time.perf_counter() - started

    LEAK_TESTS = [
        ("forget_free", (1,), psleak.MemoryLeakError),
        ("malloc_and_free", (64,), None),
        ("forget_free_of_a_node", (20_000,), psleak.MemoryLeakError),
        ("build_and_free_list", (20_000,), None),
        ("decref_list", (), None),
    ]

    class Leaks(psleak.MemoryLeakTestCase):
        pass

    def leak_test(name, args, error):
        case = Leaks("run")
        if error is None:
            case.execute(getattr(ext, name), *args)
        else:
            with pytest.raises(error):
                case.execute(getattr(ext, name), *args)

    def make(n):
        def test_ordinary():
            TIMES[n] = ordinary()
        return test_ordinary

    def make_leak(k):
        def test_leak():
            leak_test(*LEAK_TESTS[k])
        return test_leak

    for n in range(20):
        globals()[f"test_{n:02}_ordinary"] = make(n)
        if n % 4 == 3:
            globals()[f"test_{n:02}_leak"] = make_leak(n // 4)

    def test_zz_write():
        with open(os.environ["COST_OUT"], "w") as out:
            json.dump(TIMES, out)
"""


def session(out):
    with tempfile.TemporaryDirectory() as tmp:
        test = os.path.join(tmp, "test_cost.py")
        with open(test, "w") as f:
            f.write(textwrap.dedent(SESSION))
        env = {**os.environ, "COST_OUT": out}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", test]
        run = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            sys.exit(f"tracing_cost: the session failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["session"] and len(sys.argv) == 3:
        session(sys.argv[2])
    else:
        sys.exit(__doc__)
