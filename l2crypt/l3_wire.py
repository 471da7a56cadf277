r"""Wire format of a sealed layer-3 (IP) packet.

Two modes carry the same l2crypt L3 header:

* **routed** (the patent's "layer 3"): the IPv4 header stays, so the packet
  still routes; its protocol becomes ``L3_IP_PROTOCOL`` (253, "experimental")
  and the original protocol moves inside the ciphertext::

    +-----------+-------------+--------------------------------+-----+
    | IPv4 hdr  | L3 header   | ciphertext of: orig protocol   | tag |
    | proto=253 | (see below) | (u8) + original IP payload     | 16B |
    +-----------+-------------+--------------------------------+-----+
    AAD = source IP (4) + destination IP (4) + L3 header

* **nat** (the patent's "layer 3 in NAT mode"): the whole original packet is
  sealed and carried over UDP, so a NAT may rewrite the outer addresses and
  ports; the peer is found by the sender ID in the header, never by address::

    +-----------+---------+-------------+---------------------------+-----+
    | IPv4 hdr  | UDP hdr | L3 header   | ciphertext of the whole   | tag |
    | (outer)   |         |             | original IPv4 packet      | 16B |
    +-----------+---------+-------------+---------------------------+-----+
    AAD = L3 header (the inner addresses are inside the ciphertext)

The L3 header (offsets from its start)::

     0     1      2      3       4        8               16
    +-----+------+------+-------+--------+---------------+-----------------+
    | ver | mode |keyid |id_len | PW_ID  | packet number | sender ID       |
    | u8  | u8   | u8   | u8    | u32 BE | u64 BE        | id_len bytes    |
    +-----+------+------+-------+--------+---------------+-----------------+

1. ``parse_ipv4`` length-checks an IPv4 packet and returns its fields.
2. ``encode_l3_header`` / ``decode_l3_header`` build and parse the header;
   decode never raises, it returns a drop reason.
3. ``rebuild_ipv4`` gives a header a new protocol and total length (and a
   fresh checksum); ``encode_udp_packet`` builds the outer packet of nat mode.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .constants import TAG_LEN

# --- wire and spec constants ----------------------------------------------------

#: IP protocol number of routed-mode packets (RFC 3692: 253 is for experiments).
L3_IP_PROTOCOL = 253
L3_VERSION = 1
MODE_ROUTED = 1
MODE_NAT = 2
MODES = {"routed": MODE_ROUTED, "nat": MODE_NAT}
KEY_ID_PAIR = 1
L3_FIXED = struct.Struct("!BBBBIQ")  # version, mode, key id, id length, PW_ID, packet number
L3_FIXED_LEN = L3_FIXED.size  # 16
MAX_SENDER_ID = 64
IPV4_MIN_HEADER = 20
UDP_HEADER = struct.Struct("!HHHH")  # source port, destination port, length, checksum
UDP_LEN = UDP_HEADER.size
IPPROTO_UDP = 17
#: Largest IPv4 packet.
IPV4_MAX = 65535


def overhead(mode: str, sender_id_len: int) -> int:
    """Bytes a sealed packet adds to the plain one in ``mode``."""
    base = L3_FIXED_LEN + sender_id_len + TAG_LEN
    if mode == "routed":
        return base + 1  # the original protocol byte
    return base + IPV4_MIN_HEADER + UDP_LEN  # outer IPv4 + UDP


# Drop reasons produced here.
TRUNCATED = "truncated"
NOT_IPV4 = "not_ipv4"
MALFORMED = "malformed"
UNKNOWN_VERSION = "unknown_version"
UNKNOWN_KEY_ID = "unknown_key_id"


class Ipv4(NamedTuple):
    """The fields of an IPv4 packet the L3 path needs."""

    header_len: int
    total_len: int
    protocol: int
    src: bytes
    dst: bytes
    is_fragment: bool


class L3Header(NamedTuple):
    """The clear fields of an L3 header."""

    mode: int
    key_id: int
    pw_id: int
    packet_number: int
    sender_id: str
    length: int  # bytes of the header, sender ID included


def parse_ipv4(packet: bytes) -> Ipv4 | str:
    """Check and parse an IPv4 packet; a drop reason instead if it is not one.

    The packet must be exactly ``total length`` long (what netfilter hands over).
    """
    if len(packet) < IPV4_MIN_HEADER:
        return TRUNCATED
    if packet[0] >> 4 != 4:
        return NOT_IPV4
    header_len = (packet[0] & 0x0F) * 4
    total_len = int.from_bytes(packet[2:4], "big")
    if header_len < IPV4_MIN_HEADER or total_len < header_len:
        return MALFORMED
    if len(packet) != total_len:
        return TRUNCATED if len(packet) < total_len else MALFORMED
    frag = int.from_bytes(packet[6:8], "big")
    return Ipv4(header_len, total_len, packet[9], bytes(packet[12:16]), bytes(packet[16:20]),
                bool(frag & 0x3FFF))


def ipv4_checksum(header: bytes) -> int:
    """The RFC 791 header checksum of ``header`` (its checksum field counted as is)."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rebuild_ipv4(header: bytes, protocol: int, total_len: int) -> bytes:
    """``header`` with a new protocol and total length and a fresh checksum."""
    h = bytearray(header)
    h[2:4] = total_len.to_bytes(2, "big")
    h[9] = protocol
    h[10:12] = b"\0\0"
    h[10:12] = ipv4_checksum(bytes(h)).to_bytes(2, "big")
    return bytes(h)


def encode_l3_header(mode: int, pw_id: int, packet_number: int, sender_id: str) -> bytes:
    """The L3 header (the sender ID is ASCII, 1-64 bytes)."""
    sid = sender_id.encode("ascii")
    if not 1 <= len(sid) <= MAX_SENDER_ID:
        raise ValueError(f"sender ID must be 1-{MAX_SENDER_ID} bytes")
    return L3_FIXED.pack(L3_VERSION, mode, KEY_ID_PAIR, len(sid), pw_id, packet_number) + sid


def decode_l3_header(data: bytes, offset: int = 0) -> L3Header | str:
    """Parse the L3 header at ``offset``; a drop reason if it is not a valid one.

    At least a tag must follow the header.  Never raises.
    """
    if len(data) - offset < L3_FIXED_LEN:
        return TRUNCATED
    version, mode, key_id, id_len, pw_id, pn = L3_FIXED.unpack_from(data, offset)
    if version != L3_VERSION:
        return UNKNOWN_VERSION
    if key_id != KEY_ID_PAIR:
        return UNKNOWN_KEY_ID
    if not 1 <= id_len <= MAX_SENDER_ID:
        return MALFORMED
    length = L3_FIXED_LEN + id_len
    if len(data) - offset < length + TAG_LEN:
        return TRUNCATED
    raw = bytes(data[offset + L3_FIXED_LEN : offset + length])
    if not raw.isascii():
        return MALFORMED
    return L3Header(mode, key_id, pw_id, pn, raw.decode("ascii"), length)


def encode_udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
                      ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: the AEAD tag protects the payload)."""
    total = IPV4_MIN_HEADER + UDP_LEN + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0, ttl, IPPROTO_UDP, 0, src, dst)
    header = header[:10] + ipv4_checksum(header).to_bytes(2, "big") + header[12:]
    return header + UDP_HEADER.pack(sport, dport, UDP_LEN + len(payload), 0) + payload


def udp_ports(packet: bytes, header_len: int) -> tuple[int, int] | str:
    """(source port, destination port) of a UDP packet, or a drop reason."""
    if len(packet) < header_len + UDP_LEN:
        return TRUNCATED
    sport, dport, length, _ = UDP_HEADER.unpack_from(packet, header_len)
    if length != len(packet) - header_len:
        return MALFORMED
    return sport, dport


def format_ip(ip: bytes) -> str:
    return ".".join(str(b) for b in ip)


def parse_ip(text: str) -> bytes:
    """Dotted-quad IPv4 to 4 bytes; ValueError with a clear message."""
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    return bytes(int(p) for p in parts)
