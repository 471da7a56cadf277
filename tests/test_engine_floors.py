"""Replay floors in the frame engine (issue 15, High 1): captured frames do not
open again after the receiver restarts, for pair keys and for the multicast key.

Over in-memory engines: a sender A whose packet numbers follow its clock, a
receiver B that saves its floor book every half second (as the agent does)
and restores it after a crash, and an attacker who recorded A's frames.
"""

from __future__ import annotations

import os

from l2crypt.core import engine as E
from l2crypt.core import replay_floor as rf
from l2crypt.core.aead import PN_PER_SECOND
from l2crypt.core.engine import EngineSettings, FrameEngine

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
BCAST = b"\xff" * 6
PAIR_KEY, MCAST_KEY = os.urandom(32), os.urandom(32)
START_PN = 1_700_000_000 * PN_PER_SECOND  # the wall clock's packet number at A's start


def frame(dst, src, i):
    return dst + src + b"\x08\x00" + i.to_bytes(4, "big") * 12


def receiver(book: rf.FloorBook, now: float) -> FrameEngine:
    """B as the agent starts it: the book is loaded and saved before frames come."""
    book.save([], now)
    b = FrameEngine(B, EngineSettings(), pn_start=START_PN + 10**12, floors=book, now0=now)
    b.install_pair_key(A, "a", PAIR_KEY, 1, now, age_s=600)  # the same key and PW_ID come back
    b.install_multicast_key(MCAST_KEY, 1, now)
    return b


def run(a, b, book, t0, t1, captured=None, dst=B):
    """A sends to ``dst`` every 10 ms; both tick every 100 ms; B saves every 500 ms.
    Returns how many frames B opened."""
    opened = 0
    t = t0
    while t < t1:
        if round(t * 100) % 10 == 0:
            a.on_timer(t)
            if round(t * 100) % 50 == 0:
                book.save(b.replay_highest(), t)
            b.on_timer(t)
        sealed = a.seal_from_tap(frame(dst, A, round(t * 100)), t)
        if captured is not None:
            captured.append(sealed)
        opened += b.open_from_wire(sealed, t) is not None
        t = round(t + 0.01, 2)
    return opened


def test_captured_frames_do_not_open_after_the_receiver_restarts():
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN, now0=0.0)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 0.0)
    a.install_multicast_key(MCAST_KEY, 1, 0.0)
    book = rf.FloorBook()
    b = receiver(book, 0.0)
    unicast, group = [], []
    assert run(a, b, book, 0.0, 2.0, unicast) == 200
    assert run(a, b, book, 2.0, 3.37, group, dst=BCAST) == 137
    saved = book.encode()  # kill -9 at 3.37: the last save was at 3.0

    book2 = rf.FloorBook()
    book2.restore(rf.decode(saved), 50.0)  # B's engine clock starts anew
    b2 = receiver(book2, 50.0)
    for sealed in unicast + group:
        assert b2.open_from_wire(sealed, 50.1) is None
    assert b2.drops[E.REPLAYED] == len(unicast) + len(group)
    assert b2.counters["opened"] == 0
    # A never stopped: its frames open again once its clock is past the floor
    # (at most SAVE_INTERVAL_S + MAX_UNSAVED_S + SLACK_S after B's last save).
    lead = rf.SAVE_INTERVAL_S + rf.MAX_UNSAVED_S + rf.SLACK_S + rf.CLOCK_TICK_S
    a_time = 3.0 + lead
    a.on_timer(a_time)
    for dst in (B, BCAST):
        assert b2.open_from_wire(a.seal_from_tap(frame(dst, A, 1), a_time), 50.2) == frame(dst, A, 1)


def test_without_a_floors_file_a_restarted_receiver_would_open_them():
    """The control: the same capture opens in a receiver with no floors (what
    f3b867d did), so the test above is about the floors."""
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN, now0=0.0)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 0.0)
    captured = [a.seal_from_tap(frame(B, A, i), 0.0) for i in range(20)]
    fresh = FrameEngine(B, EngineSettings())
    fresh.install_pair_key(A, "a", PAIR_KEY, 1, 0.0)
    assert all(fresh.open_from_wire(s, 1.0) is not None for s in captured)


def test_frames_are_refused_while_the_floors_are_not_saved():
    book = rf.FloorBook()
    b = FrameEngine(B, EngineSettings(), floors=book, now0=0.0)  # never saved: stale
    b.install_pair_key(A, "a", PAIR_KEY, 1, 0.0)
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 0.0)
    assert b.open_from_wire(a.seal_from_tap(frame(B, A, 1), 0.0), 0.0) is None
    assert b.drops[E.FLOORS_UNSAVED] == 1
    book.save(b.replay_highest(), 0.1)
    b.on_timer(0.1)  # the engine takes the new deadline at its tick
    assert b.open_from_wire(a.seal_from_tap(frame(B, A, 2), 0.1), 0.1) is not None
    # No save for too long (a failing disk, or a loop that did not tick): refused
    # from the deadline on, whether or not a tick came in between.
    late = 0.1 + rf.MAX_UNSAVED_S + 0.01
    assert b.open_from_wire(a.seal_from_tap(frame(B, A, 3), late), late) is None
    assert b.drops[E.FLOORS_UNSAVED] == 2


def test_a_window_dropped_and_taken_again_in_the_same_run_keeps_its_floor():
    """The MAC moves to another host and back (a key under another peer ID
    replaces the peer): the old key's frames do not open again."""
    book = rf.FloorBook()
    b = receiver(book, 0.0)
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN, now0=0.0)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 0.0)
    old = [a.seal_from_tap(frame(B, A, i), 0.0) for i in range(5)]
    assert all(b.open_from_wire(s, 0.0) for s in old)
    b.install_pair_key(A, "intruder", os.urandom(32), 9, 0.1)
    b.install_pair_key(A, "a", PAIR_KEY, 1, 0.2, age_s=600)
    assert all(b.open_from_wire(s, 0.3) is None for s in old)
    assert b.drops[E.REPLAYED] == len(old)
    assert b.open_from_wire(a.seal_from_tap(frame(B, A, 9), 0.3), 0.3) is not None


def test_the_sender_follows_its_clock_and_stops_at_the_reserved_number():
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN, now0=10.0)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 10.0)
    a.on_timer(12.5)
    assert a.send_pn == START_PN + int(2.5 * PN_PER_SECOND)
    a.pn_limit = a.send_pn + 1
    assert a.seal_from_tap(frame(B, A, 1), 12.5) and a.seal_from_tap(frame(B, A, 2), 12.5)
    assert a.seal_from_tap(frame(B, A, 3), 12.5) is None
    assert a.drops[E.PN_UNRESERVED] == 1


def test_replay_highest_names_every_window():
    book = rf.FloorBook()
    b = receiver(book, 0.0)
    a = FrameEngine(A, EngineSettings(), pn_start=START_PN)
    a.install_pair_key(B, "b", PAIR_KEY, 1, 0.0)
    a.install_multicast_key(MCAST_KEY, 1, 0.0)
    b.open_from_wire(a.seal_from_tap(frame(B, A, 1), 0.0), 0.0)
    b.open_from_wire(a.seal_from_tap(frame(BCAST, A, 2), 0.0), 0.0)
    assert sorted(b.replay_highest()) == [(A, START_PN), (A, START_PN + 1)]
