"""The key server's store in a SQLite file (the default): ``sql_store.SqlStore``
with what SQLite does its own way.

1. ``SqliteStore.open(path)`` opens (or creates, mode 0600) the file in WAL
   mode with ``synchronous=FULL`` and ``secure_delete``, then migrates
   (``SqlStore._prepare``).  Without a configured KEK the keys are sealed
   under the KEK file beside it (``kek.default_kek``).
2. A write is ``BEGIN IMMEDIATE`` ... ``COMMIT``: it holds the file's write
   lock, so it needs no row or advisory locks.  A write the database cannot
   take (full disk, I/O error, locked too long) is rolled back and raised as
   ``StoreUnavailable``.
3. keyserverd workers take turns for their write groups with a flock on
   ``PATH.writer``, taken without blocking (``take_turn``): a worker whose
   turn it is not goes on reading requests and asks again a moment later,
   instead of sleeping in SQLite's busy handler (1, 2, 5, ... 100 ms steps,
   with its event loop stopped).
4. keyserverd moves the WAL's checkpoints out of its event loops
   (``checkpoint_in_background``): SQLite runs one in the commit that filled
   1,000 WAL pages, copying them into the database file and fsyncing it, which
   took up to 580 ms on a busy disk with 10,000 hosts, while that worker read
   no request.  Worker 0 checkpoints from a thread on a connection of its own
   every ``CHECKPOINT_EVERY_S`` (PASSIVE: it holds off no reader or writer).
5. Every process that has the file open holds a shared lock on ``PATH.lock``
   (``sealing.StoreUsers``); ``reseal`` needs it alone.  After sealing, the
   file is rewritten (VACUUM) so no replaced key stays in a free page.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .kek import DEFAULT_KEK_FILE, Kek, default_kek
from .protocol import StoreUnavailable
from .schema import SQLITE, migrations
from .sealing import StoreUsers
from .sql_store import SqlStore

log = logging.getLogger("keyserverd")

#: ``schema.MIGRATIONS`` in SQLite's spelling.
MIGRATIONS = migrations(SQLITE)
#: How often ``checkpoint_in_background``'s thread copies the WAL into the file.
CHECKPOINT_EVERY_S = 1.0
#: SQLite's names for a second row with the same unique key.
DUPLICATE_ERRORS = ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")


class SqliteStore(SqlStore):
    """``protocol.KeyStore`` in a SQLite file.  One connection, one thread (the
    event loop, or the CLI); other processes may open the same file."""

    migrations = MIGRATIONS
    GROUP_EXCLUDES_WRITERS = True  # BEGIN IMMEDIATE: one writer at a time

    def __init__(self, db: sqlite3.Connection, path: Path, users: StoreUsers, default_kek_path: Path):
        self._db = db
        self.path = path
        self.shown = str(path)
        self._users: StoreUsers | None = users
        self._default_kek_path = default_kek_path
        self._turn_fd: int | None = None
        self._turn_held = False

    @classmethod
    def open(cls, path: Path | str, now: float, create: bool = True, kek: Kek | None = None,
             default_kek: Path | None = None) -> "SqliteStore":
        """Open the database; with ``create=False`` a missing file is a LocalError.
        Keys are sealed under ``kek``; without one, under the KEK file
        ``default_kek`` (default: ``kek`` beside the database), created for a
        new database or one made before sealing (``kek.default_kek``).  A KEK
        that does not match the database is a KekError, and nothing is written."""
        path = Path(path)
        try:
            if not path.exists():
                if not create:
                    raise LocalError(
                        f"no key server database at {path} (wrong --state-dir? 'keyserverd host add' creates it)"
                    )
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            store = cls(sqlite3.connect(path, isolation_level=None, timeout=10.0), path, StoreUsers(path),
                        Path(default_kek) if default_kek else path.parent / DEFAULT_KEK_FILE)
            try:
                for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                               "secure_delete=ON"):  # secure_delete: a retired key's bytes leave the file
                    store._db.execute(f"PRAGMA {pragma}")
                store._prepare(kek, now)
            except BaseException:
                store.close()
                raise
        except sqlite3.Error as exc:
            raise LocalError(f"database {path}: {exc}") from None
        except OSError as exc:
            raise LocalError(f"database {path}: {exc.strerror or exc}") from None
        return store

    def checkpoint_in_background(self, run: bool, every_s: float = CHECKPOINT_EVERY_S) -> Callable[[], None]:
        """Stop this connection's own checkpoints; with ``run``, checkpoint from a
        thread (see the module docstring, 4).  Returns what stops that thread."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        if not run:
            return lambda: None
        stop = threading.Event()
        thread = threading.Thread(target=_checkpoints, args=(self.path, every_s, stop),
                                  name="sqlite-checkpoint", daemon=True)
        thread.start()

        def stop_thread() -> None:
            stop.set()
            thread.join(timeout=10.0)
        return stop_thread

    def close(self) -> None:
        if self._turn_fd is not None:
            os.close(self._turn_fd)
            self._turn_fd = None
        self._db.close()
        if self._users is not None:
            self._users.close()
            self._users = None

    # --- the hooks of SqlStore -------------------------------------------------
    def _q(self, sql: str, params=()):
        return self._db.execute(sql, params)

    def _transaction(self):
        return _Transaction(self._db)

    def _take_turn(self) -> bool:
        if self._turn_fd is None:
            path = self.path.with_name(self.path.name + ".writer")
            self._turn_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._turn_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._turn_held = True
        return True

    def _give_turn(self) -> None:
        if self._turn_held:
            self._turn_held = False
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def _is_unavailable(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def _lock_until_commit(self, name: str) -> None:
        pass  # BEGIN IMMEDIATE holds the file's write lock until the commit

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorname in DUPLICATE_ERRORS

    def _default_kek(self, sealed_under: str | None) -> Kek:
        return default_kek(self._default_kek_path, sealed_under, self.where)

    def _scrub(self) -> None:
        """Rewrite the file so that no replaced key value stays in a free page
        or the WAL.  Best effort: a reader in another process can hold it up."""
        try:
            self._db.execute("VACUUM")
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            busy = str(exc)
        if busy:
            log.warning("store_not_rewritten", extra=fields(
                database=self.shown, reason=busy,
                note="replaced key values may stay in free pages until the next VACUUM"))

    def _exclude_others(self) -> None:
        if not self._users.exclusive():
            raise LocalError(f"database {self.path} is open in another process (a running keyserverd, or "
                             f"another keyserverd command): stop it, then rotate the KEK")

    def _admit_others(self) -> None:
        self._users.shared()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on any exception)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return False
            except sqlite3.Error as err:
                exc = err
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)
        if isinstance(exc, sqlite3.OperationalError):
            raise StoreUnavailable(f"the key server cannot write its database: {exc}") from None
        if exc_type is None:
            raise exc
        return False


def _checkpoints(path: Path, every_s: float, stop: threading.Event) -> None:
    """``checkpoint_in_background``'s thread: a PASSIVE checkpoint every ``every_s``."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
    failures = 0
    try:
        db.execute("PRAGMA synchronous=FULL")
        while not stop.wait(every_s):
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # the next round tries again; the WAL only grows meanwhile
                failures += 1
                if failures in (1, 10, 100) or failures % 1000 == 0:
                    log.warning("store_checkpoint_failed", extra=fields(database=str(path), reason=str(exc),
                                                                        failures=failures))
    finally:
        db.close()
