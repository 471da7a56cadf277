r"""Wire format of the inter-subnet tunnel: one UDP datagram per message.

Layout (offsets in bytes)::

     0     1       2          8        12               20                   -16
    +-----+-------+----------+--------+----------------+--------------------+-----+
    | ver | path  | sender   | PW_ID  | packet number  | ciphertext of the  | tag |
    | u8  | kind  | tag      | u32 BE | u64 BE         | message (for DATA: |16 B |
    | =3  | 4+4 b | 6 bytes  |        |                | link seq + frame)  |     |
    +-----+-------+----------+--------+----------------+--------------------+-----+
    \_________________ authenticated data (AAD), 20 bytes ____/

* The second byte holds the *path* (high 4 bits, 0-15: which of the link's
  paths the datagram was sent on, each with keys of its own) and the *kind*
  (low 4 bits): ``DATA`` (an Ethernet frame, after the link sequence number
  of ``multipath``), ``PROBE`` and ``ECHO`` (``probe_wire``), ``PARITY``
  (``fec_parity``).  Version 2 (no path, no kinds) is not accepted.

* ``sender`` names the sending gateway (``tunnel_keys.sender_tag`` of its
  enrolled ID); with the PW_ID (the NETKEY version) it selects the receive
  state.  The receiver knows the tag of every configured peer and takes a
  tag only from that peer's address.
* The key is the link key of that direction and path
  (``l2crypt.core.tunnel_keys``): one key per (sending gateway, receiving
  gateway, path, PW_ID), and one packet counter per gateway, so every (key,
  nonce) pair is unique.
* The nonce is 4 zero bytes and the packet number, as for data frames.

The overhead is 36 bytes over the inner frame (plus IP and UDP headers).

1. ``encode_header`` builds the 20 bytes of AAD.
2. ``decode_header`` parses and length-checks a datagram; it never raises,
   it returns a drop reason instead.  Every kind's message is at least
   ``MIN_INNER_FRAME`` bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from l2crypt.core.constants import TAG_LEN

TUNNEL_VERSION = 3
KIND_DATA = 1
KIND_PROBE = 2
KIND_ECHO = 3
KIND_PARITY = 4
KINDS = frozenset({KIND_DATA, KIND_PROBE, KIND_ECHO, KIND_PARITY})
MAX_PATH = 15
#: A DATA message is the link's sequence number (u64) and the inner frame.
DATA_SEQ_LEN = 8
HEADER = struct.Struct("!BB6sIQ")  # version, path << 4 | kind, sender tag, PW_ID, packet number
HEADER_LEN = HEADER.size  # 20
#: The smallest inner frame: DA, SA and the EtherType.
MIN_INNER_FRAME = 14
MIN_DATAGRAM = HEADER_LEN + MIN_INNER_FRAME + TAG_LEN  # 50
#: Largest datagram accepted (an inner jumbo frame of 9216 bytes and the overhead).
MAX_DATAGRAM = 9216 + HEADER_LEN + TAG_LEN
OVERHEAD = HEADER_LEN + TAG_LEN  # 36

# Drop reasons produced here.
TRUNCATED = "tunnel_truncated"
OVERSIZED = "tunnel_oversized"
UNKNOWN_VERSION = "tunnel_unknown_version"
UNKNOWN_KIND = "tunnel_unknown_kind"


class TunnelHeader(NamedTuple):
    """The clear fields of a tunnel datagram."""

    sender: bytes
    pw_id: int
    packet_number: int
    path: int = 0
    kind: int = KIND_DATA


def encode_header(sender: bytes, pw_id: int, packet_number: int, path: int = 0, kind: int = KIND_DATA) -> bytes:
    """The 20-byte AAD of a datagram.  ``sender`` is 6 bytes."""
    if len(sender) != 6:
        raise ValueError(f"sender must be 6 bytes, got {len(sender)}")
    if not 0 <= path <= MAX_PATH or kind not in KINDS:
        raise ValueError(f"path {path} (want 0-{MAX_PATH}) or kind {kind} out of range")
    return HEADER.pack(TUNNEL_VERSION, path << 4 | kind, sender, pw_id, packet_number)


def encode_datagram(sender: bytes, pw_id: int, packet_number: int, sealed_body: bytes, path: int = 0,
                    kind: int = KIND_DATA) -> bytes:
    """A whole datagram from its parts (``sealed_body`` is ciphertext and tag)."""
    return encode_header(sender, pw_id, packet_number, path, kind) + sealed_body


def decode_header(datagram: bytes) -> TunnelHeader | str:
    """Parse the clear part of a received datagram, or name the drop reason."""
    if len(datagram) < MIN_DATAGRAM:
        return TRUNCATED
    if len(datagram) > MAX_DATAGRAM:
        return OVERSIZED
    version, path_kind, sender, pw_id, pn = HEADER.unpack_from(datagram)
    if version != TUNNEL_VERSION:
        return UNKNOWN_VERSION
    if path_kind & 15 not in KINDS:
        return UNKNOWN_KIND
    return TunnelHeader(sender, pw_id, pn, path_kind >> 4, path_kind & 15)


def aad_of(datagram: bytes) -> bytes:
    return datagram[:HEADER_LEN]


def body_of(datagram: bytes) -> bytes:
    return datagram[HEADER_LEN:]
