r"""Coalescing of received TCP segments into super-frames for a TAP opened with
``IFF_VNET_HDR`` (the receive-side mirror of ``gso``).

1. The datapath calls ``Coalescer.add(frame, csum_partial)`` for every plain
   frame of a received batch (after decryption), in arrival order;
   ``csum_partial`` says that the sender left the L4 checksum partial (the
   field holds the pseudo-header sum). ``add`` keeps a reference to ``frame``
   until ``flush``: the buffer must not change before then.
2. A TCP segment with payload joins the open run of its flow (same MAC
   header and VLAN tags, addresses and ports) when the kernel's GRO
   (``tcp_gro_receive``, ``inet_gro_receive``, ``ipv6_gro_receive``) would
   join it:

   * its sequence number follows the run's last byte and (IPv4) its IP ID
     follows the last one;
   * every other IP field is equal (TOS/traffic class, flow label, TTL/hop
     limit, DF); IPv4 without options, IPv6 without extension headers;
   * the TCP ACK number, window, data offset and all option bytes are equal
     (so timestamps must be equal, as Linux requires: merging different TSvals
     would hide all but the first from the receiver's RTT and PAWS logic), and
     the flags are equal apart from FIN and PSH; a segment with CWR never joins
     (it starts a new run: CWR only on the first, as ``gso`` makes them);
   * its payload is at most the run's segment size (the first segment's), and
     the run stays within 65,535 bytes of IP packet.

   A payload shorter than the segment size, PSH or FIN end the run after the
   segment joins; a segment that cannot join ends its flow's open run and
   starts a new one if it can (payload, no SYN/RST/URG/FIN/PSH), else it
   passes as it came. So out-of-order segments pass as they are, and a run
   never overtakes a later frame of its own flow. A frame that continues the
   run of the frame before it is recognised by one compare of its masked
   header bytes (``_mask``) without parsing it again: the common case of a
   batch.
3. Other frames pass untouched with a zero header: non-TCP, TCP without
   payload, IPv4 fragments or options, malformed ones (counted in
   ``malformed``). A frame with ``csum_partial`` whose TCP or UDP checksum can
   be found gets ``NEEDS_CSUM`` with ``csum_start``/``csum_offset`` instead.
4. ``flush()`` returns (header, frame) for everything added, in arrival order
   of each run's first frame; the datapath calls it at the end of each batch,
   so nothing waits. A run of one segment comes back as it came. A run of more
   is one super-frame: the first segment's headers with the IP length (and
   IPv4 checksum) set, FIN/PSH of the last segment, and in the TCP checksum
   field the folded pseudo-header sum of the super-frame's TCP length; its
   header is ``NEEDS_CSUM`` (``csum_start`` = the TCP header, ``csum_offset`` =
   16), ``GSO_TCPV4``/``GSO_TCPV6`` (or-ed with ``GSO_ECN`` when the first
   segment has CWR, as ``tcp_gro_complete`` does), ``gso_size`` = the segment
   size, ``hdr_len`` = the header bytes.

Why ``NEEDS_CSUM`` and not ``DATA_VALID``: a frame written to a TAP is read by
``virtio_net_hdr_to_skb``, which knows only ``NEEDS_CSUM`` (the skb becomes
``CHECKSUM_PARTIAL``, which the local TCP stack accepts without summing and
which a bridge or route on to another port completes when it segments);
``DATA_VALID`` is a flag of the other direction and is ignored on write, so a
super-frame carrying it would reach the stack as ``CHECKSUM_NONE`` with a
checksum field nobody computed. It also spares the receiver the checksum of
64 KB: the AEAD tag already proved the bytes.
"""

from __future__ import annotations

import struct

from .gso import (
    CWR,
    FIN,
    IPPROTO_TCP,
    IPV6_HEADER_LEN,
    IPV4_MIN_HEADER_LEN,
    PSH,
    RST,
    SYN,
    TCP_CHECKSUM_OFFSET,
    URG,
    GSO_MALFORMED,
    IpLayout,
    checksum_field,
    fold,
    l4_checksum_offset,
    ones_sum,
    parse_ip,
    parse_tcp,
    pseudo_header_sum,
)
from .vnet_hdr import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, ZERO_VNET_HDR, VnetHdr

# --- tuning constants ------------------------------------------------------------

#: The largest IP packet of a super-frame (the IPv4 total length field's limit).
MAX_SUPER_PACKET = 65535

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_NO_RUN_START = SYN | RST | URG | FIN | PSH
_RUN_ENDS = FIN | PSH
_MAY_DIFFER = ~(CWR | FIN | PSH) & 0xFF


class _Run:
    """The open run of segments of one flow; owned by its ``Coalescer``."""

    __slots__ = ("first", "layout", "l3", "l4", "payload_offset", "mask", "signature", "payloads", "mss",
                 "next_seq", "next_ip_id", "ip_length", "last_flags", "first_partial", "key", "open")

    def __init__(self, frame, layout: IpLayout, payload_offset: int, mask: int, signature: int,
                 seq: int, ip_id: int, payload, partial: bool, key: bytes):
        self.first = frame
        self.layout = layout
        self.l3, self.l4 = layout.l3_offset, layout.l4_offset
        self.payload_offset = payload_offset
        self.mask = mask
        self.signature = signature
        self.payloads = [payload]
        self.mss = len(payload)
        self.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        self.next_ip_id = (ip_id + 1) & 0xFFFF
        self.ip_length = payload_offset - self.l3 + len(payload)
        self.last_flags = frame[self.l4 + 13]
        self.first_partial = partial
        self.key = key
        self.open = True


class Coalescer:
    """Joins the TCP segments of one batch (see the module docstring).

    Counters (owned here, read by the datapath's metrics): ``super_frames``
    made, ``segments_joined`` into them, ``malformed`` frames passed as they
    came, ``csum_unresolved`` partial frames whose checksum could not be found
    (the host will drop them).
    """

    def __init__(self) -> None:
        self._entries: list = []  # (VnetHdr, frame) or _Run, in arrival order
        self._open: dict[bytes, _Run] = {}
        self._last: _Run | None = None  # the run the previous frame went to, if still open
        self.super_frames = 0
        self.segments_joined = 0
        self.malformed = 0
        self.csum_unresolved = 0

    # 1-3: one frame in
    def add(self, frame: bytes, csum_partial: bool = False) -> None:
        """Take one plain Ethernet frame of the batch. Never raises."""
        try:
            run = self._last
            # Fast path: the frame continues the run of the previous one. Equal
            # masked headers mean the same flow, layout and join fields, so only
            # the lengths, sequence number and ID are left to check.
            if (run is not None and run.open and len(frame) > run.payload_offset
                    and int.from_bytes(frame[:run.payload_offset], "big") & run.mask == run.signature
                    and self._join(run, frame)):
                return
            self._add(frame, csum_partial)
        except (IndexError, TypeError, ValueError, struct.error):  # a bug must not stop the batch
            self.malformed += 1
            self._last = None
            self._entries.append((ZERO_VNET_HDR, frame))

    def _join(self, run: _Run, frame) -> bool:
        """Append ``frame`` (headers already matched) to ``run`` if it follows it."""
        l3, l4, payload_offset = run.l3, run.l4, run.payload_offset
        if run.layout.ip_version == 4:
            ip_end = l3 + ((frame[l3 + 2] << 8) | frame[l3 + 3])
            ip_id = (frame[l3 + 4] << 8) | frame[l3 + 5]
            if ip_id != run.next_ip_id:
                return False
        else:
            ip_end = l3 + IPV6_HEADER_LEN + ((frame[l3 + 4] << 8) | frame[l3 + 5])
            ip_id = 0
        payload_len = ip_end - payload_offset
        flags = frame[l4 + 13]
        if (payload_len <= 0 or payload_len > run.mss or ip_end > len(frame) or flags & CWR
                or _U32.unpack_from(frame, l4 + 4)[0] != run.next_seq
                or run.ip_length + payload_len > MAX_SUPER_PACKET):
            return False
        run.payloads.append(memoryview(frame)[payload_offset:ip_end])
        run.next_seq = (run.next_seq + payload_len) & 0xFFFFFFFF
        run.next_ip_id = (ip_id + 1) & 0xFFFF
        run.ip_length += payload_len
        run.last_flags = flags
        if payload_len < run.mss or flags & _RUN_ENDS:
            self._close(run)
        else:
            self._last = run
        return True

    def _close(self, run: _Run) -> None:
        run.open = False
        del self._open[run.key]
        if self._last is run:
            self._last = None

    def _add(self, frame, partial: bool) -> None:
        """The general path: parse, find the flow's run, join, or start a run, or pass."""
        self._last = None
        layout = parse_ip(frame)
        if type(layout) is str:
            self.malformed += layout == GSO_MALFORMED
            self._pass(frame, None, partial)
            return
        l3, version, protocol, l4, ip_end = layout
        if protocol != IPPROTO_TCP:
            self._pass(frame, layout, partial)
            return
        payload_offset = parse_tcp(frame, layout)
        if type(payload_offset) is str:
            self.malformed += 1
            self._pass(frame, None, partial)
            return
        # MAC header and tags + addresses and ports (contiguous without IP options or extensions)
        key = frame[:l3] + frame[l3 + (12 if version == 4 else 8):l4 + 4]
        run = self._open.get(key)
        payload_len = ip_end - payload_offset
        if payload_len == 0 or l4 - l3 != (IPV4_MIN_HEADER_LEN if version == 4 else IPV6_HEADER_LEN):
            if run is not None:
                self._close(run)
            self._pass(frame, layout, partial)
            return
        mask = _MASKS.get((l3, version, payload_offset)) or _mask(l3, version, payload_offset)
        signature = int.from_bytes(frame[:payload_offset], "big") & mask
        if run is not None:
            if signature == run.signature and self._join(run, frame):
                return
            self._close(run)
        if frame[l4 + 13] & _NO_RUN_START:
            self._pass(frame, layout, partial)
            return
        seq = _U32.unpack_from(frame, l4 + 4)[0]
        ip_id = _U16.unpack_from(frame, l3 + 4)[0] if version == 4 else 0
        payload = memoryview(frame)[payload_offset:ip_end]
        run = _Run(frame, layout, payload_offset, mask, signature, seq, ip_id, payload, partial, key)
        self._open[key] = run
        self._entries.append(run)
        self._last = run

    def _pass(self, frame, layout: IpLayout | None, partial: bool) -> None:
        """Queue ``frame`` as it came (with ``NEEDS_CSUM`` if its checksum is partial)."""
        self._entries.append((_single_header(frame, layout, partial, self) if partial else ZERO_VNET_HDR, frame))

    # 4: the end of the batch
    def flush(self) -> list[tuple[VnetHdr, bytes]]:
        """Everything added since the last flush, as (header, frame) for the TAP."""
        out = []
        for entry in self._entries:
            if type(entry) is tuple:
                out.append(entry)
            elif len(entry.payloads) == 1:
                hdr = _single_header(entry.first, entry.layout, True, self) if entry.first_partial else ZERO_VNET_HDR
                out.append((hdr, entry.first))
            else:
                out.append(self._super_frame(entry))
        self._entries = []
        self._open = {}
        self._last = None
        return out

    def _super_frame(self, run: _Run) -> tuple[VnetHdr, bytes]:
        layout, frame = run.layout, run.first
        l3, l4 = layout.l3_offset, layout.l4_offset
        head = bytearray(frame[:run.payload_offset])
        tcp_length = run.ip_length - (l4 - l3)
        if layout.ip_version == 4:
            _U16.pack_into(head, l3 + 2, run.ip_length)
            head[l3 + 10:l3 + 12] = b"\0\0"
            _U16.pack_into(head, l3 + 10, checksum_field(ones_sum(head[l3:l4])))
            gso_type = GSO_TCPV4
        else:
            _U16.pack_into(head, l3 + 4, tcp_length)
            gso_type = GSO_TCPV6
        first_flags = head[l4 + 13]
        if first_flags & CWR:
            gso_type |= GSO_ECN
        head[l4 + 13] = first_flags | (run.last_flags & _RUN_ENDS)
        _U16.pack_into(head, l4 + TCP_CHECKSUM_OFFSET, fold(pseudo_header_sum(frame, layout, tcp_length)))
        self.super_frames += 1
        self.segments_joined += len(run.payloads)
        hdr = VnetHdr(NEEDS_CSUM, gso_type, run.payload_offset, run.mss, l4, TCP_CHECKSUM_OFFSET)
        return hdr, b"".join((head, *run.payloads))


_MASKS: dict[tuple[int, int, int], int] = {}  # owned by _mask; a few layouts: VLAN tags x IP version x TCP options


def _mask(l3: int, version: int, payload_offset: int) -> int:
    """The mask that keeps, of the header bytes ``frame[:payload_offset]`` read
    as one integer, what must be equal in every segment of a run: everything
    but the IP length, IPv4 ID and checksum, the TCP sequence number, CWR/FIN/PSH,
    the TCP checksum and urgent pointer. Cached per layout."""
    keep = bytearray(b"\xff" * payload_offset)
    l4 = l3 + (IPV4_MIN_HEADER_LEN if version == 4 else IPV6_HEADER_LEN)
    if version == 4:
        keep[l3 + 2:l3 + 6] = bytes(4)  # total length, ID
        keep[l3 + 10:l3 + 12] = bytes(2)  # header checksum
    else:
        keep[l3 + 4:l3 + 6] = bytes(2)  # payload length
    keep[l4 + 4:l4 + 8] = bytes(4)  # sequence number
    keep[l4 + 13] = _MAY_DIFFER
    keep[l4 + 16:l4 + 20] = bytes(4)  # checksum, urgent pointer (URG never joins)
    mask = _MASKS[(l3, version, payload_offset)] = int.from_bytes(keep, "big")
    return mask


def _single_header(frame, layout: IpLayout | None, partial: bool, counters: Coalescer) -> VnetHdr:
    """The header of a frame passed as it came whose checksum may be partial."""
    offset = l4_checksum_offset(frame, layout) if layout is not None and partial else None
    if offset is None:
        counters.csum_unresolved += partial
        return ZERO_VNET_HDR
    return VnetHdr(NEEDS_CSUM, GSO_NONE, layout.l4_offset + offset + 2, 0, layout.l4_offset, offset)
