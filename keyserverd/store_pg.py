"""The key server's state in PostgreSQL, shared by several keyserverd instances.

Same ``KeyStore`` interface and the same tables as ``store.SqliteStore``;
selected with ``store = "postgresql://..."`` in the key-server config.

1. ``PgStore.open(url, now)`` connects (psycopg 3, autocommit) and applies the
   pending migrations of ``MIGRATIONS`` in one transaction under an advisory
   lock, so instances starting together migrate once; the first start also
   creates multicast key PW_ID 1.
2. Every write is one transaction, committed before the method returns.
3. Races between instances are settled by the database, not by timing:
   - a new pair key is ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT``
     in one transaction: when both ends of a pair ask two instances at once,
     one insert wins and both read the winner's key;
   - a rotation inserts version N+1 with ``ON CONFLICT DO NOTHING``: timers
     on several instances rotate once;
   - writers of ``key_events`` hold an advisory lock until they commit, so
     events become visible in ``seq`` order and a poller that remembers the
     last seq it saw never skips one.
Key bytes and the URL's password never reach a log or an error message.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit, urlunsplit

from l2crypt.errors import LocalError, RefusedError
from l2crypt.frame_wire import format_mac

from l2crypt.ks_messages import MAX_PEER_IPS

from .store_ip import _fmt as _fmt_ip
from .store import FIRST_PW_ID, KEY_BYTES, HostRecord, KeyEvent

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError:  # pragma: no cover - only without the extra
    psycopg = None

#: Advisory lock keys (arbitrary, fixed): schema migration, event ordering.
MIGRATE_LOCK = 0x6C32_0001
EVENT_LOCK = 0x6C32_0002

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
    # 4: the ID-IP table takes IPv6 addresses too (see store_ip).
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


class PgStore:
    """PostgreSQL implementation of ``KeyStore``.  One connection, used from one
    thread (the event loop, or the CLI); other instances use their own."""

    def __init__(self, conn, url: str):
        self._db = conn
        self.url = redact_url(url)

    # --- 1. open and migrate -------------------------------------------------
    @classmethod
    def open(cls, url: str, now: float, create: bool = True) -> "PgStore":
        if psycopg is None:
            raise LocalError("store: a postgresql:// URL needs psycopg 3 (pip install 'l2crypt[postgresql]')")
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise LocalError(f"database {redact_url(url)}: cannot connect: {_first_line(exc)}") from None
        store = cls(conn, url)
        try:
            store._migrate()
            store._ensure_multicast_key(now)
        except psycopg.Error as exc:
            conn.close()
            raise LocalError(f"database {store.url}: {_first_line(exc)}") from None
        return store

    def close(self) -> None:
        self._db.close()

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
        with self._db.transaction():
            self._q("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            self._q("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self._q("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                self._q("INSERT INTO schema_version VALUES (0)")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise LocalError(f"database {self.url} has schema version {version}; this keyserverd "
                                 f"knows up to {SCHEMA_VERSION}")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._q(statement)
                self._q("UPDATE schema_version SET version = %s", (number + 1,))

    def _ensure_multicast_key(self, now: float) -> None:
        with self._db.transaction():
            self._q(
                "INSERT INTO multicast_keys (pw_id, key, created_at) SELECT %s, %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM multicast_keys) ON CONFLICT DO NOTHING",
                (FIRST_PW_ID, secrets.token_bytes(KEY_BYTES), now),
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
                (id1, id2, FIRST_PW_ID, secrets.token_bytes(KEY_BYTES), now, id1, id2),
            )
            row = self._newest_pair_key(id1, id2)
        return bytes(row[0]), row[1]

    def _newest_pair_key(self, id1, id2):
        return self._q("SELECT key, pw_id FROM pair_keys WHERE id1 = %s AND id2 = %s "
                       "ORDER BY pw_id DESC LIMIT 1", (id1, id2)).fetchone()

    def current_multicast_key(self) -> tuple[bytes, int]:
        row = self._q("SELECT key, pw_id FROM multicast_keys ORDER BY pw_id DESC LIMIT 1").fetchone()
        return bytes(row[0]), row[1]

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
                (id1, id2, row[0] + 1, secrets.token_bytes(KEY_BYTES), now),
            ).fetchone()
            if done is None:
                return None  # another instance rotated first
            self._event("pair", id1, id2, done[0], now)
        return done[0]

    def pair_key(self, id_a, id_b, pw_id) -> bytes | None:
        id1, id2 = sorted((id_a, id_b))
        row = self._q("SELECT key FROM pair_keys WHERE id1 = %s AND id2 = %s AND pw_id = %s",
                      (id1, id2, pw_id)).fetchone()
        return bytes(row[0]) if row else None

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
                (pw_id + 1, secrets.token_bytes(KEY_BYTES), now),
            ).fetchone()
            if done is None:
                return None
            self._event("multicast", None, None, done[0], now)
        return done[0]

    def multicast_key(self, pw_id) -> bytes | None:
        row = self._q("SELECT key FROM multicast_keys WHERE pw_id = %s", (pw_id,)).fetchone()
        return bytes(row[0]) if row else None

    def adopt_multicast_key(self, pw_id, key, now) -> bool:
        if len(key) != KEY_BYTES:
            raise LocalError(f"a multicast key has {KEY_BYTES} bytes")
        with self._db.transaction():
            newest = self._q("SELECT COALESCE(MAX(pw_id), 0) FROM multicast_keys").fetchone()[0]
            if pw_id <= newest:
                return False
            done = self._q("INSERT INTO multicast_keys (pw_id, key, created_at) VALUES (%s, %s, %s) "
                           "ON CONFLICT DO NOTHING RETURNING pw_id", (pw_id, key, now)).fetchone()
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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
