"""Test modules that measure throughput run with no other test module beside them.

The suite runs two pytest workers on a 2-core machine.  A module that asserts
a rate (the multipath lab's aggregation and adaptation tests) must not share
the CPU with another lab, or it measures the other lab.  Every test module
holds a shared ``flock`` on ``LOCK`` while it runs; a module that must run
``alone`` announces itself (``PENDING``, with its PID), so no module starts
beside it, and takes the lock exclusively once the running ones finish.
Every wait is bounded (``WAIT_S``); a ``PENDING`` file whose process is gone
is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

LOCK = Path(os.environ.get("L2CRYPT_TESTS_CPU_LOCK", "/tmp/l2crypt-tests-cpu.lock"))
PENDING = LOCK.with_suffix(".alone")
WAIT_S = float(os.environ.get("L2CRYPT_TESTS_CPU_WAIT_S", "900"))


def _pending_alive() -> bool:
    try:
        pid = int(PENDING.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _lock(fd: int, mode: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{LOCK}: not free within {WAIT_S:.0f} s") from None
            time.sleep(0.2)


@contextlib.contextmanager
def share_cpu(alone: bool = False):
    """Hold the CPU share of one test module (``alone``: the whole machine)."""
    deadline = time.monotonic() + WAIT_S
    fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        if alone:
            PENDING.write_text(str(os.getpid()))
            try:
                _lock(fd, fcntl.LOCK_EX, deadline)
            finally:
                PENDING.unlink(missing_ok=True)
        else:
            while _pending_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            _lock(fd, fcntl.LOCK_SH, deadline)
        yield
    finally:
        os.close(fd)
