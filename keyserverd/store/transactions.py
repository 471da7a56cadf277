"""Group commit and read-only blocks of ``sql_store.SqlStore`` (a mixin; the
dialect gives ``_q``, ``_transaction``, the turn and ``_read_snapshot``).

1. ``group()``: the writes of several requests (``_write()`` blocks) are
   savepoints of one transaction, begun at the first write and committed,
   with one fsync, when the block ends; a write that raises rolls back to
   its savepoint only.  The caller answers none of those requests before
   the block has returned (a failed commit is ``StoreUnavailable``, and
   nothing of the group was stored).  Outside a group every ``_write()`` is
   its own transaction, committed before it returns.
2. ``take_turn()``, before a group, says whether it can start without
   waiting for another process's write (SQLite: a lock file that keyserverd
   workers take in turn, without blocking); the group gives the turn back
   when it ends.
3. ``reads_only()``: requests that only read need neither.  Every read
   inside is of committed rows (on SQLite, of one snapshot: a read
   transaction), and a write raises ``WritesDeferred`` before it begins (the
   caller handles that request again in a group).
4. ``hold_snapshot()`` makes what is read stay current until the answers
   of the requests being handled have left, where it can (``host_cache``
   reads the event log once then).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .protocol import StoreUnavailable, WritesDeferred

log = logging.getLogger("keyserverd")


class Transactions:
    """Group commit and ``reads_only`` for a SQL store (see the module docstring)."""

    #: A group's open transaction keeps every other writer out until it commits.
    GROUP_EXCLUDES_WRITERS = False
    #: The open ``group()``, or None.
    _group: "_Group | None" = None
    #: Inside ``reads_only()``, and whether its reads share one snapshot (``_read_snapshot``).
    _reads_only = False
    _snapshot = False

    def take_turn(self) -> bool:
        """True if a ``group()`` may start now without waiting for another
        process's write; it then holds the turn until it ends.  False: ask again soon."""
        return self._take_turn()

    def hold_snapshot(self) -> bool:
        """Make what is read from now on stay current until the answers of the
        requests being handled have left, if this store can; True if so (see
        the module docstring, 4).  Inside ``reads_only()`` on SQLite it is
        already (one read transaction: nothing committed after it began
        becomes visible, and its answers leave before it ends).  Inside a
        ``group()`` on SQLite this begins its write transaction now: no other
        writer can commit until the group does.  False elsewhere (PostgreSQL,
        outside both): the next read may see another writer's commit."""
        if self._reads_only:
            return self._snapshot
        if self._group is None or not self.GROUP_EXCLUDES_WRITERS:
            return False
        with self._write():
            pass
        return True

    def reads_only(self):
        """A block that only reads: a write inside raises ``WritesDeferred``
        before it begins, so nothing read inside waits for a commit (see the
        module docstring, 3)."""
        return self._reads_only_block()

    @contextmanager
    def _reads_only_block(self) -> Iterator[None]:
        if self._group is not None or self._reads_only:
            raise LocalError("reads_only() inside a group or another reads_only()")
        self._reads_only = True
        try:
            with self._read_snapshot() as snapshot:
                self._snapshot = snapshot
                yield
        finally:
            self._reads_only = self._snapshot = False

    def group(self):
        """The writes inside are committed together, with one fsync, when the
        block ends (see the module docstring, 1); ``StoreUnavailable`` if that
        commit fails, and then nothing of the group is stored."""
        return self._group_block()

    @contextmanager
    def _group_block(self) -> Iterator[None]:
        if self._group is not None:
            raise LocalError("store groups do not nest")
        group = self._group = _Group()
        try:
            yield
        except BaseException as exc:
            self._group = None
            group.abandon(exc)
            self._give_turn()
            raise
        self._group = None
        if group.transaction is None:
            self._give_turn()
            return  # nothing was written
        try:
            if group.broken:
                raise StoreUnavailable("a write of the group left the transaction unusable")
            group.transaction.__exit__(None, None, None)
        except Exception as exc:
            if group.broken:
                group.abandon(exc)
            log.warning("group_commit_failed", extra=fields(database=self.shown, writes=group.writes,
                                                            reason=str(exc).splitlines()[0] if str(exc) else ""))
            raise StoreUnavailable(f"the key server cannot write its database: {exc}") from None
        finally:
            self._give_turn()

    def _write(self):
        """One write: its own transaction, or a savepoint of the open ``group()``."""
        if self._reads_only:
            raise WritesDeferred("a write inside reads_only()")
        if self._group is None:
            return self._transaction()
        return self._savepoint(self._group)

    @contextmanager
    def _savepoint(self, group: "_Group"):
        if group.transaction is None:
            transaction = self._transaction()
            try:
                transaction.__enter__()
            except Exception as exc:
                raise self._as_unavailable(exc) from None
            group.transaction = transaction
        group.writes += 1
        name = f"w{group.writes}"
        self._q(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException as exc:
            try:
                self._q(f"ROLLBACK TO SAVEPOINT {name}")
                self._q(f"RELEASE SAVEPOINT {name}")
            except Exception:
                group.broken = True  # the database dropped the whole transaction (full disk, lost connection)
            if isinstance(exc, Exception) and self._is_unavailable(exc):
                group.broken = True
                raise self._as_unavailable(exc) from None
            raise
        self._q(f"RELEASE SAVEPOINT {name}")

    def _as_unavailable(self, exc: Exception) -> Exception:
        if isinstance(exc, StoreUnavailable) or not self._is_unavailable(exc):
            return exc
        return StoreUnavailable(f"the key server cannot write its database: {exc}")

    # --- what the dialect may do its own way -----------------------------------
    @contextmanager
    def _read_snapshot(self) -> Iterator[bool]:
        """Inside ``reads_only()``: read one snapshot if the database makes that
        cheap (yield True), else read each statement's newest rows (False)."""
        yield False


class _Group:
    """An open ``SqlStore.group()``: its transaction, once a write began it."""

    def __init__(self):
        self.transaction = None
        self.writes = 0
        #: A write failed in a way that may have ended the transaction: the commit must fail.
        self.broken = False

    def abandon(self, exc: BaseException) -> None:
        """Roll the transaction back (if it began), whatever the database says."""
        if self.transaction is not None:
            try:
                self.transaction.__exit__(type(exc), exc, exc.__traceback__)
            except Exception:
                pass  # the caller raises its own exception
