"""Clients of `cargo xtask soak`, speaking psleak's daemon protocol from outside psleak's
package (the daemon must hold up against any client, not only ours).

    soak_client.py SOCKET LEAKY churn SECONDS|xN   attach, measure one batch, detach; again
    soak_client.py SOCKET LEAKY good SECONDS       one session: exact batches, again and again
    soak_client.py SOCKET LEAKY hostile SECONDS    every kind of bad client, one after another

Each prints one JSON line of counts when done. LEAKY is the leaking C target (tests/targets)."""

import json
import os
import random
import socket
import subprocess
import sys
import time

SOCKET, LEAKY, MODE, HOW_LONG = sys.argv[1:5]


def connect():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(SOCKET)
    return s, s.makefile("rb")


def ask(conn, **request):
    conn[0].sendall(json.dumps(request).encode() + b"\n")
    line = conn[1].readline()
    return json.loads(line) if line else {"ok": False, "error": "closed"}


class Target:
    """The leaky target of this user, driven on its stdin."""

    def __init__(self):
        self.process = subprocess.Popen([LEAKY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().startswith("ready")

    def run(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"


def batch(conn, target, n):
    """One measured batch of n leaks: whether the leak site came out exact."""
    m = ask(conn, op="begin")["measurement"]
    ask(conn, op="window", measurement=m)
    target.run(f"calloc {n} 64")
    reply = ask(conn, op="batch", measurement=m, calls=n, confirm=1)
    ask(conn, op="end", measurement=m)
    sites = [s for s in reply.get("sites", []) if s["site"] and s["site"].get("function") == "leak_calloc"]
    return bool(sites) and (sites[0]["count"], sites[0]["bytes"]) == (n, 64 * n)


def until_done():
    """Yields round numbers until the time (or the count, "xN") is up."""
    if HOW_LONG.startswith("x"):
        yield from range(int(HOW_LONG[1:]))
        return
    deadline, n = time.monotonic() + float(HOW_LONG), 0
    while time.monotonic() < deadline:
        yield n
        n += 1


def churn():
    target, counts = Target(), {"sessions": 0, "exact": 0, "refused": 0}
    for _ in until_done():
        conn = connect()
        ready = ask(conn, op="attach", pid=target.process.pid, version=1)
        if not ready.get("ok"):
            counts["refused"] += 1
            conn[0].close()
            time.sleep(0.05)
            continue
        counts["sessions"] += 1
        counts["exact"] += batch(conn, target, 3)
        ask(conn, op="detach")
        conn[0].close()
    return counts


def good():
    target, counts = Target(), {"batches": 0, "exact": 0}
    conn = connect()
    assert ask(conn, op="attach", pid=target.process.pid, version=1)["ok"]
    for n in until_done():
        counts["batches"] += 1
        counts["exact"] += batch(conn, target, 1 + n % 20)
        time.sleep(0.05)
    return counts


def hostile_rounds():
    """Each yields what a bad client does, once."""
    own = Target()

    def drip():
        s, _ = connect()
        for byte in b'{"op":"sta':
            s.send(bytes([byte]))
            time.sleep(0.3)
        s.close()

    def half_line_in_a_session():
        conn = connect()
        if ask(conn, op="attach", pid=own.process.pid, version=1).get("ok"):
            conn[0].sendall(b'{"op":"ma')
            time.sleep(1)
        conn[0].close()

    def endless_line():
        s, _ = connect()
        chunk = b"x" * (1 << 20)
        for _ in range(50):
            s.sendall(chunk)
        s.close()

    def garbage():
        conn = connect()
        for line in [b"\xff\xfe\n", b"{}\n", b'{"op":"attach","pid":1,"version":1}\n', os.urandom(512) + b"\n"]:
            conn[0].sendall(line)
        conn[0].close()

    def other_users_pid():
        conn = connect()
        ask(conn, op="attach", pid=1, version=1)
        conn[0].close()

    def silent_crowd():
        crowd = [connect() for _ in range(30)]
        time.sleep(1)
        for s, _ in crowd:
            s.close()

    def reads_nothing():
        conn = connect()
        if ask(conn, op="attach", pid=own.process.pid, version=1).get("ok"):
            for _ in range(2000):
                conn[0].sendall(b'{"op":"created","since":0}\n')
        conn[0].close()

    return [drip, half_line_in_a_session, endless_line, garbage, other_users_pid, silent_crowd, reads_nothing]


def hostile():
    rounds, counts = hostile_rounds(), {"attacks": 0, "errors": 0}
    for _ in until_done():
        try:
            random.choice(rounds)()
        except OSError:
            counts["errors"] += 1  # the daemon hung up on us, as it should
        counts["attacks"] += 1
    return counts


print(json.dumps({"churn": churn, "good": good, "hostile": hostile}[MODE]()), flush=True)
