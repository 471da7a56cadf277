"""The agent's frame path: TAP -> seal -> wire, and wire -> open -> TAP.

This is where every frame of a host passes; the daemon around it (``agent``)
only starts it and feeds it keys.

1. The TAP polls readable: ``on_tap_readable`` reads up to ``BATCH_FRAMES``
   plain frames the host's stack sent (``FramePort.read_frames``).
2. Each is sealed by the engine (``FrameEngine.seal_from_tap``: the peer's
   pair key, or the multicast key for a group destination); a frame whose
   key is not there yet is held in the engine and None comes back.  With
   ``datapath = "batched"`` the batch goes through ``tap_path.BatchedTapPath``
   instead, which cuts TCP super-frames into segments before sealing.
3. The frames sealed in one wakeup leave in one ``WirePort.write_frames``
   (one system call on a PACKET_MMAP ring); frames the port refused are
   counted as ``tx_error``.
4. The wire port polls readable: ``on_wire_readable`` reads up to
   ``BATCH_FRAMES`` sealed frames from the switch.
5. Each is opened by the engine (``FrameEngine.open_from_wire``: header,
   key by source MAC and PW_ID, replay window, AEAD); a bad frame is dropped
   and counted under its reason, never raised.  Opened frames are written to
   the TAP; one the TAP refuses is counted as ``tap_write_error``.  Batched:
   ``BatchedTapPath.open_batch`` joins segments into super-frames first.
6. Frames a new key released from the hold queue (``deliver``, called by the
   agent's key events): the sealed ones to the wire as in 3, the opened ones
   to the TAP as in 5.
7. After each batch, if frames wait for a key, ``on_keys_wanted(now)`` runs
   (the agent sends the engine's key requests to the key server).

The engine, the ports and the pump belong to the agent's event loop.
"""

from __future__ import annotations

from typing import Callable

from l2crypt.core.engine import Delivered, FrameEngine
from l2crypt.io.ports import FramePort, WirePort

from .tap_path import TAP_WRITE_ERROR, TX_ERROR, BatchedTapPath

#: Frames read from one port per wakeup, at most.
BATCH_FRAMES = 64


class FramePump:
    """Moves frames between the TAP and the wire port through the engine (see
    the module docstring).  ``clock()`` gives the engine's time (the loop's);
    ``batched`` is the offload path, or None for one frame per read and write."""

    def __init__(self, engine: FrameEngine, tap: FramePort, wire: WirePort, clock: Callable[[], float],
                 on_keys_wanted: Callable[[float], None], batched: BatchedTapPath | None = None):
        self.engine = engine
        self.tap = tap
        self.wire = wire
        self.clock = clock
        self.on_keys_wanted = on_keys_wanted
        self.batched = batched

    # 1-3: TAP -> seal -> wire
    def on_tap_readable(self) -> None:
        frames = self.tap.read_frames(BATCH_FRAMES)
        if not frames:
            return
        now = self.clock()
        if self.batched is not None:
            self.batched.seal_batch(frames, now)
        else:
            seal = self.engine.seal_from_tap
            sealed = [s for s in (seal(frame, now) for frame in frames) if s is not None]
            if sealed:
                self.send_to_wire(sealed)
        self._after_batch(now)

    def send_to_wire(self, frames: list[bytes]) -> None:
        """The whole batch in one call (one system call on the ring)."""
        sent = self.wire.write_frames(frames)
        if sent < len(frames):
            self.engine.drops[TX_ERROR] += len(frames) - sent

    # 4-5: wire -> open -> TAP
    def on_wire_readable(self) -> None:
        frames = self.wire.read_frames(BATCH_FRAMES)
        if not frames:
            return
        now = self.clock()
        if self.batched is not None:
            self.batched.open_batch(frames, now)
        else:
            open_ = self.engine.open_from_wire
            for frame in frames:
                plain = open_(frame, now)
                if plain is not None:
                    self.write_to_tap(plain)
        self._after_batch(now)

    def write_to_tap(self, frame: bytes) -> None:
        if not self.tap.write_frame(frame):
            self.engine.drops[TAP_WRITE_ERROR] += 1

    # 6: frames a key released
    def deliver(self, delivered: Delivered) -> None:
        if delivered.to_wire:
            self.send_to_wire(delivered.to_wire)
        for frame in delivered.to_tap:
            self.write_to_tap(frame)

    # 7
    def _after_batch(self, now: float) -> None:
        if self.engine.holds.pending:
            self.on_keys_wanted(now)
