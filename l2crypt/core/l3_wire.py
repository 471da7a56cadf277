r"""Wire format of a sealed layer-3 (IP) packet, IPv4 and IPv6.

Two modes carry the same l2crypt L3 header:

* **routed** (the patent's "layer 3"): the IP header stays, so the packet
  still routes; its protocol (IPv4) or next header (IPv6) becomes
  ``L3_IP_PROTOCOL`` (253, "experimental") and the original one moves inside
  the ciphertext::

    +-------------+-------------+--------------------------------+-----+
    | IPv4/v6 hdr | L3 header   | ciphertext of: orig protocol   | tag |
    | proto=253   | (see below) | (u8) + everything after the    | 16B |
    |             |             | fixed IP header                |     |
    +-------------+-------------+--------------------------------+-----+
    AAD = source IP + destination IP (4 or 16 bytes each) + L3 header

* **nat** (the patent's "layer 3 in NAT mode"): the whole original packet is
  sealed and carried over UDP in an outer packet of the same IP version, so
  a NAT may rewrite the outer addresses and ports; the peer is found by the
  sender ID in the header, never by address::

    +-------------+---------+-------------+---------------------------+-----+
    | IPv4/v6 hdr | UDP hdr | L3 header   | ciphertext of the whole   | tag |
    | (outer)     |         |             | original IP packet        | 16B |
    +-------------+---------+-------------+---------------------------+-----+
    AAD = L3 header (the inner addresses are inside the ciphertext)

  A sealed packet with an empty ciphertext (header and tag only) is a NAT
  keepalive.

The L3 header (offsets from its start)::

     0     1      2      3       4        8               16
    +-----+------+------+-------+--------+---------------+-----------------+
    | ver | mode |keyid |id_len | PW_ID  | packet number | sender ID       |
    | u8  | u8   | u8   | u8    | u32 BE | u64 BE        | id_len bytes    |
    +-----+------+------+-------+--------+---------------+-----------------+

1. ``parse_packet`` length-checks an IPv4 or IPv6 packet and returns its
   fields (``parse_ipv4``/``parse_ipv6``), or a drop reason.
2. ``encode_l3_header`` / ``decode_l3_header`` build and parse the header;
   decode never raises, it returns a drop reason.
3. ``rebuild_ip`` gives a fixed header a new protocol and total length (and a
   fresh IPv4 checksum); ``encode_udp_packet`` builds the outer packet of
   nat mode (IPv6: with the UDP checksum it must carry).
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from array import array
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
IPV6_HEADER = 40
#: Fixed header length by IP version (the IPv4 one without options).
IP_HEADER = {4: IPV4_MIN_HEADER, 6: IPV6_HEADER}
#: Address length by IP version.
ADDR_LEN = {4: 4, 6: 16}
UDP_HEADER = struct.Struct("!HHHH")  # source port, destination port, length, checksum
UDP_LEN = UDP_HEADER.size
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_FRAGMENT = 44  # IPv6 fragment extension header
IPV4_DF = 0x4000
#: Largest IPv4 packet, and largest IPv6 payload without a jumbogram.
IPV4_MAX = 65535
IPV6_MAX = IPV6_HEADER + 65535
IP_MAX = {4: IPV4_MAX, 6: IPV6_MAX}


def overhead(mode: str, sender_id_len: int, version: int = 4) -> int:
    """Bytes a sealed packet adds to the plain one in ``mode`` (IP ``version``)."""
    base = L3_FIXED_LEN + sender_id_len + TAG_LEN
    if mode == "routed":
        return base + 1  # the original protocol byte
    return base + IP_HEADER[version] + UDP_LEN  # outer IP + UDP


# Drop reasons produced here.
TRUNCATED = "truncated"
NOT_IP = "not_ip"
MALFORMED = "malformed"
UNKNOWN_VERSION = "unknown_version"
UNKNOWN_KEY_ID = "unknown_key_id"


class IpHeader(NamedTuple):
    """The fields of an IPv4 or IPv6 packet the L3 path needs."""

    version: int          # 4 or 6
    header_len: int       # the fixed header: IHL * 4 (IPv4), 40 (IPv6)
    total_len: int
    protocol: int         # IPv4 protocol, IPv6 (first) next header
    src: bytes            # 4 or 16 bytes
    dst: bytes
    is_fragment: bool     # IPv4 MF or offset; IPv6 a fragment header first
    dont_fragment: bool   # IPv4 DF; always True for IPv6 (routers never fragment it)


class L3Header(NamedTuple):
    """The clear fields of an L3 header."""

    mode: int
    key_id: int
    pw_id: int
    packet_number: int
    sender_id: str
    length: int  # bytes of the header, sender ID included


def parse_ipv4(packet: bytes) -> IpHeader | str:
    """Check and parse an IPv4 packet; a drop reason instead if it is not one.

    The packet must be exactly ``total length`` long (what netfilter hands over).
    """
    if len(packet) < IPV4_MIN_HEADER:
        return TRUNCATED
    if packet[0] >> 4 != 4:
        return NOT_IP
    header_len = (packet[0] & 0x0F) * 4
    total_len = int.from_bytes(packet[2:4], "big")
    if header_len < IPV4_MIN_HEADER or total_len < header_len:
        return MALFORMED
    if len(packet) != total_len:
        return TRUNCATED if len(packet) < total_len else MALFORMED
    frag = int.from_bytes(packet[6:8], "big")
    return IpHeader(4, header_len, total_len, packet[9], bytes(packet[12:16]), bytes(packet[16:20]),
                    bool(frag & 0x3FFF), bool(frag & IPV4_DF))


def parse_ipv6(packet: bytes) -> IpHeader | str:
    """Check and parse an IPv6 packet (exactly 40 + payload length bytes; no
    jumbograms); a drop reason instead if it is not one."""
    if len(packet) < IPV6_HEADER:
        return TRUNCATED
    if packet[0] >> 4 != 6:
        return NOT_IP
    total_len = IPV6_HEADER + int.from_bytes(packet[4:6], "big")
    if total_len == IPV6_HEADER and packet[6] == 0:
        return MALFORMED  # a jumbogram's hop-by-hop header (RFC 2675)
    if len(packet) != total_len:
        return TRUNCATED if len(packet) < total_len else MALFORMED
    return IpHeader(6, IPV6_HEADER, total_len, packet[6], bytes(packet[8:24]), bytes(packet[24:40]),
                    packet[6] == IPPROTO_FRAGMENT, True)


def parse_packet(packet: bytes) -> IpHeader | str:
    """``parse_ipv4`` or ``parse_ipv6`` by the version nibble; a drop reason
    for anything else."""
    if not packet:
        return TRUNCATED
    version = packet[0] >> 4
    if version == 4:
        return parse_ipv4(packet)
    if version == 6:
        return parse_ipv6(packet)
    return NOT_IP


def internet_checksum(data: bytes, initial: int = 0) -> int:
    """The RFC 1071 checksum of ``data`` (padded to even length), folded with
    ``initial`` (a partial sum, e.g. of a pseudo-header)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    words = array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words) + initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_checksum(header: bytes) -> int:
    """The RFC 791 header checksum of ``header`` (its checksum field counted as is)."""
    return internet_checksum(header)


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The unfolded sum of the IPv4 (RFC 793) or IPv6 (RFC 8200 8.1)
    pseudo-header, to pass as ``initial`` to ``internet_checksum``."""
    data = src + dst + (length.to_bytes(4, "big") + b"\0\0\0" + bytes([protocol]) if len(src) == 16
                        else bytes([0, protocol]) + length.to_bytes(2, "big"))
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def rebuild_ipv4(header: bytes, protocol: int, total_len: int) -> bytes:
    """``header`` with a new protocol and total length and a fresh checksum."""
    h = bytearray(header)
    h[2:4] = total_len.to_bytes(2, "big")
    h[9] = protocol
    h[10:12] = b"\0\0"
    h[10:12] = ipv4_checksum(bytes(h)).to_bytes(2, "big")
    return bytes(h)


def rebuild_ipv6(header: bytes, next_header: int, total_len: int) -> bytes:
    """A 40-byte IPv6 ``header`` with a new next header and payload length."""
    h = bytearray(header)
    h[4:6] = (total_len - IPV6_HEADER).to_bytes(2, "big")
    h[6] = next_header
    return bytes(h)


def rebuild_ip(header: bytes, version: int, protocol: int, total_len: int) -> bytes:
    """``rebuild_ipv4`` or ``rebuild_ipv6``."""
    if version == 6:
        return rebuild_ipv6(header, protocol, total_len)
    return rebuild_ipv4(header, protocol, total_len)


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
    """An IPv4/UDP packet (UDP checksum 0: the AEAD tag protects the payload),
    or an IPv6/UDP packet (with the checksum IPv6 requires) for 16-byte addresses."""
    udp_len = UDP_LEN + len(payload)
    if len(src) == 16:
        header = struct.pack("!IHBB16s16s", 6 << 28, udp_len, IPPROTO_UDP, ttl, src, dst)
        udp = UDP_HEADER.pack(sport, dport, udp_len, 0) + payload
        checksum = internet_checksum(udp, pseudo_header_sum(src, dst, IPPROTO_UDP, udp_len)) or 0xFFFF
        return header + udp[:6] + checksum.to_bytes(2, "big") + udp[8:]
    total = IPV4_MIN_HEADER + udp_len
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0, ttl, IPPROTO_UDP, 0, src, dst)
    header = header[:10] + ipv4_checksum(header).to_bytes(2, "big") + header[12:]
    return header + UDP_HEADER.pack(sport, dport, udp_len, 0) + payload


def udp_ports(packet: bytes, header_len: int) -> tuple[int, int] | str:
    """(source port, destination port) of a UDP packet, or a drop reason."""
    if len(packet) < header_len + UDP_LEN:
        return TRUNCATED
    sport, dport, length, _ = UDP_HEADER.unpack_from(packet, header_len)
    if length != len(packet) - header_len:
        return MALFORMED
    return sport, dport


def format_ip(ip: bytes) -> str:
    """4 or 16 address bytes as text (``10.71.0.2``, ``fd71::2``)."""
    return str(ipaddress.ip_address(bytes(ip)))


def parse_ip(text: str) -> bytes:
    """An IPv4 or IPv6 address as text to its 4 or 16 bytes; ValueError with a clear message."""
    try:
        return ipaddress.ip_address(text if isinstance(text, str) else "").packed
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None
