"""Wire format of key-server peering (keyserverd <-> keyserverd, mutual TLS 1.3).

Framing as in ``l2crypt.core.ks_messages``: a 4-byte big-endian body length, then a
msgpack map with ``t`` (the type) and ``rid`` (echoed in the answer).

    ca        rid                                 the peer's CA certificate (no client cert needed)
    ca_cert   rid cert                            PEM
    resolve   rid mac from_id hops origin         who holds ``mac``?  ``from_id`` (our host, an ID
                                                  of our namespace at the peer) wants a pair key
    resolved  rid id mac [key pw_id]              the holder; with the pair key when the answering
                                                  server owns the pair (it holds min(id, from_id))
    unknown   rid mac                             not held here (a peer never forwards: no loops)
    ext       rid kind body                       an extension request (``multicast``, ``revocations``);
    ext_ok    rid body                            ``body`` is opaque bytes, ``kind`` names the handler
    ping/pong rid
    error     rid code msg

Every field is checked on the way in (``FrameReader``) and out
(``encode_message``): types, exact lengths, u32 integers, ``pw_id`` >= 1, host
IDs as ``ks_messages.valid_host_id``, ``kind`` and ``code`` short names.
What a field *means* (is this ID in the asking peer's namespace?) is checked
by ``peering`` and the handlers.

Loops: ``hops`` counts servers already passed and must be <= ``MAX_HOPS`` (0:
only the asking server's own request is answered); ``origin`` lists the
servers' names on the way, and a server finding its own name refuses.  A
server answers from its own tables only and never forwards a peer's request.
"""

from __future__ import annotations

import re

from l2crypt.core.ks_messages import valid_host_id
from l2crypt.core.msg_codec import LENGTH, MessageCodec  # noqa: F401  (LENGTH re-exported)
from l2crypt.core.msg_codec import FrameReader as _FrameReader

MAX_MESSAGE_BYTES = 64 * 1024
MAX_HOPS = 0
MAX_ORIGIN = 8
#: ``kind`` of an ``ext`` request and ``code`` of an ``error``: short names.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_FIELDS: dict[str, tuple[type, int | None]] = {
    "rid": (int, None),
    "cert": (bytes, None),
    "mac": (bytes, 6),
    "from_id": (str, None),
    "id": (str, None),
    "hops": (int, None),
    "origin": (list, None),
    "key": (bytes, 32),
    "pw_id": (int, None),
    "kind": (str, None),
    "body": (bytes, None),
    "code": (str, None),
    "msg": (str, None),
}

SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ca": (frozenset({"rid"}), frozenset()),
    "ca_cert": (frozenset({"rid", "cert"}), frozenset()),
    "resolve": (frozenset({"rid", "mac", "from_id", "hops", "origin"}), frozenset()),
    "resolved": (frozenset({"rid", "id", "mac"}), frozenset({"key", "pw_id"})),
    "unknown": (frozenset({"rid", "mac"}), frozenset()),
    "ext": (frozenset({"rid", "kind", "body"}), frozenset()),
    "ext_ok": (frozenset({"rid", "body"}), frozenset()),
    "ping": (frozenset({"rid"}), frozenset()),
    "pong": (frozenset({"rid"}), frozenset()),
    "error": (frozenset({"rid", "code", "msg"}), frozenset()),
}


def _check_across_fields(msg: dict) -> None:
    t = msg["t"]
    if ("key" in msg) != ("pw_id" in msg):
        raise ValueError(f"{t}: key and pw_id come together")
    if "pw_id" in msg and msg["pw_id"] < 1:
        raise ValueError(f"{t}.pw_id: key versions start at 1")
    for name in ("kind", "code"):
        if name in msg and not NAME.match(msg[name]):
            raise ValueError(f"{t}.{name}: not a short lower-case name")
    for name in ("id", "from_id"):
        if name in msg and not valid_host_id(msg[name]):
            raise ValueError(f"{t}.{name}: not a valid host ID")
    if "origin" in msg:
        origin = msg["origin"]
        if len(origin) > MAX_ORIGIN or not all(isinstance(o, str) and 0 < len(o) <= 256 for o in origin):
            raise ValueError(f"{t}.origin: want at most {MAX_ORIGIN} server names")


CODEC = MessageCodec(_FIELDS, SCHEMA, MAX_MESSAGE_BYTES, "peer message", _check_across_fields)
validate = CODEC.validate
encode_message = CODEC.encode
decode_body = CODEC.decode_body


class FrameReader(_FrameReader):
    """Incremental deframer of peer messages (see ``l2crypt.core.msg_codec.FrameReader``)."""

    def __init__(self):
        super().__init__(CODEC)
