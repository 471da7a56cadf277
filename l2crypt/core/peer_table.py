"""One peer table: the key versions of every peer of one engine, written once.

The layer-2 engine (peers by MAC), the layer-3 engine (by host ID) and the
gateway tunnel (by link) each hold, per peer, a ``KeyRing`` of versions
(make before break, see ``key_ring``) and send with one packet counter.
What they do with those rings is the same, and lives here, keyed by an
opaque *peer key* (MAC bytes, host ID, link name); what a frame looks like
on the wire stays in each engine.

1. Settings: ``PeerSettings`` holds the fields every engine shares
   (``EngineSettings`` and ``L3Settings`` extend it; the tunnel makes one).
2. Installing: ``offer`` (one version pushed by the server; a pending next
   is promoted first, and the version it pushes out leaves its floor) and
   ``merge`` (several versions with their ages, ``KeyRing.merge``); both put
   the ring on the draining list when it holds a next or previous version.
3. The send step (``send``, once per frame): promote ``next`` once its switch
   is due, take the next packet number (``take_pn``: one counter for every
   key, never above ``pn_limit``), count the frame under the version, and
   after ``rekey_after_frames`` frames queue one ``rekey`` notice.
4. The ring update after a decrypt (``opened``, once the window has moved):
   a frame under ``next`` shows the peer holds it (promote); a frame under
   an older version once the peer should have switched is a lag report.
5. Lag reports (``report_lag``, also on a frame under a version too old to
   hold): at most one per peer every ``report_interval_s`` (``inf``: never).
6. Notices: (``rekey`` or ``report``, peer key, PW_ID) for the key server,
   taken with ``take_notices``.
7. Draining (``on_timer``, every tick): a due ``next`` is promoted, a
   ``previous`` past its retire time is dropped; ``next_deadline`` says when
   that is next due.  ``follow_clock`` keeps the packet counter on the clock
   (``replay_floor.raise_to_clock``).
8. Floors: every version dropped on the way (promotion, retirement,
   forgetting a peer) hands its windows' highest numbers to the floor book
   (``note``), under ``sender_name(peer key)``; ``highest`` is what a save
   takes.

Sans-I/O: no socket, file or clock.  A table is owned by its engine; nothing
in it is shared between threads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

from . import aead, constants as C
from .constants import MAX_PACKET_NUMBER
from .key_ring import KeyRing
from .replay_floor import FloorBook, raise_to_clock

#: Notice kinds (what the key server is told).
REKEY = "rekey"
REPORT = "report"

# What ``send`` answers instead of (slot, packet number).
NO_KEY = "no_key"
PN_EXHAUSTED = "pn_exhausted"
PN_UNRESERVED = "pn_unreserved"

Key = TypeVar("Key", bound=Hashable)
Peer = TypeVar("Peer")


@dataclass(frozen=True)
class PeerSettings:
    """What every engine's key handling shares.  Units are in the names."""

    cipher: str = aead.AES_256_GCM
    replay_window_frames: int = C.DEFAULT_REPLAY_WINDOW_FRAMES
    hold_frames: int = C.DEFAULT_HOLD_FRAMES                  # per pending peer key
    hold_age_s: float = C.DEFAULT_HOLD_AGE_S
    key_retry_s: float = C.DEFAULT_KEY_RETRY_S
    key_retry_max_s: float = C.DEFAULT_KEY_RETRY_MAX_S
    unknown_cache_s: float = C.DEFAULT_UNKNOWN_CACHE_S
    switch_after_s: float = C.DEFAULT_SWITCH_AFTER_S
    retire_after_s: float = C.DEFAULT_RETIRE_AFTER_S
    rekey_after_frames: int = C.DEFAULT_REKEY_AFTER_FRAMES
    report_interval_s: float = 1.0                            # inf: no lag reports
    max_pending_keys: int = C.DEFAULT_MAX_PENDING_KEYS        # peer keys waiting for a key at once
    key_requests_per_s: float = C.DEFAULT_KEY_REQUESTS_PER_S


class PeerTable(Generic[Key, Peer]):
    """The peers of one engine by peer key, their key rings, the packet
    counter and the notices (see the module docstring).

    A peer is any object with a ``keys`` attribute (its ``KeyRing``); the
    engine makes it and puts it in ``peers``.  Rings that are not peers (the
    multicast key) go through the same calls under a key of their own.
    """

    def __init__(self, settings: PeerSettings, pn_start: int = 1, now0: float | None = None,
                 floors: FloorBook | None = None, sender_name: Callable[[Key], bytes] | None = None,
                 counters: Counter | None = None):
        self.settings = settings
        self.switch_after_s = settings.switch_after_s
        self.retire_after_s = settings.retire_after_s
        self.rekey_after_frames = settings.rekey_after_frames
        self.peers: dict[Key, Peer] = {}
        #: Rings holding a next or previous version: ``on_timer`` walks only these.
        self.draining: dict[Key, KeyRing] = {}
        self.notices: list[tuple[str, Key, int]] = []
        self.reported_at: dict[Key, float] = {}  # last lag report per peer
        #: The next packet number: one counter for every key the engine sends
        #: with, so (sender, packet number) never repeats; ``follow_clock``
        #: keeps it up with the clock.
        self.send_pn = pn_start
        #: The highest number sealing may use (what the packet clock reserved on disk).
        self.pn_limit = MAX_PACKET_NUMBER
        self._pn_base, self._pn_base_now = pn_start, now0  # None: the first follow_clock
        #: Replay floors (None: windows start empty, nothing is noted).
        self.floors = floors
        self.sender_name = sender_name
        #: The engine's counters (``rekey_requests``, ``lag_reports``).
        self.counters = counters if counters is not None else Counter()

    # ------------------------------------------------------------ installing

    def offer(self, key: Key, ring: KeyRing, slot, now: float) -> bool:
        """One version pushed by the key server; True if it is new to ``ring``.
        A pending next is promoted first (the server pushed it to both ends
        before this one) and the version that pushes out leaves its floor."""
        if slot.pw_id <= ring.newest_pw_id():
            return False
        self.note(key, ring.promote(now, self.retire_after_s))
        ring.offer(slot, now, self.retire_after_s)
        self.watch(key, ring)
        return True

    def merge(self, key: Key, ring: KeyRing, offered, now: float) -> bool:
        """Versions from the key server, (slot, made_at) pairs (``KeyRing.merge``);
        True if one new to ``ring`` was taken."""
        taken, dropped = ring.merge(offered, now, self.switch_after_s, self.retire_after_s)
        self.note(key, dropped)
        self.watch(key, ring)
        return taken

    def watch(self, key: Key, ring: KeyRing) -> None:
        """Put ``ring`` on the draining list if it holds a next or previous version."""
        if ring.next is not None or ring.previous is not None:
            self.draining[key] = ring

    # -------------------------------------------------------------- sending

    def send(self, key: Key, ring: KeyRing, now: float, rekey: bool = True):
        """The send step of one frame: (slot, packet number), or the reason it
        cannot be sent (``no_key``, ``pn_exhausted``, ``pn_unreserved``).
        ``rekey``: count toward the data-volume rekey notice."""
        if ring.next is not None and now - ring.next_since >= self.switch_after_s:
            self.note(key, ring.promote(now, self.retire_after_s))
        slot = ring.current
        if slot is None:
            return NO_KEY
        pn = self.send_pn
        if pn > self.pn_limit:
            return PN_EXHAUSTED if pn > MAX_PACKET_NUMBER else PN_UNRESERVED
        self.send_pn = pn + 1
        slot.frames_sealed += 1
        if rekey and slot.frames_sealed >= self.rekey_after_frames and not slot.rekey_asked:
            slot.rekey_asked = True
            self.notices.append((REKEY, key, slot.pw_id))
        return slot, pn

    def take_pn(self) -> int | None:
        """The next packet number for a packet under no ring's step (a keepalive); None: none left."""
        pn = self.send_pn
        if pn > self.pn_limit:
            return None
        self.send_pn = pn + 1
        return pn

    def follow_clock(self, now: float) -> None:
        """Raise the packet counter to the clock (call every tick)."""
        if self._pn_base_now is None:
            self._pn_base, self._pn_base_now = self.send_pn, now
        else:
            self.send_pn = raise_to_clock(self.send_pn, self._pn_base, self._pn_base_now, now)

    # ------------------------------------------------------------ receiving

    def opened(self, key: Key, ring: KeyRing, slot, now: float) -> None:
        """A frame under ``slot`` of ``ring`` verified (its window moved)."""
        if slot is ring.current:
            return
        if slot is ring.next:
            self.note(key, ring.peer_used(slot.pw_id, now, self.retire_after_s))
            self.draining[key] = ring
        elif now - ring.current.created_at >= self.switch_after_s:
            self.report_lag(key, ring, now)  # the peer still sends with an old version (race b)

    def report_lag(self, key: Key, ring: KeyRing, now: float) -> None:
        """The peer sends under an older version than it should: tell the
        server our newest, at most once per ``report_interval_s``."""
        if now - self.reported_at.get(key, -1e18) >= self.settings.report_interval_s:
            self.reported_at[key] = now
            self.notices.append((REPORT, key, ring.newest_pw_id()))

    def take_notices(self) -> list[tuple[str, Key, int]]:
        """Rekey requests and lag reports for the key server, oldest first."""
        notices, self.notices = self.notices, []
        for kind, _, _ in notices:
            self.counters["rekey_requests" if kind == REKEY else "lag_reports"] += 1
        return notices

    # ------------------------------------------------------------- draining

    def on_timer(self, now: float) -> None:
        """Switch the versions that are due and retire the old ones."""
        if not self.draining:
            return
        for key, ring in list(self.draining.items()):
            if ring.next is not None and now - ring.next_since >= self.switch_after_s:
                self.note(key, ring.promote(now, self.retire_after_s))
            self.note(key, ring.expire(now))
            if ring.next is None and ring.previous is None:
                del self.draining[key]

    def next_deadline(self) -> float | None:
        """When ``on_timer`` next has a version to switch or retire."""
        deadlines = []
        for ring in self.draining.values():
            if ring.next is not None:
                deadlines.append(ring.next_since + self.switch_after_s)
            if ring.previous is not None:
                deadlines.append(ring.previous_until)
        return min(deadlines) if deadlines else None

    def forget(self, key: Key) -> Peer | None:
        """Drop a peer and its versions (their floors are kept); returns it."""
        peer = self.peers.pop(key, None)
        if peer is not None:
            self.note(key, peer.keys.slots())
        self.draining.pop(key, None)
        self.reported_at.pop(key, None)
        return peer

    def forget_all(self) -> None:
        """Drop every peer (a cipher change); the floors stay."""
        for key in list(self.peers):
            self.forget(key)
        self.draining.clear()

    # --------------------------------------------------------------- floors

    def note(self, key: Key, dropped) -> None:
        """Keep the floors of windows being dropped (a slot, a list of them, or None)."""
        if dropped is None or self.floors is None:
            return
        name = key if self.sender_name is None else self.sender_name(key)
        for slot in dropped if isinstance(dropped, list) else (dropped,):
            for sender, highest in slot.windows(name):
                if highest >= 0:
                    self.floors.note(sender, highest)

    def highest(self) -> list[tuple[bytes, int]]:
        """(sender, highest packet number verified) of every peer's windows, for
        ``FloorBook.save`` (several windows of one sender may appear)."""
        name = self.sender_name
        return [(key if name is None else name(key), slot.replay.highest)
                for key, peer in self.peers.items() for slot in peer.keys.slots()
                if slot.replay.highest >= 0]


def _table_field(name: str, doc: str) -> property:
    """An engine attribute that is its table's ``name`` (read and written)."""
    return property(lambda self: getattr(self.table, name),
                    lambda self, value: setattr(self.table, name, value), doc=doc)


class TableOwner:
    """What an engine shows of its ``PeerTable`` (``self.table``) as its own
    attributes: the packet counter, its limit and the notices."""

    table: PeerTable
    send_pn = _table_field("send_pn", "The next packet number (``PeerTable.send_pn``).")
    pn_limit = _table_field("pn_limit", "The highest packet number sealing may use (set by the daemon's clock).")

    @property
    def notices(self) -> list:
        """Notices not taken yet (``take_notices``)."""
        return self.table.notices

    def take_notices(self) -> list:
        """Rekey requests and lag reports for the key server, oldest first."""
        return self.table.take_notices()
