r"""Segmentation of the TCP super-frames a TAP with ``IFF_VNET_HDR`` hands out.

With TSO turned on (``TUNSETOFFLOAD`` ``TUN_F_TSO4|TUN_F_TSO6|TUN_F_CSUM``) the
host's stack writes one TCP super-frame of up to 64 KB where it would have
written many segments; its virtio-net header (``vnet_hdr``) says so with
``gso_type`` and ``gso_size`` (the MSS). This module cuts it into the
segments the kernel itself would have sent, each fitting the TAP MTU, so each
can be sealed into one wire frame.

1. ``segment(frame, vnet, mtu, csum)`` looks at the header:

   * ``GSO_NONE`` without ``NEEDS_CSUM``: the frame passes untouched.
   * ``GSO_NONE`` with ``NEEDS_CSUM``: the checksum is completed at
     ``csum_start``/``csum_offset`` (any L4 protocol, as the kernel's
     ``skb_checksum_help``); with ``csum=False`` a TCP or UDP checksum the
     receiver can find by parsing (``csum_start`` at the L4 header) is left
     partial and the result says so.
   * ``GSO_TCPV4``/``GSO_TCPV6`` (``GSO_ECN`` allowed): ``parse_ip`` and
     ``parse_tcp`` check every length against the buffer; then
     ``_cut_tcp`` writes the segments.
   * ``GSO_UDP``/``GSO_UDP_L4``: ``gso_unsupported`` (the datapath does not
     turn on ``TUN_F_UFO``/``TUN_F_USO*``, so the kernel never sends them);
     any other type: ``gso_malformed``.

2. Each TCP segment, the way the kernel's ``tcp_gso_segment`` makes them:
   sequence number advanced by the MSS, IPv4 ID incremented per segment and
   the IPv4 header checksum recomputed, IPv4 total length or IPv6 payload
   length set, FIN and PSH only on the last segment, CWR only on the first;
   URG and the urgent pointer are copied to every segment unchanged, as the
   kernel does. The MSS is ``gso_size``, lowered if the headers plus
   ``gso_size`` would not fit ``mtu`` (the IP packet size; a smaller segment
   is always legal TCP).
3. The TCP checksum: ``csum=True`` computes it; ``csum=False`` leaves in the
   field the folded pseudo-header sum for the segment's length, as the
   kernel's ``CHECKSUM_PARTIAL`` does, for a receiver that completes it (or
   hands it on with ``NEEDS_CSUM``). ``Segments.csum_partial`` tells the
   datapath which it got.

Frames: Ethernet II, with up to two VLAN tags (802.1Q 0x8100 or 802.1ad
0x88A8), which are copied into every segment. IPv4 with or without options;
IPv6 with hop-by-hop and destination-options extension headers (a routing
header changes the pseudo-header and a fragment header has no place in a
super-frame: both ``gso_unsupported``). Malformed input is returned as a drop
reason, never raised.

Cost: one copy of the payload (each segment is joined once); the header sums
are taken once per super-frame and the per-segment fields added to them; with
``csum=True`` one ``int.from_bytes`` over each segment's payload reduced
modulo 0xFFFF (2**16 = 1 mod 0xFFFF, so that is the 16-bit one's complement
sum). No per-byte Python loop.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .vnet_hdr import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, KNOWN_GSO_TYPES, NEEDS_CSUM, VnetHdr

# --- wire constants -----------------------------------------------------------

ETH_HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VLAN_ETHERTYPES = (0x8100, 0x88A8)
VLAN_TAG_LEN = 4
MAX_VLAN_TAGS = 2
IPV4_MIN_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPV6_HOP_BY_HOP = 0
IPV6_ROUTING = 43
IPV6_FRAGMENT = 44
IPV6_DEST_OPTS = 60
TCP_MIN_HEADER_LEN = 20
TCP_CHECKSUM_OFFSET = 16
UDP_HEADER_LEN = 8
UDP_CHECKSUM_OFFSET = 6

# TCP flags (byte 13 of the header).
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# Results of parse_ip / parse_tcp that are not drop reasons of their own.
NOT_IP = "not_ip"
IP_FRAGMENT = "ip_fragment"

# Drop reasons produced here.
GSO_MALFORMED = "gso_malformed"
GSO_UNSUPPORTED = "gso_unsupported"
GSO_MTU_TOO_SMALL = "gso_mtu_too_small"

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IPV4_FAST = struct.Struct("!H2xHxB")  # from IPv4 byte 2: total length, flags/fragment offset, protocol


class IpLayout(NamedTuple):
    """Where the parts of an IP frame sit (offsets from the Ethernet header)."""

    l3_offset: int  # first byte of the IP header (after the VLAN tags)
    ip_version: int  # 4 or 6
    protocol: int  # IPv4 protocol or the IPv6 next header after the extensions
    l4_offset: int  # first byte of the L4 header
    ip_end: int  # one past the IP packet's last byte (Ethernet padding excluded)


_new_tuple = tuple.__new__  # builds an IpLayout without NamedTuple's slower __new__ (fast path)


class Segments(NamedTuple):
    """The frames ``segment`` made, in order, and whether their L4 checksum was
    left partial (the field holds the pseudo-header sum)."""

    frames: list[bytes]
    csum_partial: bool


# --- checksums ------------------------------------------------------------------


def ones_sum(data) -> int:
    """The 16-bit one's complement sum of ``data`` (bytes-like, padded to even
    length), unfolded as an int congruent to it modulo 0xFFFF."""
    value = int.from_bytes(data, "big")
    return value << 8 if len(data) & 1 else value


def fold(total: int) -> int:
    """``total`` folded to 16 bits the one's complement way (0 only for 0)."""
    return total % 0xFFFF or (0xFFFF if total else 0)


def pseudo_header_sum(frame, layout: IpLayout, l4_length: int) -> int:
    """The unfolded sum of the IPv4 (RFC 793) or IPv6 (RFC 8200 8.1) pseudo-header."""
    l3 = layout.l3_offset
    addresses = frame[l3 + 12:l3 + 20] if layout.ip_version == 4 else frame[l3 + 8:l3 + 40]
    return int.from_bytes(addresses, "big") + layout.protocol + l4_length


def checksum_field(total: int) -> int:
    """The value to store in a checksum field whose covered sum is ``total``."""
    return ~fold(total) & 0xFFFF


# --- parsing --------------------------------------------------------------------


def parse_ip(frame) -> IpLayout | str:
    """The layout of an IPv4/IPv6 frame, ``NOT_IP`` for another EtherType,
    ``IP_FRAGMENT`` for a fragment, ``GSO_UNSUPPORTED`` for an IPv6 routing
    header, ``GSO_MALFORMED`` for lengths the buffer does not hold. Never raises."""
    size = len(frame)
    if size >= 34 and frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45:  # fast path: untagged IPv4, no options
        total_len, fragment, protocol = _IPV4_FAST.unpack_from(frame, 16)
        if 20 <= total_len <= size - 14 and not fragment & 0x3FFF:
            return _new_tuple(IpLayout, (14, 4, protocol, 34, 14 + total_len))
    l3 = ETH_HEADER_LEN
    if size < l3:
        return GSO_MALFORMED
    ethertype = (frame[12] << 8) | frame[13]
    tags = 0
    while ethertype in VLAN_ETHERTYPES and tags < MAX_VLAN_TAGS:
        if size < l3 + VLAN_TAG_LEN:
            return GSO_MALFORMED
        ethertype = (frame[l3 + 2] << 8) | frame[l3 + 3]
        l3 += VLAN_TAG_LEN
        tags += 1
    if ethertype == ETHERTYPE_IPV4:
        if size < l3 + IPV4_MIN_HEADER_LEN or frame[l3] >> 4 != 4:
            return GSO_MALFORMED
        header_len = (frame[l3] & 0x0F) * 4
        total_len = (frame[l3 + 2] << 8) | frame[l3 + 3]
        if header_len < IPV4_MIN_HEADER_LEN or total_len < header_len or l3 + total_len > size:
            return GSO_MALFORMED
        if ((frame[l3 + 6] << 8) | frame[l3 + 7]) & 0x3FFF:  # MF or a fragment offset
            return IP_FRAGMENT
        return IpLayout(l3, 4, frame[l3 + 9], l3 + header_len, l3 + total_len)
    if ethertype == ETHERTYPE_IPV6:
        if size < l3 + IPV6_HEADER_LEN or frame[l3] >> 4 != 6:
            return GSO_MALFORMED
        payload_len = (frame[l3 + 4] << 8) | frame[l3 + 5]
        end = l3 + IPV6_HEADER_LEN + payload_len
        if payload_len == 0 or end > size:  # 0: a jumbogram (BIG TCP), not for a 64 KB TAP
            return GSO_MALFORMED
        next_header, offset = frame[l3 + 6], l3 + IPV6_HEADER_LEN
        while next_header in (IPV6_HOP_BY_HOP, IPV6_DEST_OPTS):
            if offset + 8 > end:
                return GSO_MALFORMED
            next_header, offset = frame[offset], offset + (frame[offset + 1] + 1) * 8
        if offset > end:
            return GSO_MALFORMED
        if next_header == IPV6_FRAGMENT:
            return IP_FRAGMENT
        if next_header == IPV6_ROUTING:
            return GSO_UNSUPPORTED
        return IpLayout(l3, 6, next_header, offset, end)
    return NOT_IP


def parse_tcp(frame, layout: IpLayout) -> int | str:
    """The offset of the TCP payload, or ``GSO_MALFORMED``."""
    l4 = layout.l4_offset
    if l4 + TCP_MIN_HEADER_LEN > layout.ip_end:
        return GSO_MALFORMED
    header_len = (frame[l4 + 12] >> 4) * 4
    if header_len < TCP_MIN_HEADER_LEN or l4 + header_len > layout.ip_end:
        return GSO_MALFORMED
    return l4 + header_len


def l4_checksum_offset(frame, layout: IpLayout) -> int | None:
    """The offset of the checksum in a TCP or UDP header the buffer holds
    (counted from ``l4_offset``), else None."""
    if layout.protocol == IPPROTO_TCP and not isinstance(parse_tcp(frame, layout), str):
        return TCP_CHECKSUM_OFFSET
    if layout.protocol == IPPROTO_UDP and layout.l4_offset + UDP_HEADER_LEN <= layout.ip_end:
        return UDP_CHECKSUM_OFFSET
    return None


def complete_l4_checksum(frame: bytes) -> bytes | str:
    """``frame`` with its partial TCP/UDP checksum completed (the field holds
    the pseudo-header sum, as ``segment(..., csum=False)`` leaves it); or
    ``GSO_MALFORMED`` if no TCP or UDP checksum can be found.  For a receiver
    whose host takes no partial checksums.  Never raises."""
    try:
        layout = parse_ip(frame)
        if isinstance(layout, str):
            return GSO_MALFORMED
        offset = l4_checksum_offset(frame, layout)
        if offset is None:
            return GSO_MALFORMED
        l4, end = layout.l4_offset, layout.ip_end
        field = l4 + offset
        value = checksum_field(ones_sum(memoryview(frame)[l4:end])) or 0xFFFF  # 0 is "no checksum" for UDP
        return frame[:field] + _U16.pack(value) + frame[field + 2:]
    except (IndexError, TypeError, ValueError, struct.error):
        return GSO_MALFORMED


# --- the segmenter --------------------------------------------------------------


def segment(frame: bytes, vnet: VnetHdr, mtu: int, csum: bool = True) -> Segments | str:
    """Cut ``frame`` (read from the TAP with its header ``vnet``) into frames
    whose IP packets fit ``mtu``; or return the drop reason. Never raises."""
    try:
        gso_type = vnet.gso_type & ~GSO_ECN
        if gso_type == GSO_NONE:
            if not vnet.flags & NEEDS_CSUM:
                return Segments([frame], False)
            return _complete_checksum(frame, vnet, csum)
        if gso_type not in (GSO_TCPV4, GSO_TCPV6):
            return GSO_UNSUPPORTED if gso_type in KNOWN_GSO_TYPES else GSO_MALFORMED
        if vnet.gso_size <= 0 or vnet.hdr_len > len(frame):
            return GSO_MALFORMED
        layout = parse_ip(frame)
        if isinstance(layout, str):
            return GSO_UNSUPPORTED if layout == GSO_UNSUPPORTED else GSO_MALFORMED
        if layout.protocol != IPPROTO_TCP or layout.ip_version != (4 if gso_type == GSO_TCPV4 else 6):
            return GSO_MALFORMED
        payload_offset = parse_tcp(frame, layout)
        if isinstance(payload_offset, str):
            return payload_offset
        if vnet.flags & NEEDS_CSUM and (vnet.csum_start != layout.l4_offset
                                        or vnet.csum_offset != TCP_CHECKSUM_OFFSET):
            return GSO_MALFORMED
        mss = min(vnet.gso_size, mtu - (payload_offset - layout.l3_offset))
        if mss <= 0:
            return GSO_MTU_TOO_SMALL
        return Segments(_cut_tcp(frame, layout, payload_offset, mss, csum), not csum)
    except (IndexError, TypeError, ValueError, AttributeError):  # a bug or a non-bytes frame: a drop, not a crash
        return GSO_MALFORMED


def _complete_checksum(frame: bytes, vnet: VnetHdr, csum: bool) -> Segments | str:
    """A ``NEEDS_CSUM`` frame without segmentation: its checksum completed,
    or (``csum=False``) left partial where a receiver can find it."""
    start, field = vnet.csum_start, vnet.csum_start + vnet.csum_offset
    if start >= len(frame) or field + 2 > len(frame):
        return GSO_MALFORMED
    if not csum:
        layout = parse_ip(frame)
        if (not isinstance(layout, str) and layout.l4_offset == start and layout.ip_end == len(frame)
                and l4_checksum_offset(frame, layout) == vnet.csum_offset):
            return Segments([frame], True)
    value = checksum_field(ones_sum(memoryview(frame)[start:])) or 0xFFFF  # 0 is "no checksum" for UDP
    return Segments([frame[:field] + _U16.pack(value) + frame[field + 2:]], False)


def _cut_tcp(frame: bytes, layout: IpLayout, payload_offset: int, mss: int, csum: bool) -> list[bytes]:
    """The segments of a parsed TCP super-frame (steps 2 and 3 of the module docstring).

    The header sums are taken once from a template whose varying fields are
    zero; per segment the varying values are added (a 32-bit value is congruent
    to the sum of its two 16-bit halves modulo 0xFFFF), so only the payload
    chunk is summed per segment, and only with ``csum``.
    """
    l3, l4, end = layout.l3_offset, layout.l4_offset, layout.ip_end
    is_ipv4 = layout.ip_version == 4
    template = bytearray(frame[:payload_offset])
    if is_ipv4:
        template[l3 + 2:l3 + 6] = bytes(4)  # total length, ID
        template[l3 + 10:l3 + 12] = b"\0\0"  # header checksum
    template[l4 + 4:l4 + 8] = bytes(4)  # sequence number
    template[l4 + 13] = 0  # flags
    template[l4 + 16:l4 + 18] = b"\0\0"  # checksum
    ip_header_sum = ones_sum(template[l3:l4]) if is_ipv4 else 0
    pseudo = pseudo_header_sum(frame, layout, 0)
    tcp_base_sum = pseudo + ones_sum(template[l4:])
    length_offset = l3 + 2 if is_ipv4 else l3 + 4
    ip_overhead = l4 - l3 if is_ipv4 else l4 - l3 - IPV6_HEADER_LEN
    payload = memoryview(frame)[payload_offset:end]
    tcp_header_len = payload_offset - l4
    flags = frame[l4 + 13]
    seq = _U32.unpack_from(frame, l4 + 4)[0]
    ip_id = _U16.unpack_from(frame, l3 + 4)[0]
    count = max(1, -(-len(payload) // mss))
    pack_u16, pack_u32, join = _U16.pack_into, _U32.pack_into, b"".join
    segments = []
    for index in range(count):
        chunk = payload[index * mss:(index + 1) * mss]
        tcp_len = tcp_header_len + len(chunk)
        segment_seq = (seq + index * mss) & 0xFFFFFFFF
        segment_flags = flags
        if index:
            segment_flags &= ~CWR
        if index < count - 1:
            segment_flags &= ~(FIN | PSH)
        head = bytearray(template)
        pack_u32(head, l4 + 4, segment_seq)
        head[l4 + 13] = segment_flags
        pack_u16(head, length_offset, ip_overhead + tcp_len)
        if is_ipv4:
            segment_id = (ip_id + index) & 0xFFFF
            pack_u16(head, l3 + 4, segment_id)
            pack_u16(head, l3 + 10, checksum_field(ip_header_sum + ip_overhead + tcp_len + segment_id))
        if csum:
            total = tcp_base_sum + tcp_len + segment_seq + segment_flags + ones_sum(chunk)
            pack_u16(head, l4 + 16, checksum_field(total))
        else:
            pack_u16(head, l4 + 16, fold(pseudo + tcp_len))
        segments.append(join((head, chunk)))
    return segments
