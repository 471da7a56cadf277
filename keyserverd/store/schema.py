"""The key server's tables, written once for SQLite and PostgreSQL.

1. ``MIGRATIONS`` are the schema's steps, with a ``{name}`` for each thing the
   two dialects spell differently (``Dialect``: column types, the key column
   that numbers itself, and how migration 5 widens a CHECK).
2. ``migrations(dialect)`` gives the statements of one dialect; the stores
   run the pending ones, and ``schema_version.version`` says how many ran.
   A migration once released never changes: a database made by an older
   keyserverd only runs the steps it lacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Dialect:
    """How one database spells the parts of the schema that differ."""

    #: Raw bytes (keys, MACs, token hashes, IP addresses).
    blob: str
    #: Unix seconds with a fraction.
    real: str
    #: A PW_ID (up to 2**32 - 1).
    int64: str
    #: A primary key the database numbers itself, always increasing (``key_events.seq``).
    serial_key: str
    #: Migration 5: let ``host_ips.ip`` hold 16 bytes too.
    ipv6_ips: str


#: Migration 5 in SQLite, which cannot change a CHECK in place: the table is copied.
SQLITE_IPV6_IPS = """
    CREATE TABLE host_ips_v6 (
        ip  BLOB PRIMARY KEY CHECK (length(ip) IN (4, 16)),
        id  TEXT NOT NULL REFERENCES hosts(id)
    );
    INSERT INTO host_ips_v6 (ip, id) SELECT ip, id FROM host_ips;
    DROP TABLE host_ips;
    ALTER TABLE host_ips_v6 RENAME TO host_ips;
    CREATE INDEX host_ips_by_id ON host_ips (id);
"""
#: Migration 5 in PostgreSQL.
POSTGRESQL_IPV6_IPS = """
    ALTER TABLE host_ips DROP CONSTRAINT host_ips_ip_check;
    ALTER TABLE host_ips ADD CONSTRAINT host_ips_ip_check CHECK (length(ip) IN (4, 16));
"""

SQLITE = Dialect(blob="BLOB", real="REAL", int64="INTEGER", serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
                 ipv6_ips=SQLITE_IPV6_IPS)
POSTGRESQL = Dialect(blob="BYTEA", real="DOUBLE PRECISION", int64="BIGINT", serial_key="BIGSERIAL PRIMARY KEY",
                     ipv6_ips=POSTGRESQL_IPV6_IPS)

#: The schema's steps; ``{name}`` is a field of ``Dialect``.
MIGRATIONS: tuple[str, ...] = (
    # 1: the ID-MAC table, pair keys (the ID-ID-KEY table) and multicast keys.
    """
    CREATE TABLE hosts (
        id            TEXT PRIMARY KEY,
        mac           {blob} UNIQUE,
        role          TEXT NOT NULL CHECK (role IN ('host', 'gateway')),
        token_hash    {blob},
        token_expires {real},
        token_used    INTEGER NOT NULL DEFAULT 0,
        enrolled_at   {real},
        revoked_at    {real},
        created_at    {real} NOT NULL
    );
    CREATE TABLE pair_keys (
        id1        TEXT NOT NULL,
        id2        TEXT NOT NULL,
        pw_id      {int64} NOT NULL,
        key        {blob} NOT NULL,
        created_at {real} NOT NULL,
        PRIMARY KEY (id1, id2, pw_id),
        CHECK (id1 < id2)
    );
    CREATE TABLE multicast_keys (
        pw_id      {int64} PRIMARY KEY,
        key        {blob} NOT NULL,
        created_at {real} NOT NULL
    );
    """,
    # 2: key versions are rotated; every rotation and revocation is an event that
    #    every keyserverd sharing the store pushes to its connected hosts.
    """
    CREATE TABLE key_events (
        seq        {serial_key},
        kind       TEXT NOT NULL CHECK (kind IN ('pair', 'multicast', 'revoke')),
        id1        TEXT,
        id2        TEXT,
        pw_id      {int64},
        created_at {real} NOT NULL
    );
    """,
    # 3: the ID-IP table of the layer-3 modes (IPv4 only at first).
    """
    CREATE TABLE host_ips (
        ip  {blob} PRIMARY KEY CHECK (length(ip) = 4),
        id  TEXT NOT NULL REFERENCES hosts(id)
    );
    CREATE INDEX host_ips_by_id ON host_ips (id);
    """,
    # 4: keys are sealed under the KEK; the id of that KEK.  (The keys already
    #    stored are sealed in the same transaction: ``sealing.reseal_key_rows``.)
    """
    CREATE TABLE kek_check (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        kek_id TEXT NOT NULL
    );
    """,
    # 5: the ID-IP table takes IPv6 addresses too.
    "{ipv6_ips}",
)
SCHEMA_VERSION = len(MIGRATIONS)
#: From this schema version on, every key in the store is sealed.
SEALED_SCHEMA = 4


def migrations(dialect: Dialect) -> tuple[str, ...]:
    """``MIGRATIONS`` as ``dialect`` spells them."""
    names = asdict(dialect)
    return tuple(step.format(**names) for step in MIGRATIONS)


def statements(migration: str) -> list[str]:
    """The statements of one migration, in order."""
    return [s for s in migration.split(";") if s.strip()]
