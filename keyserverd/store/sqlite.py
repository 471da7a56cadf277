"""The key server's durable state: hosts (the ID-MAC table), pair keys
(the ID-ID-KEY table) and multicast keys.

1. ``SqliteStore.open(path)`` opens (or creates, mode 0600) the database in WAL
   mode with ``synchronous=FULL`` and applies any pending migrations from
   ``MIGRATIONS``; the first start also creates multicast key PW_ID 1.
2. Every write runs in its own ``BEGIN IMMEDIATE`` transaction and is
   committed before the method returns, so a caller that answers a client
   after the call never acknowledges something a crash could lose.  A write
   the database cannot take (full disk, I/O error, locked too long) is rolled
   back and raised as ``StoreUnavailable`` (code ``store_unavailable``), which
   the service answers like any refusal and the CLI prints as one line.
3. Tokens are stored only as their SHA-256 (``tokens.hash_token``); keys are
   32 bytes from ``secrets.token_bytes``, stored sealed under the KEK
   (``kek.Kek``, AES-256-GCM, the AAD names the row).  The database keeps the
   KEK's id; a start with another KEK is refused before anything is written.
   Migration 4 seals the keys of a database made before sealing, and the
   file is then rewritten (VACUUM) so no clear key stays in a free page.
4. Every process that has the database open holds a shared lock on
   ``PATH.lock``; ``reseal`` (``keyserverd kek rotate``) needs it alone.

``KeyStore`` is the narrow interface the service uses; a PostgreSQL store for
several keyserverd instances (``postgres``) implements the same methods.
"""

from __future__ import annotations

import hmac
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from l2crypt.core.errors import LocalError, RefusedError
from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.logs import fields

from .kek import DEFAULT_KEK_FILE, Kek, check_kek, default_kek
from .ip import MIGRATION as _IP_MIGRATION
from .ip import MIGRATION_IPV6 as _IPV6_MIGRATION
from .ip import IpBindings
from .sealing import KEY_BYTES, SealedKeys, StoreUnavailable, StoreUsers, reseal_key_rows  # noqa: F401

log = logging.getLogger("keyserverd")

FIRST_PW_ID = 1

#: Schema migrations; ``schema_version.version`` is how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id            TEXT PRIMARY KEY,
        mac           BLOB UNIQUE,
        role          TEXT NOT NULL CHECK (role IN ('host', 'gateway')),
        token_hash    BLOB,
        token_expires REAL,
        token_used    INTEGER NOT NULL DEFAULT 0,
        enrolled_at   REAL,
        revoked_at    REAL,
        created_at    REAL NOT NULL
    );
    CREATE TABLE pair_keys (
        id1        TEXT NOT NULL,
        id2        TEXT NOT NULL,
        pw_id      INTEGER NOT NULL,
        key        BLOB NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (id1, id2, pw_id),
        CHECK (id1 < id2)
    );
    CREATE TABLE multicast_keys (
        pw_id      INTEGER PRIMARY KEY,
        key        BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: key versions are rotated; every rotation and revocation is an event that
    #    every keyserverd sharing the store pushes to its connected hosts.
    """
    CREATE TABLE key_events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        kind       TEXT NOT NULL CHECK (kind IN ('pair', 'multicast', 'revoke')),
        id1        TEXT,
        id2        TEXT,
        pw_id      INTEGER,
        created_at REAL NOT NULL
    );
    """,
    # 3: the ID-IP table of the layer-3 modes (see store_ip).
    _IP_MIGRATION,
    # 4: keys are sealed under the KEK; the id of that KEK.  (The keys already
    #    stored are sealed in the same transaction: ``reseal_key_rows``.)
    """
    CREATE TABLE kek_check (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        kek_id TEXT NOT NULL
    );
    """,
    # 5: the ID-IP table takes IPv6 addresses too.
    _IPV6_MIGRATION,
)
SCHEMA_VERSION = len(MIGRATIONS)
#: From this schema version on, every key in the store is sealed.
SEALED_SCHEMA = 4


@dataclass(frozen=True)
class HostRecord:
    """One row of the ID-MAC table.  Times are Unix seconds, None when unset."""

    id: str
    mac: bytes | None
    role: str
    token_expires: float | None
    token_used: bool
    enrolled_at: float | None
    revoked_at: float | None
    created_at: float

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def enrolled(self) -> bool:
        return self.enrolled_at is not None


@dataclass(frozen=True)
class KeyEvent:
    """A rotation or revocation to announce.  ``kind`` is pair (id1, id2, pw_id),
    multicast (pw_id) or revoke (id1 = the revoked host)."""

    seq: int
    kind: str
    id1: str | None
    id2: str | None
    pw_id: int | None


class KeyStore(Protocol):
    """What the key service needs from a store.  Every write is durable on return."""

    def add_host(self, host_id: str, mac: bytes | None, role: str, token_hash: bytes,
                 token_expires: float, now: float) -> None:
        """Create a host waiting for enrollment; LocalError if the ID or MAC is taken."""

    def get_host(self, host_id: str) -> HostRecord | None:
        """The host's record, or None."""

    def list_hosts(self) -> list[HostRecord]:
        """All hosts, ordered by ID."""

    def revoke_host(self, host_id: str, now: float) -> bool:
        """Mark revoked; False if it already was.  LocalError for an unknown ID."""

    def consume_token(self, host_id: str, token_hash: bytes, now: float) -> HostRecord:
        """Spend the host's one-time token atomically, or raise RefusedError with
        code bad_token (unknown ID or wrong token), token_used, token_expired or revoked."""

    def mark_enrolled(self, host_id: str, now: float) -> None:
        """Record that a certificate was issued."""

    def bind_mac(self, host_id: str, mac: bytes) -> None:
        """Bind ``mac`` to ``host_id``, or raise RefusedError code mac_conflict."""

    def host_by_mac(self, mac: bytes) -> HostRecord | None:
        """The host bound to ``mac``, or None."""

    def get_or_create_pair_key(self, id_a: str, id_b: str, now: float) -> tuple[bytes, int]:
        """The newest (key, pw_id) of the pair, created atomically on first use."""

    def current_multicast_key(self) -> tuple[bytes, int]:
        """The newest (key, pw_id) of the multicast key."""

    def is_revoked(self, host_id: str) -> bool:
        """True if the host is revoked or unknown (fail closed)."""

    def rotate_pair_key(self, id_a: str, id_b: str, now: float, if_pw_id: int | None = None,
                        if_created_before: float | None = None) -> int | None:
        """Add the next version of an existing pair key and an event; return its
        PW_ID, or None when the condition does not hold (someone rotated first)."""

    def pair_key(self, id_a: str, id_b: str, pw_id: int) -> bytes | None:
        """One version of a pair key, if still held."""

    def pair_versions(self, id_a: str, id_b: str) -> list[tuple[int, float]]:
        """(pw_id, created_at) of every version of the pair still held, newest
        first; no key bytes (read one with ``pair_key``)."""

    def pairs(self, host_id: str | None = None) -> list[tuple[str, str]]:
        """Every pair with a key (only those including ``host_id`` if given)."""

    def stale_pairs(self, created_before: float) -> list[tuple[str, str, int]]:
        """Pairs whose newest version was created before the time: (id1, id2, pw_id)."""

    def rotate_multicast_key(self, now: float, if_created_before: float | None = None) -> int | None:
        """Add the next multicast key version and an event; PW_ID or None."""

    def multicast_key(self, pw_id: int) -> bytes | None:
        """One version of the multicast key, if still held."""

    def adopt_multicast_key(self, pw_id: int, key: bytes, now: float) -> bool:
        """Store a given multicast key version (from the multicast leader of
        peered key servers) with an event, if it is newer than every version
        held; True if it was stored."""

    def events_since(self, seq: int) -> list[KeyEvent]:
        """Events after ``seq``, oldest first."""

    def last_event_seq(self) -> int:
        """The newest event's seq (0 if none)."""

    def retire_old_versions(self, superseded_before: float) -> int:
        """Delete key versions superseded before the time; return how many."""

    def key_summary(self) -> dict:
        """For status and metrics, no key bytes: ``pairs`` [(id1, id2, newest
        pw_id, its created_at)], ``pair_versions`` (rows held), ``multicast``
        (pw_id, created_at) of the newest multicast key."""
        ...

    def bind_ip(self, host_id: str, ip: bytes) -> bool:
        """Bind an IPv4 or IPv6 address to the host (ID-IP table), or raise RefusedError
        code ip_conflict (another host holds it) or too_many_ips."""

    def host_id_by_ip(self, ip: bytes) -> str | None:
        """The ID bound to the address, or None."""

    def ips_of(self, host_id: str) -> list[bytes]:
        """The host's bound IP addresses (4 or 16 bytes each)."""

    def close(self) -> None:
        """Release the store."""


_HOST_COLUMNS = "id, mac, role, token_expires, token_used, enrolled_at, revoked_at, created_at"

def _host(row) -> HostRecord | None:
    if row is None:
        return None
    return HostRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])


class SqliteStore(IpBindings, SealedKeys):
    """SQLite implementation of ``KeyStore``.  One connection, one thread (the
    event loop, or the CLI); other processes may open the same file."""

    def __init__(self, db: sqlite3.Connection, path: Path, users: StoreUsers | None = None):
        self._db = db
        self.path = path
        self._users = users
        #: The KEK the keys are sealed under (set when the store is opened).
        self.kek: Kek | None = None

    # --- 1. open and migrate -------------------------------------------------
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
            store = cls(sqlite3.connect(path, isolation_level=None, timeout=10.0), path, StoreUsers(path))
            try:
                store._db.execute("PRAGMA journal_mode=WAL")
                store._db.execute("PRAGMA synchronous=FULL")
                store._db.execute("PRAGMA foreign_keys=ON")
                store._db.execute("PRAGMA secure_delete=ON")  # a retired key's bytes leave the file
                store._migrate(kek, Path(default_kek) if default_kek else path.parent / DEFAULT_KEK_FILE)
                store._ensure_multicast_key(now)
            except BaseException:
                store.close()
                raise
        except sqlite3.Error as exc:
            raise LocalError(f"database {path}: {exc}") from None
        except OSError as exc:
            raise LocalError(f"database {path}: {exc.strerror or exc}") from None
        return store

    def close(self) -> None:
        self._db.close()
        if self._users is not None:
            self._users.close()
            self._users = None

    def _write(self):
        return _Transaction(self._db)

    def schema_version(self) -> int:
        return self._db.execute("SELECT version FROM schema_version").fetchone()[0]

    def _migrate(self, kek: Kek | None, default_kek_path: Path) -> None:
        with self._write():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                self._db.execute("INSERT INTO schema_version VALUES (0)")
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise LocalError(
                f"database {self.path} has schema version {version}; this keyserverd knows "
                f"up to {SCHEMA_VERSION}"
            )
        sealed_under = self._sealed_under() if version >= SEALED_SCHEMA else None
        where = f"database {self.path}"
        self.kek = kek if kek is not None else default_kek(default_kek_path, sealed_under, where)
        if sealed_under is not None:
            check_kek(sealed_under, self.kek, where)
        for number in range(version, SCHEMA_VERSION):
            with self._write():
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if number + 1 == SEALED_SCHEMA:
                    counts = reseal_key_rows(self._db.execute, "?", None, self.kek)
                    self._db.execute("INSERT INTO kek_check (id, kek_id) VALUES (1, ?)", (self.kek.kek_id,))
                self._db.execute("UPDATE schema_version SET version = ?", (number + 1,))
            if number + 1 == SEALED_SCHEMA and sum(counts.values()):
                log.info("store_sealed", extra=fields(database=str(self.path), kek_id=self.kek.shown_id, **counts))
                self._scrub()

    def _sealed_under(self) -> str | None:
        row = self._db.execute("SELECT kek_id FROM kek_check WHERE id = 1").fetchone()
        return row[0] if row else None

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
                database=str(self.path), reason=busy,
                note="replaced key values may stay in free pages until the next VACUUM"))

    def reseal(self, new: Kek, then=None) -> dict[str, int]:
        """Re-seal every stored key under ``new`` in one transaction; no PW_ID
        changes.  LocalError (nothing changed) while another process has the
        database open.  ``then()`` runs after the commit, while nobody else can
        open the database yet.  Returns the rows re-sealed per table."""
        if not self._users.exclusive():
            raise LocalError(f"database {self.path} is open in another process (a running keyserverd, or "
                             f"another keyserverd command): stop it, then rotate the KEK")
        try:
            with self._write():
                check_kek(self._sealed_under() or "", self.kek, f"database {self.path}")
                counts = reseal_key_rows(self._db.execute, "?", self.kek, new)
                self._db.execute("UPDATE kek_check SET kek_id = ? WHERE id = 1", (new.kek_id,))
            self.kek = new
            self._scrub()
            if then is not None:
                then()
        finally:
            self._users.shared()
        return counts

    def _ensure_multicast_key(self, now: float) -> None:
        with self._write():
            self._db.execute(
                "INSERT OR IGNORE INTO multicast_keys (pw_id, key, created_at) "
                "SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM multicast_keys)",
                (FIRST_PW_ID, self._new_multicast_key(FIRST_PW_ID), now),
            )

    # --- hosts ---------------------------------------------------------------
    def add_host(self, host_id, mac, role, token_hash, token_expires, now) -> None:
        with self._write():
            if self._db.execute("SELECT 1 FROM hosts WHERE id = ?", (host_id,)).fetchone():
                raise LocalError(f"host {host_id!r} already exists")
            if mac is not None:
                other = self._db.execute("SELECT id FROM hosts WHERE mac = ?", (mac,)).fetchone()
                if other:
                    raise LocalError(f"MAC {format_mac(mac)} is already bound to host {other[0]!r}")
            self._db.execute(
                "INSERT INTO hosts (id, mac, role, token_hash, token_expires, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (host_id, mac, role, token_hash, token_expires, now),
            )

    def get_host(self, host_id) -> HostRecord | None:
        row = self._db.execute(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE id = ?", (host_id,)).fetchone()
        return _host(row)

    def list_hosts(self) -> list[HostRecord]:
        rows = self._db.execute(f"SELECT {_HOST_COLUMNS} FROM hosts ORDER BY id").fetchall()
        return [_host(r) for r in rows]

    def revoke_host(self, host_id, now) -> bool:
        with self._write():
            row = self._db.execute("SELECT revoked_at FROM hosts WHERE id = ?", (host_id,)).fetchone()
            if row is None:
                raise LocalError(f"no host {host_id!r}")
            if row[0] is not None:
                return False
            self._db.execute("UPDATE hosts SET revoked_at = ? WHERE id = ?", (now, host_id))
            self._event("revoke", host_id, None, None, now)
            return True

    def is_revoked(self, host_id) -> bool:
        row = self._db.execute("SELECT revoked_at FROM hosts WHERE id = ?", (host_id,)).fetchone()
        return row is None or row[0] is not None

    # --- enrollment ----------------------------------------------------------
    def consume_token(self, host_id, token_hash, now) -> HostRecord:
        with self._write():
            row = self._db.execute(
                "SELECT token_hash, token_expires, token_used, revoked_at FROM hosts WHERE id = ?",
                (host_id,),
            ).fetchone()
            if row is None or row[0] is None:
                raise RefusedError(f"no host {host_id!r} is waiting for enrollment", "bad_token")
            stored_hash, expires, used, revoked_at = row
            if revoked_at is not None:
                raise RefusedError(f"host {host_id!r} is revoked", "revoked")
            if not hmac.compare_digest(stored_hash, token_hash):
                raise RefusedError(f"wrong token for host {host_id!r}", "bad_token")
            if used:
                raise RefusedError(f"the token for host {host_id!r} was already used", "token_used")
            if expires is not None and now >= expires:
                raise RefusedError(f"the token for host {host_id!r} has expired", "token_expired")
            self._db.execute("UPDATE hosts SET token_used = 1 WHERE id = ?", (host_id,))
        return self.get_host(host_id)

    def mark_enrolled(self, host_id, now) -> None:
        with self._write():
            self._db.execute("UPDATE hosts SET enrolled_at = ? WHERE id = ?", (now, host_id))

    # --- ID-MAC table --------------------------------------------------------
    def bind_mac(self, host_id, mac) -> None:
        with self._write():
            row = self._db.execute("SELECT mac FROM hosts WHERE id = ?", (host_id,)).fetchone()
            if row is None:
                raise RefusedError(f"no host {host_id!r}", "revoked")
            if row[0] == mac:
                return
            if row[0] is not None:
                raise RefusedError(
                    f"host {host_id!r} is bound to {format_mac(row[0])}, not {format_mac(mac)}", "mac_conflict"
                )
            other = self._db.execute("SELECT id FROM hosts WHERE mac = ?", (mac,)).fetchone()
            if other is not None:
                raise RefusedError(f"MAC {format_mac(mac)} is bound to another host", "mac_conflict")
            self._db.execute("UPDATE hosts SET mac = ? WHERE id = ?", (mac, host_id))

    def host_by_mac(self, mac) -> HostRecord | None:
        row = self._db.execute(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE mac = ?", (mac,)).fetchone()
        return _host(row)

    # --- ID-ID-KEY table and multicast key -----------------------------------
    def get_or_create_pair_key(self, id_a, id_b, now) -> tuple[bytes, int]:
        if id_a == id_b:
            raise LocalError("a pair key needs two different host IDs")
        id1, id2 = sorted((id_a, id_b))
        with self._write():
            row = self._newest_pair_key(id1, id2)
            if row is None:
                self._db.execute(
                    "INSERT INTO pair_keys (id1, id2, pw_id, key, created_at) VALUES (?, ?, ?, ?, ?)",
                    (id1, id2, FIRST_PW_ID, self._new_pair_key(id1, id2, FIRST_PW_ID), now),
                )
                row = self._newest_pair_key(id1, id2)
        return self._open_pair_key(id1, id2, row[1], row[0]), row[1]

    def _newest_pair_key(self, id1, id2):
        return self._db.execute(
            "SELECT key, pw_id FROM pair_keys WHERE id1 = ? AND id2 = ? ORDER BY pw_id DESC LIMIT 1",
            (id1, id2),
        ).fetchone()

    def current_multicast_key(self) -> tuple[bytes, int]:
        row = self._db.execute(
            "SELECT key, pw_id FROM multicast_keys ORDER BY pw_id DESC LIMIT 1"
        ).fetchone()
        return self._open_multicast_key(row[1], row[0]), row[1]

    # --- rotation (PW_ID) and the event log ------------------------------------
    def _event(self, kind, id1, id2, pw_id, now) -> None:
        self._db.execute(
            "INSERT INTO key_events (kind, id1, id2, pw_id, created_at) VALUES (?, ?, ?, ?, ?)",
            (kind, id1, id2, pw_id, now),
        )

    def rotate_pair_key(self, id_a, id_b, now, if_pw_id=None, if_created_before=None) -> int | None:
        id1, id2 = sorted((id_a, id_b))
        with self._write():
            row = self._db.execute(
                "SELECT pw_id, created_at FROM pair_keys WHERE id1 = ? AND id2 = ? "
                "ORDER BY pw_id DESC LIMIT 1", (id1, id2),
            ).fetchone()
            if row is None:
                return None
            if if_pw_id is not None and row[0] != if_pw_id:
                return None
            if if_created_before is not None and row[1] >= if_created_before:
                return None
            pw_id = row[0] + 1
            self._db.execute(
                "INSERT INTO pair_keys (id1, id2, pw_id, key, created_at) VALUES (?, ?, ?, ?, ?)",
                (id1, id2, pw_id, self._new_pair_key(id1, id2, pw_id), now),
            )
            self._event("pair", id1, id2, pw_id, now)
        return pw_id

    def pair_key(self, id_a, id_b, pw_id) -> bytes | None:
        id1, id2 = sorted((id_a, id_b))
        row = self._db.execute(
            "SELECT key FROM pair_keys WHERE id1 = ? AND id2 = ? AND pw_id = ?", (id1, id2, pw_id)
        ).fetchone()
        return self._open_pair_key(id1, id2, pw_id, row[0]) if row else None

    def pair_versions(self, id_a, id_b) -> list[tuple[int, float]]:
        id1, id2 = sorted((id_a, id_b))
        rows = self._db.execute(
            "SELECT pw_id, created_at FROM pair_keys WHERE id1 = ? AND id2 = ? ORDER BY pw_id DESC", (id1, id2)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def pairs(self, host_id=None) -> list[tuple[str, str]]:
        if host_id is None:
            rows = self._db.execute("SELECT DISTINCT id1, id2 FROM pair_keys ORDER BY id1, id2")
        else:
            rows = self._db.execute(
                "SELECT DISTINCT id1, id2 FROM pair_keys WHERE id1 = ? OR id2 = ? ORDER BY id1, id2",
                (host_id, host_id),
            )
        return [(r[0], r[1]) for r in rows.fetchall()]

    def stale_pairs(self, created_before) -> list[tuple[str, str, int]]:
        rows = self._db.execute(
            "SELECT id1, id2, MAX(pw_id), MAX(created_at) FROM pair_keys GROUP BY id1, id2"
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows if r[3] < created_before]

    def rotate_multicast_key(self, now, if_created_before=None) -> int | None:
        with self._write():
            pw_id, created_at = self._db.execute(
                "SELECT pw_id, created_at FROM multicast_keys ORDER BY pw_id DESC LIMIT 1"
            ).fetchone()
            if if_created_before is not None and created_at >= if_created_before:
                return None
            self._db.execute(
                "INSERT INTO multicast_keys (pw_id, key, created_at) VALUES (?, ?, ?)",
                (pw_id + 1, self._new_multicast_key(pw_id + 1), now),
            )
            self._event("multicast", None, None, pw_id + 1, now)
        return pw_id + 1

    def multicast_key(self, pw_id) -> bytes | None:
        row = self._db.execute("SELECT key FROM multicast_keys WHERE pw_id = ?", (pw_id,)).fetchone()
        return self._open_multicast_key(pw_id, row[0]) if row else None

    def adopt_multicast_key(self, pw_id, key, now) -> bool:
        if len(key) != KEY_BYTES:
            raise LocalError(f"a multicast key has {KEY_BYTES} bytes")
        with self._write():
            newest = self._db.execute("SELECT COALESCE(MAX(pw_id), 0) FROM multicast_keys").fetchone()[0]
            if pw_id <= newest:
                return False
            self._db.execute("INSERT INTO multicast_keys (pw_id, key, created_at) VALUES (?, ?, ?)",
                             (pw_id, self._new_multicast_key(pw_id, key), now))
            self._event("multicast", None, None, pw_id, now)
        return True

    def events_since(self, seq) -> list[KeyEvent]:
        rows = self._db.execute(
            "SELECT seq, kind, id1, id2, pw_id FROM key_events WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        return [KeyEvent(*r) for r in rows]

    def last_event_seq(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM key_events").fetchone()[0]

    def retire_old_versions(self, superseded_before) -> int:
        """A version is superseded when the next one was created; drop those
        superseded before the time (their key material is gone for good)."""
        with self._write():
            cur = self._db.execute(
                "DELETE FROM pair_keys WHERE EXISTS (SELECT 1 FROM pair_keys AS newer "
                "WHERE newer.id1 = pair_keys.id1 AND newer.id2 = pair_keys.id2 "
                "AND newer.pw_id = pair_keys.pw_id + 1 AND newer.created_at < ?)",
                (superseded_before,),
            )
            pairs = cur.rowcount
            cur = self._db.execute(
                "DELETE FROM multicast_keys WHERE EXISTS (SELECT 1 FROM multicast_keys AS newer "
                "WHERE newer.pw_id > multicast_keys.pw_id AND newer.created_at < ?)",
                (superseded_before,),
            )
            self._db.execute("DELETE FROM key_events WHERE created_at < ?", (superseded_before - 86400,))
        return pairs + cur.rowcount


    def key_summary(self) -> dict:
        rows = self._db.execute(
            "SELECT p.id1, p.id2, p.pw_id, p.created_at FROM pair_keys AS p "
            "WHERE p.pw_id = (SELECT MAX(pw_id) FROM pair_keys WHERE id1 = p.id1 AND id2 = p.id2) "
            "ORDER BY p.id1, p.id2"
        ).fetchall()
        versions = self._db.execute("SELECT COUNT(*) FROM pair_keys").fetchone()[0]
        mc = self._db.execute(
            "SELECT pw_id, created_at FROM multicast_keys ORDER BY pw_id DESC LIMIT 1"
        ).fetchone()
        return {"pairs": [tuple(r) for r in rows], "pair_versions": versions,
                "multicast": tuple(mc) if mc else None}


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
