"""Length-prefixed msgpack messages checked against a schema.

The framing shared by the key-server protocol (``ks_messages``) and the
key-server peering protocol (``keyserverd.peering.messages``): a 4-byte
big-endian body length, then a msgpack map with ``t`` (the type).

1. ``MessageCodec(fields, schema, ...)`` describes one protocol: each field's
   type and exact length, each type's required and optional fields, and an
   optional ``extra_check(msg)`` for rules across fields.
2. ``codec.encode(msg)`` validates and frames our own message (LocalError on
   our own bad dict); ``codec.decode_body`` unpacks and validates a peer's
   (RemoteProtocolError with code ``malformed``).
3. ``FrameReader(codec)`` deframes a byte stream; an announced length above
   the limit is refused (code ``oversized``) before the body is buffered.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import msgpack

from .errors import LocalError, RemoteProtocolError

LENGTH = struct.Struct("!I")
U32_MAX = 2**32 - 1
MAX_STR_LEN = 1024

Fields = dict[str, tuple[type, "int | None"]]
Schema = dict[str, tuple[frozenset, frozenset]]


class MessageCodec:
    """Length-prefixed msgpack messages checked against a schema; bad input raises
    ``MalformedMessage``."""

    def __init__(self, fields: Fields, schema: Schema, max_bytes: int, what: str = "message",
                 extra_check: Callable[[dict], None] | None = None):
        self.fields = fields
        self.schema = schema
        self.max_bytes = max_bytes
        self.what = what
        self.extra_check = extra_check

    def validate(self, msg: Any) -> dict:
        """Check a decoded message against the schema; return it or raise ValueError."""
        if not isinstance(msg, dict):
            raise ValueError("message is not a map")
        t = msg.get("t")
        if not isinstance(t, str) or t not in self.schema:
            raise ValueError(f"unknown message type {t!r}")
        required, optional = self.schema[t]
        keys = set(msg) - {"t"}
        missing = required - keys
        if missing:
            raise ValueError(f"{t}: missing field(s) {', '.join(sorted(missing))}")
        extra = keys - required - optional
        if extra:
            raise ValueError(f"{t}: unexpected field(s) {', '.join(sorted(map(str, extra)))}")
        for name in keys:
            typ, length = self.fields[name]
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
            elif typ is bytes and len(value) > self.max_bytes:
                raise ValueError(f"{t}.{name}: too long")
        if self.extra_check is not None:
            self.extra_check(msg)
        return msg

    def encode_body(self, msg: dict) -> bytes:
        """Validate and pack a body (no length prefix); LocalError on our own bad dict."""
        try:
            self.validate(msg)
        except ValueError as exc:
            raise LocalError(f"refusing to send a bad {self.what}: {exc}") from None
        body = msgpack.packb(msg, use_bin_type=True)
        if len(body) > self.max_bytes:
            raise LocalError(f"refusing to send a {len(body)}-byte {self.what} (limit {self.max_bytes})")
        return body

    def encode(self, msg: dict) -> bytes:
        """Validate, pack and frame one message."""
        body = self.encode_body(msg)
        return LENGTH.pack(len(body)) + body

    def decode_body(self, body: bytes) -> dict:
        """Unpack and validate one body; RemoteProtocolError (code malformed) with the reason."""
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types for garbage
            raise RemoteProtocolError(f"undecodable {self.what}: {type(exc).__name__}", "malformed") from None
        try:
            return self.validate(msg)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc), "malformed") from None


class FrameReader:
    """Incremental deframer: feed bytes, get whole validated messages.

    Owned by one connection.  Raises RemoteProtocolError on an oversized
    length (before buffering the body) or on a malformed body.
    """

    def __init__(self, codec: MessageCodec, max_bytes: int | None = None):
        self._codec = codec
        self._buf = bytearray()
        self._max = codec.max_bytes if max_bytes is None else max_bytes

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length > self._max:
                raise RemoteProtocolError(
                    f"{self._codec.what} of {length} bytes exceeds the {self._max}-byte limit", "oversized"
                )
            if len(self._buf) < LENGTH.size + length:
                break
            body = bytes(self._buf[LENGTH.size : LENGTH.size + length])
            del self._buf[: LENGTH.size + length]
            out.append(self._codec.decode_body(body))
        return out
