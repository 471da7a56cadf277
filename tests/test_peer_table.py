"""l2crypt.core.peer_table and the shared hold queue: the per-peer key step
that the layer-2 engine, the layer-3 engine and the gateway tunnel share,
on plain slots (no crypto: the table never opens or seals anything)."""

import pytest

from l2crypt.core import hold_queue as H
from l2crypt.core import peer_table as P
from l2crypt.core.constants import MAX_PACKET_NUMBER
from l2crypt.core.key_ring import KeyRing
from l2crypt.core.peer_keys import KeySlot
from l2crypt.core.replay import ReplayWindow
from l2crypt.core.replay_floor import FloorBook

PEER = b"\x02\x00\x00\x00\x00\x07"
SETTINGS = P.PeerSettings(switch_after_s=2.0, retire_after_s=10.0, rekey_after_frames=3, report_interval_s=1.0)


class Peer:
    """A peer record as an engine keeps one: only its ring matters to the table."""

    def __init__(self, keys):
        self.keys = keys


def slot(pw_id: int, made: float = 0.0, highest: int = -1) -> KeySlot:
    s = KeySlot(pw_id, None, None, ReplayWindow(64), made)
    if highest >= 0:
        s.replay.update(highest)
    return s


def table(floors=None, settings=SETTINGS, **kw) -> P.PeerTable:
    return P.PeerTable(settings, pn_start=100, floors=floors, **kw)


def peer_with(t: P.PeerTable, *slots, now: float = 0.0) -> KeyRing:
    ring = KeyRing(slots[0])
    t.peers[PEER] = Peer(ring)
    for s in slots[1:]:
        assert t.offer(PEER, ring, s, now)
    return ring


# ------------------------------------------------------------------- sending

def test_the_send_step_numbers_counts_and_asks_for_a_rekey_once():
    t = table()
    ring = peer_with(t, slot(1))
    steps = [t.send(PEER, ring, 0.0) for _ in range(5)]
    assert [pn for _, pn in steps] == [100, 101, 102, 103, 104] and t.send_pn == 105
    assert ring.current.frames_sealed == 5
    assert t.notices == [(P.REKEY, PEER, 1)]  # after 3 frames, once
    assert t.take_notices() == [(P.REKEY, PEER, 1)] and t.counters["rekey_requests"] == 1
    assert t.take_notices() == []


def test_the_send_step_without_rekey_never_asks():
    t = table()
    ring = peer_with(t, slot(1))
    for _ in range(5):
        t.send(b"group", ring, 0.0, rekey=False)
    assert t.notices == []


def test_the_send_step_refuses_what_it_cannot_number():
    t = table()
    assert t.send(PEER, KeyRing(), 0.0) == P.NO_KEY
    ring = peer_with(t, slot(1))
    t.pn_limit = 100
    assert t.send(PEER, ring, 0.0)[1] == 100
    assert t.send(PEER, ring, 0.0) == P.PN_UNRESERVED and t.send_pn == 101
    t.pn_limit, t.send_pn = MAX_PACKET_NUMBER, MAX_PACKET_NUMBER + 1
    assert t.send(PEER, ring, 0.0) == P.PN_EXHAUSTED
    assert t.take_pn() is None
    t.send_pn = 7
    assert t.take_pn() == 7 and t.send_pn == 8


def test_the_send_step_switches_to_next_once_it_is_due():
    t = table()
    ring = peer_with(t, slot(1), slot(2), now=5.0)
    assert t.send(PEER, ring, 6.9)[0].pw_id == 1
    assert t.send(PEER, ring, 7.0)[0].pw_id == 2
    assert ring.previous.pw_id == 1 and ring.previous_until == 17.0  # retire_after_s, not the default


def test_the_packet_counter_follows_the_clock_from_its_first_tick():
    t = table()
    t.follow_clock(10.0)
    assert t.send_pn == 100
    t.follow_clock(11.0)
    assert t.send_pn >= 100 + 2**30
    started = P.PeerTable(SETTINGS, pn_start=100, now0=0.0)
    started.follow_clock(1.0)
    assert started.send_pn >= 100 + 2**30


# ----------------------------------------------------------------- receiving

def test_a_frame_under_next_switches_sending_and_drains_the_old_version():
    t = table()
    ring = peer_with(t, slot(1), slot(2), now=0.0)
    assert PEER in t.draining
    t.opened(PEER, ring, ring.next, 0.5)
    assert ring.current.pw_id == 2 and ring.previous.pw_id == 1 and ring.previous_until == 10.5
    assert t.notices == []


def test_a_frame_under_an_old_version_after_the_switch_is_reported_once_a_second():
    t = table()
    ring = peer_with(t, slot(1), slot(2), now=0.0)
    t.opened(PEER, ring, ring.next, 0.0)
    old = ring.previous
    t.opened(PEER, ring, old, 1.0)  # the peer may not have switched yet
    assert t.notices == []
    for now in (2.0, 2.5, 3.0):
        t.opened(PEER, ring, old, now)
    assert t.take_notices() == [(P.REPORT, PEER, 2), (P.REPORT, PEER, 2)] and t.counters["lag_reports"] == 2
    t.opened(PEER, ring, ring.current, 9.0)  # the current version: nothing to do
    assert t.notices == []


def test_no_lag_reports_with_an_infinite_interval():
    t = table(settings=P.PeerSettings(report_interval_s=float("inf")))
    ring = peer_with(t, slot(1))
    t.report_lag(PEER, ring, 100.0)
    assert t.notices == []


# ------------------------------------------------------------------ draining

def test_draining_switches_retires_and_leaves_the_floor():
    book = FloorBook()
    t = table(book)
    ring = peer_with(t, slot(1, highest=500), slot(2), now=1.0)
    assert t.next_deadline() == 3.0
    t.on_timer(3.0)
    assert ring.current.pw_id == 2 and t.next_deadline() == 13.0
    t.on_timer(12.9)
    assert book.floor(PEER) == 0 and ring.previous is not None
    t.on_timer(13.0)
    assert ring.previous is None and book.floor(PEER) == 500
    assert t.draining == {} and t.next_deadline() is None


def test_a_version_pushed_out_by_quick_rotations_leaves_its_floor():
    book = FloorBook()
    t = table(book)
    ring = peer_with(t, slot(1, highest=300), slot(2, highest=400), slot(3), now=0.0)
    assert [s.pw_id for s in ring.slots()] == [1, 2, 3]
    assert t.offer(PEER, ring, slot(4), 0.5)  # promotes 3: 2 previous, 1 pushed out
    assert [s.pw_id for s in ring.slots()] == [2, 3, 4] and book.floor(PEER) == 300
    assert not t.offer(PEER, ring, slot(4), 0.6) and not t.offer(PEER, ring, slot(2), 0.6)


def test_merge_notes_what_it_drops_and_watches_the_ring():
    book = FloorBook()
    t = table(book)
    ring = peer_with(t, slot(1, highest=50))
    # A restarted peer's answer: 6 has been sent with for long, 7 is new, 1 is long gone.
    assert t.merge(PEER, ring, [(slot(5), -100.0), (slot(6), -50.0), (slot(7), 0.0)], 0.0)
    assert [s.pw_id for s in ring.slots()] == [6, 7] and book.floor(PEER) == 50
    assert t.draining[PEER] is ring


def test_forgetting_a_peer_keeps_every_floor_under_its_sender_name():
    book = FloorBook()
    t = table(book, sender_name=str.encode)
    ring = KeyRing(slot(1, highest=70))
    t.peers["host-a"] = Peer(ring)
    assert t.offer("host-a", ring, slot(2, highest=80), 0.0)
    assert sorted(t.highest()) == [(b"host-a", 70), (b"host-a", 80)]
    t.report_lag("host-a", ring, 0.0)
    assert t.forget("host-a").keys is ring and t.forget("host-a") is None
    assert book.floor(b"host-a") == 80 and t.peers == {} and t.draining == {} and t.reported_at == {}
    assert t.highest() == []


def test_settings_of_the_engines_share_the_table_fields():
    from l2crypt.core.engine import EngineSettings
    from l2crypt.core.l3_engine import L3Settings
    for settings in (EngineSettings(max_pending_keys=9, key_requests_per_s=3.0, retire_after_s=4.0),
                     L3Settings(max_pending_keys=9, key_requests_per_s=3.0, retire_after_s=4.0)):
        assert isinstance(settings, P.PeerSettings)
        assert (settings.max_pending_keys, settings.key_requests_per_s, settings.retire_after_s) == (9, 3.0, 4.0)


# ------------------------------------------------------------- hold queue

def test_the_hold_queue_hands_back_what_it_pushes_out():
    holds = H.HoldTable(2, 5.0, 0.5, 8.0)
    assert holds.hold("k", H.TX, "a", 0.0) is None
    assert holds.hold("k", H.TX, "b", 0.1) is None
    assert holds.hold("k", H.TX, "c", 0.2) == (H.HOLD_OVERFLOW, "a")
    assert holds.held_count == [2, 0]
    assert [item for _, item, _ in holds.take("k")] == ["b", "c"] and holds.held_count == [0, 0]


def test_nothing_held_but_the_key_is_still_asked():
    holds = H.HoldTable(0, 5.0, 0.5, 8.0)
    assert holds.hold("k", H.RX, "a", 0.0) == (H.HOLD_OVERFLOW, "a")
    assert holds.due_requests(0.0) == ["k"] and holds.held_count == [0, 0]


def test_forged_senders_get_half_the_pending_keys_and_the_first_key_none_of_the_cap():
    holds = H.HoldTable(4, 5.0, 0.5, 8.0, max_pending=4, first="group")
    assert [holds.hold(f"rx{i}", H.RX, i, 0.0) for i in range(3)] == [None, None, (H.PENDING_FULL, 2)]
    assert [holds.hold(f"tx{i}", H.TX, i, 0.0) for i in range(3)] == [None, None, (H.PENDING_FULL, 2)]
    assert holds.hold("rx0", H.RX, "again", 0.0) is None  # a key already pending takes more
    assert holds.hold("group", H.TX, "g", 0.0) is None
    assert "rx2" not in holds.pending and "group" in holds.pending


def test_held_items_are_capped_all_keys_together():
    holds = H.HoldTable(16, 5.0, 0.5, 8.0, max_held=4)
    assert [holds.hold("rx", H.RX, i, 0.0) for i in range(3)] == [None, None, (H.HOLD_OVERFLOW, 2)]
    assert [holds.hold(f"tx{i}", H.TX, i, 0.0) for i in range(3)] == [None, None, (H.HOLD_OVERFLOW, 2)]
    assert "tx2" not in holds.pending  # refused before it was asked
    assert holds.held_count == [2, 2]


def test_expiry_hands_back_the_aged_items_and_forgets_idle_keys():
    holds = H.HoldTable(4, 2.0, 0.5, 8.0)
    holds.hold("k", H.TX, "old", 0.0)
    holds.hold("k", H.TX, "new", 1.5)
    assert holds.expire(2.0) == ["old"] and holds.held_count == [1, 0]
    assert holds.expire(3.5) == ["new"] and not holds.pending


@pytest.mark.parametrize("rate, burst", [(5.0, 5), (0.5, 1)])
def test_key_requests_leave_at_the_rate_first_key_first(rate, burst):
    holds = H.HoldTable(4, 60.0, 100.0, 100.0, requests_per_s=rate, first="group")
    for i in range(20):
        holds.hold(f"rx{i}", H.RX, i, 0.0)
    holds.hold("group", H.TX, "g", 0.0)
    first = holds.take_requests(0.0)
    assert len(first) == burst and first[0] == "group"
    sent = sum(len(holds.take_requests(t / 10)) for t in range(1, 21))  # 2 s more
    assert sent == pytest.approx(2 * rate, abs=1)
