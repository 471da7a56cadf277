"""A test module that asserts rates runs alone (l2crypt/lab/cpu_share.py), across processes."""

import os
import subprocess
import sys
import time

CHILD = """
import sys, time
from l2crypt.lab.cpu_share import share_cpu
with share_cpu(alone=sys.argv[1] == "alone"):
    print("in", time.time(), flush=True)
    time.sleep(float(sys.argv[2]))
    print("out", time.time(), flush=True)
"""


def child(env, mode: str, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(hold_s)], env=env, stdout=subprocess.PIPE,
                            text=True)


def wait_line(proc: subprocess.Popen, timeout_s: float = 10.0) -> str:  # the first line only
    start = time.monotonic()
    line = proc.stdout.readline().strip()
    assert time.monotonic() - start < timeout_s
    return line


def test_an_alone_module_waits_for_the_running_ones_and_keeps_new_ones_out(tmp_path):
    env = dict(os.environ, L2CRYPT_TESTS_CPU_LOCK=str(tmp_path / "cpu.lock"), L2CRYPT_TESTS_CPU_WAIT_S="30",
               PYTHONPATH=os.getcwd())
    running = child(env, "shared", 1.5)
    assert wait_line(running).startswith("in ")
    alone = child(env, "alone", 1.5)
    time.sleep(0.3)  # it is waiting now
    later = child(env, "shared", 0.1)
    entered = {}
    for name, proc in (("running", running), ("alone", alone), ("later", later)):
        for line in proc.stdout:
            what, at = line.split()
            entered.setdefault(name, {})[what] = float(at)
        assert proc.wait(timeout=20) == 0
    # The alone module entered after the running one left, and the later one after the alone one left.
    assert entered["running"]["out"] <= entered["alone"]["in"]
    assert entered["alone"]["out"] <= entered["later"]["in"]
