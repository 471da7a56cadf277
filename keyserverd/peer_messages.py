"""Wire format of key-server peering (keyserverd <-> keyserverd, mutual TLS 1.3).

Framing as in ``l2crypt.ks_messages``: a 4-byte big-endian body length, then a
msgpack map with ``t`` (the type) and ``rid`` (echoed in the answer).

    ca        rid                                 the peer's CA certificate (no client cert needed)
    ca_cert   rid cert                            PEM
    resolve   rid mac from_id hops origin         who holds ``mac``?  ``from_id`` (our host) wants
                                                  a pair key with it
    resolved  rid id mac [key pw_id]              the holder; with the pair key when the answering
                                                  server owns the pair (it holds min(id, from_id))
    unknown   rid mac                             not held here (a peer never forwards: no loops)
    ext       rid kind body                       an extension request (e.g. the gateway's NETKEY);
    ext_ok    rid body                            ``body`` is opaque bytes, ``kind`` names the handler
    ping/pong rid
    error     rid code msg

Loops: ``hops`` counts servers already passed and must be <= ``MAX_HOPS`` (0:
only the asking server's own request is answered); ``origin`` lists the
servers' names on the way, and a server finding its own name refuses.  A
server answers from its own tables only and never forwards a peer's request.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from l2crypt.errors import LocalError, RemoteProtocolError
from l2crypt.ks_messages import valid_host_id

LENGTH = struct.Struct("!I")
MAX_MESSAGE_BYTES = 64 * 1024
MAX_HOPS = 0
MAX_ORIGIN = 8
MAX_STR_LEN = 1024
U32_MAX = 2**32 - 1

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


def validate(msg: Any) -> dict:
    """Check a decoded message against SCHEMA; return it or raise ValueError."""
    if not isinstance(msg, dict):
        raise ValueError("message is not a map")
    t = msg.get("t")
    if t not in SCHEMA:
        raise ValueError(f"unknown message type {t!r}")
    required, optional = SCHEMA[t]
    keys = set(msg) - {"t"}
    if required - keys:
        raise ValueError(f"{t}: missing field(s) {', '.join(sorted(required - keys))}")
    if keys - required - optional:
        raise ValueError(f"{t}: unexpected field(s) {', '.join(sorted(map(str, keys - required - optional)))}")
    if ("key" in msg) != ("pw_id" in msg):
        raise ValueError(f"{t}: key and pw_id come together")
    for name in keys:
        typ, length = _FIELDS[name]
        value = msg[name]
        if typ is int:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
                raise ValueError(f"{t}.{name}: not an unsigned 32-bit integer")
        elif not isinstance(value, typ):
            raise ValueError(f"{t}.{name}: wrong type {type(value).__name__}")
        elif length is not None and len(value) != length:
            raise ValueError(f"{t}.{name}: length {len(value)}, want {length}")
        elif typ is str and len(value) > MAX_STR_LEN:
            raise ValueError(f"{t}.{name}: too long")
    for name in ("id", "from_id"):
        if name in msg and not valid_host_id(msg[name]):
            raise ValueError(f"{t}.{name}: not a valid host ID")
    if "origin" in msg:
        origin = msg["origin"]
        if len(origin) > MAX_ORIGIN or not all(isinstance(o, str) and 0 < len(o) <= 256 for o in origin):
            raise ValueError(f"{t}.origin: want at most {MAX_ORIGIN} server names")
    return msg


def encode_message(msg: dict) -> bytes:
    """Validate, pack and frame one message; LocalError on our own bad dict."""
    try:
        validate(msg)
    except ValueError as exc:
        raise LocalError(f"refusing to send a bad peer message: {exc}") from None
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise LocalError(f"refusing to send a {len(body)}-byte peer message (limit {MAX_MESSAGE_BYTES})")
    return LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        raise RemoteProtocolError(f"undecodable peer message: {type(exc).__name__}", "malformed") from None
    try:
        return validate(msg)
    except ValueError as exc:
        raise RemoteProtocolError(str(exc), "malformed") from None


class FrameReader:
    """Incremental deframer for one connection: feed bytes, get whole messages."""

    def __init__(self):
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length > MAX_MESSAGE_BYTES:
                raise RemoteProtocolError(f"peer message of {length} bytes exceeds the limit", "oversized")
            if len(self._buf) < LENGTH.size + length:
                break
            body = bytes(self._buf[LENGTH.size:LENGTH.size + length])
            del self._buf[:LENGTH.size + length]
            out.append(decode_body(body))
        return out
