"""The ID-IP table of the layer-3 modes, next to the ID-MAC table.

A host running ``l2crypt l3-agent`` binds each of its IPv4 (4 bytes) and
IPv6 (16 bytes) addresses to its ID (``ip_bind``).  One address belongs to one host: a second host asking for it
gets ``ip_conflict``.  A host binds at most ``MAX_PEER_IPS`` addresses.
Mixed into ``SqliteStore`` (which provides ``_db`` and ``_write``); every
write is durable on return, like the rest of the store.
"""

from __future__ import annotations

import ipaddress

from l2crypt.core.errors import RefusedError
from l2crypt.core.ks_messages import MAX_PEER_IPS

#: Migration that creates the table (appended to ``store.MIGRATIONS``; IPv4 only).
MIGRATION = """
    CREATE TABLE host_ips (
        ip  BLOB PRIMARY KEY CHECK (length(ip) = 4),
        id  TEXT NOT NULL REFERENCES hosts(id)
    );
    CREATE INDEX host_ips_by_id ON host_ips (id);
"""


#: Migration that lets the table hold IPv6 addresses too (SQLite cannot change
#: a CHECK in place: the table is copied).
MIGRATION_IPV6 = """
    CREATE TABLE host_ips_v6 (
        ip  BLOB PRIMARY KEY CHECK (length(ip) IN (4, 16)),
        id  TEXT NOT NULL REFERENCES hosts(id)
    );
    INSERT INTO host_ips_v6 (ip, id) SELECT ip, id FROM host_ips;
    DROP TABLE host_ips;
    ALTER TABLE host_ips_v6 RENAME TO host_ips;
    CREATE INDEX host_ips_by_id ON host_ips (id);
"""


def format_ip(ip: bytes) -> str:
    return str(ipaddress.ip_address(bytes(ip)))


class IpBindings:
    """``bind_ip``, ``host_id_by_ip`` and ``ips_of`` on the ``host_ips`` table."""

    def bind_ip(self, host_id: str, ip: bytes) -> bool:
        """Bind ``ip`` to ``host_id``; False if it already was.  RefusedError
        ``ip_conflict`` if another host holds it, ``too_many_ips`` past the limit."""
        with self._write():
            row = self._db.execute("SELECT id FROM host_ips WHERE ip = ?", (ip,)).fetchone()
            if row is not None:
                if row[0] == host_id:
                    return False
                raise RefusedError(f"IP {format_ip(ip)} is bound to another host", "ip_conflict")
            if self._db.execute("SELECT 1 FROM hosts WHERE id = ?", (host_id,)).fetchone() is None:
                raise RefusedError(f"no host {host_id!r}", "revoked")
            count = self._db.execute("SELECT COUNT(*) FROM host_ips WHERE id = ?", (host_id,)).fetchone()[0]
            if count >= MAX_PEER_IPS:
                raise RefusedError(f"host {host_id!r} already binds {count} IPs", "too_many_ips")
            self._db.execute("INSERT INTO host_ips (ip, id) VALUES (?, ?)", (ip, host_id))
        return True

    def host_id_by_ip(self, ip: bytes) -> str | None:
        """The ID of the host bound to ``ip``, or None."""
        row = self._db.execute("SELECT id FROM host_ips WHERE ip = ?", (ip,)).fetchone()
        return row[0] if row else None

    def ips_of(self, host_id: str) -> list[bytes]:
        """Every IP address bound to ``host_id`` (4 or 16 bytes), in order."""
        rows = self._db.execute("SELECT ip FROM host_ips WHERE id = ? ORDER BY ip", (host_id,)).fetchall()
        return [bytes(r[0]) for r in rows]
