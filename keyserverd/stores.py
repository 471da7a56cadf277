"""Open the store a key-server config names.

``store`` in the config (``--store``): empty (the default) is the SQLite file
``keyserver.db`` in ``state_dir``; ``sqlite:///PATH`` is another SQLite file (relative; ``sqlite:////abs`` for an absolute path);
``postgresql://...`` (or ``postgres://``) is a PostgreSQL database that several
keyserverd instances share (``store_pg.PgStore``).
"""

from __future__ import annotations

from pathlib import Path

from l2crypt.errors import LocalError

from .store import KeyStore, SqliteStore

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


def open_store(store_url: str, state_dir: Path, now: float, create: bool = True) -> KeyStore:
    """The configured store, migrated to the current schema; LocalError if it cannot be opened."""
    if store_url.startswith(PG_SCHEMES):
        from .store_pg import PgStore
        return PgStore.open(store_url, now, create=create)
    if store_url.startswith("sqlite:///"):
        return SqliteStore.open(Path(store_url[len("sqlite:///"):]), now, create=create)
    if store_url:
        raise LocalError(f"store: unsupported URL scheme in {store_url.split(':', 1)[0]!r}")
    return SqliteStore.open(Path(state_dir) / DB_FILE, now, create=create)
