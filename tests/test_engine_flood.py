"""Key-request floods against one engine: the pending table and the request
rate stay bounded, and every frame over the bound is counted.

A host (or a forged sender on the wire) sends to thousands of random MACs;
the engine may hold at most ``max_pending_keys`` MACs, MACs first seen on the
wire only half of them, and it hands out at most ``key_requests_per_s`` key
requests a second.
"""

import os

from l2crypt.core import engine as engine_mod
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.frame_wire import encode_frame

ME = bytes.fromhex("020000000001")
MCAST_KEY = bytes(range(32))


def random_mac() -> bytes:
    return bytes([0x02]) + os.urandom(5)


def plain(dst: bytes, src: bytes = ME) -> bytes:
    return dst + src + b"\x08\x00" + b"x" * 46


def test_flood_of_destinations_is_capped_and_counted():
    eng = FrameEngine(ME, EngineSettings(max_pending_keys=64, key_requests_per_s=1000))
    eng.install_multicast_key(MCAST_KEY, 1, 0.0)
    for _ in range(5000):
        assert eng.seal_from_tap(plain(random_mac()), 0.0) is None
    assert len(eng.holds.pending) == 64
    assert eng.drops["pending_full"] == 5000 - 64
    assert eng.counters["held"] == 64
    # After the hold age everything is forgotten, and new MACs get room again.
    eng.on_timer(10.0)
    assert not eng.holds.pending
    assert eng.drops["hold_expired"] == 64
    assert eng.seal_from_tap(plain(random_mac()), 10.0) is None
    assert len(eng.holds.pending) == 1


def test_key_requests_are_rate_limited_and_none_is_lost():
    eng = FrameEngine(ME, EngineSettings(max_pending_keys=500, key_requests_per_s=50, hold_age_s=60))
    macs = [random_mac() for _ in range(200)]
    for mac in macs:
        eng.seal_from_tap(plain(mac), 0.0)
    first = eng.take_key_requests(0.0)
    assert len(first) == 50  # the burst
    assert eng.take_key_requests(0.0) == []  # no tokens left at the same instant
    assert len(eng.take_key_requests(0.5)) == 25  # 50/s refill
    asked = set(first)
    for t in range(1, 10):
        asked.update(eng.take_key_requests(0.5 + t * 0.5))
    assert asked == set(macs)  # every MAC got its request, late but not lost
    assert eng.counters["key_requests"] <= 50 + 50 * 5 + 1


def test_forged_senders_cannot_crowd_out_our_own_destinations():
    eng = FrameEngine(ME, EngineSettings(max_pending_keys=100, key_requests_per_s=10))
    for _ in range(1000):  # frames from random (unknown) sources on the wire
        frame = encode_frame(ME, random_mac(), 0x88B5, 1, 1, 5, os.urandom(40))
        assert eng.open_from_wire(frame, 0.0) is None
    assert len(eng.holds.pending) == 50  # half of the table
    assert eng.drops["pending_full"] == 950
    peer = random_mac()
    eng.seal_from_tap(plain(peer), 0.0)  # our own host's new peer still gets in ...
    assert peer in eng.holds.pending
    assert eng.take_key_requests(0.0)[0] == peer  # ... and is asked for first
    # The multicast key request goes before anything else.
    eng2 = FrameEngine(ME, EngineSettings(max_pending_keys=100, key_requests_per_s=1))
    eng2.seal_from_tap(plain(random_mac()), 0.0)
    eng2.seal_from_tap(plain(b"\xff" * 6), 0.0)
    assert eng2.take_key_requests(0.0) == [engine_mod.GROUP_MAC]


def test_every_flood_frame_is_accounted_for():
    eng = FrameEngine(ME, EngineSettings(max_pending_keys=32, hold_frames=4))
    sent = 0
    for i in range(3000):
        mac = random_mac() if i % 3 else bytes.fromhex("020000000099")
        eng.seal_from_tap(plain(mac), i * 0.001)
        sent += 1
    eng.on_timer(100.0)
    assert not eng.holds.pending
    assert sum(eng.drops.values()) == sent
