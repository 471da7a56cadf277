"""The key service's side of peering, without I/O, mixed into ``KeyService``:
what a peer key server may ask of us and what we believe of its answers.

A peer is a ``peer_spec.PeerSpec``, known by the CA that verified it, with its
namespace of host IDs.  The pair key of our host and a peer's host lives with
the server of the lower host ID.

1. ``resolve_for_peer(mac, from_id, peer, now)``: the peer's host ``from_id``
   wants a pair key with our host at ``mac``.  It is refused (``forbidden``)
   unless ``from_id`` is in the asking peer's namespace, is not one of our
   hosts and is not revoked (the peer told us, ``revocation_peering``); the
   answer is ``unknown`` unless ``mac`` is bound to one of our unrevoked hosts.  A peer gets at most
   ``PEER_REQUESTS_PER_S`` answers a second (``rate_limited``), and we create
   pair rows for at most ``MAX_IDS_PER_PEER`` of its IDs (``too_many``), so a
   peer cannot fill our database.
2. ``answer_from_peer(session, rid, peer_mac, found, now)`` finishes a
   ``key_req`` the peers were asked about; ``found`` is (peer, ``resolved``
   answer) from ``Peering.resolve``, which already checked the ID is in that
   peer's namespace.  The ID must not be ours, the requester's or revoked.  A
   key in the answer is taken only when the peer owns the pair (its host's ID
   is the lower one); otherwise the pair is ours and we get or create it.
3. ``apply_peer_revocations(peer, hosts, version, now)`` records the hosts a
   peer revoked (checked by ``revocation_peering``) and returns the
   ``peer_revoked`` pushes for every host that said hello.
Key bytes are never logged.
"""

from __future__ import annotations

import logging

from keyserverd.ratelimit import HostBuckets
from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.logs import fields

log = logging.getLogger("keyserverd")

PUSH_RID = 0
#: Resolve requests one peer key server may make, per second and at once.
PEER_REQUESTS_PER_S = 200.0
PEER_REQUEST_BURST = 400
#: Most host IDs of one peer we keep pair keys with (rows we created).
MAX_IDS_PER_PEER = 4096


class PeerHandlers:
    """Needs ``self.store``, ``self.macs``, ``self.welcome_revocations``,
    ``self.refusals`` and ``self._limited`` (KeyService); call
    ``_init_peer_state()`` from its ``__init__``."""

    def _init_peer_state(self) -> None:
        self._peer_buckets = HostBuckets(PEER_REQUESTS_PER_S, PEER_REQUEST_BURST)
        #: peer CA -> that peer's IDs we hold pair keys with; loaded from the store on first use.
        self._peer_ids: dict[str, set[str]] = {}

    def _refuse_peer(self, peer, code: str, text: str, now: float, **kv) -> dict:
        self.refusals[f"peer_{code}"] += 1
        self._limited(logging.WARNING, "peer_request_refused", (peer.address, code), now,
                      peer=peer.address, code=code, reason=text, **kv)
        return {"t": "error", "code": code, "msg": text}

    def resolve_for_peer(self, mac: bytes, from_id: str, peer, now: float) -> dict:
        """The answer to the peer's ``resolve`` (see the module docstring)."""
        unknown = {"t": "unknown", "mac": mac}
        if not self._peer_buckets.take(peer.ca_fingerprint, now):
            return self._refuse_peer(peer, "rate_limited", "too many resolve requests; slow down", now)
        if not peer.owns(from_id):
            return self._refuse_peer(peer, "forbidden", f"{from_id} is not one of this peer's host IDs", now)
        if self.store.get_host(from_id) is not None or self.welcome_revocations.book.is_peer_host_revoked(from_id):
            return self._refuse_peer(peer, "forbidden", f"{from_id} is one of ours, or revoked", now)
        host = self.store.host_by_mac(mac)
        if host is None or host.revoked:
            return unknown
        answer = {"t": "resolved", "id": host.id, "mac": mac}
        if host.id < from_id:  # the pair lives with us
            ids = self._ids_of_peer(peer)
            if from_id not in ids and len(ids) >= MAX_IDS_PER_PEER:
                return self._refuse_peer(peer, "too_many", f"pair keys with {len(ids)} of this peer's hosts "
                                         "already", now)
            key, pw_id = self.store.get_or_create_pair_key(host.id, from_id, now)
            ids.add(from_id)
            answer.update(key=key, pw_id=pw_id)
        log.info("peer_lookup", extra=fields(peer=peer.address, mac=format_mac(mac), from_id=from_id, host=host.id))
        return answer

    def _ids_of_peer(self, peer) -> set[str]:
        ids = self._peer_ids.get(peer.ca_fingerprint)
        if ids is None:
            ids = {i for pair in self.store.pairs() for i in pair if peer.owns(i)}
            self._peer_ids[peer.ca_fingerprint] = ids
        return ids

    def answer_from_peer(self, session, rid: int, peer_mac: bytes, found, now: float) -> list:
        """Finish a ``key_req`` that the peers were asked about (see the module docstring)."""
        unknown = [("reply", {"t": "unknown", "rid": rid, "peer_mac": peer_mac})]
        if found is None:
            log.info("key_req from %s for MAC %s: unknown here and at the peers", session.identity,
                     format_mac(peer_mac))
            return unknown
        peer, answer = found
        peer_id = answer["id"]
        if (peer_id == session.identity or self.store.get_host(peer_id) is not None
                or self.welcome_revocations.book.is_peer_host_revoked(peer_id)):
            self._refuse_peer(peer, "forbidden", f"answered for {peer_id}: one of ours, or revoked", now)
            return unknown
        if peer_id < session.identity:  # the peer owns the pair: its key or nothing
            if "key" not in answer:
                self._refuse_peer(peer, "bad_answer", f"no key for the pair {peer_id}-{session.identity} "
                                  "it owns", now)
                return unknown
            key, pw_id = answer["key"], answer["pw_id"]
        else:
            key, pw_id = self.store.get_or_create_pair_key(session.identity, peer_id, now)
        log.info("pair key %s <-> %s (at %s) pw_id %d handed out", session.identity, peer_id, peer.address, pw_id)
        return [("reply", {"t": "key", "rid": rid, "peer_mac": peer_mac, "peer_id": peer_id,
                           "key": key, "pw_id": pw_id})]

    def apply_peer_revocations(self, peer, hosts: list[tuple[str, bytes]], version: bytes, now: float) -> list:
        """Record hosts the peer revoked; the ``peer_revoked`` pushes for the new ones."""
        actions = []
        for host_id, mac in self.welcome_revocations.book.add_peer_hosts(peer.ca_fingerprint, hosts, version, now):
            self.events["peer_revoke"] += 1
            log.warning("peer_host_revoked", extra=fields(peer=peer.address, host=host_id, mac=format_mac(mac)))
            actions.append((("broadcast", None), {"t": "peer_revoked", "rid": PUSH_RID, "peer_mac": mac}))
        return actions
