"""The key server's store, written once for SQLite and PostgreSQL: hosts (the
ID-MAC table), pair keys (the ID-ID-KEY table), multicast keys, the key event
log and the ID-IP table.

1. A dialect (``sqlite.SqliteStore``, ``postgres.PgStore``) connects, then
   calls ``_prepare``: ``_migrate`` runs the pending steps of
   ``schema.MIGRATIONS`` in one transaction and checks the KEK; the first
   start also creates multicast key PW_ID 1.
2. Every write is one ``_write()`` transaction, committed before the method
   returns, so a caller that answers a client after the call never
   acknowledges something a crash could lose.  A write the database cannot
   take is ``StoreUnavailable``.
   Group commit: inside ``with store.group():`` the writes of several
   requests (``_write()`` blocks) are savepoints of one transaction, begun at
   the first write and committed, with one fsync, when the block ends; a
   write that raises rolls back to its savepoint only.  The caller answers
   none of those requests before the block has returned (a failed commit is
   ``StoreUnavailable``, and nothing of the group was stored).  Before a
   group, ``take_turn()`` says whether it can start without waiting for
   another process's write (SQLite: a lock file that keyserverd workers take
   in turn, without blocking); the group gives the turn back when it ends.
3. Several writers (processes on one SQLite file, keyserverd instances on one
   PostgreSQL database) are settled by the database, not by timing:
   - a row read to decide a write is read ``FOR UPDATE`` (PostgreSQL; a SQLite
     write transaction holds the whole file already);
   - a new key version is ``INSERT ... ON CONFLICT DO NOTHING``: when two
     writers create or rotate the same key at once, one insert wins, and the
     other reads the winner's key or returns None ("someone rotated first");
   - a unique key another writer took between our check and our insert is
     the same refusal as the check's (``_unless_taken``);
   - writers of ``key_events`` hold a lock until they commit
     (``_lock_until_commit``), so events become visible in ``seq`` order and
     a poller that remembers the last seq it saw never skips one.
4. Tokens are stored only as their SHA-256 (``tokens.hash_token``); keys are
   32 random bytes, stored sealed under the KEK (``sealing.SealedKeys``).  The
   database keeps the KEK's id; a start with another KEK is refused before
   anything is written.  Migration 4 seals the keys of a database made
   before sealing, and the key tables are then rewritten (``_scrub``).
5. ``reseal`` (``keyserverd kek rotate``) needs the database alone
   (``_exclude_others``).

SQL here is written once, with ``?`` placeholders and no ``%``; the hooks
below the ``# --- dialect`` line are what each database does its own way.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import contextmanager
from typing import Iterator

from l2crypt.core.errors import LocalError, RefusedError
from l2crypt.core.frame_wire import format_mac
from l2crypt.core.ks_messages import MAX_PEER_IPS
from l2crypt.core.l3_wire import format_ip
from l2crypt.ops.logs import fields

from .kek import Kek, check_kek
from .protocol import HostRecord, KeyEvent, StoreUnavailable
from .schema import SCHEMA_VERSION, SEALED_SCHEMA, statements
from .sealing import KEY_BYTES, SealedKeys, reseal_key_rows

log = logging.getLogger("keyserverd")

FIRST_PW_ID = 1
#: Events older than this before the retirement time are dropped with the versions.
EVENTS_KEPT_S = 86400
#: A pair key version whose next version was made before the time (``?``).
_SUPERSEDED_PAIR = ("EXISTS (SELECT 1 FROM pair_keys AS newer WHERE newer.id1 = pair_keys.id1 "
                    "AND newer.id2 = pair_keys.id2 AND newer.pw_id = pair_keys.pw_id + 1 AND newer.created_at < ?)")
_SUPERSEDED_MULTICAST = ("EXISTS (SELECT 1 FROM multicast_keys AS newer "
                         "WHERE newer.pw_id > multicast_keys.pw_id AND newer.created_at < ?)")

HOST_COLUMNS = "id, mac, role, token_expires, token_used, enrolled_at, revoked_at, created_at"
NEW_PAIR_KEY = "INSERT INTO pair_keys (id1, id2, pw_id, key, created_at) "
NEW_MULTICAST_KEY = "INSERT INTO multicast_keys (pw_id, key, created_at) "


def host_record(row) -> HostRecord | None:
    """A ``hosts`` row read as ``HOST_COLUMNS``."""
    if row is None:
        return None
    mac = bytes(row[1]) if row[1] is not None else None
    return HostRecord(row[0], mac, row[2], row[3], bool(row[4]), row[5], row[6], row[7])


class SqlStore(SealedKeys):
    """``protocol.KeyStore`` on a SQL database; a dialect subclass provides
    the connection and the hooks at the end.  One connection, used from one
    thread (the event loop, or the CLI); other processes use their own."""

    #: ``schema.MIGRATIONS`` in the dialect's spelling.
    migrations: tuple[str, ...]
    #: Appended to a SELECT whose rows the transaction goes on to change.
    FOR_UPDATE = ""
    #: A group's open transaction keeps every other writer out until it commits.
    GROUP_EXCLUDES_WRITERS = False
    #: The database, for messages and logs (a PostgreSQL URL without its password).
    shown: str
    kek: Kek
    #: The open ``group()``, or None.
    _group: "_Group | None" = None

    @property
    def where(self) -> str:
        return f"database {self.shown}"

    # --- 1. migrate ------------------------------------------------------------
    def _prepare(self, kek: Kek | None, now: float) -> None:
        """Migrate, check the KEK and create the first multicast key (right after connecting)."""
        self._migrate(kek)
        self._ensure_multicast_key(now)

    def schema_version(self) -> int:
        return self._q("SELECT version FROM schema_version").fetchone()[0]

    def _migrate(self, kek: Kek | None) -> None:
        sealed: dict[str, int] = {}
        with self._write():
            self._lock_until_commit("migrate")
            self._q("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self._q("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                self._q("INSERT INTO schema_version VALUES (0)")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise LocalError(f"{self.where} has schema version {version}; this keyserverd knows "
                                 f"up to {SCHEMA_VERSION}")
            sealed_under = self._sealed_under() if version >= SEALED_SCHEMA else None
            self.kek = kek if kek is not None else self._default_kek(sealed_under)
            if sealed_under is not None:
                check_kek(sealed_under, self.kek, self.where)
            for number in range(version, SCHEMA_VERSION):
                for statement in statements(self.migrations[number]):
                    self._q(statement)
                if number + 1 == SEALED_SCHEMA:
                    sealed = reseal_key_rows(self._q, None, self.kek)
                    self._q("INSERT INTO kek_check (id, kek_id) VALUES (1, ?)", (self.kek.kek_id,))
                self._q("UPDATE schema_version SET version = ?", (number + 1,))
        if sum(sealed.values()):
            log.info("store_sealed", extra=fields(database=self.shown, kek_id=self.kek.shown_id, **sealed))
            self._scrub()

    def _sealed_under(self) -> str:
        """The id of the KEK the keys are sealed under ("" if the database names none)."""
        row = self._q("SELECT kek_id FROM kek_check WHERE id = 1").fetchone()
        return row[0] if row else ""

    def reseal(self, new: Kek, then=None) -> dict[str, int]:
        """Re-seal every stored key under ``new`` in one transaction; no PW_ID
        changes.  LocalError (nothing changed) while anyone else uses the
        database.  ``then()`` runs after the commit, while nobody else can
        open the database yet.  Returns the rows re-sealed per table."""
        self._exclude_others()
        try:
            with self._write():
                check_kek(self._sealed_under(), self.kek, self.where)
                counts = reseal_key_rows(self._q, self.kek, new)
                self._q("UPDATE kek_check SET kek_id = ? WHERE id = 1", (new.kek_id,))
            self.kek = new
            self.opened_pair_keys.clear()
            self._scrub()
            if then is not None:
                then()
        finally:
            self._admit_others()
        return counts

    def _ensure_multicast_key(self, now: float) -> None:
        with self._write():
            self._q(NEW_MULTICAST_KEY + "SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM multicast_keys) "
                    "ON CONFLICT DO NOTHING", (FIRST_PW_ID, self._new_multicast_key(FIRST_PW_ID), now))

    # --- hosts -----------------------------------------------------------------
    def add_host(self, host_id, mac, role, token_hash, token_expires, now) -> None:
        taken = LocalError(f"host {host_id!r} or its MAC was added at the same moment elsewhere")
        with self._unless_taken(taken), self._write():
            if self._q("SELECT 1 FROM hosts WHERE id = ?", (host_id,)).fetchone():
                raise LocalError(f"host {host_id!r} already exists")
            if mac is not None:
                other = self._q("SELECT id FROM hosts WHERE mac = ?", (mac,)).fetchone()
                if other:
                    raise LocalError(f"MAC {format_mac(mac)} is already bound to host {other[0]!r}")
            self._q("INSERT INTO hosts (id, mac, role, token_hash, token_expires, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (host_id, mac, role, token_hash, token_expires, now))

    def get_host(self, host_id) -> HostRecord | None:
        return host_record(self._q(f"SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?", (host_id,)).fetchone())

    def list_hosts(self) -> list[HostRecord]:
        return [host_record(r) for r in self._q(f"SELECT {HOST_COLUMNS} FROM hosts ORDER BY id").fetchall()]

    def revoke_host(self, host_id, now) -> bool:
        with self._write():
            row = self._q("SELECT revoked_at FROM hosts WHERE id = ?" + self.FOR_UPDATE, (host_id,)).fetchone()
            if row is None:
                raise LocalError(f"no host {host_id!r}")
            if row[0] is not None:
                return False
            self._q("UPDATE hosts SET revoked_at = ? WHERE id = ?", (now, host_id))
            self._event("revoke", host_id, None, None, now)
            return True

    def is_revoked(self, host_id) -> bool:
        row = self._q("SELECT revoked_at FROM hosts WHERE id = ?", (host_id,)).fetchone()
        return row is None or row[0] is not None

    # --- enrollment ------------------------------------------------------------
    def consume_token(self, host_id, token_hash, now) -> HostRecord:
        with self._write():
            row = self._q("SELECT token_hash, token_expires, token_used, revoked_at FROM hosts WHERE id = ?"
                          + self.FOR_UPDATE, (host_id,)).fetchone()
            if row is None or row[0] is None:
                raise RefusedError(f"no host {host_id!r} is waiting for enrollment", "bad_token")
            stored_hash, expires, used, revoked_at = row
            if revoked_at is not None:
                raise RefusedError(f"host {host_id!r} is revoked", "revoked")
            if not hmac.compare_digest(bytes(stored_hash), token_hash):
                raise RefusedError(f"wrong token for host {host_id!r}", "bad_token")
            if used:
                raise RefusedError(f"the token for host {host_id!r} was already used", "token_used")
            if expires is not None and now >= expires:
                raise RefusedError(f"the token for host {host_id!r} has expired", "token_expired")
            self._q("UPDATE hosts SET token_used = 1 WHERE id = ?", (host_id,))
        return self.get_host(host_id)

    def mark_enrolled(self, host_id, now) -> None:
        with self._write():
            self._q("UPDATE hosts SET enrolled_at = ? WHERE id = ?", (now, host_id))

    # --- ID-MAC table ----------------------------------------------------------
    def bind_mac(self, host_id, mac) -> None:
        taken = RefusedError(f"MAC {format_mac(mac)} is bound to another host", "mac_conflict")
        with self._unless_taken(taken), self._write():
            row = self._q("SELECT mac FROM hosts WHERE id = ?" + self.FOR_UPDATE, (host_id,)).fetchone()
            if row is None:
                raise RefusedError(f"no host {host_id!r}", "revoked")
            bound = bytes(row[0]) if row[0] is not None else None
            if bound == mac:
                return
            if bound is not None:
                raise RefusedError(f"host {host_id!r} is bound to {format_mac(bound)}, not {format_mac(mac)}",
                                   "mac_conflict")
            if self._q("SELECT id FROM hosts WHERE mac = ?", (mac,)).fetchone() is not None:
                raise taken
            self._q("UPDATE hosts SET mac = ? WHERE id = ?", (mac, host_id))

    def host_by_mac(self, mac) -> HostRecord | None:
        return host_record(self._q(f"SELECT {HOST_COLUMNS} FROM hosts WHERE mac = ?", (mac,)).fetchone())

    # --- ID-IP table (layer-3 modes) -------------------------------------------
    def bind_ip(self, host_id, ip) -> bool:
        """Bind ``ip`` to ``host_id``; False if it already was.  RefusedError
        ``ip_conflict`` if another host holds it, ``too_many_ips`` past the limit."""
        taken = RefusedError(f"IP {format_ip(ip)} is bound to another host", "ip_conflict")
        with self._unless_taken(taken), self._write():
            host = self._q("SELECT id FROM hosts WHERE id = ?" + self.FOR_UPDATE, (host_id,)).fetchone()
            row = self._q("SELECT id FROM host_ips WHERE ip = ?", (ip,)).fetchone()
            if row is not None:
                if row[0] == host_id:
                    return False
                raise taken
            if host is None:
                raise RefusedError(f"no host {host_id!r}", "revoked")
            count = self._q("SELECT COUNT(*) FROM host_ips WHERE id = ?", (host_id,)).fetchone()[0]
            if count >= MAX_PEER_IPS:
                raise RefusedError(f"host {host_id!r} already binds {count} IPs", "too_many_ips")
            self._q("INSERT INTO host_ips (ip, id) VALUES (?, ?)", (ip, host_id))
        return True

    def host_id_by_ip(self, ip) -> str | None:
        row = self._q("SELECT id FROM host_ips WHERE ip = ?", (ip,)).fetchone()
        return row[0] if row else None

    def ips_of(self, host_id) -> list[bytes]:
        rows = self._q("SELECT ip FROM host_ips WHERE id = ? ORDER BY ip", (host_id,)).fetchall()
        return [bytes(r[0]) for r in rows]

    # --- ID-ID-KEY table and multicast key -------------------------------------
    def get_or_create_pair_key(self, id_a, id_b, now) -> tuple[bytes, int]:
        pw_id, _, key = self.pair_key_versions(id_a, id_b, now)[0]
        return key, pw_id

    def pair_key_versions(self, id_a, id_b, now=None) -> list[tuple[int, float, bytes]]:
        if id_a == id_b:
            raise LocalError("a pair key needs two different host IDs")
        id1, id2 = sorted((id_a, id_b))
        versions = self._pair_rows(id1, id2)  # committed rows, or the open group's: nothing to lock
        if not versions and now is not None:
            with self._write():
                self._q(NEW_PAIR_KEY + "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS "
                        "(SELECT 1 FROM pair_keys WHERE id1 = ? AND id2 = ?) ON CONFLICT DO NOTHING",
                        (id1, id2, FIRST_PW_ID, self._new_pair_key(id1, id2, FIRST_PW_ID), now, id1, id2))
                versions = self._pair_rows(id1, id2)
        return versions

    def _pair_rows(self, id1, id2) -> list[tuple[int, float, bytes]]:
        """Every version of the pair held, newest first, opened (through ``opened_pair_keys``)."""
        rows = self._q("SELECT pw_id, created_at, key FROM pair_keys WHERE id1 = ? AND id2 = ? "
                       "ORDER BY pw_id DESC", (id1, id2)).fetchall()
        self.opened_pair_keys.keep_only((id1, id2), {r[0] for r in rows})
        return [(r[0], r[1], self._open_pair_key(id1, id2, r[0], r[2])) for r in rows]

    def current_multicast_key(self) -> tuple[bytes, int]:
        row = self._q("SELECT key, pw_id FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
        return self._open_multicast_key(row[1], row[0]), row[1]

    # --- rotation (PW_ID) and the event log ------------------------------------
    def _event(self, kind, id1, id2, pw_id, now) -> None:
        self._lock_until_commit("events")
        self._q("INSERT INTO key_events (kind, id1, id2, pw_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (kind, id1, id2, pw_id, now))

    def rotate_pair_key(self, id_a, id_b, now, if_pw_id=None, if_created_before=None) -> int | None:
        id1, id2 = sorted((id_a, id_b))
        with self._write():
            row = self._q("SELECT pw_id, created_at FROM pair_keys WHERE id1 = ? AND id2 = ? "
                          "ORDER BY pw_id DESC LIMIT 1", (id1, id2)).fetchone()
            if row is None:
                return None
            if if_pw_id is not None and row[0] != if_pw_id:
                return None
            if if_created_before is not None and row[1] >= if_created_before:
                return None
            pw_id = row[0] + 1
            done = self._q(NEW_PAIR_KEY + "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING pw_id",
                           (id1, id2, pw_id, self._new_pair_key(id1, id2, pw_id), now)).fetchone()
            if done is None:
                return None  # another writer rotated first
            self._event("pair", id1, id2, pw_id, now)
        return pw_id

    def pair_key(self, id_a, id_b, pw_id) -> bytes | None:
        id1, id2 = sorted((id_a, id_b))
        row = self._q("SELECT key FROM pair_keys WHERE id1 = ? AND id2 = ? AND pw_id = ?",
                      (id1, id2, pw_id)).fetchone()
        return self._open_pair_key(id1, id2, pw_id, row[0]) if row else None

    def pair_versions(self, id_a, id_b) -> list[tuple[int, float]]:
        id1, id2 = sorted((id_a, id_b))
        rows = self._q("SELECT pw_id, created_at FROM pair_keys WHERE id1 = ? AND id2 = ? "
                       "ORDER BY pw_id DESC", (id1, id2)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def pairs(self, host_id=None) -> list[tuple[str, str]]:
        if host_id is None:
            rows = self._q("SELECT DISTINCT id1, id2 FROM pair_keys ORDER BY id1, id2")
        else:
            rows = self._q("SELECT DISTINCT id1, id2 FROM pair_keys WHERE id1 = ? OR id2 = ? "
                           "ORDER BY id1, id2", (host_id, host_id))
        return [(r[0], r[1]) for r in rows.fetchall()]

    def stale_pairs(self, created_before) -> list[tuple[str, str, int]]:
        rows = self._q("SELECT id1, id2, MAX(pw_id) FROM pair_keys GROUP BY id1, id2 "
                       "HAVING MAX(created_at) < ? ORDER BY id1, id2", (created_before,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def rotate_multicast_key(self, now, if_created_before=None) -> int | None:
        with self._write():
            pw_id, created_at = self._q(
                "SELECT pw_id, created_at FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
            if if_created_before is not None and created_at >= if_created_before:
                return None
            return pw_id + 1 if self._add_multicast_key(pw_id + 1, None, now) else None

    def multicast_key(self, pw_id) -> bytes | None:
        row = self._q("SELECT key FROM multicast_keys WHERE pw_id = ?", (pw_id,)).fetchone()
        return self._open_multicast_key(pw_id, row[0]) if row else None

    def adopt_multicast_key(self, pw_id, key, now) -> bool:
        if len(key) != KEY_BYTES:
            raise LocalError(f"a multicast key has {KEY_BYTES} bytes")
        with self._write():
            newest = self._q("SELECT COALESCE(MAX(pw_id), 0) FROM multicast_keys").fetchone()[0]
            return pw_id > newest and self._add_multicast_key(pw_id, key, now)

    def _add_multicast_key(self, pw_id: int, key: bytes | None, now: float) -> bool:
        """Store version ``pw_id`` (``key``, or a new one) with its event; False
        if another writer stored that version first."""
        done = self._q(NEW_MULTICAST_KEY + "VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING pw_id",
                       (pw_id, self._new_multicast_key(pw_id, key), now)).fetchone()
        if done is not None:
            self._event("multicast", None, None, pw_id, now)
        return done is not None

    def events_since(self, seq) -> list[KeyEvent]:
        rows = self._q("SELECT seq, kind, id1, id2, pw_id FROM key_events WHERE seq > ? ORDER BY seq",
                       (seq,)).fetchall()
        return [KeyEvent(*r) for r in rows]

    def last_event_seq(self) -> int:
        return self._q("SELECT COALESCE(MAX(seq), 0) FROM key_events").fetchone()[0]

    def retire_old_versions(self, superseded_before) -> int:
        """A version is superseded when the next one was created; drop those
        superseded before the time (their key material is gone for good).

        The write transaction is taken only when a first read (which holds no
        writer off) found something to drop: it runs every few seconds and
        usually finds nothing, and a write transaction scanning every pair
        would hold every other writer (a worker's group of requests) for tens
        of milliseconds at 10,000 hosts."""
        events_before = superseded_before - EVENTS_KEPT_S
        oldest_event = self._q("SELECT created_at FROM key_events ORDER BY seq LIMIT 1").fetchone()
        drop_events = oldest_event is not None and oldest_event[0] < events_before
        superseded = (("pair_keys", _SUPERSEDED_PAIR), ("multicast_keys", _SUPERSEDED_MULTICAST))
        if not drop_events and not any(
                self._q(f"SELECT 1 FROM {table} WHERE {where} LIMIT 1", (superseded_before,)).fetchone()
                for table, where in superseded):
            return 0
        with self._write():
            pairs = self._q(f"DELETE FROM pair_keys WHERE {_SUPERSEDED_PAIR}", (superseded_before,)).rowcount
            mcast = self._q(f"DELETE FROM multicast_keys WHERE {_SUPERSEDED_MULTICAST}", (superseded_before,)).rowcount
            if drop_events:
                self._q("DELETE FROM key_events WHERE created_at < ?", (events_before,))
        return pairs + mcast

    def key_summary(self) -> dict:
        rows = self._q(
            "SELECT p.id1, p.id2, p.pw_id, p.created_at FROM pair_keys AS p "
            "WHERE p.pw_id = (SELECT MAX(pw_id) FROM pair_keys WHERE id1 = p.id1 AND id2 = p.id2) "
            "ORDER BY p.id1, p.id2"
        ).fetchall()
        versions = self._q("SELECT COUNT(*) FROM pair_keys").fetchone()[0]
        mc = self._q("SELECT pw_id, created_at FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
        return {"pairs": [tuple(r) for r in rows], "pair_versions": versions,
                "multicast": tuple(mc) if mc else None}

    # --- group commit ----------------------------------------------------------
    def take_turn(self) -> bool:
        """True if a ``group()`` may start now without waiting for another
        process's write; it then holds the turn until it ends.  False: ask again soon."""
        return self._take_turn()

    def hold_writers(self) -> bool:
        """Inside ``group()``: begin its transaction now.  True if no other
        writer can commit before the group does (SQLite's write lock), so what
        is read from now on stays current until the group's answers leave;
        False (PostgreSQL, or outside a group): read again for each request."""
        if self._group is None or not self.GROUP_EXCLUDES_WRITERS:
            return False
        with self._write():
            pass
        return True

    def group(self):
        """The writes inside are committed together, with one fsync, when the
        block ends (see the module docstring, 2); ``StoreUnavailable`` if that
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

    @contextmanager
    def _unless_taken(self, refusal: Exception):
        """Raise ``refusal`` for a unique key another writer took after our check."""
        try:
            yield
        except Exception as exc:
            if not self._is_duplicate(exc):
                raise
            raise refusal from None

    # --- dialect: what each database does its own way --------------------------
    def _q(self, sql: str, params=()):
        """Run one statement (``?`` placeholders); its cursor."""
        raise NotImplementedError

    def _transaction(self):
        """A context manager: one transaction, committed on exit before it
        returns (durable), rolled back when the block raises.  A database
        that cannot take it raises ``StoreUnavailable``."""
        raise NotImplementedError

    def _take_turn(self) -> bool:
        """See ``take_turn``; a database that queues writers itself always says True."""
        return True

    def _give_turn(self) -> None:
        """End the turn ``_take_turn`` gave (nothing if none)."""

    def _is_unavailable(self, exc: Exception) -> bool:
        """True if ``exc`` is the database failing to take a write (full disk,
        I/O error, locked too long), not a refusal of this write."""
        raise NotImplementedError

    def _lock_until_commit(self, name: str) -> None:
        """Inside ``_write()``: no other writer passes the same ``name``
        ("migrate", "events") until this transaction ends."""
        raise NotImplementedError

    def _is_duplicate(self, exc: Exception) -> bool:
        """True if ``exc`` is the database refusing a second row with the same unique key."""
        raise NotImplementedError

    def _default_kek(self, sealed_under: str | None) -> Kek:
        """The KEK when the config names none (``sealed_under``: the database's
        KEK id, None if it is not sealed yet); KekError if there is none."""
        raise NotImplementedError

    def _scrub(self) -> None:
        """Rewrite the key tables, so replaced key values leave the files."""
        raise NotImplementedError

    def _exclude_others(self) -> None:
        """Be the database's only user (for ``reseal``), or raise LocalError."""
        raise NotImplementedError

    def _admit_others(self) -> None:
        """Undo ``_exclude_others``."""
        raise NotImplementedError


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
