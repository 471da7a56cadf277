"""Frames (or packets) held while a key request is outstanding, the request
backoff and the request rate limit.  Shared by the layer-2 and layer-3
engines; the peer key is opaque (a MAC, or an (``ip``/``id``, value) lookup).

1. An item to (or from) a peer key with no key creates a ``PendingKey`` and
   asks for one request at once; later items only join its hold queue.
   At most ``max_pending`` peer keys wait at once, those first seen on the
   wire (``RX``) at most half of them, so forged senders cannot crowd out
   our own destinations (``pending_full``); the ``first`` key (the
   multicast key) is never refused.
2. Held items are bounded by count per peer key and by age (as the kernel's
   ARP queue), and optionally all together (``max_held``, ``RX`` again at
   most half).  ``hold`` hands back the item that did not stay (the oldest
   one pushed out, or the new one refused) with its reason, ``expire`` the
   items aged out, so the engine can count them (and answer each one).
3. An unanswered request is retried with exponential backoff; a
   ``PendingKey`` with nothing held and older than the hold age is forgotten.
3a. ``take_requests`` sends at most ``requests_per_s`` (a token bucket,
   burst as many): the ``first`` key first, then keys our own host sends
   to, then keys that only sent to us; what is over budget stays due for
   the next call.
4. When the key arrives the engine takes the held items (``take``) and
   seals or opens them in arrival order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TX = 0  # a plain frame from the TAP, waiting to be sealed
RX = 1  # a sealed frame from the wire, waiting to be opened

# Why ``hold`` did not keep an item (drop reasons).
PENDING_FULL = "pending_full"
HOLD_OVERFLOW = "hold_overflow"


@dataclass(slots=True, eq=False)
class PendingKey:
    """A key asked of the key server: request backoff and the items held for it."""
    mac: object  # the peer key (a MAC for the layer-2 engine)
    created_at: float
    next_request_at: float
    backoff_s: float
    requests_sent: int = 0
    tx: bool = False  # our own host sent to this key (its requests go first)
    held: deque = field(default_factory=deque)  # (direction, item, arrived_at)


class HoldTable:
    """All pending peer keys of one engine.  Owned by that engine."""

    def __init__(self, max_frames: int, max_age_s: float, retry_s: float, retry_max_s: float,
                 max_pending: int | None = None, requests_per_s: float | None = None,
                 max_held: int | None = None, first=None):
        self.max_frames = max_frames
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.max_pending = max_pending
        self.max_held = max_held
        self.first = first
        self.pending: dict[object, PendingKey] = {}
        #: Items held now, by direction (TX, RX).
        self.held_count = [0, 0]
        self.requests_per_s = requests_per_s
        self._tokens = float(max(1.0, requests_per_s)) if requests_per_s is not None else 0.0
        self._refill_at: float | None = None

    def hold(self, mac, direction: int, item, now: float) -> tuple[str, object] | None:
        """Hold an item.  None: held, nothing left; else (reason, the item that
        left): the oldest one pushed out, or ``item`` itself when it may not
        be held (its key is still requested unless the reason is ``pending_full``)."""
        entry = self.pending.get(mac)
        share = 2 if direction == RX else 1
        if entry is None and mac != self.first and self.max_pending is not None \
                and len(self.pending) >= self.max_pending // share:
            return PENDING_FULL, item
        if entry is not None and len(entry.held) >= self.max_frames > 0:
            pushed = entry.held.popleft()
            self.held_count[pushed[0]] -= 1
        elif self.max_held is not None and (sum(self.held_count) >= self.max_held
                                            or self.held_count[direction] >= self.max_held // share):
            return HOLD_OVERFLOW, item
        else:
            pushed = None
        if entry is None:
            entry = PendingKey(mac, now, now, self.retry_s)
            self.pending[mac] = entry
        if direction == TX:
            entry.tx = True
        if self.max_frames <= 0:
            return HOLD_OVERFLOW, item
        entry.held.append((direction, item, now))
        self.held_count[direction] += 1
        return None if pushed is None else (HOLD_OVERFLOW, pushed[1])

    def take_requests(self, now: float) -> list:
        """Peer keys whose request should be sent now, within the rate limit."""
        rate = self.requests_per_s
        if rate is None:
            return self.due_requests(now)
        if self._refill_at is not None:
            elapsed = max(0.0, now - self._refill_at)
            self._tokens = min(max(1.0, rate), self._tokens + elapsed * rate)
        self._refill_at = now
        due = self.due_requests(now, int(self._tokens), first=self.first)
        self._tokens -= len(due)
        return due

    def due_requests(self, now: float, budget: int | None = None, first=None) -> list:
        """Peer keys whose key request should be sent now (at most ``budget``, ``first``
        and our own destinations before the others, first requests before retries);
        advances their backoff."""
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

    def expire(self, now: float) -> list:
        """Drop items older than the hold age; forget idle entries.  Returns the
        items dropped, oldest of each key first."""
        dropped = []
        limit = now - self.max_age_s
        for mac in list(self.pending):
            entry = self.pending[mac]
            held = entry.held
            while held and held[0][2] <= limit:
                direction, item, _ = held.popleft()
                self.held_count[direction] -= 1
                dropped.append(item)
            if not held and entry.created_at <= limit:
                del self.pending[mac]
        return dropped

    def take(self, mac) -> deque:
        """Remove a key's entry and return its held (direction, item, arrived_at) (may be empty)."""
        entry = self.pending.pop(mac, None)
        if entry is None:
            return deque()
        for direction, _, _ in entry.held:
            self.held_count[direction] -= 1
        return entry.held

    def next_deadline(self) -> float | None:
        deadlines = []
        for entry in self.pending.values():
            deadlines.append(entry.next_request_at)
            deadlines.append((entry.held[0][2] if entry.held else entry.created_at) + self.max_age_s)
        return min(deadlines) if deadlines else None
