"""Replay floors: the part of a receiver's replay state that outlives a restart.

Replay windows live in memory.  When a receiver restarts and a key comes
back with the same key bytes and PW_ID, a fresh window would accept every
frame recorded under that key once more.  Floors close that hole without a
write per frame:

1. **Senders' packet numbers follow their clock.**  A sender's counter is
   never below ``clock_pn(pn_base, base_now, now)``: the engine raises it to
   that value at every timer tick (``raise_to_clock``).  So a sender's
   packet number at real time ``t`` is at most the number it used at ``t0``
   plus ``(t - t0 + CLOCK_TICK_S) * PN_PER_SECOND`` (a sender cannot send
   2**30 frames a second).
2. **The receiver saves an estimate of every sender's clock.**  Every
   ``SAVE_INTERVAL_S`` the receiver hands ``FloorBook.save`` the highest
   packet number verified from each sender (read from its replay windows,
   nothing per frame).  For each sender the book keeps an upper bound of
   that sender's packet number *at the moment of the save*: the highest
   number plus ``PN_PER_SECOND`` for every second since it may have been
   verified (the previous save, if the highest number moved since then).
   ``encode()`` is what the receiver writes to its state directory.
   A frame that waited for its key (held) is older than its arrival: the
   receiver says so with ``late(sender, seconds)`` and the bound grows by
   that much.  A window dropped between two saves (key retired, peer
   revoked) hands its highest number to ``note``, which the next save counts.
3. **The receiver refuses frames once it has not saved for**
   ``MAX_UNSAVED_S`` (``stale``): a failing disk must not let it accept
   numbers that no saved bound covers.
4. **After a restart,** ``FloorBook.restore(decode(data), now)`` sets each
   sender's floor to the saved bound plus ``MAX_UNSAVED_S + SLACK_S``
   seconds of packet numbers: above every number the receiver could have
   accepted, since it accepted nothing more than ``MAX_UNSAVED_S`` after its
   last save (and ``SLACK_S`` covers the sender's tick, the receiver's tick
   and the frame's transit).
   After a clean stop the last save is made once no frame can be accepted
   any more (``encode(stopped=True)``): its bounds are floors already, and
   the restart adds no lead, so a ``systemctl restart`` costs no frame.
5. **Every new replay window for a sender starts at** ``floor(sender)``
   (``ReplayWindow(window_frames, floor=...)``): numbers at or below it are
   refused as replayed, under whatever key they come.  A sender's genuine
   frames pass again once its clock has moved past the floor, at most
   ``SAVE_INTERVAL_S + MAX_UNSAVED_S + SLACK_S`` after the receiver's last
   save (2 s with the defaults): about what a restart takes anyway.

Senders are named by bytes: a MAC (layer 2), a tunnel sender tag, or a host
ID encoded as UTF-8 (layer 3).  A sender has one packet counter for all its
keys, so one floor per sender covers its pair keys and the multicast key.

Limits: a sender whose wall clock stepped back while it was down restarts
its counter from its packet-clock file (``packet_clock``), which may leave
it below a receiver's estimate for the size of the step; its frames are then
refused (counted as replayed) until its clock catches up.

This module is sans-I/O: the caller reads and writes the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from .aead import PN_PER_SECOND

#: A sender raises its counter to its clock at least this often (seconds).
CLOCK_TICK_S = 0.1
#: How often a receiver saves its floors (seconds).  Tuning.
SAVE_INTERVAL_S = 0.5
#: Sender timer tick (at most this long between ``raise_to_clock`` calls), the
#: receiver's tick (it checks ``stale`` once per tick), frame transit, and
#: margin, in seconds.  Frames held for their key are covered by ``late``.  Tuning.
SLACK_S = 0.5
#: A receiver that has not saved for this long must refuse frames (``stale``):
#: one save may be late by a whole interval.
MAX_UNSAVED_S = 2 * SAVE_INTERVAL_S
#: Senders unseen for this long are forgotten: every key they could have
#: used has expired by then (keys have a maximum lifetime at the agent).
FORGET_AFTER_S = 7 * 86400.0

FORMAT_VERSION = 1
#: Floors stay below the largest packet number (the file keeps bounds < 2**64).
MAX_FLOOR = 2**64 - 2


def clock_pn(pn_base: int, base_now: float, now: float) -> int:
    """The packet number a sender's clock has reached at engine time ``now``
    (``pn_base`` was its first packet number, at engine time ``base_now``)."""
    return pn_base + int(max(0.0, now - base_now) * PN_PER_SECOND)


def raise_to_clock(send_pn: int, pn_base: int, base_now: float, now: float) -> int:
    """A sender's next packet number, raised to its clock if it lags behind.
    Call at every timer tick (at most ``CLOCK_TICK_S`` apart)."""
    clock = clock_pn(pn_base, base_now, now)
    return clock if clock > send_pn else send_pn


@dataclass(slots=True)
class _Entry:
    """The book's record of one (sender, key): the highest number verified and the bound on the
    sender's clock."""
    highest: int      # highest packet number verified (or the restored floor)
    bound: int        # upper bound of the sender's packet number at ``bound_at``
    bound_at: float   # engine time of that bound
    seen_at: float    # engine time the highest number last moved (or of the restore)
    grows: bool = True  # False for a restored sender not heard from since


class FloorBook:
    """Per-sender floors of one receiver.  Owned by its engine (or shared by the
    engines of one daemon, since a sender has one counter); see the module docstring."""

    def __init__(self, save_interval_s: float = SAVE_INTERVAL_S, slack_s: float = SLACK_S,
                 forget_after_s: float = FORGET_AFTER_S):
        self.save_interval_s = save_interval_s
        self.slack_s = slack_s
        self.forget_after_s = forget_after_s
        #: Refuse frames when the last save is older than this (seconds).
        self.max_unsaved_s = 2 * save_interval_s
        self._entries: dict[bytes, _Entry] = {}
        self._floors: dict[bytes, int] = {}  # restored or noted floors, for new windows
        self._noted: dict[bytes, int] = {}   # highest of windows dropped since the last save
        self._late: dict[bytes, float] = {}  # seconds a verified frame waited, since the last save
        self.saved_at: float | None = None

    # -- while running ---------------------------------------------------------

    def floor(self, sender: bytes) -> int:
        """The number at or below which ``sender``'s frames are refused in a new
        window (0: no floor)."""
        return self._floors.get(sender, 0)

    def note(self, sender: bytes, highest: int) -> None:
        """A window of ``sender`` is dropped (key retired, peer forgotten): a
        later window for it starts above ``highest``, and the next save counts it."""
        if highest > self._floors.get(sender, 0):
            self._floors[sender] = highest
        if highest > self._noted.get(sender, -1):
            self._noted[sender] = highest

    def late(self, sender: bytes, seconds: float) -> None:
        """A frame of ``sender`` verified ``seconds`` after it arrived (it was
        held for its key): the sender's clock is that much further than its
        number, and the next save's bound says so."""
        if seconds > self._late.get(sender, 0.0):
            self._late[sender] = seconds

    def save(self, highest: Iterable[tuple[bytes, int]], now: float) -> None:
        """Take the highest verified packet number per sender (several windows
        of one sender may appear; the largest counts).  Call every
        ``save_interval_s``, then write ``encode()``."""
        previous = self.saved_at
        merged, self._noted = self._noted, {}
        late, self._late = self._late, {}
        for sender, pn in highest:
            if pn > merged.get(sender, -1):
                merged[sender] = pn
        entries = self._entries
        for sender, pn in merged.items():
            entry = entries.get(sender)
            if entry is None or pn > entry.highest:
                # Verified after the previous save at the earliest (or now, for the
                # first save), and sent up to ``late`` before it was verified.
                seen = previous if previous is not None else now
                entries[sender] = _Entry(pn, pn + _pn(now - seen + late.get(sender, 0.0)), now, now)
        for sender, entry in list(entries.items()):
            if now - entry.seen_at > self.forget_after_s:
                del entries[sender]
                self._floors.pop(sender, None)
                continue
            if entry.grows and entry.bound_at != now:
                entry.bound += _pn(now - entry.bound_at)
                entry.bound_at = now
        self.saved_at = now

    def stale(self, now: float) -> bool:
        """True when the floors were not saved for ``max_unsaved_s``: the
        receiver must refuse frames until a save succeeds (fail closed)."""
        return self.saved_at is None or now - self.saved_at > self.max_unsaved_s

    # -- across a restart ------------------------------------------------------

    def encode(self, stopped: bool = False) -> bytes:
        """The saved bounds, for the receiver's state directory.  ``stopped``: the
        receiver accepts no frame any more (a clean stop): the bounds written are
        floors as they are (a restored floor counts, not only its bound)."""
        if stopped:
            bounds = {s.hex(): min(max(e.bound, e.highest), MAX_FLOOR) for s, e in sorted(self._entries.items())}
        else:
            bounds = {s.hex(): min(e.bound, MAX_FLOOR) for s, e in sorted(self._entries.items())}
        doc: dict = {"version": FORMAT_VERSION, "bounds": bounds}
        if stopped:
            doc["stopped"] = True
        return json.dumps(doc, separators=(",", ":")).encode()

    def restore(self, bounds: dict[bytes, int], now: float, stopped: bool = False) -> None:
        """Floors after a restart, from ``decode(file bytes)`` (``decode_file``
        also says whether the previous life stopped cleanly: no lead then)."""
        lead = 0 if stopped else _pn(self.max_unsaved_s + self.slack_s)
        for sender, bound in bounds.items():
            floor = min(bound + lead, MAX_FLOOR)
            self._floors[sender] = max(floor, self._floors.get(sender, 0))
            # Saved again unchanged until the sender is heard from: nothing of it
            # is accepted below the floor meanwhile, so the bound need not grow
            # (and repeated restarts do not push the floor ahead of its clock).
            self._entries[sender] = _Entry(floor, bound, now, now, grows=False)

    def __len__(self) -> int:
        return len(self._entries)


def decode(data: bytes) -> dict[bytes, int]:
    """Saved bounds from a floors file; ValueError with the reason if it is not one."""
    return decode_file(data)[0]


def decode_file(data: bytes) -> tuple[dict[bytes, int], bool]:
    """(saved bounds, written at a clean stop) from a floors file; ValueError
    with the reason if it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a replay floors file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("bounds"), dict):
        raise ValueError("not a replay floors file (version or bounds missing)")
    out: dict[bytes, int] = {}
    for key, value in doc["bounds"].items():
        try:
            sender = bytes.fromhex(key)
        except ValueError:
            raise ValueError(f"bad sender {key!r} in replay floors file") from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
            raise ValueError(f"bad floor for sender {key} in replay floors file")
        out[sender] = value
    stopped = doc.get("stopped", False)
    if not isinstance(stopped, bool):
        raise ValueError("bad 'stopped' in replay floors file")
    return out, stopped


def _pn(seconds: float) -> int:
    return int(max(0.0, seconds) * PN_PER_SECOND) + 1
