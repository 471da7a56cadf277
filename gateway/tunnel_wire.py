r"""Wire format of the inter-subnet tunnel: one UDP datagram per Ethernet frame.

Layout (offsets in bytes)::

     0     1      2          8        12               20                   -16
    +-----+------+----------+--------+----------------+--------------------+-----+
    | ver | kind | sender   | PW_ID  | packet number  | ciphertext of the  | tag |
    | u8  | u8   | tag      | u32 BE | u64 BE         | whole inner frame  |16 B |
    | =2  | =1   | 6 bytes  |        |                | (DA SA type data)  |     |
    +-----+------+----------+--------+----------------+--------------------+-----+
    \_________________ authenticated data (AAD), 20 bytes ____/

* ``sender`` names the sending gateway (``tunnel_keys.sender_tag`` of its
  enrolled ID); with the PW_ID (the NETKEY version) it selects the receive
  state.  The receiver knows the tag of every configured peer and takes a
  tag only from that peer's address.
* The key is the link key of that direction (``l2crypt.core.tunnel_keys``): one
  key per (sending gateway, receiving gateway, PW_ID), and one packet counter
  per gateway, so every (key, nonce) pair is unique.  Version 1 (one key per
  sender, derived by every gateway from NETKEY) is not accepted.
* The nonce is 4 zero bytes and the packet number, as for data frames.

The overhead is 36 bytes over the inner frame (plus IP and UDP headers).

1. ``encode_header`` builds the 20 bytes of AAD.
2. ``decode_header`` parses and length-checks a datagram; it never raises,
   it returns a drop reason instead.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from l2crypt.core.constants import TAG_LEN

TUNNEL_VERSION = 2
KIND_DATA = 1
HEADER = struct.Struct("!BB6sIQ")  # version, kind, sender tag, PW_ID, packet number
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


def encode_header(sender: bytes, pw_id: int, packet_number: int) -> bytes:
    """The 20-byte AAD of a datagram.  ``sender`` is 6 bytes."""
    if len(sender) != 6:
        raise ValueError(f"sender must be 6 bytes, got {len(sender)}")
    return HEADER.pack(TUNNEL_VERSION, KIND_DATA, sender, pw_id, packet_number)


def encode_datagram(sender: bytes, pw_id: int, packet_number: int, sealed_body: bytes) -> bytes:
    """A whole datagram from its parts (``sealed_body`` is ciphertext and tag)."""
    return encode_header(sender, pw_id, packet_number) + sealed_body


def decode_header(datagram: bytes) -> TunnelHeader | str:
    """Parse the clear part of a received datagram, or name the drop reason."""
    if len(datagram) < MIN_DATAGRAM:
        return TRUNCATED
    if len(datagram) > MAX_DATAGRAM:
        return OVERSIZED
    version, kind, sender, pw_id, pn = HEADER.unpack_from(datagram)
    if version != TUNNEL_VERSION:
        return UNKNOWN_VERSION
    if kind != KIND_DATA:
        return UNKNOWN_KIND
    return TunnelHeader(sender, pw_id, pn)


def aad_of(datagram: bytes) -> bytes:
    return datagram[:HEADER_LEN]


def body_of(datagram: bytes) -> bytes:
    return datagram[HEADER_LEN:]
