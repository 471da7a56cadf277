"""Anti-replay window in the style of RFC 6479.

The window is a ring of 64-bit blocks.  Sliding forward clears whole blocks
instead of shifting a bitmap, so the cost of a jump does not depend on its
size.  With ``n`` blocks the window tolerates reordering by ``(n - 1) * 64``
frames.

Use it in two steps, so that a forged frame can never move the window:

1. ``check(pn)`` before decrypting: False means "replayed or too old";
2. ``update(pn)`` only after the frame's tag has verified.

A window may start at a *floor* (``replay_floor``): every number at or below
it counts as already received, so a key that comes back after a restart does
not open frames recorded before it.
"""

from __future__ import annotations

_BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BIT_MASK = 63


class ReplayWindow:
    """Receive-side replay state of one (key, direction).  Owned by its KeySlot."""

    __slots__ = ("_blocks", "_n", "_last", "window_frames")

    def __init__(self, window_frames: int = 2048, floor: int = 0):
        if window_frames < _BLOCK_BITS:
            raise ValueError("replay window must be at least 64 frames")
        self._n = -(-window_frames // _BLOCK_BITS) + 1
        self.window_frames = (self._n - 1) * _BLOCK_BITS
        self._blocks = [0] * self._n
        self._last = -1  # highest accepted packet number; -1: none yet
        if floor > 0:
            # Everything up to the floor counts as received: full blocks below
            # the floor's block, and the floor's own bits up to it.
            full = (1 << _BLOCK_BITS) - 1
            self._blocks = [full] * self._n
            self._blocks[(floor >> _BLOCK_SHIFT) % self._n] = (1 << ((floor & _BIT_MASK) + 1)) - 1
            self._last = floor

    @property
    def highest(self) -> int:
        return self._last

    def check(self, pn: int) -> bool:
        """Would ``pn`` be accepted?  Does not change the window."""
        if pn > self._last:
            return True
        if pn + self.window_frames <= self._last:
            return False
        block = (pn >> _BLOCK_SHIFT) % self._n
        return not (self._blocks[block] >> (pn & _BIT_MASK)) & 1

    def update(self, pn: int) -> bool:
        """Record ``pn`` as received.  Call only after the tag verified.

        Returns False (and changes nothing) if ``pn`` is replayed or too old.
        """
        last = self._last
        n = self._n
        if pn > last:
            current = last >> _BLOCK_SHIFT if last >= 0 else -1
            target = pn >> _BLOCK_SHIFT
            if target != current:
                blocks = self._blocks
                for i in range(1, min(target - current, n) + 1):
                    blocks[(current + i) % n] = 0
            self._last = pn
        elif pn + self.window_frames <= last:
            return False  # too old
        elif (self._blocks[(pn >> _BLOCK_SHIFT) % n] >> (pn & _BIT_MASK)) & 1:
            return False  # replayed
        self._blocks[(pn >> _BLOCK_SHIFT) % n] |= 1 << (pn & _BIT_MASK)
        return True
