"""The wire port over PACKET_MMAP rings: many frames per system call.

1. ``RingWire(port, ethertype)`` opens the same socket as ``LinuxWire`` (an
   AF_PACKET socket bound to the l2crypt EtherType on the port, own frames
   not looped back), switches it to TPACKET_V3 and maps two rings shared
   with the kernel: a receive ring of blocks and a transmit ring of slots.
   A kernel that refuses any of it raises ``RingRefused``; ``open_wire``
   then falls back to ``LinuxWire`` and says why.
2. Transmit: ``tx_slot(max_len)`` hands out the data area of the next free
   slot (a memoryview into the ring: seal straight into it); ``commit(len)``
   marks it ready; ``flush()`` is the one ``send`` that makes the kernel send
   every ready slot.  ``write_frames`` does the three for a batch (one copy
   per frame into its slot, one system call); ``write_frame`` for one frame.
3. A frame the kernel refuses in a flush (an egress filter dropped it, no
   buffer) would stay at the head of the ring and block it; it is skipped
   (its length zeroed, which PACKET_LOSS lets the kernel pass over) and
   counted in ``write_errors``.  After ``FLUSH_TRIES`` refusals in one flush
   the frames left wait for the next one.
4. Receive: ``read_frames(limit)`` walks the blocks the kernel has closed
   (full, or older than ``RX_BLOCK_TIMEOUT_MS``), copies each frame out as
   ``bytes`` and gives each block back as soon as its last frame is read.
   The frames returned are the caller's: nothing points into the ring.
   A VLAN tag the kernel took off (``tp_vlan_tci``) is not put back, as
   ``LinuxWire`` (a plain ``recv`` without PACKET_AUXDATA) does not either.
   A block not full waits for its timer (1 ms at least): about +1 ms of
   round trip on sparse traffic.  ``tpacket_version=TPACKET_V2`` has one
   slot per frame instead, handed over (and polled readable) at once.
5. ``close()`` unmaps the rings and closes the socket.

No PACKET_QDISC_BYPASS: sent frames take the normal transmit path, so the
port guard's nftables egress chain sees every one of them.
"""

from __future__ import annotations

import fcntl
import mmap
import socket
import struct

from l2crypt.core.errors import LocalError

from .linux_wire import SOL_PACKET, LinuxWire, open_packet_socket

# linux/if_packet.h
PACKET_RX_RING = 5
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
TPACKET_V2, TPACKET_V3 = 1, 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TPACKET3_HDR = struct.Struct("=IIIIIIHH")  # next_offset, sec, nsec, snaplen, len, status, mac, net
TPACKET2_HDR = struct.Struct("=IIIH")      # status, len, snaplen, mac
# Where a slot's frame starts (TPACKET_ALIGN(sizeof(struct tpacketN_hdr))), its
# tp_len and its tp_status, by version.
TX_DATA_OFFSET = {TPACKET_V2: 32, TPACKET_V3: 48}
TX_LEN_AT = {TPACKET_V2: 4, TPACKET_V3: 16}
TX_STATUS_AT = {TPACKET_V2: 0, TPACKET_V3: 20}
U32 = struct.Struct("=I")
BLOCK_STATUS_AT = 8               # tpacket_block_desc.hdr.bh1.block_status
BLOCK_HDR = struct.Struct("=III")  # block_status, num_pkts, offset_to_first_pkt (at BLOCK_STATUS_AT)
ETH_HEADER = 14
SIOCGIFMTU = 0x8921               # linux/sockios.h

# Tuning
RX_BLOCK_BYTES = 1 << 15          # 32 KiB: 20 full-size frames per block
RX_BLOCKS = 128                   # 4 MiB, as LinuxWire's socket buffer; a block not full is
                                  # closed after RX_BLOCK_TIMEOUT_MS, so the ring holds at least
                                  # RX_BLOCKS ms of sparse traffic
RX_BLOCK_TIMEOUT_MS = 1           # a block not full is handed over after this
TX_SLOTS = 512
TX_MIN_SLOT_BYTES = 2048
FLUSH_TRIES = 4                   # flushes per batch while the kernel refuses frames
PAGE = mmap.PAGESIZE


class RingRefused(LocalError):
    """The kernel would not set up the rings (old kernel, no memory, a sandbox)."""


def _slot_bytes(max_frame: int) -> int:
    size = TX_MIN_SLOT_BYTES
    while size < 2 * TX_DATA_OFFSET[TPACKET_V3] + max_frame:  # RX slots (V2) put the frame further in
        size *= 2
    return size


def _port_mtu(sock: socket.socket, port: str) -> int:
    """The port's MTU, from the kernel of the socket's namespace."""
    req = struct.pack("16si", port.encode(), 0)
    return struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), SIOCGIFMTU, req))[1]


class RingWire:
    """Raw l2crypt frames on one interface through mmap'ed rings, non-blocking.

    Implements FramePort, plus ``write_frames`` and the slot API.  Owned by
    one thread (the agent's loop); nothing here is locked.
    """

    def __init__(self, port: str, ethertype: int, tpacket_version: int = TPACKET_V3):
        self.name = port
        self.version = tpacket_version
        self._tx_data_at = TX_DATA_OFFSET[tpacket_version]
        self._tx_len_at = TX_LEN_AT[tpacket_version]
        self._tx_status_at = TX_STATUS_AT[tpacket_version]
        self.write_errors = 0         # frames refused: too big, ring full, or by the kernel
        self.rx_truncated = 0         # frames the ring held only part of (dropped)
        maps = []
        try:
            # Rings first, then bind: no frame is queued outside the ring.
            sock = open_packet_socket(port, ethertype, lambda s: maps.append(self._set_up_rings(s, port)))
        except OSError as exc:
            raise RingRefused(f"the kernel refused the packet rings on {port!r}: {exc}") from None
        except LocalError:
            for ring in maps:
                ring.close()
            raise
        self._map = maps[0]
        sock.setblocking(False)
        self._sock = sock
        self._view = memoryview(self._map)
        # RX: the block being read, and where in it (owned by read_frames).
        self._rx_block = 0
        self._rx_left = 0
        self._rx_at = 0
        # TX: next slot to fill, next slot the kernel will take (owned by the slot API).
        self._tx_head = 0
        self._tx_flushed = 0
        self._tx_open: int | None = None

    def _set_up_rings(self, sock: socket.socket, port: str) -> mmap.mmap:
        self.max_frame = _port_mtu(sock, port) + ETH_HEADER
        v3 = self.version == TPACKET_V3
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, self.version)
        sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        self.slot_bytes = _slot_bytes(self.max_frame)
        tx_block = max(self.slot_bytes, 16 * PAGE)
        per_block = tx_block // self.slot_bytes
        self._rx_bytes = RX_BLOCK_BYTES * RX_BLOCKS
        if v3:
            self.rx_block_bytes, self.rx_blocks = RX_BLOCK_BYTES, RX_BLOCKS
            rx_frame = TX_MIN_SLOT_BYTES
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
                "=7I", RX_BLOCK_BYTES, RX_BLOCKS, rx_frame, RX_BLOCKS * (RX_BLOCK_BYTES // rx_frame),
                RX_BLOCK_TIMEOUT_MS, 0, 0))
        else:  # one slot per frame, as big as a TX slot; the kernel wakes us per frame
            self.rx_block_bytes, self.rx_blocks = self.slot_bytes, self._rx_bytes // self.slot_bytes
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
                "=4I", tx_block, self._rx_bytes // tx_block, self.slot_bytes, self.rx_blocks))
        self.tx_slots = max(per_block, TX_SLOTS // per_block * per_block)
        sock.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack(
            "=7I" if v3 else "=4I", tx_block, self.tx_slots // per_block, self.slot_bytes, self.tx_slots,
            *((0, 0, 0) if v3 else ())))
        size = self._rx_bytes + self.slot_bytes * self.tx_slots
        self._tx_offsets = [self._rx_bytes + i * self.slot_bytes for i in range(self.tx_slots)]
        return mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def fileno(self) -> int:
        return self._sock.fileno()

    # ------------------------------------------------------------- transmit

    def _slot_at(self, index: int) -> int:
        return self._rx_bytes + (index % self.tx_slots) * self.slot_bytes

    def tx_slot(self, max_len: int) -> memoryview | None:
        """The data area (``max_len`` bytes) of the next free slot, or None if
        ``max_len`` is over ``max_frame`` or the ring is full (counted in
        ``write_errors``).  Valid until ``commit``; do not keep it after."""
        if max_len > self.max_frame:
            self.write_errors += 1
            return None
        if self._tx_head - self._tx_flushed >= self.tx_slots:
            self.flush()
        at = self._slot_at(self._tx_head)
        if self._tx_head - self._tx_flushed >= self.tx_slots or \
                self._map[at + self._tx_status_at] != TP_STATUS_AVAILABLE:
            self.write_errors += 1  # still in flight in the kernel
            return None
        self._tx_open = at
        return self._view[at + self._tx_data_at:at + self._tx_data_at + max_len]

    def commit(self, length: int) -> None:
        """Mark the slot from ``tx_slot`` ready with its first ``length`` bytes.
        Sent at the next ``flush``."""
        at, self._tx_open = self._tx_open, None
        if at is None or not ETH_HEADER <= length <= self.max_frame:
            raise LocalError(f"commit({length}) without a slot or with a bad length")  # our own misuse
        # The kernel reads the slots only inside flush's send: no ordering to keep here.
        U32.pack_into(self._map, at + self._tx_len_at, length)
        U32.pack_into(self._map, at + self._tx_status_at, TP_STATUS_SEND_REQUEST)
        self._tx_head += 1

    def flush(self) -> int:
        """One ``send``: the kernel sends every committed slot.  Returns the
        number of frames it refused (also counted in ``write_errors``)."""
        refused = 0
        for _ in range(FLUSH_TRIES):
            if self._tx_flushed == self._tx_head:
                break
            try:
                self._sock.send(b"", socket.MSG_DONTWAIT)
            except OSError:
                pass
            else:  # the kernel took every ready slot in order
                self._tx_flushed = self._tx_head
                break
            while self._tx_flushed < self._tx_head and \
                    self._map[self._slot_at(self._tx_flushed) + self._tx_status_at] != TP_STATUS_SEND_REQUEST:
                self._tx_flushed += 1
            if self._tx_flushed < self._tx_head:
                # The kernel stopped at this frame and would retry it first at
                # every flush; a zero length makes it skip the frame.
                U32.pack_into(self._map, self._slot_at(self._tx_flushed) + self._tx_len_at, 0)
                refused += 1
        self.write_errors += refused
        return refused

    def write_frames(self, frames) -> int:
        """Copy each frame into a slot, then one ``flush``.  Returns how many
        the kernel took; the others are counted in ``write_errors``."""
        ring, offsets, slots, max_frame = self._map, self._tx_offsets, self.tx_slots, self.max_frame
        head, queued = self._tx_head, 0
        data_at, len_at, status_at = self._tx_data_at, self._tx_len_at, self._tx_status_at
        for frame in frames:
            n = len(frame)
            if n > max_frame or n < ETH_HEADER:
                self.write_errors += 1
                continue
            if head - self._tx_flushed >= slots:
                self._tx_head = head
                self.flush()
            at = offsets[head % slots]
            # tp_status is a little-endian u32; its low byte holds the flags.
            if head - self._tx_flushed >= slots or ring[at + status_at] != TP_STATUS_AVAILABLE:
                self.write_errors += 1
                continue
            ring[at + data_at:at + data_at + n] = frame
            U32.pack_into(ring, at + len_at, n)
            U32.pack_into(ring, at + status_at, TP_STATUS_SEND_REQUEST)
            head += 1
            queued += 1
        self._tx_head = head
        return queued - self.flush()

    def write_frame(self, frame: bytes) -> bool:
        return self.write_frames((frame,)) == 1

    # -------------------------------------------------------------- receive

    def read_frames(self, limit: int) -> list[bytes]:
        """Up to ``limit`` frames from closed blocks, copied out; each block
        goes back to the kernel once its last frame is read."""
        if self.version == TPACKET_V2:
            return self._read_slots(limit)
        frames = []
        ring = self._map
        while len(frames) < limit:
            base = self._rx_block * self.rx_block_bytes
            if self._rx_left == 0:
                status, count, first = BLOCK_HDR.unpack_from(ring, base + BLOCK_STATUS_AT)
                if not status & TP_STATUS_USER:
                    break
                if count == 0:
                    self._release_block(base)
                    continue
                self._rx_left, self._rx_at = count, base + first
            at = self._rx_at
            next_offset, _, _, snaplen, length, _, mac, _ = TPACKET3_HDR.unpack_from(ring, at)
            if snaplen == length:
                frames.append(ring[at + mac:at + mac + snaplen])
            else:
                self.rx_truncated += 1
            self._rx_left -= 1
            self._rx_at = at + next_offset
            if self._rx_left == 0:
                self._release_block(base)
        return frames

    def _read_slots(self, limit: int) -> list[bytes]:
        """TPACKET_V2: one frame per slot, each given back once copied."""
        frames, ring, size, count = [], self._map, self.rx_block_bytes, self.rx_blocks
        at = self._rx_block * size
        while len(frames) < limit and ring[at] & TP_STATUS_USER:
            _, length, snaplen, mac = TPACKET2_HDR.unpack_from(ring, at)
            if snaplen == length:
                frames.append(ring[at + mac:at + mac + snaplen])
            else:
                self.rx_truncated += 1
            U32.pack_into(ring, at, TP_STATUS_KERNEL)
            self._rx_block = (self._rx_block + 1) % count
            at = self._rx_block * size
        return frames

    def _release_block(self, base: int) -> None:
        U32.pack_into(self._map, base + BLOCK_STATUS_AT, TP_STATUS_KERNEL)
        self._rx_left = 0
        self._rx_block = (self._rx_block + 1) % self.rx_blocks

    def close(self) -> None:
        """Unmap the rings and close the socket.  Idempotent.  A slot view still
        held by a caller keeps the mapping alive until it is dropped."""
        if self._sock.fileno() < 0:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller holds a slot view; the mapping goes with it
        self._sock.close()


def open_wire(port: str, ethertype: int, batched: bool,
              tpacket_version: int = TPACKET_V3) -> tuple[RingWire | LinuxWire, str]:
    """The wire port for the agent, and why it is the one it is.

    ``batched``: rings (TPACKET_V3 receive blocks, or V2 slots) if the kernel
    allows them, else ``LinuxWire``."""
    if not batched:
        return LinuxWire(port, ethertype), "simple: not asked for"
    try:
        wire = RingWire(port, ethertype, tpacket_version)
    except RingRefused as exc:
        return LinuxWire(port, ethertype), f"simple: {exc}"
    return wire, f"batched: packet rings (TPACKET_V{tpacket_version + 1})"


def open_wire_ring(port: str, ethertype: int, ring: str) -> tuple[RingWire | LinuxWire, str]:
    """``open_wire`` for the config key ``wire_ring``: ``off``, ``v2`` (TPACKET_V2 receive
    slots) or ``v3`` (TPACKET_V3 receive blocks)."""
    return open_wire(port, ethertype, batched=ring != "off",
                     tpacket_version=TPACKET_V2 if ring == "v2" else TPACKET_V3)
