"""The key-server protocol core, without I/O: messages in, messages out.

1. The server layer makes one ``Session`` per TLS connection, with the host ID
   from the verified client certificate (None when the client showed none).
2. For every decoded message it calls ``KeyService.handle(session, msg, now)``
   and gets back a list of ``(target, message)`` actions:
     ``"reply"``              send on this connection;
     ``("push", host_id)``    send to every connection of that host (rid 0);
     ``"close"``              close this connection after the replies (message {});
     ``("broadcast", None)``  send to every connection that said hello;
     ``("disconnect", id)``   close every connection of that host;
     ``("peer_resolve", None)`` ask the peered key servers who holds ``peer_mac``
                              and then answer with ``answer_from_peer``;
     ``("peer_check", kind)``  ask them who holds ``mac`` before a hello or a
                              map_req goes on (``after_peer_check``).
3. The rules, in the order a request meets them:
   - without a certificate only ``ca``, ``enroll``, ``auth_begin`` and ``auth``
     are allowed (``unauthenticated``); the last two let a host whose key is
     on a token take its identity by challenge (``challenge_service``);
     every refused ``enroll`` gets the same ``enroll_refused`` (unknown ID,
     wrong, used or expired token, revoked host: the log has which);
   - a certificate of a revoked or unknown ID gets ``revoked`` and the close
     (host rows come from ``host_cache``, exact to every revocation committed
     before the request's store group began);
   - ``hello`` binds (certificate ID, mac) in the ID-MAC table (``mac_conflict``);
     with ``require_pinned_macs`` only the MAC of ``host add --mac``
     (``mac_not_pinned``).  A first binding is checked with the peered key
     servers (``mac_held_by_peer``).  A MAC a gateway had mapped goes to the
     host: the mapping is dropped and the gateway told (``unmapped``);
     the ``welcome`` names the MACs of recently revoked hosts (``revoked_macs``,
     see ``revocations``) and ``key_max_age_s``, the longest an agent may use
     a pair key.
   - ``key_req`` needs a hello on this connection (``not_bound``), a ``my_mac``
     that is the requester's bound MAC (``forbidden``), and a peer MAC that is
     not its own (``bad_request``); an unknown or revoked peer gets ``unknown``.
     The pair key goes to the requester and is pushed to the peer.  Every
     ``key`` message carries the version's age and up to two older versions
     still held, with theirs (``_key_msg``), so a restarted agent, or one that
     missed rotations, holds every version its peer may still send with.
4. Rotations (PW_ID) and revocations are written to the store as events, by
   this server, another keyserverd on the same store, or the CLI.  The server
   polls ``store.events_since`` and turns each event into pushes with
   ``on_event``: a new pair version goes to both ends, a new multicast version
   and a revocation go to every bound host (``("broadcast", None)``), and the
   revoked host is disconnected (``("disconnect", host_id)``).  A host that
   was not connected then learns the revocation from its next welcome.
   A pair with a gateway also goes to the host under every MAC the gateway
   speaks for (see below).
5. ``periodic(now)`` rotates what is older than ``rekey_after_s`` /
   ``multicast_rekey_after_s`` and drops versions superseded more than
   ``retire_after_s`` ago, every ``periodic_every_s`` (a tenth of the
   shortest of those, from 5 to 60 s: it reads every pair, and at 10,000
   hosts that held up the worker's requests for 20-170 ms).  The rotations
   are conditional in the store, so several servers running it rotate once.
6. Gateways (role ``gateway``) may also send ``map_req`` (map a MAC they
   learned on their plain port or from a tunnel to them, see ``mac_map``; a MAC
   a host of a peered key server holds is refused, ``mac_held_by_peer``),
   ``map_release`` (a MAC they aged out), ``map_list`` and ``netkey_req
   peer_id``: the keys of the tunnel link between the requester and gateway
   ``peer_id`` of the peer segment, derived from each NETKEY version agreed
   with the peer key server (``netkey_peering``, ``l2crypt.core.tunnel_keys``).
   NETKEY itself never leaves the key server; the requester is always one end
   of the link, as the server authenticated it.  New versions are pushed for
   every link path a gateway asked about (at most ``MAX_TUNNEL_PATHS``).  A
   ``key_req`` for a mapped MAC is answered with KEY(requester, gateway) under
   that MAC; the gateway asks for the same key by the requester's MAC.
7. Key requests (``key_req``, ``rekey_req``, ``key_report``, ``mcast_req``, ``netkey_req``)
   are limited per host ID (``key_requests_per_s``, ``key_request_burst``,
   over all its connections): over the limit they get ``rate_limited``.
Every refusal is counted and logged at WARNING with its code and the
requester, once per (requester, code) every ``REFUSAL_LOG_S`` with the count of
lines skipped (a flood makes one line).  Key bytes and tokens are never logged.  This module imports no socket, asyncio or time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from keyserverd.peering.service import PeerHandlers
from keyserverd.store.protocol import HostRecord, KeyEvent, KeyStore
from l2crypt.core.errors import RefusedError
from l2crypt.core.frame_wire import format_mac, is_group_address
from l2crypt.core.ks_messages import OLDER_VERSIONS_MAX
from l2crypt.core.tunnel_keys import Endpoint, link_keys
from l2crypt.ops.logs import RateLimiter, fields

from .challenge_service import ChallengeHandlers
from .host_cache import HostCache
from .l3_service import L3Handlers
from .mac_map import MacMap
from .ratelimit import HostBuckets
from .revocations import RevocationBook, WelcomeRevocations
from .tokens import hash_token

if TYPE_CHECKING:
    from .ca import CertificateAuthority

log = logging.getLogger("keyserverd")

CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
DEFAULT_CIPHER = CIPHERS[0]
PUSH_RID = 0

Target = Union[str, tuple[str, str]]
Action = tuple[Target, dict]

#: Refusals (and unknown-MAC answers) are logged once per (requester, code)
#: this often; the lines skipped in between are counted in the next one.
REFUSAL_LOG_S = 10.0

#: What a refused enrollment is told, whatever the reason (the log has the reason).
ENROLL_REFUSED_TEXT = ("enrollment refused: unknown ID, wrong, used or expired token, or revoked host; "
                       "ask the operator for a new token (keyserverd host add)")

#: Message types a client without a certificate may send.
UNAUTHENTICATED_TYPES = frozenset({"ca", "enroll", "auth_begin", "auth"})
#: Message types that count against a host's key-request limit.
RATE_LIMITED_TYPES = frozenset({"key_req", "rekey_req", "key_report", "mcast_req", "netkey_req"})
DEFAULT_KEY_REQUESTS_PER_S = 100.0
DEFAULT_KEY_REQUEST_BURST = 200
#: Most tunnel peers one gateway may ask link keys for.
MAX_TUNNEL_PATHS = 64
#: ``key_max_age_s`` in a welcome, in units of ``rekey_after_s``.
KEY_MAX_AGE_FACTOR = 2
#: Bounds of ``periodic_every_s``.
PERIODIC_MIN_S, PERIODIC_MAX_S = 5.0, 60.0


@dataclass
class Session:
    """Per-connection state.  Created and owned by the server layer; only
    ``KeyService.handle`` changes ``bound_mac``, and ``identity`` (from None,
    after a challenge answered: ``challenge_service``)."""

    identity: str | None
    peer: str = "?"  # remote address, for logs
    bound_mac: bytes | None = None
    l3: bool = False  # said l3_hello (a layer-3 agent; see l3_service)
    #: How the identity was proven: "tls" (client certificate) or "token" (challenge).
    auth: str = "tls"
    #: The challenge sent on this connection and not answered yet (``challenge_service``).
    challenge: object = None

    @property
    def said_hello(self) -> bool:
        """Receives broadcasts: bound a MAC, or started a layer-3 session."""
        return self.bound_mac is not None or self.l3

    @property
    def who(self) -> str:
        return self.identity if self.identity is not None else f"unauthenticated {self.peer}"


class KeyService(L3Handlers, PeerHandlers, ChallengeHandlers):
    """Answers key-server requests.  One per keyserverd, shared by all sessions.
    The layer-3 requests are handled in ``l3_service``, what peer key servers
    ask in ``peer_service``, challenges in ``challenge_service``."""

    def __init__(self, store: KeyStore, cipher: str, server_name: str, ca: "CertificateAuthority",
                 cert_days: int = 365, rekey_after_s: float = 3600.0,
                 multicast_rekey_after_s: float = 3600.0, retire_after_s: float = 300.0,
                 key_requests_per_s: float = DEFAULT_KEY_REQUESTS_PER_S,
                 key_request_burst: int = DEFAULT_KEY_REQUEST_BURST,
                 require_pinned_macs: bool = False, require_pinned_ips: bool = True,
                 revocation_book: RevocationBook | None = None):
        if cipher not in CIPHERS:
            raise ValueError(f"cipher must be one of {', '.join(CIPHERS)}, not {cipher!r}")
        self.store = store
        #: Bound, unrevoked host rows, exact to the event log (``host_cache``).
        self.hosts = HostCache(store)
        self.cipher = cipher
        self.server_name = server_name
        self.ca = ca
        self.cert_days = cert_days
        self.rekey_after_s = rekey_after_s
        self.multicast_rekey_after_s = multicast_rekey_after_s
        self.retire_after_s = retire_after_s
        #: Requests by message type, refusals by code, pushes by event kind
        #: (read by ``keyserverd status`` and the metrics collector).
        self.requests: Counter = Counter()
        self.refusals: Counter = Counter()
        self.events: Counter = Counter()
        self.rotations: Counter = Counter()
        self._log_limit = RateLimiter(REFUSAL_LOG_S)
        #: Set by the server when key servers of cascaded switches are peered.
        self.peering_enabled = False
        self.macs = MacMap()
        #: NETKEY versions (``netkey_peering.NetkeyBook``), or None when not peered.
        self.netkeys = None
        #: CA fingerprint of the NETKEY peer server (set with ``netkeys``): it names
        #: the other end's segment in the tunnel link keys.
        self.netkey_peer_ca = ""
        #: Gateway ID -> the tunnel peers it asked link keys for (pushed on rotation).
        self.tunnel_links: dict[str, set[tuple[str, int]]] = {}
        self.key_requests = HostBuckets(key_requests_per_s, key_request_burst)
        #: Binding policy (see the module docstring, 3, and ``l3_service``).
        self.require_pinned_macs = require_pinned_macs
        self.require_pinned_ips = require_pinned_ips
        #: The revocations every welcome names (``revocations``).
        self.welcome_revocations = WelcomeRevocations(2 * self.key_max_age_s, revocation_book)
        self._init_peer_state()

    @property
    def key_max_age_s(self) -> int:
        """Seconds an agent may use a pair key after it got it (the ``welcome``
        field): ``KEY_MAX_AGE_FACTOR`` x ``rekey_after_s``, so a connected agent
        always has the next version first."""
        return math.ceil(KEY_MAX_AGE_FACTOR * self.rekey_after_s)

    def handle(self, session: Session, msg: dict, now: float) -> list[Action]:
        """Process one validated message (see ``l2crypt.core.ks_messages``)."""
        kind = msg["t"]
        rid = msg.get("rid", 0)
        self.requests[kind] += 1
        try:
            if session.identity is None and kind not in UNAUTHENTICATED_TYPES:
                raise RefusedError(f"{kind} needs a client certificate", "unauthenticated")
            if session.identity is not None and kind not in UNAUTHENTICATED_TYPES:
                if self.hosts.is_revoked(session.identity):
                    raise RefusedError(f"host {session.identity!r} is revoked", "revoked")
                if kind in RATE_LIMITED_TYPES and not self.key_requests.take(session.identity, now):
                    raise RefusedError(f"too many key requests from {session.identity!r}; slow down",
                                       "rate_limited")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is None:
                raise RefusedError(f"{kind} is not a request", "bad_request")
            return handler(session, msg, now)
        except RefusedError as exc:
            return self._refused(session, kind, rid, exc, now)

    def begin_group(self) -> None:
        """The requests of one store group come next (``host_cache``, 3)."""
        self.hosts.expire()

    def end_group(self) -> None:
        """The store group has ended: the next lookup reads the event log again."""
        self.hosts.expire()

    def _refused(self, session: Session, kind: str, rid: int, exc: RefusedError, now: float) -> list[Action]:
        """Count, log (rate-limited) and answer a refusal."""
        self.refusals[exc.code] += 1
        self._limited(logging.WARNING, "request_refused", (session.who, exc.code), now,
                      type=kind, host=session.who, code=exc.code, reason=str(exc))
        actions: list[Action] = [("reply", _error(rid, exc.code, str(exc)))]
        if exc.code == "revoked":
            actions.append(("close", {}))
        return actions

    # --- without a certificate ---------------------------------------------
    def _on_ca(self, session: Session, msg: dict, now: float) -> list[Action]:
        return [("reply", {"t": "ca_cert", "rid": msg["rid"], "cert": self.ca.ca_cert_pem})]

    def _on_enroll(self, session: Session, msg: dict, now: float) -> list[Action]:
        host_id = msg["id"]
        # Check the CSR first, so a typo in it does not spend the token.
        self.ca.check_csr(msg["csr"])
        try:
            host = self.store.consume_token(host_id, hash_token(msg["token"]), now)
        except RefusedError as exc:
            if exc.code == "store_unavailable":
                raise
            # The client learns nothing about which IDs exist; the log keeps the detail.
            self._limited(logging.WARNING, "enroll_refused", (session.who, exc.code), now,
                          host=host_id, peer=session.peer, code=exc.code, reason=str(exc))
            raise RefusedError(ENROLL_REFUSED_TEXT, "enroll_refused") from None
        cert = self.ca.sign_csr(msg["csr"], host_id, role=host.role, days=self.cert_days)
        self.store.mark_enrolled(host_id, now)
        log.info("host_enrolled", extra=fields(host=host_id, role=host.role, peer=session.peer))
        return [("reply", {"t": "enrolled", "rid": msg["rid"], "cert": cert, "ca": self.ca.ca_cert_pem})]

    # --- with a certificate --------------------------------------------------
    def _on_hello(self, session: Session, msg: dict, now: float) -> list[Action]:
        mac = msg["mac"]
        if is_group_address(mac):
            raise RefusedError(f"{format_mac(mac)} is a group address", "bad_request")
        host = self.store.get_host(session.identity)
        if host is not None and host.mac is None:  # a first binding
            if self.require_pinned_macs:
                raise RefusedError(f"host {session.identity!r} has no pinned MAC and this key server binds only "
                                   "pinned ones (keyserverd host add --mac)", "mac_not_pinned")
            if self.peering_enabled and self.store.host_by_mac(mac) is None:
                return [(("peer_check", "hello"), {"rid": msg["rid"], "mac": mac})]
        return self._bind(session, msg["rid"], mac, now)

    def _bind(self, session: Session, rid: int, mac: bytes, now: float) -> list[Action]:
        """Bind (ID, mac), take the MAC from a gateway that had mapped it, welcome the host."""
        self.store.bind_mac(session.identity, mac)
        session.bound_mac = mac
        key, pw_id = self.store.current_multicast_key()
        log.info("host_bound", extra=fields(host=session.identity, mac=format_mac(mac)))
        actions: list[Action] = [
            ("reply", {"t": "welcome", "rid": rid, "id": session.identity, "mac": mac, "cipher": self.cipher,
                       "multicast_key": key, "multicast_pw_id": pw_id, "server": self.server_name,
                       "key_max_age_s": self.key_max_age_s,
                       "revoked_macs": self.welcome_revocations.macs(self.store, now, exclude=mac)}),
        ]
        gateway = self.macs.release(mac)
        if gateway is not None and gateway != session.identity:
            log.warning("gateway_mapping_dropped", extra=fields(mac=format_mac(mac), gateway=gateway,
                                                                host=session.identity))
            actions.append((("push", gateway), {"t": "unmapped", "rid": PUSH_RID, "mac": mac}))
        return actions

    def _on_key_req(self, session: Session, msg: dict, now: float) -> list[Action]:
        rid, peer_mac = msg["rid"], msg["peer_mac"]
        if session.bound_mac is None:
            raise RefusedError("key_req before hello on this connection", "not_bound")
        my_mac = msg.get("my_mac")
        if my_mac is not None and my_mac != session.bound_mac:
            raise RefusedError(
                f"claimed my_mac {format_mac(my_mac)} but is bound to {format_mac(session.bound_mac)}",
                "forbidden",
            )
        if peer_mac == session.bound_mac:
            raise RefusedError("peer_mac is the requester's own MAC", "bad_request")
        if is_group_address(peer_mac):
            raise RefusedError(f"{format_mac(peer_mac)} is a group address", "bad_request")
        peer = self._resolve(peer_mac)
        if peer is None and self.peering_enabled:
            return [(("peer_resolve", None), {"rid": rid, "peer_mac": peer_mac})]
        if peer is None or peer.revoked or peer.id == session.identity:
            self._limited(logging.INFO, "key_req_unknown_mac", (session.identity, "unknown"), now,
                          host=session.identity, peer_mac=format_mac(peer_mac))
            return [("reply", {"t": "unknown", "rid": rid, "peer_mac": peer_mac})]
        versions = self.store.pair_key_versions(session.identity, peer.id, now)
        pw_id = versions[0][0]
        log.info("pair_key_sent", extra=fields(host=session.identity, peer=peer.id, pw_id=pw_id))
        answer = self._key_msg(rid, peer_mac, peer.id, versions, pw_id, now)
        push = _renamed(answer, PUSH_RID, session.bound_mac, session.identity)
        return [("reply", answer), (("push", peer.id), push)]

    def _on_ping(self, session: Session, msg: dict, now: float) -> list[Action]:
        return [("reply", {"t": "pong", "rid": msg["rid"]})]

    def _pair_peer(self, session: Session, msg: dict):
        """The peer host of a pair request by this session, or raise RefusedError."""
        if session.bound_mac is None:
            raise RefusedError(f"{msg['t']} before hello on this connection", "not_bound")
        peer = self._resolve(msg["peer_mac"])
        if peer is None or peer.revoked or peer.id == session.identity:
            raise RefusedError(f"no pair with {format_mac(msg['peer_mac'])}", "bad_request")
        return peer

    def _resolve(self, mac: bytes) -> HostRecord | None:
        """The host bound to ``mac``, or the gateway it is mapped to (with ``mac`` as its MAC)."""
        host = self.hosts.host_by_mac(mac)
        if host is not None:
            return host
        owner = self.macs.owner(mac)
        gateway = self.hosts.get_host(owner) if owner is not None else None
        return dataclasses.replace(gateway, mac=mac) if gateway is not None else None

    def _gateway(self, session: Session, kind: str) -> None:
        if session.bound_mac is None:
            raise RefusedError(f"{kind} before hello on this connection", "not_bound")
        host = self.hosts.get_host(session.identity)
        if host is None or host.role != "gateway":
            raise RefusedError(f"{kind} is for gateways only", "forbidden")

    def _on_map_req(self, session: Session, msg: dict, now: float) -> list[Action]:
        self._gateway(session, "map_req")
        if self.peering_enabled and self.macs.owner(msg["mac"]) != session.identity:
            self.macs.check(self.store, session.identity, msg["mac"], msg["side"])  # refuse early, locally
            return [(("peer_check", "map"), {"rid": msg["rid"], "mac": msg["mac"], "side": msg["side"]})]
        return self._map(session, msg["rid"], msg["mac"], msg["side"])

    def _map(self, session: Session, rid: int, mac: bytes, side: str) -> list[Action]:
        self.macs.map(self.store, session.identity, mac, side)
        log.info("MAC %s (%s) mapped to gateway %s", format_mac(mac), side, session.identity)
        return [("reply", {"t": "mapped", "rid": rid, "mac": mac, "side": side})]

    def after_peer_check(self, session: Session, kind: str, req: dict, found: dict | None,
                         now: float) -> list[Action]:
        """Go on with a ``hello`` or ``map_req`` once the peers said who holds ``req["mac"]``
        (``found``: (peer, its ``resolved`` answer) from ``Peering.resolve``, or None).  Peers that do not answer do
        not block it: the check is best effort."""
        msg_type = "hello" if kind == "hello" else "map_req"
        try:
            if found is not None:
                _, answer = found
                raise RefusedError(f"{format_mac(req['mac'])} is held by host {answer.get('id')!r} of a "
                                   "peered key server", "mac_held_by_peer")
            if kind == "hello":
                return self._bind(session, req["rid"], req["mac"], now)
            return self._map(session, req["rid"], req["mac"], req["side"])
        except RefusedError as exc:
            return self._refused(session, msg_type, req["rid"], exc, now)

    def _on_map_release(self, session: Session, msg: dict, now: float) -> list[Action]:
        self._gateway(session, "map_release")
        if self.macs.unmap(session.identity, msg["mac"]):
            log.info("MAC %s released by gateway %s", format_mac(msg["mac"]), session.identity)
        return [("reply", {"t": "unmapped", "rid": msg["rid"], "mac": msg["mac"]})]

    def _on_map_list(self, session: Session, msg: dict, now: float) -> list[Action]:
        self._gateway(session, "map_list")
        return [("reply", {"t": "mapped", "rid": msg["rid"], "mac": mac, "side": side})
                for mac, side in self.macs.macs_of(session.identity)]

    def _on_netkey_req(self, session: Session, msg: dict, now: float) -> list[Action]:
        self._gateway(session, "netkey_req")
        peer_id = msg.get("peer_id")
        if peer_id is None:
            raise RefusedError("netkey_req needs peer_id (the tunnel peer's gateway ID): "
                               "upgrade the gateway", "bad_request")
        path = msg.get("path", 0)
        versions = self.netkeys.versions() if self.netkeys is not None else []
        if not versions:
            raise RefusedError("no NETKEY: this key server has no peer", "no_netkey")
        links = self.tunnel_links.setdefault(session.identity, set())
        if (peer_id, path) not in links and len(links) >= MAX_TUNNEL_PATHS:
            raise RefusedError(f"at most {MAX_TUNNEL_PATHS} tunnel paths per gateway", "too_many")
        links.add((peer_id, path))
        return [("reply", self._link_msg(msg["rid"], session.identity, peer_id, pw_id, key, path))
                for pw_id, key in versions]

    def _link_msg(self, rid: int, gateway_id: str, peer_id: str, pw_id: int, netkey: bytes, path: int = 0) -> dict:
        """The keys of ``path`` of the link (this segment's ``gateway_id``) -> (peer segment's ``peer_id``)."""
        me = Endpoint(self.ca.ca_fingerprint(), gateway_id)
        send_key, recv_key = link_keys(netkey, pw_id, me, Endpoint(self.netkey_peer_ca, peer_id), path)
        msg = {"t": "netkey", "rid": rid, "peer_id": peer_id, "pw_id": pw_id,
               "send_key": send_key, "recv_key": recv_key}
        if path:
            msg["path"] = path
        return msg

    def netkey_pushes(self, pw_id: int, key: bytes) -> list[Action]:
        """Push a new NETKEY version: the keys of every link path a gateway asked about."""
        return [(("push", h.id), self._link_msg(PUSH_RID, h.id, peer_id, pw_id, key, path))
                for h in self.store.list_hosts() if h.role == "gateway" and not h.revoked
                for peer_id, path in sorted(self.tunnel_links.get(h.id, ()))]

    def _key_msg(self, rid: int, peer_mac: bytes, peer_id: str, versions: list[tuple[int, float, bytes]],
                 pw_id: int, now: float | None = None) -> dict:
        """A ``key`` message naming the peer (``peer_mac``, ``peer_id``):
        version ``pw_id`` with its age, and up to ``OLDER_VERSIONS_MAX`` older
        versions still held with theirs, from ``versions`` (the pair's
        (pw_id, created_at, key), newest first: ``store.pair_key_versions``,
        one read), which hold ``pw_id``.  Ages count to ``now``; without it
        (a push of the version just made), to ``pw_id``'s creation."""
        held = [v for v in versions if v[0] <= pw_id]  # held[0] is pw_id: the callers check it is held
        ref = now if now is not None else held[0][1]
        msg = {"t": "key", "rid": rid, "peer_mac": peer_mac, "peer_id": peer_id, "key": held[0][2],
               "pw_id": pw_id, "age_s": _age_s(ref, held[0][1])}
        older = [[version, key, _age_s(ref, created)] for version, created, key in held[1:1 + OLDER_VERSIONS_MAX]]
        if older:
            msg["older"] = older
        return msg

    def _on_rekey_req(self, session: Session, msg: dict, now: float) -> list[Action]:
        """The sender reached its data-volume limit under ``pw_id``: rotate once."""
        peer = self._pair_peer(session, msg)
        new = self.store.rotate_pair_key(session.identity, peer.id, now, if_pw_id=msg["pw_id"])
        if new is not None:
            self.rotations["data_volume"] += 1
            log.info("pair_key_rotated", extra=fields(host=session.identity, peer=peer.id, pw_id=new,
                                                      cause="data_volume"))
        versions = self.store.pair_key_versions(session.identity, peer.id, now)
        return [("reply", self._key_msg(msg["rid"], peer.mac, peer.id, versions, versions[0][0], now))]

    def _on_key_report(self, session: Session, msg: dict, now: float) -> list[Action]:
        """The requester holds ``pw_id`` but its peer still sends with an older
        version.  If ``pw_id`` is the newest, push it again to both ends (the
        patent's race b); if it is older, the requester gets the newest."""
        peer = self._pair_peer(session, msg)
        versions = self.store.pair_key_versions(session.identity, peer.id, now)
        pw_id = versions[0][0]
        if msg["pw_id"] > pw_id:
            raise RefusedError(f"pw_id {msg['pw_id']} does not exist (newest is {pw_id})", "bad_request")
        answer = self._key_msg(msg["rid"], peer.mac, peer.id, versions, pw_id, now)
        actions: list[Action] = [("reply", answer)]
        if msg["pw_id"] == pw_id:
            log.info("peer_lagging", extra=fields(host=session.identity, peer=peer.id, pw_id=pw_id))
            actions.append((("push", peer.id), _renamed(answer, PUSH_RID, session.bound_mac, session.identity)))
        return actions

    def _on_mcast_req(self, session: Session, msg: dict, now: float) -> list[Action]:
        if session.bound_mac is None:
            raise RefusedError("mcast_req before hello on this connection", "not_bound")
        key, pw_id = self.store.current_multicast_key()
        return [("reply", {"t": "multicast", "rid": msg["rid"], "key": key, "pw_id": pw_id})]

    # --- events and timers -----------------------------------------------------
    def on_event(self, event: KeyEvent) -> list[Action]:
        """Pushes for one rotation or revocation event (see the module docstring)."""
        self.events[event.kind] += 1
        if event.kind == "revoke":
            self.hosts.forget(event.id1)
        return self._l2_pushes(event) + self.l3_pushes(event)

    def _l2_pushes(self, event: KeyEvent) -> list[Action]:
        if event.kind == "pair":
            a, b = self.hosts.get_host(event.id1), self.hosts.get_host(event.id2)
            if a is None or b is None or a.mac is None or b.mac is None or a.revoked or b.revoked:
                return []
            versions = self.store.pair_key_versions(a.id, b.id)
            if event.pw_id not in {v[0] for v in versions}:
                return []  # retired already
            to_a = self._key_msg(PUSH_RID, b.mac, b.id, versions, event.pw_id)  # the pair's versions read once
            actions: list[Action] = [(("push", a.id), to_a), (("push", b.id), _renamed(to_a, PUSH_RID, a.mac, a.id))]
            for gw, other in ((a, b), (b, a)):  # the host holds the gateway's key under mapped MACs too
                for mac, _ in self.macs.macs_of(gw.id) if gw.role == "gateway" else ():
                    actions.append((("push", other.id), _renamed(to_a, PUSH_RID, mac, gw.id)))
            return actions
        if event.kind == "multicast":
            key = self.store.multicast_key(event.pw_id)
            if key is None:
                return []
            return [(("broadcast", None), {"t": "multicast", "rid": PUSH_RID, "key": key, "pw_id": event.pw_id})]
        if event.kind == "revoke":
            host = self.store.get_host(event.id1)
            actions: list[Action] = [(("disconnect", event.id1), {})]
            if host is not None and host.mac is not None:
                actions.append((("broadcast", None), {"t": "peer_revoked", "rid": PUSH_RID, "peer_mac": host.mac}))
            mapped = self.macs.forget_gateway(event.id1)
            for mac in mapped:
                actions.append((("broadcast", None), {"t": "peer_revoked", "rid": PUSH_RID, "peer_mac": mac}))
            # Hosts that missed these pushes learn them from their next welcome.
            if host is not None and host.revoked_at is not None:
                self.welcome_revocations.book.add_gateway_macs(event.id1, mapped, host.revoked_at)
            self.welcome_revocations.invalidate()
            return actions
        return []

    @property
    def periodic_every_s(self) -> float:
        """How often to call ``periodic`` (see the module docstring, 5)."""
        shortest = min(self.rekey_after_s, self.multicast_rekey_after_s, self.retire_after_s)
        return min(PERIODIC_MAX_S, max(PERIODIC_MIN_S, shortest / 10))

    def periodic(self, now: float) -> None:
        """Timed rotations and retirement.  Call every ``periodic_every_s``."""
        for id1, id2, _ in self.store.stale_pairs(now - self.rekey_after_s):
            if self.hosts.is_revoked(id1) or self.hosts.is_revoked(id2):
                continue
            pw_id = self.store.rotate_pair_key(id1, id2, now, if_created_before=now - self.rekey_after_s)
            if pw_id is not None:
                self.rotations["timer"] += 1
                log.info("pair_key_rotated", extra=fields(host=id1, peer=id2, pw_id=pw_id, cause="timer"))
        pw_id = self.store.rotate_multicast_key(now, if_created_before=now - self.multicast_rekey_after_s)
        if pw_id is not None:
            self.rotations["multicast_timer"] += 1
            log.info("multicast_key_rotated", extra=fields(pw_id=pw_id, cause="timer"))
        self.store.retire_old_versions(now - self.retire_after_s)


    def _limited(self, level: int, event: str, key: tuple, now: float, **kv) -> None:
        """Log ``event`` at most once per ``key`` every ``REFUSAL_LOG_S``."""
        if self._log_limit.allow(key, now):
            suppressed = self._log_limit.take_suppressed(key)
            if suppressed:
                kv["suppressed"] = suppressed
            log.log(level, event, extra=fields(**kv))


def revoke_and_rotate(store: KeyStore, host_id: str, now: float) -> tuple[bool, int]:
    """Revoke a host, rotate every pair key that includes it and the multicast
    key.  Returns (newly revoked, pair keys rotated)."""
    newly = store.revoke_host(host_id, now)
    rotated = 0
    for id1, id2 in store.pairs(host_id):
        if store.rotate_pair_key(id1, id2, now) is not None:
            rotated += 1
    store.rotate_multicast_key(now)
    return newly, rotated


def _renamed(msg: dict, rid: int, peer_mac: bytes, peer_id: str) -> dict:
    """The same ``key`` message (key, version, older versions, ages: they belong
    to the pair) as the pair's other end, or one of a gateway's MACs, gets it."""
    return {**msg, "rid": rid, "peer_mac": peer_mac, "peer_id": peer_id}


def _age_s(now: float, created_at: float) -> int:
    return max(0, int(now - created_at))


def _error(rid: int, code: str, text: str) -> dict:
    return {"t": "error", "rid": rid, "code": code, "msg": text[:1000]}
