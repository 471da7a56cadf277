"""One daemon per state directory: an exclusive lock on ``state_dir/daemon.lock``.

Two daemons on one identity (a shared or copied state directory) would bind
the same MAC, fight over the key server session and share one packet-clock
floor.  So every daemon (agent, layer-3 agent, gateway) locks its state
directory for its whole life:

1. ``lock_state_dir(path)`` opens (creating, mode 0600) ``daemon.lock`` and
   takes a non-blocking ``flock``; on success it writes its PID into the file.
2. If another process holds the lock: ``LocalError`` naming that PID (read
   from the file) and the directory.
3. The lock lives as long as the returned file object, so as long as the
   process: the kernel releases it when the process ends, even after
   ``kill -9``, and a left-over file never blocks the next start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from l2crypt.core.errors import LocalError

LOCK_FILE = "daemon.lock"


def lock_state_dir(state_dir: str | Path) -> IO | None:
    """Lock ``state_dir`` for this process; the open lock file (keep it), or None
    if the directory does not exist (the daemon then says it is not enrolled)."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalError(f"cannot open {path}: {exc.strerror or exc}") from None
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip()
        lock.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise LocalError(f"state directory {state_dir} is in use by {who} (another daemon with this "
                         "identity); stop it first, or give this one its own --state-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
