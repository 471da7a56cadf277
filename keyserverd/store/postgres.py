"""The key server's state in PostgreSQL, shared by several keyserverd instances.

Same ``KeyStore`` interface and the same tables as ``store.SqliteStore``;
selected with ``store = "postgresql://..."`` in the key-server config.

1. ``PgStore.open(url, now, kek=...)`` connects (psycopg 3, autocommit; TLS as
   ``pg_tls`` decides: ``verify-full`` for a host that is not local) and
   applies the pending migrations of ``MIGRATIONS`` in one transaction under
   an advisory lock, so instances starting together migrate once; the first
   start also creates multicast key PW_ID 1.  Keys are sealed under the KEK
   as in ``store`` (migration 4 seals the keys of an older database); a KEK
   that does not match the database's is refused before anything is written.
2. Every write is one transaction, committed before the method returns.
   When the connection is lost (PostgreSQL restarts, the network breaks),
   the call raises ``StoreUnavailable`` (the client gets ``store_unavailable``
   and asks again): nothing of it was acknowledged.  The next calls reconnect
   with backoff and answer ``StoreUnavailable`` at once meanwhile
   (``pg_connection``); a reconnection checks the KEK again.
3. Races between instances are settled by the database, not by timing:
   - a new pair key is ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT``
     in one transaction: when both ends of a pair ask two instances at once,
     one insert wins and both read the winner's key;
   - a rotation inserts version N+1 with ``ON CONFLICT DO NOTHING``: timers
     on several instances rotate once;
   - writers of ``key_events`` hold an advisory lock until they commit, so
     events become visible in ``seq`` order and a poller that remembers the
     last seq it saw never skips one.
4. Every connection holds a shared advisory lock (``KEK_LOCK``); a KEK
   rotation (``reseal``) holds it alone, so no instance writes under the old KEK.
Key bytes and the URL's password never reach a log or an error message.
"""

from __future__ import annotations

import hmac
import logging
import time
from urllib.parse import urlsplit, urlunsplit

from l2crypt.core.errors import LocalError, RefusedError
from l2crypt.core.frame_wire import format_mac
from l2crypt.core.ks_messages import MAX_PEER_IPS
from l2crypt.ops.logs import fields

from .ip import format_ip as _fmt_ip
from .kek import Kek, KekError, check_kek
from .pg_connection import PgConnection, first_line, guarded
from .pg_tls import tls_parameters
from .sealing import SealedKeys, reseal_key_rows
from .sqlite import FIRST_PW_ID, KEY_BYTES, SEALED_SCHEMA, HostRecord, KeyEvent

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError:  # pragma: no cover - only without the extra
    psycopg = None

log = logging.getLogger("keyserverd")

#: Advisory lock keys (arbitrary, fixed): schema migration, event ordering,
#: the KEK (shared by every connection, exclusive for a rotation).
MIGRATE_LOCK = 0x6C32_0001
EVENT_LOCK = 0x6C32_0002
KEK_LOCK = 0x6C32_0003
#: Seconds a KEK rotation waits for the other connections to be gone.
RESEAL_WAIT_S = 2.0


#: Schema migrations; ``schema_version.version`` is how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id            TEXT PRIMARY KEY,
        mac           BYTEA UNIQUE,
        role          TEXT NOT NULL CHECK (role IN ('host', 'gateway')),
        token_hash    BYTEA,
        token_expires DOUBLE PRECISION,
        token_used    INTEGER NOT NULL DEFAULT 0,
        enrolled_at   DOUBLE PRECISION,
        revoked_at    DOUBLE PRECISION,
        created_at    DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE pair_keys (
        id1        TEXT NOT NULL,
        id2        TEXT NOT NULL,
        pw_id      BIGINT NOT NULL,
        key        BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (id1, id2, pw_id),
        CHECK (id1 < id2)
    );
    CREATE TABLE multicast_keys (
        pw_id      BIGINT PRIMARY KEY,
        key        BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    CREATE TABLE key_events (
        seq        BIGSERIAL PRIMARY KEY,
        kind       TEXT NOT NULL CHECK (kind IN ('pair', 'multicast', 'revoke')),
        id1        TEXT,
        id2        TEXT,
        pw_id      BIGINT,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: the ID-IP table of the layer-3 modes (see store_ip).
    """
    CREATE TABLE host_ips (
        ip  BYTEA PRIMARY KEY CHECK (length(ip) = 4),
        id  TEXT NOT NULL REFERENCES hosts(id)
    );
    CREATE INDEX host_ips_by_id ON host_ips (id);
    """,
    # 4: keys are sealed under the KEK (see store.MIGRATIONS).
    """
    CREATE TABLE kek_check (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        kek_id TEXT NOT NULL
    );
    """,
    # 5: the ID-IP table takes IPv6 addresses too (see store_ip).
    """
    ALTER TABLE host_ips DROP CONSTRAINT host_ips_ip_check;
    ALTER TABLE host_ips ADD CONSTRAINT host_ips_ip_check CHECK (length(ip) IN (4, 16));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_HOST_COLUMNS = "id, mac, role, token_expires, token_used, enrolled_at, revoked_at, created_at"


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def _host(row) -> HostRecord | None:
    if row is None:
        return None
    return HostRecord(row[0], bytes(row[1]) if row[1] is not None else None, row[2], row[3],
                      bool(row[4]), row[5], row[6], row[7])


class PgStore(SealedKeys):
    """PostgreSQL implementation of ``KeyStore``.  One connection, used from one
    thread (the event loop, or the CLI); other instances use their own."""

    def __init__(self, url: str, kek: Kek, parameters: dict):
        self.url = redact_url(url)
        self.kek = kek
        self._link = PgConnection(url, self.url, parameters, self._attach)

    # --- 1. open and migrate -------------------------------------------------
    @classmethod
    def open(cls, url: str, now: float, create: bool = True, *, kek: Kek | None = None,
             tls_insecure: bool = False) -> "PgStore":
        """Connect and migrate.  ``kek`` is required (every instance sharing the
        database uses the same one); ``tls_insecure`` lets the URL name a TLS
        mode weaker than verify-full for a host that is not local (``pg_tls``)."""
        if psycopg is None:
            raise LocalError("store: a postgresql:// URL needs psycopg 3 (pip install 'l2crypt[postgresql]')")
        if kek is None:
            raise KekError("a PostgreSQL store needs a KEK: set kek_file or kek_credential (the same on every "
                           "keyserverd sharing the database)")
        try:
            parameters = tls_parameters(url, tls_insecure)
        except ValueError as exc:
            raise LocalError(f"store {redact_url(url)}: {exc}") from None
        store = cls(url, kek, parameters)
        try:
            store._link.connect()
        except psycopg.Error as exc:
            raise LocalError(f"database {store.url}: cannot connect: {first_line(exc)}") from None
        try:
            store._migrate()
            store._ensure_multicast_key(now)
        except psycopg.Error as exc:
            store.close()
            raise LocalError(f"database {store.url}: {first_line(exc)}") from None
        except BaseException:
            store.close()
            raise
        return store

    def _attach(self, conn, reconnecting: bool) -> None:
        """Every new connection holds the shared KEK lock; a reconnection checks the KEK
        again (it may have been rotated meanwhile)."""
        if not conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (KEK_LOCK,)).fetchone()[0]:
            raise KekError(f"database {self.url}: a KEK rotation is running on it; try again when it has finished")
        if reconnecting:
            row = conn.execute("SELECT kek_id FROM kek_check WHERE id = 1").fetchone()
            check_kek(row[0] if row else "", self.kek, f"database {self.url}")

    def close(self) -> None:
        self._link.close()

    @property
    def _db(self):
        """The connection (remade after it was lost, see ``pg_connection``)."""
        return self._link.conn

    def _q(self, sql: str, params=()):
        return self._db.execute(sql, params)

    def schema_version(self) -> int:
        return self._q("SELECT version FROM schema_version").fetchone()[0]

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

    def _migrate(self) -> None:
        sealed = None
        with self._db.transaction():
            self._q("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            self._q("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self._q("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                self._q("INSERT INTO schema_version VALUES (0)")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise LocalError(f"database {self.url} has schema version {version}; this keyserverd "
                                 f"knows up to {SCHEMA_VERSION}")
            if version >= SEALED_SCHEMA:
                check_kek(self._sealed_under(), self.kek, f"database {self.url}")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._q(statement)
                if number + 1 == SEALED_SCHEMA:
                    sealed = reseal_key_rows(self._q, "%s", None, self.kek)
                    self._q("INSERT INTO kek_check (id, kek_id) VALUES (1, %s)", (self.kek.kek_id,))
                self._q("UPDATE schema_version SET version = %s", (number + 1,))
        if sealed and sum(sealed.values()):
            log.info("store_sealed", extra=fields(database=self.url, kek_id=self.kek.shown_id, **sealed))
            self._scrub()

    def _sealed_under(self) -> str:
        row = self._q("SELECT kek_id FROM kek_check WHERE id = 1").fetchone()
        return row[0] if row else ""

    def _scrub(self) -> None:
        """Rewrite the key tables, so replaced values leave the table files (not
        PostgreSQL's WAL, nor backups taken before)."""
        self._q("VACUUM (FULL) pair_keys, multicast_keys")

    def reseal(self, new: Kek, then=None) -> dict[str, int]:
        """Re-seal every stored key under ``new`` in one transaction; no PW_ID
        changes.  LocalError (nothing changed) while another connection (a
        keyserverd, a keyserverd command) uses the database.  ``then()`` runs
        after the commit, while no other instance can connect yet."""
        deadline = time.monotonic() + RESEAL_WAIT_S  # a backend just closed may hold it a moment longer
        while not self._q("SELECT pg_try_advisory_lock(%s)", (KEK_LOCK,)).fetchone()[0]:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            users = self._q("SELECT COUNT(*) - 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
                            "AND objid = %s AND objsubid = 1 AND granted", (KEK_LOCK,)).fetchone()[0]
            raise LocalError(f"database {self.url} is in use ({users} other keyserverd connection(s)): stop "
                             f"every keyserverd sharing it, then rotate the KEK")
        try:
            with self._db.transaction():
                check_kek(self._sealed_under(), self.kek, f"database {self.url}")
                counts = reseal_key_rows(self._q, "%s", self.kek, new)
                self._q("UPDATE kek_check SET kek_id = %s WHERE id = 1", (new.kek_id,))
            self.kek = new
            self._scrub()
            if then is not None:
                then()
        finally:
            self._q("SELECT pg_advisory_unlock(%s)", (KEK_LOCK,))
        return counts

    def _ensure_multicast_key(self, now: float) -> None:
        with self._db.transaction():
            self._q(
                "INSERT INTO multicast_keys (pw_id, key, created_at) SELECT %s, %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM multicast_keys) ON CONFLICT DO NOTHING",
                (FIRST_PW_ID, self._new_multicast_key(FIRST_PW_ID), now),
            )

    # --- hosts ---------------------------------------------------------------
    def add_host(self, host_id, mac, role, token_hash, token_expires, now) -> None:
        try:
            with self._db.transaction():
                if self._q("SELECT 1 FROM hosts WHERE id = %s", (host_id,)).fetchone():
                    raise LocalError(f"host {host_id!r} already exists")
                if mac is not None:
                    other = self._q("SELECT id FROM hosts WHERE mac = %s", (mac,)).fetchone()
                    if other:
                        raise LocalError(f"MAC {format_mac(mac)} is already bound to host {other[0]!r}")
                self._q(
                    "INSERT INTO hosts (id, mac, role, token_hash, token_expires, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (host_id, mac, role, token_hash, token_expires, now),
                )
        except pg_errors.UniqueViolation:
            raise LocalError(f"host {host_id!r} or its MAC was added at the same moment elsewhere") from None

    def get_host(self, host_id) -> HostRecord | None:
        return _host(self._q(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE id = %s", (host_id,)).fetchone())

    def list_hosts(self) -> list[HostRecord]:
        return [_host(r) for r in self._q(f"SELECT {_HOST_COLUMNS} FROM hosts ORDER BY id").fetchall()]

    def revoke_host(self, host_id, now) -> bool:
        with self._db.transaction():
            row = self._q("SELECT revoked_at FROM hosts WHERE id = %s FOR UPDATE", (host_id,)).fetchone()
            if row is None:
                raise LocalError(f"no host {host_id!r}")
            if row[0] is not None:
                return False
            self._q("UPDATE hosts SET revoked_at = %s WHERE id = %s", (now, host_id))
            self._event("revoke", host_id, None, None, now)
            return True

    def is_revoked(self, host_id) -> bool:
        row = self._q("SELECT revoked_at FROM hosts WHERE id = %s", (host_id,)).fetchone()
        return row is None or row[0] is not None

    # --- enrollment ----------------------------------------------------------
    def consume_token(self, host_id, token_hash, now) -> HostRecord:
        with self._db.transaction():
            row = self._q(
                "SELECT token_hash, token_expires, token_used, revoked_at FROM hosts WHERE id = %s FOR UPDATE",
                (host_id,),
            ).fetchone()
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
            self._q("UPDATE hosts SET token_used = 1 WHERE id = %s", (host_id,))
        return self.get_host(host_id)

    def mark_enrolled(self, host_id, now) -> None:
        with self._db.transaction():
            self._q("UPDATE hosts SET enrolled_at = %s WHERE id = %s", (now, host_id))

    # --- ID-MAC table --------------------------------------------------------
    def bind_mac(self, host_id, mac) -> None:
        try:
            with self._db.transaction():
                row = self._q("SELECT mac FROM hosts WHERE id = %s FOR UPDATE", (host_id,)).fetchone()
                if row is None:
                    raise RefusedError(f"no host {host_id!r}", "revoked")
                if row[0] is not None and bytes(row[0]) == mac:
                    return
                if row[0] is not None:
                    raise RefusedError(f"host {host_id!r} is bound to {format_mac(bytes(row[0]))}, "
                                       f"not {format_mac(mac)}", "mac_conflict")
                if self._q("SELECT id FROM hosts WHERE mac = %s", (mac,)).fetchone() is not None:
                    raise RefusedError(f"MAC {format_mac(mac)} is bound to another host", "mac_conflict")
                self._q("UPDATE hosts SET mac = %s WHERE id = %s", (mac, host_id))
        except pg_errors.UniqueViolation:
            raise RefusedError(f"MAC {format_mac(mac)} is bound to another host", "mac_conflict") from None

    def host_by_mac(self, mac) -> HostRecord | None:
        return _host(self._q(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE mac = %s", (mac,)).fetchone())

    # --- ID-IP table (layer-3 modes; see store_ip) ------------------------------
    def bind_ip(self, host_id, ip) -> bool:
        try:
            with self._db.transaction():
                if self._q("SELECT id FROM hosts WHERE id = %s FOR UPDATE", (host_id,)).fetchone() is None:
                    raise RefusedError(f"no host {host_id!r}", "revoked")
                row = self._q("SELECT id FROM host_ips WHERE ip = %s", (ip,)).fetchone()
                if row is not None:
                    if row[0] == host_id:
                        return False
                    raise RefusedError(f"IP {_fmt_ip(ip)} is bound to another host", "ip_conflict")
                count = self._q("SELECT COUNT(*) FROM host_ips WHERE id = %s", (host_id,)).fetchone()[0]
                if count >= MAX_PEER_IPS:
                    raise RefusedError(f"host {host_id!r} already binds {count} IPs", "too_many_ips")
                self._q("INSERT INTO host_ips (ip, id) VALUES (%s, %s)", (ip, host_id))
        except pg_errors.UniqueViolation:
            raise RefusedError(f"IP {_fmt_ip(ip)} is bound to another host", "ip_conflict") from None
        return True

    def host_id_by_ip(self, ip) -> str | None:
        row = self._q("SELECT id FROM host_ips WHERE ip = %s", (ip,)).fetchone()
        return row[0] if row else None

    def ips_of(self, host_id) -> list[bytes]:
        rows = self._q("SELECT ip FROM host_ips WHERE id = %s ORDER BY ip", (host_id,)).fetchall()
        return [bytes(r[0]) for r in rows]

    # --- ID-ID-KEY table and multicast key -----------------------------------
    def get_or_create_pair_key(self, id_a, id_b, now) -> tuple[bytes, int]:
        if id_a == id_b:
            raise LocalError("a pair key needs two different host IDs")
        id1, id2 = sorted((id_a, id_b))
        with self._db.transaction():
            self._q(
                "INSERT INTO pair_keys (id1, id2, pw_id, key, created_at) SELECT %s, %s, %s, %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM pair_keys WHERE id1 = %s AND id2 = %s) "
                "ON CONFLICT DO NOTHING",
                (id1, id2, FIRST_PW_ID, self._new_pair_key(id1, id2, FIRST_PW_ID), now, id1, id2),
            )
            row = self._newest_pair_key(id1, id2)
        return self._open_pair_key(id1, id2, row[1], row[0]), row[1]

    def _newest_pair_key(self, id1, id2):
        return self._q("SELECT key, pw_id FROM pair_keys WHERE id1 = %s AND id2 = %s "
                       "ORDER BY pw_id DESC LIMIT 1", (id1, id2)).fetchone()

    def current_multicast_key(self) -> tuple[bytes, int]:
        row = self._q("SELECT key, pw_id FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
        return self._open_multicast_key(row[1], row[0]), row[1]

    # --- rotation (PW_ID) and the event log ------------------------------------
    def _event(self, kind, id1, id2, pw_id, now) -> None:
        self._q("SELECT pg_advisory_xact_lock(%s)", (EVENT_LOCK,))
        self._q("INSERT INTO key_events (kind, id1, id2, pw_id, created_at) VALUES (%s, %s, %s, %s, %s)",
                (kind, id1, id2, pw_id, now))

    def rotate_pair_key(self, id_a, id_b, now, if_pw_id=None, if_created_before=None) -> int | None:
        id1, id2 = sorted((id_a, id_b))
        with self._db.transaction():
            row = self._q("SELECT pw_id, created_at FROM pair_keys WHERE id1 = %s AND id2 = %s "
                          "ORDER BY pw_id DESC LIMIT 1", (id1, id2)).fetchone()
            if row is None:
                return None
            if if_pw_id is not None and row[0] != if_pw_id:
                return None
            if if_created_before is not None and row[1] >= if_created_before:
                return None
            done = self._q(
                "INSERT INTO pair_keys (id1, id2, pw_id, key, created_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING pw_id",
                (id1, id2, row[0] + 1, self._new_pair_key(id1, id2, row[0] + 1), now),
            ).fetchone()
            if done is None:
                return None  # another instance rotated first
            self._event("pair", id1, id2, done[0], now)
        return done[0]

    def pair_key(self, id_a, id_b, pw_id) -> bytes | None:
        id1, id2 = sorted((id_a, id_b))
        row = self._q("SELECT key FROM pair_keys WHERE id1 = %s AND id2 = %s AND pw_id = %s",
                      (id1, id2, pw_id)).fetchone()
        return self._open_pair_key(id1, id2, pw_id, row[0]) if row else None

    def pair_versions(self, id_a, id_b) -> list[tuple[int, float]]:
        id1, id2 = sorted((id_a, id_b))
        rows = self._q("SELECT pw_id, created_at FROM pair_keys WHERE id1 = %s AND id2 = %s "
                       "ORDER BY pw_id DESC", (id1, id2)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def pairs(self, host_id=None) -> list[tuple[str, str]]:
        if host_id is None:
            rows = self._q("SELECT DISTINCT id1, id2 FROM pair_keys ORDER BY id1, id2")
        else:
            rows = self._q("SELECT DISTINCT id1, id2 FROM pair_keys WHERE id1 = %s OR id2 = %s "
                           "ORDER BY id1, id2", (host_id, host_id))
        return [(r[0], r[1]) for r in rows.fetchall()]

    def stale_pairs(self, created_before) -> list[tuple[str, str, int]]:
        rows = self._q("SELECT id1, id2, MAX(pw_id), MAX(created_at) FROM pair_keys "
                       "GROUP BY id1, id2 ORDER BY id1, id2").fetchall()
        return [(r[0], r[1], r[2]) for r in rows if r[3] < created_before]

    def rotate_multicast_key(self, now, if_created_before=None) -> int | None:
        with self._db.transaction():
            pw_id, created_at = self._q(
                "SELECT pw_id, created_at FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
            if if_created_before is not None and created_at >= if_created_before:
                return None
            done = self._q(
                "INSERT INTO multicast_keys (pw_id, key, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING pw_id",
                (pw_id + 1, self._new_multicast_key(pw_id + 1), now),
            ).fetchone()
            if done is None:
                return None
            self._event("multicast", None, None, done[0], now)
        return done[0]

    def multicast_key(self, pw_id) -> bytes | None:
        row = self._q("SELECT key FROM multicast_keys WHERE pw_id = %s", (pw_id,)).fetchone()
        return self._open_multicast_key(pw_id, row[0]) if row else None

    def adopt_multicast_key(self, pw_id, key, now) -> bool:
        if len(key) != KEY_BYTES:
            raise LocalError(f"a multicast key has {KEY_BYTES} bytes")
        with self._db.transaction():
            newest = self._q("SELECT COALESCE(MAX(pw_id), 0) FROM multicast_keys").fetchone()[0]
            if pw_id <= newest:
                return False
            done = self._q("INSERT INTO multicast_keys (pw_id, key, created_at) VALUES (%s, %s, %s) "
                           "ON CONFLICT DO NOTHING RETURNING pw_id",
                           (pw_id, self._new_multicast_key(pw_id, key), now)).fetchone()
            if done is None:
                return False  # another instance stored it first
            self._event("multicast", None, None, pw_id, now)
        return True

    def events_since(self, seq) -> list[KeyEvent]:
        rows = self._q("SELECT seq, kind, id1, id2, pw_id FROM key_events WHERE seq > %s ORDER BY seq",
                       (seq,)).fetchall()
        return [KeyEvent(*r) for r in rows]

    def last_event_seq(self) -> int:
        return self._q("SELECT COALESCE(MAX(seq), 0) FROM key_events").fetchone()[0]

    def retire_old_versions(self, superseded_before) -> int:
        with self._db.transaction():
            pairs = self._q(
                "DELETE FROM pair_keys WHERE EXISTS (SELECT 1 FROM pair_keys AS newer "
                "WHERE newer.id1 = pair_keys.id1 AND newer.id2 = pair_keys.id2 "
                "AND newer.pw_id = pair_keys.pw_id + 1 AND newer.created_at < %s)", (superseded_before,),
            ).rowcount
            mcast = self._q(
                "DELETE FROM multicast_keys WHERE EXISTS (SELECT 1 FROM multicast_keys AS newer "
                "WHERE newer.pw_id > multicast_keys.pw_id AND newer.created_at < %s)", (superseded_before,),
            ).rowcount
            self._q("DELETE FROM key_events WHERE created_at < %s", (superseded_before - 86400,))
        return pairs + mcast


# Every public method of the store (those added later too) maps a lost connection
# to StoreUnavailable (see pg_connection).
for _name, _method in list(vars(PgStore).items()):
    if not _name.startswith("_") and _name not in ("open", "close") and callable(_method):
        setattr(PgStore, _name, guarded(_method))
