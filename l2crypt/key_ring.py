"""Make before break: the versions (PW_ID) of one key that a host holds at once.

A ring holds up to three versions of a pair key (or of the multicast key)::

                 offer(newer)                  peer used it, or
    [current] ---------------> [current, next] ---switch delay passed---+
        ^                                                                |
        |   retire time passed                                           v
        +----------------------------------- [previous, current] <- promote()

* Receiving accepts every version held (``lookup``), so frames sealed just
  before or just after a change still open.
* Sending uses ``current``.  A ``next`` version becomes current once the peer
  has been seen using it (``peer_used``), or after ``switch_after_s`` — the
  server pushed it to both ends at the same time, so the peer holds it by then.
* The previous version is dropped, key material and all, ``retire_after_s``
  after the switch (``expire``).
* ``offer`` ignores a version not newer than every version held, so repeated or
  stale answers never reset a packet counter under a live key.
* A newer version offered while ``next`` is still pending first promotes
  ``next``: the server pushed it to both ends before the newer one, so the
  peer may already send with it, and it must stay open (rotations closer
  together than the switch delay would otherwise lose frames).

Slots are any object with ``pw_id``.  A ring is owned by its PeerState (or by
the engine, for the multicast key).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .constants import DEFAULT_RETIRE_AFTER_S

Slot = TypeVar("Slot")


class KeyRing(Generic[Slot]):
    __slots__ = ("current", "next", "previous", "next_since", "previous_until")

    def __init__(self, current: Slot | None = None):
        self.current = current
        self.next: Slot | None = None
        self.previous: Slot | None = None
        self.next_since = 0.0
        self.previous_until = 0.0

    def newest_pw_id(self) -> int:
        slot = self.next or self.current
        return slot.pw_id if slot is not None else 0

    def lookup(self, pw_id: int) -> Slot | None:
        for slot in (self.current, self.next, self.previous):
            if slot is not None and slot.pw_id == pw_id:
                return slot
        return None

    def offer(self, slot: Slot, now: float, retire_after_s: float = DEFAULT_RETIRE_AFTER_S) -> bool:
        """Take a version from the key server.  True if it is new to this ring."""
        if slot.pw_id <= self.newest_pw_id():
            return False
        if self.current is None:
            self.current = slot
        else:
            self.promote(now, retire_after_s)  # a pending next is older: it becomes current
            self.next = slot
            self.next_since = now
        return True

    def due_switch(self, now: float, switch_after_s: float) -> bool:
        return self.next is not None and now - self.next_since >= switch_after_s

    def promote(self, now: float, retire_after_s: float) -> None:
        """Start sending with ``next``; keep the old current until the retire time."""
        if self.next is None:
            return
        self.previous = self.current
        self.previous_until = now + retire_after_s
        self.current = self.next
        self.next = None

    def peer_used(self, pw_id: int, now: float, retire_after_s: float) -> None:
        """A frame sealed with ``pw_id`` verified: the peer holds it."""
        if self.next is not None and self.next.pw_id == pw_id:
            self.promote(now, retire_after_s)

    def expire(self, now: float) -> bool:
        """Drop the previous version once its time is up.  True if one was dropped."""
        if self.previous is not None and now >= self.previous_until:
            self.previous = None
            return True
        return False
