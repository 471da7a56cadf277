"""What the key service needs from its store, whichever database holds it.

``KeyStore`` is the interface: ``service``, ``server``, the CLI and peering
use only these methods.  ``sql_store.SqlStore`` implements it once, and
``sqlite.SqliteStore`` and ``postgres.PgStore`` fill in what their databases
do differently.  A write the database cannot take is ``StoreUnavailable``;
nothing of it was stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

from l2crypt.core.errors import RefusedError

if TYPE_CHECKING:
    from .kek import Kek


class StoreUnavailable(RefusedError):
    """The database could not take a write (nothing of it was stored)."""

    code = "store_unavailable"


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

    #: The KEK the stored keys are sealed under (``kek``).
    kek: Kek

    def take_turn(self) -> bool:
        """True if a ``group()`` may start now without waiting for another
        process's write (it holds the turn until it ends); False: ask again soon."""

    def group(self) -> ContextManager[None]:
        """A block whose writes are committed together, with one fsync, when it
        ends; StoreUnavailable (nothing of it stored) if that commit fails.
        Nothing written inside may be acknowledged before the block returns."""

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

    def pair_key_versions(self, id_a: str, id_b: str, now: float | None = None) -> list[tuple[int, float, bytes]]:
        """(pw_id, created_at, key) of every version of the pair still held,
        newest first, in one read; with ``now``, version 1 is made first if
        the pair has none (as ``get_or_create_pair_key``)."""

    def hold_writers(self) -> bool:
        """Inside ``group()``: begin its transaction now; True if no other
        writer can commit before the group does (SQLite), so what is read
        from now on stays current until the group's answers leave."""

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

    def bind_ip(self, host_id: str, ip: bytes) -> bool:
        """Bind an IPv4 or IPv6 address to the host (ID-IP table), or raise RefusedError
        code ip_conflict (another host holds it) or too_many_ips."""

    def host_id_by_ip(self, ip: bytes) -> str | None:
        """The ID bound to the address, or None."""

    def ips_of(self, host_id: str) -> list[bytes]:
        """The host's bound IP addresses (4 or 16 bytes each)."""

    def schema_version(self) -> int:
        """How many of ``schema.MIGRATIONS`` the database has run."""

    def reseal(self, new: Kek, then: Callable[[], None] | None = None) -> dict[str, int]:
        """Re-seal every stored key under ``new`` in one transaction (no PW_ID
        changes) and keep it as ``kek``; LocalError, nothing changed, while
        anyone else uses the database.  ``then()`` runs after the commit,
        before anyone else can open the store.  Returns the rows per table."""

    def close(self) -> None:
        """Release the store."""
