"""The messages between the agent's control process and its datapath process.

With ``datapath_process = true`` the frame path (TAP <-> engine <-> wire)
runs in a process of its own (``agent.datapath_proc``); the two talk over an
``AF_UNIX``/``SOCK_SEQPACKET`` socketpair, one message per packet, and over
nothing else (key material never leaves this pair).

A message is a 5-byte header, then its body:

    0      1                 5
    +------+-----------------+------------------------------+
    | type | body length u32 | body (the type's layout)     |
    +------+-----------------+------------------------------+

Control -> datapath (the engine is touched only through these):

* ``PairKey``      6 peer MAC, u32 PW_ID, f64 age_s, str peer ID, key,
                   u8 count of older versions, each u32 PW_ID, f64 age_s, key
* ``MulticastKey`` u32 PW_ID, f64 age_s, key
* ``UseCipher``    str cipher name
* ``KeyMaxAge``    f64 seconds
* ``RevokePeer``   6 MAC (the server revoked that host: forget it, refuse it)
* ``PeerUnknown``  6 MAC (no host holds it: drop its held frames)
* ``RetryPending`` (empty: ask again for every key still pending)
* ``Stop``         (empty: save the floors a last time and exit)

Datapath -> control:

* ``KeyRequest``   6 MAC (``engine.GROUP_MAC``: the multicast key)
* ``Notice``       str kind (``rekey``, ``report``: a lag report), 6 MAC, u32 PW_ID
* ``Stats``        UTF-8 JSON object: the engine's status snapshot, its
                   counters and drops (no key material)

``str`` and ``key`` are a u8 length then the bytes.  ``decode_message``
raises ``DatapathMessageError`` (a RemoteProtocolError) with the code
``truncated``, ``wrong_length``, ``unknown_type`` or ``malformed``;
``encode_message`` raises ValueError on our own bad value.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple, Union

from .errors import RemoteProtocolError

HEADER = struct.Struct("!BI")
MAC_LEN = 6
U32 = struct.Struct("!I")
F64 = struct.Struct("!d")
#: The largest message either side sends or accepts (a Stats with many peers).
MAX_MESSAGE_BYTES = 1 << 20
MAX_OLDER = 255


class DatapathMessageError(RemoteProtocolError):
    """A message on the datapath socketpair is not what its header says."""


class PairKey(NamedTuple):
    """Install versions of a peer's pair key (``older``: (pw_id, key, age_s) tuples)."""

    peer_mac: bytes
    pw_id: int
    age_s: float
    peer_id: str
    key: bytes
    older: tuple = ()


class MulticastKey(NamedTuple):
    """Install a multicast key version."""

    pw_id: int
    age_s: float
    key: bytes


class UseCipher(NamedTuple):
    """The segment's cipher (from the key server's welcome)."""

    cipher: str


class KeyMaxAge(NamedTuple):
    """The key lifetime in force, seconds."""

    seconds: float


class RevokePeer(NamedTuple):
    """The key server revoked the host at ``mac``."""

    mac: bytes


class PeerUnknown(NamedTuple):
    """The key server knows no host at ``mac``."""

    mac: bytes


class RetryPending(NamedTuple):
    """Ask again for every key still pending (a new key-server connection)."""


class Stop(NamedTuple):
    """Stop cleanly: the floors saved a last time, the packet clock reserved."""


class KeyRequest(NamedTuple):
    """The engine wants the key of ``mac`` (``GROUP_MAC``: the multicast key)."""

    mac: bytes


class Notice(NamedTuple):
    """An engine notice for the key server (``rekey`` or ``report``)."""

    kind: str
    mac: bytes
    pw_id: int


class Stats(NamedTuple):
    """The datapath's status snapshot, counters and drops (a JSON object)."""

    doc: dict


Message = Union[PairKey, MulticastKey, UseCipher, KeyMaxAge, RevokePeer, PeerUnknown, RetryPending, Stop,
                KeyRequest, Notice, Stats]


# --------------------------------------------------------------- field helpers


def _mac(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != MAC_LEN:
        raise ValueError(f"a MAC is {MAC_LEN} bytes")
    return bytes(value)


def _short(value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError("a string or key is 255 bytes at most")
    return bytes([len(value)]) + value


def _u32(value: int) -> bytes:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{value} does not fit 32 bits")
    return U32.pack(value)


class BodyReader:
    """Reads a body's fields in order; every short read raises ``truncated``."""

    def __init__(self, body: bytes, kind: str):
        self.body = body
        self.kind = kind
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise DatapathMessageError(f"{self.kind}: body truncated at byte {self.pos}", "truncated")
        out = self.body[self.pos:self.pos + n]
        self.pos += n
        return out

    def mac(self) -> bytes:
        return self.take(MAC_LEN)

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def f64(self) -> float:
        return F64.unpack(self.take(8))[0]

    def short(self) -> bytes:
        return self.take(self.take(1)[0])

    def text(self) -> str:
        raw = self.short()
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise DatapathMessageError(f"{self.kind}: a string is not UTF-8", "malformed") from None

    def done(self) -> None:
        if self.pos != len(self.body):
            raise DatapathMessageError(f"{self.kind}: {len(self.body) - self.pos} bytes after the last field",
                                       "wrong_length")


# ----------------------------------------------------------------- the bodies


def _encode_pair_key(m: PairKey) -> bytes:
    if len(m.older) > MAX_OLDER:
        raise ValueError(f"at most {MAX_OLDER} older versions")
    out = [_mac(m.peer_mac), _u32(m.pw_id), F64.pack(m.age_s), _short(m.peer_id.encode()), _short(m.key),
           bytes([len(m.older)])]
    for pw_id, key, age_s in m.older:
        out += [_u32(pw_id), F64.pack(age_s), _short(key)]
    return b"".join(out)


def _decode_pair_key(r: BodyReader) -> PairKey:
    mac, pw_id, age_s, peer_id, key = r.mac(), r.u32(), r.f64(), r.text(), r.short()
    older = []
    for _ in range(r.take(1)[0]):
        older_pw_id, older_age = r.u32(), r.f64()
        older.append((older_pw_id, r.short(), older_age))
    return PairKey(mac, pw_id, age_s, peer_id, key, tuple(older))


def _decode_stats(r: BodyReader) -> Stats:
    raw = r.take(len(r.body))
    try:
        doc = json.loads(raw)
    except ValueError:
        raise DatapathMessageError("Stats: the body is not JSON", "malformed") from None
    if not isinstance(doc, dict):
        raise DatapathMessageError("Stats: the body is not a JSON object", "malformed")
    return Stats(doc)


#: type code -> (class, encode body, decode body)
CODECS = {
    1: (PairKey, _encode_pair_key, _decode_pair_key),
    2: (MulticastKey, lambda m: _u32(m.pw_id) + F64.pack(m.age_s) + _short(m.key),
        lambda r: MulticastKey(r.u32(), r.f64(), r.short())),
    3: (UseCipher, lambda m: _short(m.cipher.encode()), lambda r: UseCipher(r.text())),
    4: (KeyMaxAge, lambda m: F64.pack(m.seconds), lambda r: KeyMaxAge(r.f64())),
    5: (RevokePeer, lambda m: _mac(m.mac), lambda r: RevokePeer(r.mac())),
    6: (PeerUnknown, lambda m: _mac(m.mac), lambda r: PeerUnknown(r.mac())),
    7: (RetryPending, lambda m: b"", lambda r: RetryPending()),
    8: (Stop, lambda m: b"", lambda r: Stop()),
    32: (KeyRequest, lambda m: _mac(m.mac), lambda r: KeyRequest(r.mac())),
    33: (Notice, lambda m: _short(m.kind.encode()) + _mac(m.mac) + _u32(m.pw_id),
         lambda r: Notice(r.text(), r.mac(), r.u32())),
    34: (Stats, lambda m: json.dumps(m.doc, separators=(",", ":")).encode(), _decode_stats),
}
TYPE_OF = {cls: code for code, (cls, _, _) in CODECS.items()}
#: The messages the control process sends; the others come from the datapath.
TO_DATAPATH = frozenset(cls for code, (cls, _, _) in CODECS.items() if code < 32)


def encode_message(msg: Message) -> bytes:
    """One message as it goes on the socketpair; ValueError on a bad field or an oversized body."""
    code = TYPE_OF.get(type(msg))
    if code is None:
        raise ValueError(f"not a datapath message: {type(msg).__name__}")
    body = CODECS[code][1](msg)
    if HEADER.size + len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{type(msg).__name__}: {len(body)} bytes, over {MAX_MESSAGE_BYTES}")
    return HEADER.pack(code, len(body)) + body


def decode_message(data: bytes) -> Message:
    """One message read from the socketpair; DatapathMessageError if it is not exactly one."""
    if len(data) < HEADER.size:
        raise DatapathMessageError(f"message of {len(data)} bytes, shorter than its header", "truncated")
    code, length = HEADER.unpack_from(data)
    codec = CODECS.get(code)
    if codec is None:
        raise DatapathMessageError(f"unknown message type {code}", "unknown_type")
    cls, _, decode_body = codec
    if len(data) - HEADER.size < length:
        raise DatapathMessageError(f"{cls.__name__}: {len(data) - HEADER.size} body bytes of {length}", "truncated")
    if len(data) - HEADER.size > length:
        raise DatapathMessageError(f"{cls.__name__}: {len(data) - HEADER.size} body bytes, header says {length}",
                                   "wrong_length")
    reader = BodyReader(bytes(data[HEADER.size:]), cls.__name__)
    msg = decode_body(reader)
    reader.done()
    return msg
