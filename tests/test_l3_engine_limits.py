"""l2crypt.core.l3_engine: the limits of a hostile peer's reach (pending keys, held
packets, key-request rate, no request loop), retire_after_s, and replay
floors across a restart of the receiver.  No I/O; the test plays the kernel
and the key server."""

from l2crypt.core import l3_wire as W
from l2crypt.core import l3_engine as E
from l2crypt.core.aead import PN_PER_SECOND
from l2crypt.core.replay_floor import FloorBook, decode

A_IP, B_IP = W.parse_ip("10.71.0.2"), W.parse_ip("10.72.0.2")
KEY = b"\x44" * 32


def packet(src=A_IP, dst=B_IP, payload=b"limits" * 5) -> bytes:
    return W.rebuild_ipv4(b"\x45\0\0\0\0\x07\x40\0\x40\x11\0\0" + src + dst, 17, 20 + len(payload)) + payload


def sealed_by(sender: str, pw_id: int, count: int, pn_start: int = 1000, key: bytes = KEY) -> list[bytes]:
    eng = E.L3Engine(sender, [A_IP], E.L3Settings(), pn_start=pn_start)
    eng.install_key("b", key, pw_id, [B_IP], 0.0)
    return [eng.outbound("t", packet(), 0.0).payload for _ in range(count)]


def test_two_forged_packets_cause_a_bounded_number_of_key_requests():
    """Issue 15, High 4: a packet under a PW_ID above the one held is held and
    the key requested; the answer (the real, older version) used to release it
    into a fresh hold and a fresh request, every tick, for ever."""
    b = E.L3Engine("b", [B_IP], E.L3Settings(), pn_start=5000)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    forged = sealed_by("a", 99, 2)
    assert [b.inbound(f"f{i}", p, 0.0) for i, p in enumerate(forged)] == [None, None]
    requests, verdicts, now = 0, [], 0.0
    while now < 60.0:
        for lookup in b.take_key_requests(now):
            requests += 1
            assert lookup == (E.BY_ID, "a")
            verdicts += b.install_key("a", KEY, 1, [A_IP], now)  # the server answers what it holds
        verdicts += b.on_timer(now)
        now = round(now + 0.1, 1)
    assert requests <= 2, f"{requests} key requests in 60 s for 2 forged packets"
    assert sorted(v.tag for v in verdicts) == ["f0", "f1"] and all(v.payload is None for v in verdicts)
    assert b.drops[E.NO_KEY] == 2 and not b.holds.pending


def test_forged_senders_fill_at_most_half_the_pending_keys():
    s = E.L3Settings(max_pending_keys=8, hold_frames=2)
    b = E.L3Engine("b", [B_IP], s)
    verdicts = [b.inbound(i, sealed_by(f"x{i}", 1, 1)[0], 0.0) for i in range(10)]
    assert sum(v is None for v in verdicts) == 4  # held: half of 8
    assert [v.reason for v in verdicts if v is not None] == [E.PENDING_FULL] * 6
    # Our own destinations still get a key request.
    for i in range(4):
        assert b.outbound(f"t{i}", packet(src=B_IP, dst=W.parse_ip(f"10.71.0.{10 + i}")), 0.0) is None
    assert b.outbound("t9", packet(src=B_IP, dst=A_IP), 0.0).reason == E.PENDING_FULL
    assert len(b.take_key_requests(0.0)) == 8


def test_held_packets_are_capped_all_peers_together():
    s = E.L3Settings(max_held_packets=6, hold_frames=16)
    b = E.L3Engine("b", [B_IP], s)
    sent = [b.inbound(i, p, 0.0) for i, p in enumerate(sealed_by("x", 1, 5))]
    assert sum(v is None for v in sent) == 3 and b.held_packets == 3  # forged senders: half
    outs = [b.outbound(i, packet(src=B_IP, dst=W.parse_ip(f"10.71.0.{i + 9}")), 0.0) for i in range(5)]
    assert sum(v is None for v in outs) == 3 and b.held_packets == 6
    assert b.drops[E.HOLD_OVERFLOW] == 4
    assert len(b.on_timer(10.0)) == 6 and b.held_packets == 0  # aged out: a verdict each


def test_key_requests_leave_at_the_configured_rate():
    b = E.L3Engine("b", [B_IP], E.L3Settings(key_requests_per_s=5.0))
    for i in range(40):
        b.outbound(i, packet(src=B_IP, dst=bytes([10, 71, 1, i])), 0.0)
    assert len(b.take_key_requests(0.0)) == 5  # the burst
    sent = sum(len(b.take_key_requests(t / 10)) for t in range(1, 31))
    assert 14 <= sent <= 16  # 3 s at 5 per second


def test_retire_after_s_is_honoured_when_a_pending_version_is_promoted():
    b = E.L3Engine("b", [B_IP], E.L3Settings(retire_after_s=5.0, switch_after_s=60.0))
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    b.install_key("a", KEY, 2, [A_IP], 10.0)
    b.install_key("a", KEY, 3, [A_IP], 10.5)  # promotes 2; 1 becomes previous
    assert b.peers["a"].keys.lookup(1) is not None
    b.on_timer(15.4)
    assert b.peers["a"].keys.lookup(1) is not None
    b.on_timer(15.6)
    assert b.peers["a"].keys.lookup(1) is None  # 5 s, not the default 30


def test_the_packet_counter_follows_the_clock():
    a = E.L3Engine("a", [A_IP], E.L3Settings(), pn_start=1000, now=50.0)
    a.on_timer(60.0)
    assert a.send_pn >= 1000 + 10 * PN_PER_SECOND


def test_captured_packets_do_not_open_after_the_receiver_restarts():
    """Issue 15, High 1 (layer 3): a restarted receiver gets the same key and
    PW_ID back; its new window starts at the sender's saved floor."""
    a = E.L3Engine("a", [A_IP], E.L3Settings(), pn_start=1000, now=0.0)
    a.install_key("b", KEY, 1, [B_IP], 0.0)
    book = FloorBook()
    b = E.L3Engine("b", [B_IP], E.L3Settings(), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    book.save([], 0.0)
    captured = [a.outbound("t", packet(), 0.1).payload for _ in range(3)]
    assert all(b.inbound("r", p, 0.1).payload for p in captured)
    book.save(b.highest_verified(), 0.5)
    saved = book.encode()
    # b crashes at 0.6 and comes back at 3.0 with the same key.
    book2 = FloorBook()
    book2.restore(decode(saved), 3.0)
    book2.save([], 3.0)
    b2 = E.L3Engine("b", [B_IP], E.L3Settings(), floors=book2)
    b2.install_key("a", KEY, 1, [A_IP], 3.0)
    assert [b2.inbound("r", p, 3.0).reason for p in captured] == [E.REPLAYED] * 3
    # a's genuine packets open again once its clock has passed the floor.
    a.on_timer(3.0)
    assert b2.inbound("r", a.outbound("t", packet(), 3.0).payload, 3.0).payload == packet()
    assert b2.drops == {E.REPLAYED: 3}


def test_packets_are_refused_while_the_floors_are_unsaved():
    book = FloorBook()
    b = E.L3Engine("b", [B_IP], E.L3Settings(), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    p = sealed_by("a", 1, 1)[0]
    assert b.inbound("r", p, 0.0).reason == E.FLOORS_UNSAVED  # never saved yet
    book.save([], 1.0)
    assert b.inbound("r", p, 1.1).payload
    assert b.inbound("r", sealed_by("a", 1, 1, pn_start=9000)[0], 10.0).reason == E.FLOORS_UNSAVED


def test_a_cipher_change_keeps_the_floors():
    book = FloorBook()
    book.save([], 0.0)
    b = E.L3Engine("b", [B_IP], E.L3Settings(), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    p = sealed_by("a", 1, 1)[0]
    assert b.inbound("r", p, 0.1).payload
    E.use_cipher(b, "chacha20-poly1305")
    assert book.floor(b"a") >= W.decode_l3_header(p, 20).packet_number


def test_a_retired_version_leaves_its_top_as_the_floor():
    """Drift (issue 12, step 2): the layer-2 engine noted the top of every
    window it retired in the replay floors; the layer-3 engine dropped it, so
    a save after the retirement did not name the sender at all."""
    book = FloorBook()
    book.save([], 0.0)
    b = E.L3Engine("b", [B_IP], E.L3Settings(switch_after_s=1.0, retire_after_s=5.0), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    assert all(b.inbound("r", p, 0.1).payload for p in sealed_by("a", 1, 3, pn_start=7000))
    b.install_key("a", KEY, 2, [A_IP], 0.5)
    b.on_timer(1.5)  # switched: version 1 retires at 6.5
    assert b.peers["a"].keys.lookup(1) is not None and book.floor(b"a") == 0
    b.on_timer(6.5)
    assert b.peers["a"].keys.lookup(1) is None
    assert book.floor(b"a") == 7002
    book.save(b.highest_verified(), 6.5)
    assert decode(book.encode())[b"a"] >= 7002


def test_a_version_pushed_out_by_quick_rotations_leaves_its_floor():
    """Drift (issue 12, step 2): a version offered while the one before it
    was still pending pushed the oldest out without noting its floor."""
    book = FloorBook()
    book.save([], 0.0)
    b = E.L3Engine("b", [B_IP], E.L3Settings(switch_after_s=60.0), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    assert all(b.inbound("r", p, 0.1).payload for p in sealed_by("a", 1, 2, pn_start=9000))
    for pw_id, now in ((2, 0.2), (3, 0.3), (4, 0.4)):  # 3 promotes 2, 4 promotes 3: 1 leaves
        b.install_key("a", KEY, pw_id, [A_IP], now)
    assert [s.pw_id for s in b.peers["a"].keys.slots()] == [2, 3, 4]
    assert book.floor(b"a") == 9001


def test_the_sender_switching_by_time_leaves_the_floor_of_the_version_it_pushes_out():
    book = FloorBook()
    book.save([], 0.0)
    b = E.L3Engine("b", [B_IP], E.L3Settings(switch_after_s=1.0, retire_after_s=30.0), floors=book)
    b.install_key("a", KEY, 1, [A_IP], 0.0)
    assert b.inbound("r", sealed_by("a", 1, 1, pn_start=4000)[0], 0.1).payload
    b.install_key("a", KEY, 2, [A_IP], 0.2)
    assert b.outbound("t", packet(src=B_IP, dst=A_IP), 1.5).payload  # sends with 2: 1 is previous
    b.install_key("a", KEY, 3, [A_IP], 1.6)
    assert b.outbound("t", packet(src=B_IP, dst=A_IP), 2.6).payload  # sends with 3: 1 leaves
    assert [s.pw_id for s in b.peers["a"].keys.slots()] == [2, 3] and book.floor(b"a") == 4000
