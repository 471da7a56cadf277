"""Keeping sealed layer-3 packets within the path MTU, without I/O.

A sealed packet is ``overhead`` bytes larger than the plain one, and the
kernel checks the grown packet against the route only after the agent grew
it.  So the engine keeps packets small enough itself:

1. ``clamp_mss``: a TCP SYN (or SYN-ACK), sent or received, has its MSS
   option lowered to what fits once sealed (``max_mss``), its checksum
   recomputed; both ends of a connection then send segments that fit.  This
   replaces a hand-set ``advmss`` on the routes.
2. Any other packet that would not fit once sealed and may not be fragmented
   (IPv4 with DF, every IPv6 packet) is dropped by the engine and counted
   (``too_big``).  It does not answer with an ICMP "fragmentation needed" /
   "packet too big": the sender's stack would lower the path MTU of that
   destination, and the sealed packets, which leave on the same route, would
   then no longer fit either (every TCP connection to the peer would stall).

Offsets are the RFCs' (RFC 793, 8200).
"""

from __future__ import annotations

from .l3_wire import IP_HEADER, IPPROTO_TCP, IpHeader, internet_checksum, pseudo_header_sum

# --- wire and spec constants ----------------------------------------------------

TCP_MIN_HEADER = 20
TCP_SYN = 0x02
TCP_OPT_END, TCP_OPT_NOP, TCP_OPT_MSS = 0, 1, 2


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
