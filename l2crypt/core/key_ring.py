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
* ``merge`` takes several versions at once, each with the time the server
  made it (a restarted agent gets every version still live; a host that
  missed rotations gets the ones in between).  It places them the way the
  peer, which saw every push, holds them: current is the newest version at
  least ``switch_after_s`` old (the peer has switched to it by then) or a
  newer one this ring already sends with; a younger one is next, with its
  switch due ``switch_after_s`` after it was made; the version below current
  is previous, kept until the peer retires it at the latest (never chosen for
  sending).  Versions this ring holds keep their slots (and replay windows).
* ``promote``, ``expire`` and ``merge`` hand back the slots they drop, so the
  owner can keep their replay floors (``replay_floor.FloorBook.note``).

Slots are any object with ``pw_id``.  A ring is owned by its PeerState (or by
the engine, for the multicast key).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .constants import DEFAULT_RETIRE_AFTER_S

Slot = TypeVar("Slot")


class KeyRing(Generic[Slot]):
    """The versions of one key: ``current``, the ``next`` one being introduced and the
    ``previous`` one being retired (see the module docstring)."""
    __slots__ = ("current", "next", "previous", "next_since", "previous_until")

    def __init__(self, current: Slot | None = None):
        self.current = current
        self.next: Slot | None = None
        self.previous: Slot | None = None
        self.next_since = 0.0
        self.previous_until = 0.0

    def slots(self):
        """Every version held (previous, current, next; those present)."""
        return [s for s in (self.previous, self.current, self.next) if s is not None]

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

    def promote(self, now: float, retire_after_s: float) -> Slot | None:
        """Start sending with ``next``; keep the old current until the retire time.
        Returns the previous version it pushed out, if any."""
        if self.next is None:
            return None
        dropped = self.previous
        self.previous = self.current
        self.previous_until = now + retire_after_s
        self.current = self.next
        self.next = None
        return dropped

    def peer_used(self, pw_id: int, now: float, retire_after_s: float) -> Slot | None:
        """A frame sealed with ``pw_id`` verified: the peer holds it.  Returns
        the slot a promotion pushed out, if any."""
        if self.next is not None and self.next.pw_id == pw_id:
            return self.promote(now, retire_after_s)
        return None

    def expire(self, now: float) -> Slot | None:
        """Drop the previous version once its time is up; returns it (None if none was)."""
        if self.previous is not None and now >= self.previous_until:
            dropped, self.previous = self.previous, None
            return dropped
        return None

    def drop_made_by(self, made_by: float) -> list:
        """Drop every version whose ``created_at`` is at or before ``made_by`` (the
        maximum key lifetime); a younger next becomes current.  Returns the
        dropped slots; ``current`` is None if nothing young is left."""
        dropped = [s for s in self.slots() if s.created_at <= made_by]
        if not dropped:
            return []
        if self.previous in dropped:
            self.previous = None
        if self.current in dropped:
            self.current, self.next = self.next, None
        if self.next in dropped:
            self.next = None
        return dropped

    def merge(self, offered, now: float, switch_after_s: float,
              retire_after_s: float = DEFAULT_RETIRE_AFTER_S) -> tuple[bool, list]:
        """Take versions from the key server: ``offered`` is (slot, made_at) pairs,
        ``made_at`` the time the server made that version (``now`` minus its age).
        Returns (a version new to this ring was taken, the held slots dropped)."""
        held = {s.pw_id: s for s in self.slots()}
        made: dict[int, float] = {}
        fresh: dict[int, Slot] = {}
        for slot, made_at in offered:
            if slot.pw_id not in held and slot.pw_id not in fresh:
                fresh[slot.pw_id] = slot
                made[slot.pw_id] = min(made_at, now)
        if not fresh:
            return False, []
        every = {**held, **fresh}
        old_current = self.current.pw_id if self.current is not None else 0
        aged = [pw for pw, t in made.items() if now - t >= switch_after_s]
        if old_current or aged:
            target = max([old_current] + aged)
        else:
            target = min(every)  # a new ring, every version young: the peer still sends the oldest
        newer = sorted(pw for pw in every if pw > target)
        if len(newer) >= 2:  # rotations closer than the switch delay: the peer promoted the one before
            target, newer = newer[-2], newer[-1:]
        older = [pw for pw in every if pw < target]
        prev_pw = max(older) if older else None
        if prev_pw is None:
            until = 0.0
        elif prev_pw in held and self.previous is not None and prev_pw == self.previous.pw_id \
                and target == old_current:
            until = self.previous_until
        elif prev_pw == old_current:
            until = now + retire_after_s  # this ring sent with it until now
        else:
            switched = made.get(target, now)
            until = switched + switch_after_s + retire_after_s
            if until <= now:
                prev_pw = None  # the peer has retired it
        next_pw = newer[0] if newer else None
        if next_pw is None:
            since = 0.0
        elif self.next is not None and next_pw == self.next.pw_id:
            since = self.next_since
        else:
            since = made.get(next_pw, now)
        keep = {target, prev_pw, next_pw}
        dropped = [s for pw, s in held.items() if pw not in keep]
        self.current = every[target]
        self.next = every[next_pw] if next_pw is not None else None
        self.next_since = since
        self.previous = every[prev_pw] if prev_pw is not None else None
        self.previous_until = until
        return any(pw in fresh for pw in keep if pw is not None), dropped
