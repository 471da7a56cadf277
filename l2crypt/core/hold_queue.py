"""Frames held while a key request is outstanding, and the request backoff.

1. A frame to (or from) a MAC with no key creates a ``PendingKey`` and asks
   for one request at once; later frames only join its hold queue.
2. Held frames are bounded by count and by age (as the kernel's ARP queue);
   the frames pushed out or aged out are returned so the engine counts them.
3. An unanswered request is retried with exponential backoff; a ``PendingKey``
   with nothing held and older than the hold age is forgotten.
3a. ``due_requests`` takes a budget (the engine's request rate limit): the
   multicast key first, then MACs our own host sends to, then MACs that only
   sent to us; whatever is over budget stays due for the next call.
4. When the key arrives the engine takes the held frames and seals or opens
   them in arrival order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TX = 0  # a plain frame from the TAP, waiting to be sealed
RX = 1  # a sealed frame from the wire, waiting to be opened


@dataclass(slots=True, eq=False)
class PendingKey:
    """A key asked of the key server: request backoff and the frames held for it."""
    mac: bytes
    created_at: float
    next_request_at: float
    backoff_s: float
    requests_sent: int = 0
    tx: bool = False  # our own host sent to this MAC (its requests go first)
    held: deque = field(default_factory=deque)  # (direction, frame, arrived_at)


class HoldTable:
    """All pending MACs of one agent.  Owned by the FrameEngine."""

    def __init__(self, max_frames: int, max_age_s: float, retry_s: float, retry_max_s: float):
        self.max_frames = max_frames
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.pending: dict[bytes, PendingKey] = {}

    def hold(self, mac: bytes, direction: int, frame: bytes, now: float) -> tuple[bool, int]:
        """Hold a frame.  Returns (new_request_needed, frames_pushed_out)."""
        entry = self.pending.get(mac)
        new = entry is None
        if new:
            entry = PendingKey(mac, now, now, self.retry_s)
            self.pending[mac] = entry
        if direction == TX:
            entry.tx = True
        dropped = 0
        if self.max_frames <= 0:
            return new, 1
        if len(entry.held) >= self.max_frames:
            entry.held.popleft()
            dropped = 1
        entry.held.append((direction, frame, now))
        return new, dropped

    def due_requests(self, now: float, budget: int | None = None, first: bytes | None = None) -> list[bytes]:
        """MACs whose key request should be sent now (at most ``budget``, ``first``
        our own destinations, then first requests before retries); advances their backoff."""
        ready = [e for e in self.pending.values() if e.next_request_at <= now]
        if budget is not None and len(ready) > budget:
            ready.sort(key=lambda e: (e.mac != first, not e.tx, e.requests_sent))
            ready = ready[:max(0, budget)]
        due = []
        for entry in ready:
            due.append(entry.mac)
            entry.requests_sent += 1
            entry.next_request_at = now + entry.backoff_s
            entry.backoff_s = min(entry.backoff_s * 2, self.retry_max_s)
        return due

    def expire(self, now: float) -> int:
        """Drop frames older than the hold age; forget idle entries.  Returns frames dropped."""
        dropped = 0
        limit = now - self.max_age_s
        for mac in list(self.pending):
            entry = self.pending[mac]
            while entry.held and entry.held[0][2] <= limit:
                entry.held.popleft()
                dropped += 1
            if not entry.held and entry.created_at <= limit:
                del self.pending[mac]
        return dropped

    def take(self, mac: bytes) -> deque:
        """Remove a MAC's entry and return its held frames (may be empty)."""
        entry = self.pending.pop(mac, None)
        return entry.held if entry is not None else deque()

    def next_deadline(self) -> float | None:
        deadlines = []
        for entry in self.pending.values():
            deadlines.append(entry.next_request_at)
            deadlines.append((entry.held[0][2] if entry.held else entry.created_at) + self.max_age_s)
        return min(deadlines) if deadlines else None
