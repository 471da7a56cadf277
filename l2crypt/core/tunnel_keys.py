"""Keys and sender tags of the inter-subnet tunnel: one key per direction of each link.

A *link* joins two gateways of different segments (the tunnel peers each
configures).  NETKEY is the secret the key servers of the two segments agree
on (``keyserverd.peering.netkey``); it never leaves the key servers:

1. A gateway asks its key server for the keys of one link (``netkey_req
   peer_id``).  The server answers, for every live NETKEY version (PW_ID),
   ``send_key = link_key(NETKEY, pw_id, me, peer)`` and
   ``recv_key = link_key(NETKEY, pw_id, peer, me)``, where ``me`` is the
   requester as the server authenticated it (this server's CA fingerprint,
   the ID in the requester's certificate) and ``peer`` is (the peer key
   server's CA fingerprint, ``peer_id``).  New versions are pushed the same way.
2. So a gateway holds only the keys of links it is an end of.  It cannot
   seal a datagram that another gateway would take as coming from a third
   one, and a gateway of one segment that takes the ID of a gateway of the
   other segment gets keys under its own segment's fingerprint, which match
   nothing.  Only a holder of NETKEY itself (a key server) can make every key.
3. The key is ``HKDF-SHA256(NETKEY, info)`` (``aead.hkdf``) with ``info`` = ``"l2crypt v2
   tunnel"``, the cipher's name, the PW_ID and both ends, every variable part
   length-prefixed, so no two (cipher, version, direction, link) share a key.
   A link can run over several *paths* (``netkey_req path``, 1-15; path 0 is
   the link's first path and keeps the key above): a path's key adds
   ``"path"`` and the path ID to ``info``, so one path's key opens none of
   the other paths' datagrams.
4. A datagram names its sender with ``sender_tag(gateway ID)`` (6 bytes):
   the receiver knows the tag of each configured peer, and accepts a tag only
   from that peer's address.  The tag selects state; the key authenticates.

Sans-I/O: no sockets, files or clock.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from .aead import AES_256_GCM, hkdf, label

#: The tunnel's cipher (both segments must agree on it, whatever their key servers use).
TUNNEL_CIPHER = AES_256_GCM
TAG_LEN = 6
_INFO = b"l2crypt v2 tunnel"
_TAG_INFO = b"l2crypt v2 tunnel tag"
_PATH_INFO = b"path"


class Endpoint(NamedTuple):
    """One end of a link: the CA fingerprint of its segment's key server and its gateway ID."""

    segment: str
    gateway_id: str


def link_key(netkey: bytes, pw_id: int, sender: Endpoint, receiver: Endpoint,
             cipher: str = TUNNEL_CIPHER, path: int = 0) -> bytes:
    """The key ``sender`` seals its datagrams to ``receiver`` with on ``path``, under NETKEY version ``pw_id``."""
    info = (_INFO + label(cipher) + pw_id.to_bytes(4, "big") + label(sender.segment) + label(sender.gateway_id)
            + label(receiver.segment) + label(receiver.gateway_id))
    if path:
        info += _PATH_INFO + path.to_bytes(1, "big")
    return hkdf(netkey, info)


def link_keys(netkey: bytes, pw_id: int, me: Endpoint, peer: Endpoint, path: int = 0) -> tuple[bytes, bytes]:
    """(send key, receive key) of ``me``'s link to ``peer`` on ``path``: what a key server hands ``me``."""
    return (link_key(netkey, pw_id, me, peer, path=path), link_key(netkey, pw_id, peer, me, path=path))


def sender_tag(gateway_id: str) -> bytes:
    """The 6 bytes that name a gateway as the sender of a tunnel datagram."""
    return hashlib.sha256(_TAG_INFO + label(gateway_id)).digest()[:TAG_LEN]
