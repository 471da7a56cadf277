"""The key server's state in PostgreSQL, shared by several keyserverd instances:
``sql_store.SqlStore`` with what PostgreSQL does its own way.  Selected with
``store = "postgresql://..."`` in the key-server config.

1. ``PgStore.open(url, now, kek=...)`` connects (psycopg 3, autocommit; TLS as
   ``pg_tls`` decides: ``verify-full`` for a host that is not local) and
   migrates (``SqlStore._prepare``) under an advisory lock, so instances
   starting together migrate once.  The KEK is required: every instance
   sharing the database uses the same one.
2. Every write is one transaction, committed before the method returns.
   When the connection is lost (PostgreSQL restarts, the network breaks),
   the call raises ``StoreUnavailable`` (the client gets ``store_unavailable``
   and asks again): nothing of it was acknowledged.  The next calls reconnect
   with backoff and answer ``StoreUnavailable`` at once meanwhile
   (``pg_connection``); a reconnection checks the KEK again.
3. Races between instances are settled as ``sql_store`` says; here a row
   read to decide a write is read ``FOR UPDATE``, and ``_lock_until_commit``
   is a transaction-scoped advisory lock.
4. Every connection holds a shared advisory lock (``KEK_LOCK``); a KEK
   rotation (``reseal``) holds it alone, so no instance writes under the old KEK.
Key bytes and the URL's password never reach a log or an error message.
"""

from __future__ import annotations

import inspect
import time
from urllib.parse import urlsplit, urlunsplit

from l2crypt.core.errors import LocalError

from .kek import Kek, KekError, check_kek
from .pg_connection import PgConnection, first_line, guarded
from .pg_tls import tls_parameters
from .schema import POSTGRESQL, migrations
from .sql_store import SqlStore

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError:  # pragma: no cover - only without the extra
    psycopg = None

#: ``schema.MIGRATIONS`` in PostgreSQL's spelling.
MIGRATIONS = migrations(POSTGRESQL)
#: Advisory lock keys (arbitrary, fixed): held until the commit by writers of
#: the same name (``SqlStore._lock_until_commit``); the KEK (shared by every
#: connection, exclusive for a rotation).
XACT_LOCKS = {"migrate": 0x6C32_0001, "events": 0x6C32_0002}
KEK_LOCK = 0x6C32_0003
#: Seconds a KEK rotation waits for the other connections to be gone.
RESEAL_WAIT_S = 2.0


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class PgStore(SqlStore):
    """``protocol.KeyStore`` in PostgreSQL.  One connection, used from one
    thread (the event loop, or the CLI); other instances use their own."""

    migrations = MIGRATIONS
    FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, kek: Kek, parameters: dict):
        self.url = self.shown = redact_url(url)
        self.kek = kek
        self._link = PgConnection(url, self.url, parameters, self._attach)

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
            store._prepare(kek, now)
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

    # --- the hooks of SqlStore -------------------------------------------------
    def _q(self, sql: str, params=()):
        return self._db.execute(sql.replace("?", "%s"), params)

    def _transaction(self):
        return self._db.transaction()

    def _is_unavailable(self, exc: Exception) -> bool:
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))

    def _lock_until_commit(self, name: str) -> None:
        self._q("SELECT pg_advisory_xact_lock(?)", (XACT_LOCKS[name],))

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, pg_errors.UniqueViolation)

    def _default_kek(self, sealed_under: str | None) -> Kek:
        raise KekError(f"{self.where}: a PostgreSQL store needs a KEK")  # open() asks for it first

    def _scrub(self) -> None:
        """Rewrite the key tables, so replaced values leave the table files (not
        PostgreSQL's WAL, nor backups taken before)."""
        self._q("VACUUM (FULL) pair_keys, multicast_keys")

    def _exclude_others(self) -> None:
        deadline = time.monotonic() + RESEAL_WAIT_S  # a backend just closed may hold it a moment longer
        while not self._q("SELECT pg_try_advisory_lock(?)", (KEK_LOCK,)).fetchone()[0]:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            users = self._q("SELECT COUNT(*) - 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
                            "AND objid = ? AND objsubid = 1 AND granted", (KEK_LOCK,)).fetchone()[0]
            raise LocalError(f"database {self.url} is in use ({users} other keyserverd connection(s)): stop "
                             f"every keyserverd sharing it, then rotate the KEK")

    def _admit_others(self) -> None:
        self._q("SELECT pg_advisory_unlock(?)", (KEK_LOCK,))


# Every public method of the store (those added later too, and those of
# SqlStore) maps a lost connection to StoreUnavailable (see pg_connection).
for _name, _method in inspect.getmembers(PgStore, inspect.isfunction):
    if not _name.startswith("_") and _name not in ("open", "close"):
        setattr(PgStore, _name, guarded(_method))
