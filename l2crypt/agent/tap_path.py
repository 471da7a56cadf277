"""The agent's batched TAP path (``--datapath batched``, issue 13 steps 1, 3, 4).

The TAP is opened with ``IFF_VNET_HDR`` and offloads (``io.linux_tap``), so
one read may hold a TCP super-frame of up to 64 KB:

1. ``seal_batch``: each buffer read from the TAP is split into its
   virtio-net header and frame (``vnet_hdr.split_vnet_frame``); ``gso.segment``
   cuts it into segments that fit the TAP MTU, the TCP/UDP checksum left
   partial where the receiver can find it; each segment is sealed on its
   own into one wire frame (a lost wire frame costs one segment), flagged
   ``csum_partial`` when its checksum was left partial.
2. ``open_batch``: each opened frame goes to ``gro.Coalescer`` with the
   flag of its wire frame (the engine leaves partial checksums as they are:
   ``EngineSettings.complete_checksums=False``); at the end of the batch the
   coalescer's super-frames and single frames are written to the TAP, each
   with its header (``NEEDS_CSUM`` where the checksum is partial).
3. Bad input never raises: a header or super-frame that cannot be used is
   dropped and counted in the engine's ``drops`` under the reason
   ``vnet_hdr``/``gso`` name (``vnet_truncated``, ``gso_malformed``, ...).

Counters (in the engine's ``counters``, so status and metrics show them):
``super_frames_read`` (TAP reads cut into more than one segment),
``segments_cut``, ``super_frames_written``, ``segments_joined``.

``cut_buffer`` and ``write_coalesced`` are the two halves on their own; the
gateway's plain port (``datapath = "batched"``) uses them too.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from l2crypt.core.engine import FrameEngine
from l2crypt.core.frame_wire import csum_partial_of
from l2crypt.core.gro import Coalescer
from l2crypt.core.gso import Segments, segment
from l2crypt.core.vnet_hdr import VnetHdrError, encode_vnet_hdr, split_vnet_frame

BATCHED_COUNTERS = ("super_frames_read", "segments_cut", "super_frames_written", "segments_joined")
TX_ERROR = "tx_error"
TAP_WRITE_ERROR = "tap_write_error"


class BatchedTapPath:
    """Moves one batch at a time between a vnet TAP and the wire port.

    ``tap`` needs ``write_vnet(header_bytes, frame)``; ``wire`` is a WirePort (``write_frames``).
    The engine, the ports and the coalescer are owned by the caller's loop.
    """

    def __init__(self, engine: FrameEngine, tap, wire, tap_mtu: int):
        self.engine = engine
        self.tap = tap
        self.wire = wire
        self.tap_mtu = tap_mtu
        self.coalescer = Coalescer()

    # 1: TAP -> wire
    def seal_batch(self, buffers: list[bytes], now: float) -> None:
        engine = self.engine
        drops, counters = engine.drops, engine.counters
        seal, mtu = engine.seal_from_tap, self.tap_mtu
        out: list[bytes] = []
        for buffer in buffers:
            cut = cut_buffer(buffer, mtu, False, drops, counters)
            if cut is None:
                continue
            frames, partial = cut
            for piece in frames:
                sealed = seal(piece, now, partial)
                if sealed is not None:
                    out.append(sealed)
        if out:  # the whole batch in one call, as the simple path sends (one system call on the ring)
            sent = self.wire.write_frames(out)
            if sent < len(out):
                drops[TX_ERROR] += len(out) - sent

    # 2: wire -> TAP
    def open_batch(self, frames: list[bytes], now: float) -> None:
        open_, add = self.engine.open_from_wire, self.coalescer.add
        for frame in frames:
            plain = open_(frame, now)
            if plain is not None:
                add(plain, csum_partial_of(frame))
        self.flush()

    def flush(self) -> None:
        """Write what the coalescer holds (the end of a batch)."""
        engine = self.engine
        write_coalesced(self.coalescer, self.tap.write_vnet, engine.drops, engine.counters, TAP_WRITE_ERROR)


def cut_buffer(buffer: bytes, mtu: int, csum: bool, drops: Counter, counters: Counter) -> Segments | None:
    """A buffer read with its virtio-net header (a vnet TAP, or the gateway's plain port
    with PACKET_VNET_HDR) cut into segments whose IP packets fit ``mtu`` (``gso.segment``;
    ``csum``: checksums completed, else left partial where the receiver finds them).
    None if it cannot be used, counted in ``drops`` under its reason; a super-frame
    counts in ``counters`` (``super_frames_read``, ``segments_cut``).  Never raises."""
    split = split_vnet_frame(buffer)
    if split.__class__ is str:
        drops[split] += 1
        return None
    hdr, frame = split
    cut = segment(frame, hdr, mtu, csum)
    if cut.__class__ is str:
        drops[cut] += 1
        return None
    if len(cut[0]) > 1:
        counters["super_frames_read"] += 1
        counters["segments_cut"] += len(cut[0])
    return cut


def write_coalesced(coalescer: Coalescer, write_vnet: Callable[[bytes, bytes], bool], drops: Counter,
                    counters: Counter, write_error: str) -> None:
    """Write what ``coalescer`` holds, each frame with its virtio-net header, through
    ``write_vnet(header, frame)`` (False: refused, counted in ``drops[write_error]``);
    counts ``super_frames_written`` and ``segments_joined``.  Never raises."""
    super_before, joined_before = coalescer.super_frames, coalescer.segments_joined
    for hdr, frame in coalescer.flush():
        try:
            encoded = encode_vnet_hdr(hdr)
        except VnetHdrError as exc:
            drops[exc.code] += 1
            continue
        if not write_vnet(encoded, frame):
            drops[write_error] += 1
    counters["super_frames_written"] += coalescer.super_frames - super_before
    counters["segments_joined"] += coalescer.segments_joined - joined_before
