"""Receive coalescing for the TAP (GRO in the agent), and the virtio-net header.

The TAP is opened with IFF_VNET_HDR, so every frame read from it or written
to it carries a 10-byte ``virtio_net_hdr`` first.  That lets the agent hand
the host's stack one large TCP segment instead of many small ones: the
kernel's TCP receive path then runs once per batch, not once per frame,
which is where most of the receiving agent's CPU went (in ``write``).

``coalesce(frames)`` takes the plain frames opened from one wire batch, in
order, and returns the write vectors for them, in the same order:

1. A run of consecutive frames of one IPv4 TCP flow (same MACs, addresses,
   ports, TOS, TTL, ACK number, window and options; DF set; no IP options,
   no fragments; each segment's sequence number following the last; every
   segment but the last a full ``gso_size`` and flagged ACK only, the last
   ACK or ACK|PSH) becomes one frame: the first frame's headers with the IP
   total length and checksum redone, the last frame's TCP flags, and a
   virtio header asking for GSO TCPv4 with ``gso_size`` and a partial
   checksum (``NEEDS_CSUM``: the TCP checksum field holds the pseudo-header
   sum, as the kernel's own GRO output does).
2. Every other frame goes out as it is, behind ``VNET_NONE``.

Frames are only ever merged, never changed otherwise, so what the host's
stack sees is what a NIC with GRO would have given it.  ``tcp_checksum``
completes a partial checksum of a frame read from the TAP (rare: the TAP
announces no checksum offload).
"""

from __future__ import annotations

import struct
from array import array

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
VNET_NONE = bytes(VNET_HDR_LEN)
F_NEEDS_CSUM = 1
GSO_TCPV4 = 1

ETH_LEN = 14
IP_LEN = 20
TCP_ACK = 0x10
TCP_PSH = 0x08
MAX_IP_TOTAL = 65535
#: At most this many frames in one coalesced frame (bounds the iovec).
MAX_SEGMENTS = 64

_u16 = struct.Struct("!H")
_u32 = struct.Struct("!I")


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _ip_checksum(header: bytes | bytearray) -> int:
    s = sum(struct.unpack("!10H", header))
    return ~_fold(s) & 0xFFFF


def _pseudo_sum(frame: bytes | bytearray, tcp_len: int) -> int:
    """Folded (not inverted) TCP pseudo-header sum: what a partial checksum field holds."""
    w = struct.unpack_from("!4H", frame, ETH_LEN + 12)  # source and destination address
    return _fold(sum(w) + 6 + tcp_len)


def _segment(frame: bytes) -> int:
    """Length of the headers (Ethernet + IPv4 + TCP) if ``frame`` may be coalesced, else 0."""
    n = len(frame)
    if (n < ETH_LEN + IP_LEN + 20 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] != 0x45
            or frame[23] != 6 or (frame[20] & 0xBF) or frame[21]  # DF only: no MF, offset 0
            or not frame[20] & 0x40):
        return 0
    if _u16.unpack_from(frame, 16)[0] != n - ETH_LEN:  # Ethernet padding or a short frame
        return 0
    hl = ETH_LEN + IP_LEN + (frame[46] >> 4) * 4
    if hl < ETH_LEN + IP_LEN + 20 or hl >= n:
        return 0  # no payload: pure ACKs are never merged
    return hl


def _flow_key(frame: bytes, hl: int) -> bytes:
    """What must match between segments: MACs, TOS, TTL, addresses, ports, ACK, window, options."""
    return frame[:12] + frame[15:16] + frame[22:23] + frame[26:38] + frame[42:46] + frame[48:50] + frame[54:hl]


def coalesce(frames: list[bytes]) -> list[list]:
    """Write vectors (``[virtio header, piece, ...]``) for ``frames``, in order."""
    out: list[list] = []
    i, count = 0, len(frames)
    while i < count:
        first = frames[i]
        hl = _segment(first)
        if not hl or first[47] != TCP_ACK:
            out.append([VNET_NONE, first])
            i += 1
            continue
        gso = len(first) - hl
        flow = _flow_key(first, hl)
        seq = (_u32.unpack_from(first, 38)[0] + gso) & 0xFFFFFFFF
        total = gso
        j = i + 1
        while j < count and j - i < MAX_SEGMENTS:
            nxt = frames[j]
            if _segment(nxt) != hl:
                break
            size = len(nxt) - hl
            flags = nxt[47]
            if (size > gso or total + size + hl - ETH_LEN > MAX_IP_TOTAL
                    or flags not in (TCP_ACK, TCP_ACK | TCP_PSH)
                    or _u32.unpack_from(nxt, 38)[0] != seq or _flow_key(nxt, hl) != flow):
                break
            seq = (seq + size) & 0xFFFFFFFF
            total += size
            j += 1
            if size < gso or flags != TCP_ACK:
                break  # a short or pushed segment ends the run
        if j == i + 1:
            out.append([VNET_NONE, first])
            i += 1
            continue
        head = bytearray(first[:hl])
        tcp_len = hl - ETH_LEN - IP_LEN + total
        _u16.pack_into(head, 16, IP_LEN + tcp_len)
        head[24:26] = b"\0\0"
        _u16.pack_into(head, 24, _ip_checksum(head[ETH_LEN:ETH_LEN + IP_LEN]))
        head[47] = frames[j - 1][47]
        _u16.pack_into(head, 50, _pseudo_sum(head, tcp_len))
        vec = [VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, hl, gso, ETH_LEN + IP_LEN, 16), bytes(head)]
        for k in range(i, j):
            vec.append(memoryview(frames[k])[hl:])
        out.append(vec)
        i = j
    return out


def tcp_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Complete a partial checksum (``NEEDS_CSUM`` on a frame read from the TAP)."""
    if csum_start + csum_offset + 2 > len(frame):
        return frame
    data = bytearray(frame[csum_start:])
    if len(data) & 1:
        data.append(0)
    words = array("H", bytes(data))
    s = _fold(sum(words))  # native order; folding is byte-order independent
    csum = ~s & 0xFFFF
    buf = bytearray(frame)
    struct.pack_into("=H", buf, csum_start + csum_offset, csum)
    return bytes(buf)
