"""Small files in a daemon's state directory, written so a crash never leaves half of one.

``write_atomic(path, data)``: write ``path.tmp`` (mode 0600 unless told
otherwise), fsync it, rename it over ``path``, fsync the directory.  Raises
OSError; callers decide whether that is fatal.

``FloorFile``: the replay floors of one receiver (``replay_floor``) in its
state directory.

1. ``load(book, now)`` restores the floors saved by the previous life (a
   missing file is a first start; an unreadable one is a LocalError: the
   operator must look, since starting without it would reopen old frames).
2. ``save_due(now)`` / ``save(book, highest, now)`` every
   ``replay_floor.SAVE_INTERVAL_S``; a failed write is logged once and
   retried at the next tick, and ``book.stale(now)`` then tells the engine
   to refuse frames until a write succeeds (fail closed).
3. ``save(..., stopped=True)`` once more at a clean stop, after the last
   frame was accepted: the next start adds no lead to the floors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from l2crypt.core import replay_floor
from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

log = logging.getLogger("l2crypt.state")

FLOORS_FILE = "replay_floors"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FloorFile:
    """Where one receiver keeps its replay floors (``state_dir/replay_floors``)."""

    def __init__(self, state_dir: str | Path, name: str = FLOORS_FILE):
        self.path = Path(state_dir) / name
        self._next_save = 0.0
        self._failing = False

    def load(self, book: replay_floor.FloorBook, now: float) -> int:
        """Restore the floors of the previous life into ``book``; returns how many senders."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise LocalError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            bounds, stopped = replay_floor.decode_file(data)
        except ValueError as exc:
            raise LocalError(f"{self.path}: {exc}; move it away only if no frame recorded "
                             "under the current keys may be replayed") from None
        book.restore(bounds, now, stopped)
        return len(bounds)

    def save_due(self, now: float) -> bool:
        return now >= self._next_save

    def save(self, book: replay_floor.FloorBook, highest: Iterable[tuple[bytes, int]], now: float,
             stopped: bool = False) -> bool:
        """Save the floors now; False (logged once per failure spell) if the write
        failed.  ``stopped``: the last save of a clean stop (no frame is accepted
        after it)."""
        self._next_save = now + book.save_interval_s
        # The book moves to ``now`` only once the file holds it: a failed write
        # leaves the book stale, so the engine refuses frames until one succeeds.
        previous = book.saved_at
        book.save(highest, now)
        try:
            write_atomic(self.path, book.encode(stopped))
        except OSError as exc:
            book.saved_at = previous
            if not self._failing:
                log.error("replay_floors_unsaved", extra=fields(path=str(self.path), reason=exc.strerror or str(exc)))
            self._failing = True
            return False
        if self._failing:
            log.info("replay_floors_saved_again", extra=fields(path=str(self.path)))
        self._failing = False
        return True
