"""Replay floors (l2crypt/core/replay_floor.py): a receiver's replay state across its restart.

The scenario of each test is the one the module docstring describes: a
sender whose packet numbers follow its clock, a receiver that saves its
floors every half second, a crash, and a restart.
"""

from __future__ import annotations

import pytest

from l2crypt.core import replay_floor as rf
from l2crypt.core.aead import PN_PER_SECOND
from l2crypt.core.replay import ReplayWindow

S1, S2 = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"


class Sender:
    """A sender with a clock-following counter (what the engines do)."""

    def __init__(self, pn_base: int, now: float):
        self.base, self.base_now, self.pn = pn_base, now, pn_base

    def tick(self, now: float) -> None:
        self.pn = rf.raise_to_clock(self.pn, self.base, self.base_now, now)

    def send(self) -> int:
        pn, self.pn = self.pn, self.pn + 1
        return pn


def test_window_with_a_floor_refuses_everything_up_to_it_and_accepts_above():
    w = ReplayWindow(2048, floor=10_000)
    for pn in (1, 9_000, 9_999, 10_000):
        assert not w.check(pn)
    assert w.check(10_001) and w.update(10_001)
    # A reordered number between the floor and the highest was never received: it passes once.
    assert w.update(10_005) and w.check(10_003) and w.update(10_003) and not w.check(10_003)
    assert not w.check(10_000)


@pytest.mark.parametrize("floor", [1, 63, 64, 65, 127, 128, 2**40 + 17])
def test_floor_on_every_bit_position(floor):
    w = ReplayWindow(256, floor=floor)
    assert not w.check(floor) and not w.check(max(0, floor - 1))
    assert w.check(floor + 1)
    assert w.update(floor + 2) and w.check(floor + 1) and w.update(floor + 1)


def test_clock_pn_follows_the_clock_and_never_goes_back():
    s = Sender(5 * PN_PER_SECOND, now=100.0)
    s.send()
    s.tick(100.5)
    assert s.pn == 5 * PN_PER_SECOND + PN_PER_SECOND // 2
    s.pn += 10**9  # a sender far ahead of its clock keeps its number
    before = s.pn
    s.tick(100.6)
    assert s.pn == before


def _life(book: rf.FloorBook, sender: Sender, start: float, seconds: float, accepted: list[int]) -> float:
    """Frames every 10 ms, ticks every 100 ms, saves every 500 ms; returns the end time."""
    t = start
    next_save = start
    window_top = max(accepted, default=-1)
    while t < start + seconds:
        if round((t - start) * 1000) % 100 == 0:
            sender.tick(t)
        pn = sender.send()
        accepted.append(pn)
        window_top = max(window_top, pn)
        if t >= next_save:
            book.save([(S1, window_top)], t)
            next_save = t + rf.SAVE_INTERVAL_S
        t = round(t + 0.01, 3)
    return t


def test_after_a_crash_between_saves_no_accepted_number_passes_the_floor():
    sender = Sender(1_000 * PN_PER_SECOND, now=0.0)
    book = rf.FloorBook()
    accepted: list[int] = []
    end = _life(book, sender, 0.0, 3.37, accepted)  # the crash: just before the next save
    saved = rf.decode(book.encode())
    # The receiver comes back (its engine clock starts anew).
    book2 = rf.FloorBook()
    book2.restore(saved, now=0.0)
    floor = book2.floor(S1)
    assert floor >= max(accepted), "a frame accepted before the crash would open again"
    # Genuine frames the sender sends once the floor's lead has passed are above it.
    last_save = book.saved_at
    assert end - last_save < rf.SAVE_INTERVAL_S
    sender.tick(last_save + rf.SAVE_INTERVAL_S + rf.MAX_UNSAVED_S + rf.SLACK_S + rf.CLOCK_TICK_S)
    assert sender.send() > floor
    assert book2.floor(S2) == 0


def test_a_silent_sender_keeps_a_growing_bound_and_a_restored_one_does_not_drift():
    book = rf.FloorBook()
    book.save([(S1, 1_000)], now=10.0)
    book.save([], now=70.0)  # S1 silent for a minute: its clock ran on
    bound = rf.decode(book.encode())[S1]
    assert bound >= 1_000 + 60 * PN_PER_SECOND
    # Restart twice without hearing from S1: the floor stays where the first restart put it.
    floors = []
    for _ in range(3):
        b = rf.FloorBook()
        b.restore(rf.decode(book.encode()), now=0.0)
        b.save([], now=0.0)
        b.save([], now=30.0)
        floors.append(b.floor(S1))
        book = b
    assert floors[0] == floors[1] == floors[2] > bound


def test_noted_highest_is_the_floor_of_a_later_window():
    book = rf.FloorBook()
    book.note(S1, 500)
    book.note(S1, 400)
    assert book.floor(S1) == 500


def test_stale_until_saved_and_after_a_missed_save():
    book = rf.FloorBook()
    assert book.stale(0.0)
    book.save([], 0.0)
    assert not book.stale(1.0)
    assert book.stale(0.0 + rf.MAX_UNSAVED_S + 0.01)


def test_forgotten_after_a_week_of_silence():
    book = rf.FloorBook(forget_after_s=100.0)
    book.save([(S1, 1)], 0.0)
    book.save([], 101.0)
    assert rf.decode(book.encode()) == {}


@pytest.mark.parametrize("data", [
    b"", b"[]", b'{"version": 2, "bounds": {}}', b'{"version": 1}', b'{"version": 1, "bounds": {"zz": 1}}',
    b'{"version": 1, "bounds": {"00": -1}}', b'{"version": 1, "bounds": {"00": true}}',
    b'{"version": 1, "bounds": {"00": 18446744073709551616}}', b"\xff\xfe",
])
def test_a_bad_floors_file_is_a_clear_error(data):
    with pytest.raises(ValueError, match="replay floors file"):
        rf.decode(data)


def test_floor_file_round_trip_and_fail_closed_when_unwritable(tmp_path):
    from l2crypt.core.errors import LocalError
    from l2crypt.io.state_file import FloorFile

    ff = FloorFile(tmp_path)
    book = rf.FloorBook()
    assert ff.load(book, 0.0) == 0  # first start
    assert ff.save(book, [(S1, 7_000)], 0.0) and not book.stale(0.1)
    assert (tmp_path / "replay_floors").stat().st_mode & 0o777 == 0o600
    again = rf.FloorBook()
    assert FloorFile(tmp_path).load(again, 0.0) == 1 and again.floor(S1) > 7_000

    (tmp_path / "replay_floors").write_bytes(b"garbage")
    with pytest.raises(LocalError, match="replay_floors"):
        FloorFile(tmp_path).load(rf.FloorBook(), 0.0)

    gone = FloorFile(tmp_path / "missing-dir")
    assert not gone.save(book, [(S1, 8_000)], 5.0)
    assert book.stale(5.0 + rf.MAX_UNSAVED_S - 0.9)  # the failed save did not count


def test_a_receiver_that_cannot_save_stops_accepting_before_the_restored_floor_is_passed():
    """Saves fail from t = 1 s on; the receiver accepts frames while it is not
    stale (checked once per 100 ms tick, as the engine does), then crashes at
    the last moment it still accepted: no accepted number may pass the floor
    of the restart.  (The first version's floor covered 1.0 s after the last
    save while ``stale`` waited 1.5 s.)"""
    sender = Sender(1_000 * PN_PER_SECOND, now=0.0)
    book = rf.FloorBook()
    accepted: list[int] = []
    t, accepting = 0.0, True
    while accepting:
        if round(t * 1000) % 100 == 0:  # a tick: the sender follows its clock, the receiver checks
            sender.tick(t)
            if t <= 1.0 and round(t * 1000) % 500 == 0:
                book.save([(S1, max(accepted, default=0))], t)
            accepting = not book.stale(t)
        if accepting:
            accepted.append(sender.send())
        t = round(t + 0.01, 3)
    assert t > 1.5, "the receiver kept accepting between its last save and stale"
    restarted = rf.FloorBook()
    restarted.restore(rf.decode(book.encode()), now=0.0)
    assert restarted.floor(S1) >= max(accepted)


def test_a_frame_held_for_its_key_moves_the_bound_by_its_wait():
    """A frame sent at t = 0 waits 1.9 s for its key, then fresh frames follow
    until a crash just before the next save: the floor is above all of them."""
    sender = Sender(1_000 * PN_PER_SECOND, now=0.0)
    book = rf.FloorBook()
    book.save([], 0.0)
    book.save([], 0.5)
    book.save([], 1.0)
    book.save([], 1.5)
    held = sender.send()                     # t = 0.0, held until 1.9
    book.late(S1, 1.9)
    book.save([(S1, held)], 2.0)             # the held frame was the highest at this save
    accepted = [held]
    for i in range(1, 50):                   # fresh frames from 2.0 to 2.49, then the crash
        t = 2.0 + i / 100
        sender.tick(t)
        accepted.append(sender.send())
    restarted = rf.FloorBook()
    restarted.restore(rf.decode(book.encode()), now=0.0)
    assert restarted.floor(S1) >= max(accepted)


def test_a_window_dropped_between_saves_still_counts():
    """A sender first heard after a save whose window is gone before the next
    one (its key retired) is in the next save through ``note``."""
    book = rf.FloorBook()
    book.save([], 0.0)
    book.note(S2, 5_000)
    book.save([], 0.5)
    assert rf.decode(book.encode())[S2] >= 5_000


def test_a_clean_stop_needs_no_lead_and_keeps_restored_floors():
    sender = Sender(1_000 * PN_PER_SECOND, now=0.0)
    book = rf.FloorBook()
    accepted: list[int] = []
    _life(book, sender, 0.0, 2.0, accepted)
    book.save([(S1, max(accepted))], 2.0)          # the last save, after the readers stopped
    bounds, stopped = rf.decode_file(book.encode(stopped=True))
    assert stopped
    after = rf.FloorBook()
    after.restore(bounds, 0.0, stopped)
    assert after.floor(S1) >= max(accepted)
    sender.tick(2.0 + rf.SAVE_INTERVAL_S + rf.CLOCK_TICK_S)  # a quick restart: the sender's next frame passes
    assert sender.send() > after.floor(S1)
    # A floor restored after a crash, for a sender not heard since, survives a
    # clean stop (its bound alone would be below frames the first life accepted).
    crashed = rf.FloorBook()
    crashed.restore({S2: 5_000}, 0.0)
    crashed.save([], 0.5)
    bounds, stopped = rf.decode_file(crashed.encode(stopped=True))
    again = rf.FloorBook()
    again.restore(bounds, 0.0, stopped)
    assert again.floor(S2) == crashed.floor(S2) > 5_000
