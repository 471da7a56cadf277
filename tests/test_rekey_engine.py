"""Key versions in the engine: make before break, the patent's two races,
data-volume rekeys, multicast rotation and revocation — over fakes."""

import os

from l2crypt.core import engine as E
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.key_ring import KeyRing

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
BCAST = b"\xff" * 6
K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)
SETTINGS = EngineSettings(switch_after_s=2.0, retire_after_s=10.0)


def frame(dst, src, tag=b"x"):
    return dst + src + b"\x08\x00" + tag * 40


def pw_of(sealed):
    return int.from_bytes(sealed[16:20], "big")


def pair(settings=SETTINGS):
    a, b = FrameEngine(A, settings), FrameEngine(B, settings)
    a.install_pair_key(B, "b", K1, 1, 0.0)
    b.install_pair_key(A, "a", K1, 1, 0.0)
    return a, b


def test_ring_diagram():
    ring = KeyRing()
    s1, s2, s3 = (type("S", (), {"pw_id": n})() for n in (1, 2, 3))
    assert ring.offer(s1, 0.0) and ring.current is s1
    assert not ring.offer(s1, 1.0)
    assert ring.offer(s2, 1.0) and ring.next is s2 and ring.current is s1
    assert not ring.due_switch(2.0, 2.0) and ring.due_switch(3.0, 2.0)
    ring.peer_used(2, 1.5, 10.0)
    assert ring.current is s2 and ring.previous is s1 and ring.next is None
    assert ring.lookup(1) is s1 and ring.lookup(2) is s2 and ring.lookup(3) is None
    assert not ring.expire(11.0) and ring.expire(11.5) and ring.previous is None
    assert ring.offer(s3, 12.0) and ring.newest_pw_id() == 3


def test_rotation_loses_nothing_in_either_direction():
    a, b = pair()
    delivered = 0
    t = 0.0
    for step in range(400):
        t = step * 0.05
        if step == 100:  # the server pushes version 2 to both ends "at once"
            a.install_pair_key(B, "b", K2, 2, t)
        if step == 103:
            b.install_pair_key(A, "a", K2, 2, t)
        for src, dst in ((a, b), (b, a)):
            sealed = src.seal_from_tap(frame(dst.my_mac, src.my_mac), t)
            assert dst.open_from_wire(sealed, t) is not None, (step, dict(dst.drops))
            delivered += 1
        a.on_timer(t)
        b.on_timer(t)
    assert delivered == 800
    assert not a.drops and not b.drops
    for e, peer in ((a, B), (b, A)):
        ring = e.peers[peer].keys
        assert ring.current.pw_id == 2 and ring.previous is None  # old key retired, material gone


def test_sender_switches_when_the_peer_is_seen_using_the_new_key():
    a, b = pair()
    a.install_pair_key(B, "b", K2, 2, 1.0)
    b.install_pair_key(A, "a", K2, 2, 1.0)
    assert pw_of(a.seal_from_tap(frame(B, A), 1.1)) == 1       # before the switch delay
    b.peers[A].keys.promote(1.2, 10.0)                          # b moves first
    assert a.open_from_wire(b.seal_from_tap(frame(A, B), 1.2), 1.2)
    assert pw_of(a.seal_from_tap(frame(B, A), 1.3)) == 2       # a saw v2 in use: switches


def test_race_a_receiver_lacks_the_newer_version():
    a, b = pair()
    a.install_pair_key(B, "b", K2, 2, 1.0)               # the push to b is lost
    sealed = a.seal_from_tap(frame(B, A, b"n"), 4.0)            # a switched after 2 s
    assert pw_of(sealed) == 2
    assert b.open_from_wire(sealed, 4.0) is None                # held, not dropped
    assert b.take_key_requests(4.0) == [A]                      # b asks the server
    out = b.install_pair_key(A, "a", K2, 2, 4.1)         # the server answers the newest
    assert out.to_tap == [frame(B, A, b"n")]
    assert not b.drops


def test_race_b_peer_still_sends_with_the_old_version():
    a, b = pair()
    a.install_pair_key(B, "b", K2, 2, 1.0)               # b never got the push
    a.seal_from_tap(frame(B, A), 3.5)                           # a has switched to v2
    for t in (4.0, 4.1, 4.2, 5.5):
        assert a.open_from_wire(b.seal_from_tap(frame(A, B), t), t) is not None  # still opens (overlap)
    notices = a.take_notices()
    assert notices == [(E.REPORT, B, 2), (E.REPORT, B, 2)]      # reported, once a second
    b.install_pair_key(A, "a", K2, 2, 5.6)               # the server pushed again
    b.peers[A].keys.promote(5.6, 10.0)
    assert a.open_from_wire(b.seal_from_tap(frame(A, B), 5.7), 5.7) is not None


def test_frames_under_a_retired_version_are_refused_and_reported():
    a, b = pair()
    old = b.seal_from_tap(frame(A, B), 0.5)
    a.install_pair_key(B, "b", K2, 2, 1.0)
    a.seal_from_tap(frame(B, A), 3.5)                           # switch at 3.5, retire at 13.5
    a.on_timer(14.0)
    assert a.peers[B].keys.previous is None
    late = b.seal_from_tap(frame(A, B), 14.0)
    assert a.open_from_wire(late, 14.0) is None
    assert a.drops[E.STALE_KEY] == 1
    assert a.take_notices() == [(E.REPORT, B, 2)]
    assert a.open_from_wire(old, 14.1) is None


def test_data_volume_rekey_is_asked_once():
    a, b = pair(EngineSettings(rekey_after_frames=5))
    for i in range(12):
        b.open_from_wire(a.seal_from_tap(frame(B, A), 0.1 * i), 0.1 * i)
    assert a.take_notices() == [(E.REKEY, B, 1)]
    a.install_pair_key(B, "b", K2, 2, 2.0)
    b.install_pair_key(A, "a", K2, 2, 2.0)
    for i in range(12):
        t = 4.0 + 0.1 * i
        assert b.open_from_wire(a.seal_from_tap(frame(B, A), t), t) is not None
    assert a.take_notices() == [(E.REKEY, B, 2)]


def test_multicast_rotation_make_before_break_and_refresh():
    a, b, c = (FrameEngine(m, SETTINGS) for m in (A, B, C))
    for i, e in enumerate((a, b, c)):
        e.install_multicast_key(K1, 1, 0.0)
    a.install_multicast_key(K2, 2, 1.0)
    b.install_multicast_key(K2, 2, 1.0)                   # c misses the push
    assert b.open_from_wire(a.seal_from_tap(frame(BCAST, A), 1.5), 1.5)  # a still sends v1
    late = a.seal_from_tap(frame(BCAST, A, b"z"), 3.5)          # switched to v2
    assert pw_of(late) == 2
    assert b.open_from_wire(late, 3.5) == frame(BCAST, A, b"z")
    assert c.open_from_wire(late, 3.5) is None                  # c lacks v2: held, asks
    assert c.take_key_requests(3.5) == [E.GROUP_MAC]
    assert c.install_multicast_key(K2, 2, 3.6).to_tap == [frame(BCAST, A, b"z")]
    assert b.open_from_wire(c.seal_from_tap(frame(BCAST, C), 3.7), 3.7)  # v1 still accepted


def test_revoked_peer_is_cut_off():
    a, b = pair()
    good = b.seal_from_tap(frame(A, B), 0.1)
    a.revoke_peer(B)
    assert a.open_from_wire(good, 0.2) is None
    assert a.drops[E.REVOKED_SENDER] == 1
    a.install_pair_key(B, "b", K3, 3, 0.3)                   # a late answer changes nothing
    assert B not in a.peers
    assert a.seal_from_tap(frame(B, A), 0.4) is None
    assert a.take_key_requests(0.4) == []                       # and nothing is asked for it


def test_rotations_closer_than_the_switch_delay_lose_nothing():
    # Versions come about every 2 s (the switch delay), with 10 ms of jitter in
    # the pushes.  Version 3 reaches A just as B switches to version 2, before
    # A has seen B use 2: A must keep 2 and open B's frames under it.
    a, b = pair()
    schedule = [  # (pw_id, time B gets it, time A gets it)
        (2, 1.00, 1.01), (3, 3.01, 3.00), (4, 5.00, 5.01), (5, 7.01, 7.00),
    ]
    keys = {n: os.urandom(32) for n, _, _ in schedule}
    delivered = 0
    for step in range(1000):
        t = round(step * 0.01, 2)
        for n, at_b, at_a in schedule:
            if t == at_b:
                b.install_pair_key(A, "a", keys[n], n, t)
            if t == at_a:
                a.install_pair_key(B, "b", keys[n], n, t)
        a.on_timer(t)
        b.on_timer(t)
        for src, dst in ((b, a), (a, b)):
            sealed = src.seal_from_tap(frame(dst.my_mac, src.my_mac), t)
            assert dst.open_from_wire(sealed, t) is not None, (step, t, dict(dst.drops))
            delivered += 1
    assert delivered == 2000 and not a.drops and not b.drops
    assert a.peers[B].keys.current.pw_id == b.peers[A].keys.current.pw_id == 5


def test_a_newer_version_promotes_a_pending_one():
    ring = KeyRing()
    s1, s2, s3 = (type("S", (), {"pw_id": n})() for n in (1, 2, 3))
    ring.offer(s1, 0.0)
    ring.offer(s2, 1.0, retire_after_s=10.0)
    assert ring.offer(s3, 1.5, retire_after_s=10.0)
    assert (ring.previous, ring.current, ring.next) == (s1, s2, s3)
    assert [ring.lookup(n) for n in (1, 2, 3)] == [s1, s2, s3]
    assert not ring.expire(11.0) and ring.expire(11.5)
