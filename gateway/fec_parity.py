"""Parity frames of ``tunnel_mode = fec``: one XOR of every ``k`` frames, and rebuilding one lost frame.

Wire format of a ``PARITY`` message (the plaintext, sealed like any tunnel
message, ``tunnel_wire`` kind ``PARITY``)::

    u64 first sequence number | u8 k | u16 XOR of the k lengths | XOR of the k frames

The frames are the ``k`` consecutive frames of one link from ``first`` on,
each zero-padded to the longest.  With the parity and any ``k - 1`` of them,
the missing one is the XOR of the rest, cut to the XOR of the lengths.

* ``ParityEncoder.add`` (sender): a parity message after every ``k``
  consecutive frames (a gap in the numbers starts a new group).
* ``ParityDecoder`` (receiver): keeps the last ``max_frames`` frames and the
  parity of up to ``max_groups`` groups still missing a frame; whichever of
  the parity or the last-but-one frame arrives last rebuilds the missing
  one.  It never raises: a malformed parity is counted (``bad_parity``), a
  group dropped with two or more frames missing is counted
  (``unrecoverable``).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

HEADER = struct.Struct("!QBH")
MIN_K, MAX_K = 2, 32
MIN_FRAME = 14


class ParityEncoder:
    """The sending side of one link."""

    def __init__(self, k: int):
        if not MIN_K <= k <= MAX_K:
            raise ValueError(f"fec k must be {MIN_K}-{MAX_K}, got {k}")
        self.k = k
        self.first = -1
        self.count = 0
        self.acc = 0
        self.longest = 0
        self.lens = 0

    def add(self, seq: int, frame: bytes) -> bytes | None:
        if self.count and seq != self.first + self.count:
            self.count = 0
        if self.count == 0:
            self.first, self.acc, self.longest, self.lens = seq, 0, 0, 0
        self.acc ^= int.from_bytes(frame, "little")
        self.longest = max(self.longest, len(frame))
        self.lens ^= len(frame)
        self.count += 1
        if self.count < self.k:
            return None
        self.count = 0
        return HEADER.pack(self.first, self.k, self.lens) + self.acc.to_bytes(self.longest, "little")


def decode_parity(message: bytes) -> tuple[int, int, int, bytes] | None:
    """(first, k, XOR of lengths, XOR of frames), or None if malformed."""
    if len(message) < HEADER.size + MIN_FRAME:
        return None
    first, k, lens = HEADER.unpack_from(message)
    if not MIN_K <= k <= MAX_K:
        return None
    return first, k, lens, message[HEADER.size:]


class ParityDecoder:
    """The receiving side of one link."""

    def __init__(self, max_frames: int = 512, max_groups: int = 64):
        self.max_frames = max_frames
        self.max_groups = max_groups
        self.frames: OrderedDict[int, bytes] = OrderedDict()
        self.groups: OrderedDict[int, tuple[int, int, bytes]] = OrderedDict()  # first -> (k, lens, xor)
        self.member: dict[int, int] = {}  # seq -> first of a pending group it belongs to
        self.recovered = 0
        self.unrecoverable = 0
        self.bad_parity = 0

    def on_frame(self, seq: int, frame: bytes) -> list[tuple[int, bytes]]:
        self._keep(seq, frame)
        first = self.member.get(seq)
        return self._try(first) if first is not None else []

    def on_parity(self, message: bytes) -> list[tuple[int, bytes]]:
        parsed = decode_parity(message)
        if parsed is None:
            self.bad_parity += 1
            return []
        first, k, lens, xor = parsed
        if first in self.groups:
            return []
        self.groups[first] = (k, lens, xor)
        for seq in range(first, first + k):
            self.member[seq] = first
        while len(self.groups) > self.max_groups:
            self._forget(next(iter(self.groups)), give_up=True)
        return self._try(first)

    def _keep(self, seq: int, frame: bytes) -> None:
        self.frames[seq] = frame
        if len(self.frames) > self.max_frames:
            self.frames.popitem(last=False)

    def _try(self, first: int) -> list[tuple[int, bytes]]:
        k, lens, xor = self.groups[first]
        missing = [s for s in range(first, first + k) if s not in self.frames]
        if len(missing) > 1:
            return []
        self._forget(first)
        if not missing:
            return []
        acc, length = int.from_bytes(xor, "little"), lens
        for seq in range(first, first + k):
            if seq != missing[0]:
                frame = self.frames[seq]
                acc ^= int.from_bytes(frame, "little")
                length ^= len(frame)
        if not MIN_FRAME <= length <= len(xor):
            self.bad_parity += 1
            return []
        frame = acc.to_bytes(len(xor), "little")[:length]
        self._keep(missing[0], frame)
        self.recovered += 1
        return [(missing[0], frame)]

    def _forget(self, first: int, give_up: bool = False) -> None:
        k, _, _ = self.groups.pop(first)
        if give_up:
            self.unrecoverable += 1
        for seq in range(first, first + k):
            if self.member.get(seq) == first:
                del self.member[seq]
