"""Host records kept in each keyserverd worker, exact to the store's event log.

A key request used to read the requester's revocation and the peer's row by
MAC from the store every time.  ``HostCache`` keeps the rows a request needs
(by ID and by MAC) and answers from memory, without weakening what a request
is refused for:

1. Only rows of hosts that are bound (a MAC) and not revoked are kept.  Such a
   row changes in one way only: it is revoked (``revoke_host``), and every
   revocation writes a ``revoke`` event in the same transaction.  (A MAC is
   bound once and never changes or goes; no row is ever deleted.)  Unknown
   IDs, unbound and revoked hosts are read from the store each time.
2. Before it answers from memory, the cache reads the event log after the
   last event it has seen (``events_since``: one indexed read that is almost
   always empty) and drops the host of every ``revoke`` event.  Events become
   visible in ``seq`` order (see ``sql_store``), so none is skipped.
3. When that read is done: ``expire()`` makes the next lookup read the log
   first.  The server calls it when a store group begins and ends
   (``KeyService.begin_group``/``end_group``).  Inside a group, the read
   first begins the group's transaction (``store.hold_writers``): on SQLite
   no other writer can commit a revocation until the group's answers have
   left, so one read serves the whole group, and a revocation committed
   before the group began is seen by every request of it.  Where writers do
   not exclude each other (PostgreSQL), or outside a group (the event loop,
   peer answers), every lookup reads the log first.
4. The event loop, which reads every event in any case, drops a revoked
   host too (``forget``), so a worker that answered nothing for longer than
   the log keeps its events still learns every revocation.
5. At most ``max_hosts`` rows are kept; past that the cache starts afresh.
This module imports no socket, asyncio or time.
"""

from __future__ import annotations

from keyserverd.store.protocol import HostRecord, KeyStore

#: Rows a worker keeps at most (``HostCache``).
HOSTS_KEPT = 65536


class HostCache:
    """Bound, unrevoked host rows by ID and by MAC, kept exact by the
    store's event log (see the module docstring)."""

    def __init__(self, store: KeyStore, max_hosts: int = HOSTS_KEPT):
        self.store = store
        self.max_hosts = max_hosts
        self._by_id: dict[str, HostRecord] = {}
        self._by_mac: dict[bytes, HostRecord] = {}
        #: The newest event read (None: not read yet).
        self._seq: int | None = None
        #: The log was read and nobody can have committed a revocation since.
        self._current = False
        self.hits = 0
        self.misses = 0

    def expire(self) -> None:
        """The next lookup reads the event log first."""
        self._current = False

    def forget(self, host_id: str) -> None:
        """Drop the host's row (its revocation event was read elsewhere: ``KeyService.on_event``)."""
        host = self._by_id.pop(host_id, None)
        if host is not None:
            self._by_mac.pop(host.mac, None)

    def get_host(self, host_id: str) -> HostRecord | None:
        return self._lookup(self._by_id, host_id, self.store.get_host)

    def host_by_mac(self, mac: bytes) -> HostRecord | None:
        return self._lookup(self._by_mac, mac, self.store.host_by_mac)

    def _lookup(self, kept: dict, key, read) -> HostRecord | None:
        self._follow()
        host = kept.get(key)
        if host is not None:
            self.hits += 1
            return host
        self.misses += 1
        return self._keep(read(key))

    def is_revoked(self, host_id: str) -> bool:
        """True if the host is revoked or unknown (as ``store.is_revoked``)."""
        host = self.get_host(host_id)
        return host is None or host.revoked

    def _keep(self, host: HostRecord | None) -> HostRecord | None:
        if host is not None and host.mac is not None and not host.revoked:
            if len(self._by_id) >= self.max_hosts:
                self._by_id.clear()
                self._by_mac.clear()
            self._by_id[host.id] = host
            self._by_mac[host.mac] = host
        return host

    def _follow(self) -> None:
        """Drop the hosts revoked since the last read of the log (see the module docstring, 2 and 3)."""
        if self._current:
            return
        held = self.store.hold_writers()
        if self._seq is None:
            self._seq = self.store.last_event_seq()
        else:
            for event in self.store.events_since(self._seq):
                self._seq = event.seq
                if event.kind == "revoke":
                    self.forget(event.id1)
        self._current = held
