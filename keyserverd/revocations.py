"""Which revocations a key server tells its hosts about when they (re)connect.

A host that was disconnected when a revocation was pushed (``peer_revoked``)
must still stop opening the revoked host's frames.  So every ``welcome``
carries ``revoked_macs``, and the agent applies it on every (re)connect.

1. What a welcome names (``WelcomeRevocations.macs``), newest first:
   - our hosts revoked within ``window_s`` (their ``revoked_at``);
   - what the ``RevocationBook`` holds from within ``window_s``: hosts of
     peered key servers revoked there, and the MACs a revoked gateway of ours
     spoke for (its mapped MACs).
   ``window_s`` is twice ``key_max_age_s`` (the ``welcome`` field): an agent
   drops a pair key that long after it got it, and no key of a revoked host
   is handed out after its revocation, so an older revocation can match no
   key an agent still holds.  At most ``MAX_WELCOME_REVOKED`` MACs (6 bytes
   each: 24 KiB of the 64 KiB message limit); more is logged and the oldest
   are left out.  The list is cached and rebuilt when a revocation event
   arrives (``invalidate``), when the book changes, or every ``REFRESH_S``.
2. ``RevocationBook`` keeps what is not in our hosts table, in
   ``state_dir/revocations.json`` (mode 0600, written atomically on every
   change): per peer (by its CA fingerprint) the IDs and MACs it revoked and
   the version of its list we last read (``revocation_peering``); and the
   mapped MACs of our revoked gateways.  Nothing is ever forgotten, up to
   ``MAX_PER_PEER`` hosts a peer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from l2crypt.core.frame_wire import format_mac
from l2crypt.core.ks_messages import MAX_REVOKED_MACS
from l2crypt.ops.logs import fields

from .ca import write_private

log = logging.getLogger("keyserverd")

#: Most MACs one welcome names (6 bytes each).
MAX_WELCOME_REVOKED = MAX_REVOKED_MACS
#: The welcome list is rebuilt at least this often (the window slides).
REFRESH_S = 5.0
#: Most revoked hosts kept per peer key server.
MAX_PER_PEER = 65536
BOOK_FILE = "revocations.json"


class RevocationBook:
    """Revocations not in our hosts table (see the module docstring).  Owned by
    the key service; ``path`` None keeps it in memory (tests)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        #: peer CA fingerprint -> {"version": bytes, "hosts": {id: (mac, learned_at)}}
        self._peers: dict[str, dict] = {}
        #: mapped MAC -> (revoked gateway ID, at)
        self._gateway_macs: dict[bytes, tuple[str, float]] = {}
        #: Bumped on every change (the welcome cache compares it).
        self.changes = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            for fp, entry in doc.get("peers", {}).items():
                hosts = {str(i): (bytes.fromhex(m), float(t)) for i, (m, t) in entry["hosts"].items()}
                self._peers[str(fp)] = {"version": bytes.fromhex(entry["version"]), "hosts": hosts}
            for mac, (gateway, at) in doc.get("gateway_macs", {}).items():
                self._gateway_macs[bytes.fromhex(mac)] = (str(gateway), float(at))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # The peers' lists come back at the next poll (their version differs).
            log.warning("revocation_book_unreadable", extra=fields(path=str(self.path), reason=str(exc)))

    def _save(self) -> None:
        self.changes += 1
        if self.path is None:
            return
        doc = {
            "peers": {fp: {"version": e["version"].hex(),
                           "hosts": {i: [m.hex(), t] for i, (m, t) in e["hosts"].items()}}
                      for fp, e in self._peers.items()},
            "gateway_macs": {m.hex(): [g, t] for m, (g, t) in self._gateway_macs.items()},
        }
        write_private(self.path, json.dumps(doc).encode(), 0o600)

    # --- hosts of peered key servers --------------------------------------------
    def peer_version(self, fingerprint: str) -> bytes:
        """The version of the peer's list we last read in full (b"" if none)."""
        return self._peers.get(fingerprint, {}).get("version", b"")

    def add_peer_hosts(self, fingerprint: str, hosts: list[tuple[str, bytes]], version: bytes,
                       now: float) -> list[tuple[str, bytes]]:
        """Record a peer's revoked hosts (checked by the caller) and its list
        version; return those not known before."""
        entry = self._peers.setdefault(fingerprint, {"version": b"", "hosts": {}})
        new = []
        for host_id, mac in hosts:
            if host_id in entry["hosts"] or len(entry["hosts"]) >= MAX_PER_PEER:
                continue
            entry["hosts"][host_id] = (mac, now)
            new.append((host_id, mac))
        if new or entry["version"] != version:
            entry["version"] = version
            self._save()
        return new

    def is_peer_host_revoked(self, host_id: str) -> bool:
        """True if a peer told us it revoked ``host_id``."""
        return any(host_id in e["hosts"] for e in self._peers.values())

    # --- MACs of our revoked gateways -------------------------------------------
    def add_gateway_macs(self, gateway_id: str, macs: list[bytes], now: float) -> None:
        """The MACs a gateway spoke for when it was revoked."""
        fresh = [m for m in macs if m not in self._gateway_macs]
        for mac in fresh:
            self._gateway_macs[mac] = (gateway_id, now)
        if fresh:
            self._save()

    # --- for the welcome --------------------------------------------------------
    def recent(self, since: float) -> list[tuple[float, bytes]]:
        """(time, MAC) of everything recorded at or after ``since``."""
        out = [(t, mac) for e in self._peers.values() for mac, t in e["hosts"].values() if t >= since]
        out += [(t, mac) for mac, (_, t) in self._gateway_macs.items() if t >= since]
        return out


class WelcomeRevocations:
    """The ``revoked_macs`` of a welcome (see the module docstring).  Owned by the key service."""

    def __init__(self, window_s: float, book: RevocationBook | None = None,
                 max_macs: int = MAX_WELCOME_REVOKED):
        self.window_s = window_s
        self.book = book if book is not None else RevocationBook()
        self.max_macs = max_macs
        self._cache: list[bytes] | None = None
        self._built_at = 0.0
        self._built_changes = -1
        self._warned_full = False

    def invalidate(self) -> None:
        """A revocation happened: rebuild the list for the next welcome."""
        self._cache = None

    def macs(self, store, now: float, exclude: bytes | None = None) -> bytes:
        """The revoked MACs, 6 bytes each, newest first, without ``exclude``."""
        if (self._cache is None or now - self._built_at >= REFRESH_S or now < self._built_at
                or self._built_changes != self.book.changes):
            self._cache = self._build(store, now)
            self._built_at, self._built_changes = now, self.book.changes
        return b"".join(m for m in self._cache if m != exclude)

    def _build(self, store, now: float) -> list[bytes]:
        since = now - self.window_s
        found = [(h.revoked_at, h.mac) for h in store.list_hosts()
                 if h.revoked and h.mac is not None and h.revoked_at >= since]
        found += self.book.recent(since)
        found.sort(key=lambda item: item[0], reverse=True)
        out, seen = [], set()
        for _, mac in found:
            if mac not in seen:
                seen.add(mac)
                out.append(mac)
        if len(out) > self.max_macs:
            if not self._warned_full:
                log.warning("welcome_revocations_truncated", extra=fields(
                    revoked=len(out), named=self.max_macs, oldest_left_out=format_mac(out[-1])))
                self._warned_full = True
            out = out[:self.max_macs]
        return out
