r"""Wire format of an l2crypt data frame.

Layout (offsets in bytes)::

     0   6   12     14    15    16       20              28                  -16
    +---+---+------+-----+-----+--------+---------------+--------------------+-----+
    |DA |SA |L2C ET| ver |keyid| PW_ID  | packet number | ciphertext of the  | tag |
    |   |   |0x88B5| u8  | u8  | u32 BE | u64 BE        | orig EtherType and |16 B |
    |   |   |      |1, 2 |     |        |               | payload (VLAN too) |     |
    +---+---+------+-----+-----+--------+---------------+--------------------+-----+
    \_______________ authenticated data (AAD), 28 bytes _/

The overhead over the plain frame is 32 bytes: 16 of header (the original
EtherType moves inside the ciphertext) and 16 of tag.

Version 1: the key-id byte is the key id.  Version 2 (the same layout): its
top bit is a flag, ``KEY_FLAG_CSUM_PARTIAL`` (the inner TCP/UDP checksum is
left to the receiver), and the low 7 bits are the key id.  A sender writes
version 2 only for a frame with a flag set; a receiver reads both.  The
flag is in the AAD, so it is as authentic as the rest of the header.

1. ``encode_header`` builds the 28 bytes of AAD for a plain frame's MACs.
2. ``decode_header`` parses and length-checks a received frame; it never
   raises, it returns a drop reason instead.  ``decode_fields`` does the
   same and returns a plain tuple (the engine's per-frame path); the key id
   comes without the flag, ``csum_partial_of`` reads the flag.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .constants import (
    FRAME_VERSION,
    FRAME_VERSION_FLAGS,
    KEY_FLAG_CSUM_PARTIAL,
    KEY_ID_MASK,
    L2C_HEADER_LEN,
    MAC_HEADER_LEN,
    MIN_PLAIN_FRAME,
    TAG_LEN,
)

HEADER = struct.Struct("!HBBIQ")  # ethertype, version, key id, PW_ID, packet number
assert HEADER.size == L2C_HEADER_LEN
AAD_LEN = MAC_HEADER_LEN + L2C_HEADER_LEN  # 28
#: A sealed frame holds at least the AAD, the inner EtherType and the tag.
MIN_SEALED_FRAME = AAD_LEN + 2 + TAG_LEN
#: A sealed frame of the smallest plain frame we accept.
MIN_SEALED_FROM_PLAIN = MIN_PLAIN_FRAME + L2C_HEADER_LEN + TAG_LEN

# Drop reasons produced here.
TRUNCATED = "truncated"
NOT_L2CRYPT = "not_l2crypt"
UNKNOWN_VERSION = "unknown_version"


class FrameHeader(NamedTuple):
    """The clear fields of a sealed frame."""

    dst_mac: bytes
    src_mac: bytes
    key_id: int
    pw_id: int
    packet_number: int


def encode_header(
    mac_header: bytes, ethertype: int, key_id: int, pw_id: int, packet_number: int, csum_partial: bool = False
) -> bytes:
    """Return the 28-byte AAD: ``mac_header`` (DA+SA, 12 bytes) and the l2crypt
    header (version 2 with the flag when ``csum_partial``, else version 1)."""
    if csum_partial:
        return mac_header + HEADER.pack(ethertype, FRAME_VERSION_FLAGS, key_id | KEY_FLAG_CSUM_PARTIAL,
                                        pw_id, packet_number)
    return mac_header + HEADER.pack(ethertype, FRAME_VERSION, key_id, pw_id, packet_number)


def encode_frame(
    dst_mac: bytes,
    src_mac: bytes,
    ethertype: int,
    key_id: int,
    pw_id: int,
    packet_number: int,
    sealed_body: bytes,
) -> bytes:
    """Assemble a whole wire frame from its parts (``sealed_body`` is ciphertext+tag)."""
    return encode_header(dst_mac + src_mac, ethertype, key_id, pw_id, packet_number) + sealed_body


def decode_header(frame: bytes, ethertype: int) -> FrameHeader | str:
    """Parse the clear part of a received frame.

    Returns a ``FrameHeader`` or, for a frame that cannot be ours, the name of
    the drop reason (``truncated``, ``not_l2crypt``, ``unknown_version``).
    Never raises.
    """
    fields = decode_fields(frame, ethertype)
    return fields if isinstance(fields, str) else FrameHeader(*fields)


_unpack_header = HEADER.unpack_from


def decode_fields(frame: bytes, ethertype: int) -> tuple[bytes, bytes, int, int, int] | str:
    """``decode_header`` as a plain tuple (dst, src, key id, PW_ID, packet number)."""
    if len(frame) < MIN_SEALED_FRAME:
        return TRUNCATED
    et, version, key_id, pw_id, pn = _unpack_header(frame, MAC_HEADER_LEN)
    if et != ethertype:
        return NOT_L2CRYPT
    if version != FRAME_VERSION:
        if version != FRAME_VERSION_FLAGS:
            return UNKNOWN_VERSION
        key_id &= KEY_ID_MASK
    return frame[0:6], frame[6:12], key_id, pw_id, pn


def csum_partial_of(frame: bytes) -> bool:
    """True if a sealed frame (header already decoded) says its inner L4
    checksum was left to the receiver."""
    return frame[14] == FRAME_VERSION_FLAGS and bool(frame[15] & KEY_FLAG_CSUM_PARTIAL)


def aad_of(frame: bytes) -> bytes:
    """The authenticated data of a sealed frame."""
    return frame[:AAD_LEN]


def body_of(frame: bytes) -> bytes:
    """Ciphertext and tag of a sealed frame."""
    return frame[AAD_LEN:]


def is_group_address(mac: bytes) -> bool:
    """True for broadcast and multicast MACs (the I/G bit of the first octet)."""
    return bool(mac[0] & 1)


def format_mac(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (or with ``-``); raises ValueError with a clear message."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (want aa:bb:cc:dd:ee:ff)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r} (want aa:bb:cc:dd:ee:ff)") from None
