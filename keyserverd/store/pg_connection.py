"""The PostgreSQL store's connection, which comes back after PostgreSQL restarts.

1. ``PgConnection.connect()`` makes the first connection (a failure raises
   psycopg's error: keyserverd does not start without its database).
   ``on_connect(conn, reconnecting)`` runs on every new connection before it
   is used (the store takes its KEK lock there, and checks the KEK again on
   a reconnection); a LocalError from it refuses the connection.
2. ``conn`` is the live connection.  After one was lost it makes a new one,
   at most once per backoff (``RECONNECT_MIN_S`` doubling to
   ``RECONNECT_MAX_S``, reset by a success); meanwhile it raises
   ``StoreUnavailable`` at once, so a request costs no wait.
3. ``guarded(method)`` wraps a store method: a psycopg ``OperationalError``
   or ``InterfaceError`` during it (the connection broke, the server shut
   down, a query was cancelled) is ``StoreUnavailable``.  The method's
   transaction was not committed, or its commit is in doubt: either way the
   client was told nothing was stored and asks again, and every write of the
   store is idempotent or conditional, so asking again is safe.  ``lost``
   drops the connection when it is broken.
The loss and the return are logged once each (``store_connection_lost``,
``store_reconnected`` with the seconds it was down); the URL's password never.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .sealing import StoreUnavailable

try:
    import psycopg
except ImportError:  # pragma: no cover - only without the extra
    psycopg = None

log = logging.getLogger("keyserverd")

#: Seconds to wait for a connection: the first one, and each reconnection
#: (short: the event loop waits meanwhile; a Unix socket answers at once).
CONNECT_TIMEOUT_S = 10
RECONNECT_TIMEOUT_S = 3
#: Backoff between reconnection attempts, seconds.
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
#: TCP keepalive and user timeout, so a dead peer is noticed (no effect on a Unix socket).
TCP_PARAMETERS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "3",
                  "keepalives_count": "3", "tcp_user_timeout": "20000"}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PgConnection:
    """One connection to ``url`` (shown as ``shown_url``), remade after it is lost."""

    def __init__(self, url: str, shown_url: str, parameters: dict,
                 on_connect: Callable[[object, bool], None]):
        self._url, self.shown_url = url, shown_url
        self._parameters = {**TCP_PARAMETERS, **parameters}
        self._on_connect = on_connect
        self._conn = None
        #: No reconnection attempt before this (monotonic seconds).
        self._retry_at = 0.0
        self._backoff_s = RECONNECT_MIN_S
        self._lost_at: float | None = None

    def connect(self) -> None:
        self._conn = self._new(CONNECT_TIMEOUT_S, reconnecting=False)

    def _new(self, timeout_s: float, reconnecting: bool):
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=timeout_s, **self._parameters)
        try:
            self._on_connect(conn, reconnecting)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def conn(self):
        if self._conn is None:
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreUnavailable(f"the database {self.shown_url} is unreachable; next attempt in "
                                   f"{self._retry_at - now:.1f} s")
        try:
            conn = self._new(RECONNECT_TIMEOUT_S, reconnecting=True)
        except (psycopg.Error, LocalError) as exc:
            self._retry_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, RECONNECT_MAX_S)
            log.log(logging.ERROR if isinstance(exc, LocalError) else logging.DEBUG, "store_reconnect_failed",
                    extra=fields(database=self.shown_url, reason=first_line(exc)))
            raise StoreUnavailable(f"the database {self.shown_url} is unreachable: {first_line(exc)}") from None
        self._conn = conn
        self._backoff_s = RECONNECT_MIN_S
        down_s = now - self._lost_at if self._lost_at is not None else 0.0
        self._lost_at = None
        log.warning("store_reconnected", extra=fields(database=self.shown_url, down_s=round(down_s, 1)))

    def lost(self, exc: BaseException) -> None:
        """After a failed call: drop the connection if it is broken (the next use reconnects)."""
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            log.warning("store_connection_lost", extra=fields(database=self.shown_url, reason=first_line(exc)))
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None
            self._lost_at = time.monotonic()
            self._retry_at = 0.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def guarded(method):
    """``method`` of an object with a ``_link`` (``PgConnection``): a lost
    connection during it is ``StoreUnavailable`` (nothing acknowledged)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._link.lost(exc)
            raise StoreUnavailable(f"the database {self._link.shown_url} did not complete the request: "
                                   f"{first_line(exc)}") from None
    return call
