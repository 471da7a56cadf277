"""Putting sprayed frames back in order (``tunnel_spray``), sans-I/O.

Frames of one link carry consecutive sequence numbers (``multipath``).  When
they are sprayed over paths of different delay, a frame may arrive before an
earlier one.  ``push`` hands frames on in sequence order:

1. The next expected frame goes on at once, with every held frame that
   follows it without a gap.
2. A frame after a gap is held until the gap fills, until the oldest held
   frame has waited ``max_wait_s`` (``due``, called from the timer), or until
   ``max_frames`` are held; then the gap is skipped (``skipped`` counts the
   frames given up: lost on their path, or still on the way).
3. A frame below the next expected one (it came after its gap was skipped)
   is handed on at once and counted in ``late``: TCP copes with one frame out
   of order, and dropping it would lose it.
4. A frame far ahead of the expected one (``RESET_GAP``: the sender
   restarted, its numbers jump with its clock) ends the old order: the held
   frames go on, and the order starts again from it.
"""

from __future__ import annotations

#: A jump this far ahead is a new start, not a gap.
RESET_GAP = 1 << 20


class ReorderBuffer:
    """The receive order of one link.  Owned by the link's ``LinkState``."""

    def __init__(self, max_frames: int = 256, max_wait_s: float = 0.03):
        self.max_frames = max_frames
        self.max_wait_s = max_wait_s
        self.next: int | None = None
        self.held: dict[int, tuple[bytes, float]] = {}
        self.late = 0
        self.skipped = 0

    def push(self, seq: int, frame: bytes, now: float) -> list[bytes]:
        nxt = self.next
        if nxt is None or seq - nxt > RESET_GAP:
            out = self._drain()
            self.next = seq + 1
            return out + [frame]
        if seq < nxt:
            self.late += 1
            return [frame]
        if seq == nxt:
            self.next = seq + 1
            return [frame] + self._ready()
        if seq not in self.held:
            self.held[seq] = (frame, now)
        return self._skip() if len(self.held) > self.max_frames else []

    def due(self, now: float) -> list[bytes]:
        """The frames whose wait is over (and those after them without a gap)."""
        out = []
        while self.held and min(at for _, at in self.held.values()) + self.max_wait_s <= now:
            out += self._skip()
        return out

    def next_deadline(self) -> float | None:
        return min(at for _, at in self.held.values()) + self.max_wait_s if self.held else None

    def _ready(self) -> list[bytes]:
        out, held, nxt = [], self.held, self.next
        while nxt in held:
            out.append(held.pop(nxt)[0])
            nxt += 1
        self.next = nxt
        return out

    def _skip(self) -> list[bytes]:
        """Give up the gap before the lowest held frame."""
        first = min(self.held)
        self.skipped += first - self.next
        self.next = first
        return self._ready()

    def _drain(self) -> list[bytes]:
        out = [self.held[seq][0] for seq in sorted(self.held)]
        self.held.clear()
        return out
