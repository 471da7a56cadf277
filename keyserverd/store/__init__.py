"""Open the store a key-server config names.

``store`` in the config (``--store``): empty (the default) is the SQLite file
``keyserver.db`` in ``state_dir``; ``sqlite:///PATH`` is another SQLite file (relative; ``sqlite:////abs`` for an absolute path);
``postgresql://...`` (or ``postgres://``) is a PostgreSQL database that several
keyserverd instances share (``postgres.PgStore``).

Both stores implement ``protocol.KeyStore``, the only interface the service
uses: the tables are written once (``schema``), the methods once
(``sql_store.SqlStore``), and ``sqlite`` and ``postgres`` hold only what
their databases do differently (placeholders, locks, connections, types).

Keys in either store are sealed under the KEK the config names (``kek_file``,
``kek_credential``, or ``pkcs11_kek_label`` on a token; see ``kek``).  A SQLite store without one uses
``state_dir/kek``, created with a new database; a PostgreSQL store needs one.
"""

from __future__ import annotations

from pathlib import Path

from l2crypt.core.errors import LocalError

from .kek import DEFAULT_KEK_FILE, Kek, load_kek
from .protocol import KeyStore
from .sqlite import SqliteStore

DB_FILE = "keyserver.db"
PG_SCHEMES = ("postgresql://", "postgres://")


def check_store_url(value: str) -> str:
    """ValueError unless ``value`` is empty, sqlite:///PATH or a PostgreSQL URL."""
    if not isinstance(value, str):
        raise ValueError(f"not a store URL: {value!r}")
    if value == "" or value.startswith(PG_SCHEMES):
        return value
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    raise ValueError("want postgresql://..., sqlite:///PATH or nothing (SQLite in state_dir)")


def open_store(store_url: str, state_dir: Path, now: float, create: bool = True, *, kek: Kek | None = None,
               tls_insecure: bool = False) -> KeyStore:
    """The configured store, migrated to the current schema, its keys sealed
    under ``kek`` (None: ``state_dir/kek`` for SQLite); LocalError if it cannot be opened."""
    if store_url.startswith(PG_SCHEMES):
        from .postgres import PgStore
        return PgStore.open(store_url, now, create=create, kek=kek, tls_insecure=tls_insecure)
    default_kek = Path(state_dir) / DEFAULT_KEK_FILE
    if store_url.startswith("sqlite:///"):
        return SqliteStore.open(Path(store_url[len("sqlite:///"):]), now, create=create, kek=kek,
                                default_kek=default_kek)
    if store_url:
        raise LocalError(f"store: unsupported URL scheme in {store_url.split(':', 1)[0]!r}")
    return SqliteStore.open(Path(state_dir) / DB_FILE, now, create=create, kek=kek, default_kek=default_kek)


def open_configured_store(config, now: float, create: bool = True, kek: Kek | None = None) -> KeyStore:
    """The store of a ``KeyServerConfig``, with ``kek`` or else the KEK it names."""
    if kek is None:
        kek = load_kek(config.kek_file, config.kek_credential, token=config.kek_token())
    return open_store(config.store, config.state_dir, now, create, kek=kek,
                      tls_insecure=config.store_tls_insecure)
