"""Key-server handlers of the layer-3 modes (``l2crypt l3-agent``), mixed into
``KeyService``.

1. ``l3_hello`` starts a layer-3 session (``Session.l3``); no MAC is bound.
2. ``ip_bind`` binds one of the host's IPv4 or IPv6 addresses to its
   certificate ID (the ID-IP table; one address belongs to one host:
   ``ip_conflict``); only unicast addresses a host can be reached at
   (``bindable_ip``).  With ``require_pinned_ips`` (the default) a host binds
   only the addresses the operator pinned to it (``keyserverd host add --ip``,
   which binds them at once, so nobody else can claim them first):
   ``ip_not_pinned``.
3. ``ip_key_req`` (a packet to an address) and ``id_key_req`` (a packet from a
   sender ID, nat mode) give the requester the pair key for (requester, peer)
   and push it to the peer.  The requester is always the ID its certificate
   names, so a host only ever gets keys of pairs it is part of; an address of
   its own, an unknown or revoked peer, or a peer with no bound address gets
   ``l3_unknown``.
4. ``l3_rekey_req`` / ``l3_key_report`` rotate or re-push, as their layer-2
   twins do.
5. ``l3_pushes`` turns a pair rotation or a revocation event into the layer-3
   pushes (``l3_key`` to both ends, ``l3_peer_revoked`` to everyone).
Key bytes are never logged.
"""

from __future__ import annotations

import ipaddress
import logging

from l2crypt.core.errors import RefusedError
from l2crypt.core.ks_messages import pack_peer_ips

log = logging.getLogger("keyserverd")
PUSH_RID = 0


def _fmt(ip: bytes) -> str:
    return str(ipaddress.ip_address(bytes(ip)))


def bindable_ip(ip: bytes) -> bool:
    """A unicast address one host can own: not unspecified, loopback,
    multicast, broadcast or reserved (IPv4), nor link-local or IPv4-mapped (IPv6,
    where a link-local address is not unique between hosts)."""
    addr = ipaddress.ip_address(bytes(ip))
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        return False
    if addr.version == 4:
        return ip[0] != 0 and ip[0] < 224
    return not (addr.is_link_local or addr.ipv4_mapped is not None)


class L3Handlers:
    """Needs ``self.store``, ``self.cipher``, ``self.server_name`` and
    ``self.require_pinned_ips`` (KeyService)."""

    def _on_l3_hello(self, session, msg: dict, now: float) -> list:
        session.l3 = True
        log.info("host %s started a layer-3 session", session.identity)
        return [("reply", {"t": "l3_welcome", "rid": msg["rid"], "id": session.identity,
                           "cipher": self.cipher, "server": self.server_name})]

    def _l3_session(self, session, msg: dict) -> None:
        if not session.l3:
            raise RefusedError(f"{msg['t']} before l3_hello on this connection", "not_bound")

    def _on_ip_bind(self, session, msg: dict, now: float) -> list:
        self._l3_session(session, msg)
        ip = msg["ip"]
        if not bindable_ip(ip):
            raise RefusedError(f"{_fmt(ip)} is not a unicast host address", "bad_request")
        if self.require_pinned_ips and ip not in self.store.ips_of(session.identity):
            raise RefusedError(f"{_fmt(ip)} is not pinned to host {session.identity!r} and this key server "
                               "binds only pinned addresses (keyserverd host add --ip)", "ip_not_pinned")
        if self.store.bind_ip(session.identity, ip):
            log.info("host %s bound to IP %s", session.identity, _fmt(ip))
        return [("reply", {"t": "ip_bound", "rid": msg["rid"], "ip": ip})]

    def _l3_key_msg(self, rid: int, peer_id: str, key: bytes, pw_id: int) -> dict | None:
        ips = self.store.ips_of(peer_id)
        if not ips:
            return None
        return {"t": "l3_key", "rid": rid, "peer_id": peer_id, "key": key, "pw_id": pw_id, **pack_peer_ips(ips)}

    def _l3_peer(self, session, peer_id: str | None) -> str | None:
        """The peer ID if it may get a key with the requester, else None."""
        if peer_id is None or peer_id == session.identity or self.store.is_revoked(peer_id):
            return None
        return peer_id if self.store.ips_of(peer_id) else None

    def _l3_answer(self, session, rid: int, peer_id: str, now: float) -> list:
        key, pw_id = self.store.get_or_create_pair_key(session.identity, peer_id, now)
        log.info("L3 pair key %s <-> %s pw_id %d handed out", session.identity, peer_id, pw_id)
        answer = self._l3_key_msg(rid, peer_id, key, pw_id)
        push = self._l3_key_msg(PUSH_RID, session.identity, key, pw_id)
        actions = [("reply", answer)]
        if push is not None:
            actions.append((("push", peer_id), push))
        return actions

    def _on_ip_key_req(self, session, msg: dict, now: float) -> list:
        self._l3_session(session, msg)
        ip = msg["peer_ip"]
        if ip in self.store.ips_of(session.identity):
            raise RefusedError("peer_ip is one of the requester's own addresses", "bad_request")
        peer_id = self._l3_peer(session, self.store.host_id_by_ip(ip))
        if peer_id is None:
            log.info("ip_key_req from %s for unknown IP %s", session.identity, _fmt(ip))
            return [("reply", {"t": "l3_unknown", "rid": msg["rid"], "peer_ip": ip})]
        return self._l3_answer(session, msg["rid"], peer_id, now)

    def _on_id_key_req(self, session, msg: dict, now: float) -> list:
        self._l3_session(session, msg)
        peer_id = self._l3_peer(session, msg["peer_id"])
        if peer_id is None:
            log.info("id_key_req from %s for unknown host %s", session.identity, msg["peer_id"])
            return [("reply", {"t": "l3_unknown", "rid": msg["rid"], "peer_id": msg["peer_id"]})]
        return self._l3_answer(session, msg["rid"], peer_id, now)

    def _l3_pair(self, session, msg: dict) -> str:
        self._l3_session(session, msg)
        peer_id = self._l3_peer(session, msg["peer_id"])
        if peer_id is None or self.store.pair_key(session.identity, peer_id, msg["pw_id"]) is None:
            raise RefusedError(f"no L3 pair with {msg['peer_id']} at pw_id {msg['pw_id']}", "bad_request")
        return peer_id

    def _on_l3_rekey_req(self, session, msg: dict, now: float) -> list:
        peer_id = self._l3_pair(session, msg)
        new = self.store.rotate_pair_key(session.identity, peer_id, now, if_pw_id=msg["pw_id"])
        if new is not None:
            log.info("pair key %s <-> %s rotated to pw_id %d (data volume)", session.identity, peer_id, new)
        key, pw_id = self.store.get_or_create_pair_key(session.identity, peer_id, now)
        return [("reply", self._l3_key_msg(msg["rid"], peer_id, key, pw_id))]

    def _on_l3_key_report(self, session, msg: dict, now: float) -> list:
        peer_id = self._l3_pair(session, msg)
        key, pw_id = self.store.get_or_create_pair_key(session.identity, peer_id, now)
        actions = [("reply", self._l3_key_msg(msg["rid"], peer_id, key, pw_id))]
        if msg["pw_id"] == pw_id:
            push = self._l3_key_msg(PUSH_RID, session.identity, key, pw_id)
            if push is not None:
                log.info("host %s reports %s lagging behind pw_id %d; pushing again", session.identity, peer_id, pw_id)
                actions.append((("push", peer_id), push))
        return actions

    def l3_pushes(self, event) -> list:
        """Layer-3 pushes for a rotation or revocation event (see the docstring)."""
        if event.kind == "pair":
            key = self.store.pair_key(event.id1, event.id2, event.pw_id)
            if key is None or self.store.is_revoked(event.id1) or self.store.is_revoked(event.id2):
                return []
            to_1 = self._l3_key_msg(PUSH_RID, event.id2, key, event.pw_id)
            to_2 = self._l3_key_msg(PUSH_RID, event.id1, key, event.pw_id)
            if to_1 is None or to_2 is None:
                return []
            return [(("push", event.id1), to_1), (("push", event.id2), to_2)]
        if event.kind == "revoke" and self.store.ips_of(event.id1):
            return [(("broadcast", None), {"t": "l3_peer_revoked", "rid": PUSH_RID, "peer_id": event.id1})]
        return []
