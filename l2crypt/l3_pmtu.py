"""Keeping sealed layer-3 packets within the path MTU, without I/O.

A sealed packet is ``overhead`` bytes larger than the plain one, and the
kernel checks the grown packet against the route only after the agent grew
it: too late to tell the sender anything useful (its ICMP error would quote
the sealed packet, which no socket owns).  So the engine does it:

1. ``clamp_mss``: a TCP SYN (or SYN-ACK), sent or received, has its MSS
   option lowered to what fits once sealed (``max_mss``), its checksum
   recomputed; both ends of a connection then send segments that fit.  This
   replaces a hand-set ``advmss`` on the routes.
2. ``too_big_answer``: a packet that would not fit once sealed and may not be
   fragmented (IPv4 with DF, every IPv6 packet) is dropped by the engine,
   which answers the local sender with an ICMP "fragmentation needed"
   (IPv4, RFC 1191) or ICMPv6 "packet too big" (RFC 8201) quoting the plain
   packet and giving ``max_plain`` as the MTU.  The sender's stack lowers its
   path MTU for that destination, as it would for a router's answer.

Offsets and codes are the RFCs' (RFC 792, 793, 4443, 8200).
"""

from __future__ import annotations

import struct

from .l3_wire import (
    IP_HEADER,
    IPPROTO_TCP,
    IpHeader,
    internet_checksum,
    ipv4_checksum,
    pseudo_header_sum,
)

# --- wire and spec constants ----------------------------------------------------

TCP_MIN_HEADER = 20
TCP_SYN = 0x02
TCP_OPT_END, TCP_OPT_NOP, TCP_OPT_MSS = 0, 1, 2
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED = 3, 4
ICMPV6_PACKET_TOO_BIG = 2
#: Largest ICMP error an IPv4 host sends (RFC 1812 4.3.2.3) and an IPv6 host (RFC 4443 2.4 c).
ICMP_ERROR_MAX = {4: 576, 6: 1280}
ICMP_ERROR_TTL = 64
ICMP_TOS = 0xC0  # internetwork control, as Linux sends its ICMP errors


def max_mss(path_mtu: int, overhead: int, version: int) -> int:
    """The largest TCP MSS whose segments still fit ``path_mtu`` once sealed."""
    return path_mtu - overhead - IP_HEADER[version] - TCP_MIN_HEADER


def clamp_mss(packet: bytes, ip: IpHeader, limit: int) -> bytes:
    """``packet`` with the MSS option of a TCP SYN lowered to ``limit`` (and
    the TCP checksum recomputed); the packet unchanged if it is no SYN, has no
    larger MSS, or is not plain TCP right after the fixed IP header."""
    t = ip.header_len
    if ip.protocol != IPPROTO_TCP or ip.is_fragment or len(packet) < t + TCP_MIN_HEADER:
        return packet
    if not packet[t + 13] & TCP_SYN:
        return packet
    end = t + (packet[t + 12] >> 4) * 4
    if end > len(packet):
        return packet
    i = t + TCP_MIN_HEADER
    while i < end:
        kind = packet[i]
        if kind == TCP_OPT_END:
            break
        if kind == TCP_OPT_NOP:
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2 or i + packet[i + 1] > end:
            break
        if kind == TCP_OPT_MSS and packet[i + 1] == 4:
            if int.from_bytes(packet[i + 2:i + 4], "big") <= limit:
                return packet
            out = bytearray(packet)
            out[i + 2:i + 4] = max(limit, 0).to_bytes(2, "big")
            out[t + 16:t + 18] = b"\0\0"
            segment = bytes(out[t:])
            checksum = internet_checksum(segment, pseudo_header_sum(ip.src, ip.dst, IPPROTO_TCP, len(segment)))
            out[t + 16:t + 18] = checksum.to_bytes(2, "big")
            return bytes(out)
        i += packet[i + 1]
    return packet


def too_big_answer(packet: bytes, ip: IpHeader, mtu: int) -> bytes:
    """The ICMP error telling the local sender of ``packet`` that at most
    ``mtu`` bytes fit: a whole IP packet from and to the packet's source
    address (our own), quoting as much of ``packet`` as the RFCs allow."""
    if ip.version == 6:
        quoted = packet[:ICMP_ERROR_MAX[6] - 40 - 8]
        body = struct.pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, mtu) + quoted
        checksum = internet_checksum(body, pseudo_header_sum(ip.src, ip.src, IPPROTO_ICMPV6, len(body)))
        header = struct.pack("!IHBB16s16s", 6 << 28, len(body), IPPROTO_ICMPV6, ICMP_ERROR_TTL, ip.src, ip.src)
        return header + body[:2] + checksum.to_bytes(2, "big") + body[4:]
    quoted = packet[:ICMP_ERROR_MAX[4] - 20 - 8]
    body = struct.pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, min(mtu, 0xFFFF)) + quoted
    body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, ICMP_TOS, 20 + len(body), 0, 0, ICMP_ERROR_TTL,
                         IPPROTO_ICMP, 0, ip.src, ip.src)
    return header[:10] + ipv4_checksum(header).to_bytes(2, "big") + header[12:] + body
