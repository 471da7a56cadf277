"""The last key event this keyserverd has pushed, kept in its state directory.

A rotation or revocation written while keyserverd is down (``keyserverd host
revoke`` writes the store itself) must still be pushed when it starts.  So the
event loop (``KeyServer.run_events``) starts after the event it pushed last,
not after the newest one in the store.

1. ``EventCursor.start(store)`` is the seq to start after: the saved one, but
   never above the store's newest (a store restored from a backup numbers its
   events again from there).  With no file yet (the first start) it is the
   store's newest: nothing older is pushed again.  The start is saved at
   once, so an event written after it is pushed even if we stop before it.
2. ``save(seq)`` writes the file atomically (temporary file, fsync, rename)
   after the pushes of the events up to ``seq`` were queued.  A crash in
   between only pushes them once more, and pushes are idempotent.
   ``save_in_background(seq, loop)`` does it in a thread, one write at a time:
   on a busy disk the fsync took up to 160 ms, and the event loop read no
   request meanwhile.
A missing path (``None``) keeps the old behaviour: start at the newest event.
With several keyserverd instances on one PostgreSQL store, each has its own
state directory and so its own cursor.
"""

from __future__ import annotations

import logging
from pathlib import Path

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .ca import write_private

log = logging.getLogger("keyserverd")

CURSOR_FILE = "event_cursor"


class EventCursor:
    """The last key event pushed, kept in a file, so events written while keyserverd was down
    are pushed at its start."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        #: The newest seq asked of ``save_in_background``, and its write in progress.
        self._wanted = 0
        self._writing = None

    def start(self, store) -> int:
        """The seq to read events after (see the module docstring); saved at
        once, so what is written from now on is pushed even if we stop first."""
        newest = store.last_event_seq()
        saved = self._read()
        if saved is not None and saved > newest:  # every event retired, or a store restored from a backup
            log.info("event_cursor_reset", extra=fields(saved=saved, newest=newest))
        seq = newest if saved is None else min(saved, newest)
        self.save(seq)
        return seq

    def _read(self) -> int | None:
        if self.path is None:
            return None
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LocalError(f"cannot read the event cursor {self.path}: {exc.strerror or exc}") from None
        if not text.isdigit():
            raise LocalError(f"the event cursor {self.path} holds {text[:40]!r}, not an event number; "
                             "remove it to start from the newest event")
        return int(text)

    def save(self, seq: int) -> None:
        if self.path is not None:
            write_private(self.path, f"{seq}\n".encode(), 0o600)

    def save_in_background(self, seq: int, loop) -> None:
        """``save(seq)`` in a thread of ``loop``'s executor.  A seq asked while
        a write is running is written after it; one asked just as it ends waits
        for the next call (a crash until then only pushes its events again)."""
        if self.path is None:
            return
        self._wanted = seq
        if self._writing is None or self._writing.done():
            self._writing = loop.run_in_executor(None, self._write_wanted)

    def _write_wanted(self) -> None:
        while True:
            seq = self._wanted
            try:
                self.save(seq)
            except OSError as exc:
                log.warning("event_cursor_save_failed", extra=fields(path=str(self.path), reason=str(exc)))
                return
            if self._wanted == seq:
                return
