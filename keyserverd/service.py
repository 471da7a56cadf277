"""The key-server protocol core, without I/O: messages in, messages out.

1. The server layer makes one ``Session`` per TLS connection, with the host ID
   from the verified client certificate (None when the client showed none).
2. For every decoded message it calls ``KeyService.handle(session, msg, now)``
   and gets back a list of ``(target, message)`` actions:
     ``"reply"``              send on this connection;
     ``("push", host_id)``    send to every connection of that host (rid 0);
     ``"close"``              close this connection after the replies (message {}).
3. The rules, in the order a request meets them:
   - without a certificate only ``ca`` and ``enroll`` are allowed (``unauthenticated``);
   - a certificate of a revoked or unknown ID gets ``revoked`` and the close;
   - ``hello`` binds (certificate ID, mac) in the ID-MAC table (``mac_conflict``);
   - ``key_req`` needs a hello on this connection (``not_bound``), a ``my_mac``
     that is the requester's bound MAC (``forbidden``), and a peer MAC that is
     not its own (``bad_request``); an unknown or revoked peer gets ``unknown``.
     The pair key goes to the requester and is pushed to the peer.
Every refusal is logged at WARNING with its code and the requester.  Key bytes
and tokens are never logged.  This module imports no socket, asyncio or time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from l2crypt.errors import RefusedError
from l2crypt.frame_wire import format_mac, is_group_address

from .store import KeyStore
from .tokens import hash_token

if TYPE_CHECKING:
    from .ca import CertificateAuthority

log = logging.getLogger("keyserverd")

CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
DEFAULT_CIPHER = CIPHERS[0]
PUSH_RID = 0

Target = Union[str, tuple[str, str]]
Action = tuple[Target, dict]

#: Message types a client without a certificate may send.
UNAUTHENTICATED_TYPES = frozenset({"ca", "enroll"})


@dataclass
class Session:
    """Per-connection state.  Created and owned by the server layer; only
    ``KeyService.handle`` changes ``bound_mac``."""

    identity: str | None
    peer: str = "?"  # remote address, for logs
    bound_mac: bytes | None = None

    @property
    def who(self) -> str:
        return self.identity if self.identity is not None else f"unauthenticated {self.peer}"


class KeyService:
    """Answers key-server requests.  One per keyserverd, shared by all sessions."""

    def __init__(self, store: KeyStore, cipher: str, server_name: str, ca: "CertificateAuthority",
                 cert_days: int = 365):
        if cipher not in CIPHERS:
            raise ValueError(f"cipher must be one of {', '.join(CIPHERS)}, not {cipher!r}")
        self.store = store
        self.cipher = cipher
        self.server_name = server_name
        self.ca = ca
        self.cert_days = cert_days

    def handle(self, session: Session, msg: dict, now: float) -> list[Action]:
        """Process one validated message (see ``l2crypt.ks_messages``)."""
        kind = msg["t"]
        rid = msg.get("rid", 0)
        try:
            if session.identity is None and kind not in UNAUTHENTICATED_TYPES:
                raise RefusedError(f"{kind} needs a client certificate", "unauthenticated")
            if session.identity is not None and kind not in UNAUTHENTICATED_TYPES:
                if self.store.is_revoked(session.identity):
                    raise RefusedError(f"host {session.identity!r} is revoked", "revoked")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is None:
                raise RefusedError(f"{kind} is not a request", "bad_request")
            return handler(session, msg, now)
        except RefusedError as exc:
            log.warning("refused %s from %s: %s: %s", kind, session.who, exc.code, exc)
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
        host = self.store.consume_token(host_id, hash_token(msg["token"]), now)
        cert = self.ca.sign_csr(msg["csr"], host_id, role=host.role, days=self.cert_days)
        self.store.mark_enrolled(host_id, now)
        log.info("enrolled host %s (role %s) from %s", host_id, host.role, session.peer)
        return [("reply", {"t": "enrolled", "rid": msg["rid"], "cert": cert, "ca": self.ca.ca_cert_pem})]

    # --- with a certificate --------------------------------------------------
    def _on_hello(self, session: Session, msg: dict, now: float) -> list[Action]:
        mac = msg["mac"]
        if is_group_address(mac):
            raise RefusedError(f"{format_mac(mac)} is a group address", "bad_request")
        self.store.bind_mac(session.identity, mac)
        session.bound_mac = mac
        key, pw_id = self.store.current_multicast_key()
        log.info("host %s bound to %s", session.identity, format_mac(mac))
        return [
            (
                "reply",
                {
                    "t": "welcome", "rid": msg["rid"], "id": session.identity, "mac": mac,
                    "cipher": self.cipher, "multicast_key": key, "multicast_pw_id": pw_id,
                    "server": self.server_name,
                },
            )
        ]

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
        peer = self.store.host_by_mac(peer_mac)
        if peer is None or peer.revoked:
            log.info("key_req from %s for unknown MAC %s", session.identity, format_mac(peer_mac))
            return [("reply", {"t": "unknown", "rid": rid, "peer_mac": peer_mac})]
        key, pw_id = self.store.get_or_create_pair_key(session.identity, peer.id, now)
        log.info("pair key %s <-> %s pw_id %d handed out", session.identity, peer.id, pw_id)
        answer = {"t": "key", "rid": rid, "peer_mac": peer_mac, "peer_id": peer.id, "key": key, "pw_id": pw_id}
        push = {
            "t": "key", "rid": PUSH_RID, "peer_mac": session.bound_mac, "peer_id": session.identity,
            "key": key, "pw_id": pw_id,
        }
        return [("reply", answer), (("push", peer.id), push)]

    def _on_ping(self, session: Session, msg: dict, now: float) -> list[Action]:
        return [("reply", {"t": "pong", "rid": msg["rid"]})]


def _error(rid: int, code: str, text: str) -> dict:
    return {"t": "error", "rid": rid, "code": code, "msg": text[:1000]}
