"""A (key, nonce) pair is never used twice: both directions of a pair, the many
senders of the multicast key, and across an agent restart."""

import json
import os

import pytest

from l2crypt.core import aead
from l2crypt.core.engine import FrameEngine
from l2crypt.core.errors import LocalError
from l2crypt.io.packet_clock import PERSIST_INTERVAL_S, PacketClock

H1 = bytes.fromhex("020000000001")
H2 = bytes.fromhex("020000000002")
H3 = bytes.fromhex("020000000003")
PAIR_KEY = os.urandom(32)
MCAST_KEY = os.urandom(32)


def used(engine_frames, derive):
    """(derived key, nonce) of every sealed frame, derived as a receiver would."""
    out = []
    for frame in engine_frames:
        src, dst, key_id = frame[6:12], frame[0:6], frame[15]
        pw_id = int.from_bytes(frame[16:20], "big")
        pn = int.from_bytes(frame[20:28], "big")
        out.append((derive(src, dst, key_id, pw_id), aead.nonce(pn)))
    return out


def derive(src, dst, key_id, pw_id):
    if key_id == 1:
        return aead.pair_direction_key(PAIR_KEY, pw_id, src, dst, aead.AES_256_GCM)
    return aead.group_sender_key(MCAST_KEY, pw_id, src, aead.AES_256_GCM)


def frame(dst, src, i):
    return dst + src + b"\x08\x00" + i.to_bytes(4, "big") * 10


def test_two_directions_of_a_pair_never_share_key_and_nonce():
    # Same pair key, same PW_ID, and deliberately the *same* starting counter.
    a, b = FrameEngine(H1, pn_start=1000), FrameEngine(H2, pn_start=1000)
    a.install_pair_key(H2, "h2", PAIR_KEY, 1, 0.0)
    b.install_pair_key(H1, "h1", PAIR_KEY, 1, 0.0)
    sent = [a.seal_from_tap(frame(H2, H1, i), 0.0) for i in range(100)]
    sent += [b.seal_from_tap(frame(H1, H2, i), 0.0) for i in range(100)]
    pairs = used(sent, derive)
    assert len(set(pairs)) == len(pairs) == 200
    # and the nonces alone do collide, so it is the per-direction key that saves us
    assert len({n for _, n in pairs}) == 100


def test_many_senders_of_the_multicast_key_never_share_key_and_nonce():
    engines = [FrameEngine(m, pn_start=5000) for m in (H1, H2, H3)]  # same start on purpose
    for e in engines:
        e.install_multicast_key(MCAST_KEY, 1, 0.0)
    sent = [e.seal_from_tap(frame(b"\xff" * 6, e.my_mac, i), 0.0) for e in engines for i in range(50)]
    pairs = used(sent, derive)
    assert len(set(pairs)) == len(pairs) == 150


def test_a_restart_right_after_a_save_with_the_clock_3_s_back_never_reuses_a_number(tmp_path):
    """The easy case: the clock is saved just before the crash.  A crash
    between two saves is the next test."""
    wall = [1_700_000_000.0]
    clock = PacketClock(tmp_path, wall=lambda: wall[0])
    first = FrameEngine(H1, pn_start=clock.pn_start())
    first.install_pair_key(H2, "h2", PAIR_KEY, 1, 0.0)
    sent = [first.seal_from_tap(frame(H2, H1, i), 0.0) for i in range(1000)]
    clock.persist()
    # Crash, and the wall clock even steps back by a few seconds over the restart.
    wall[0] -= 3.0
    clock2 = PacketClock(tmp_path, wall=lambda: wall[0])
    second = FrameEngine(H1, pn_start=clock2.pn_start())
    second.install_pair_key(H2, "h2", PAIR_KEY, 1, 0.0)
    sent += [second.seal_from_tap(frame(H2, H1, i), 0.0) for i in range(1000)]
    pairs = used(sent, derive)
    assert len(set(pairs)) == len(pairs) == 2000
    last_before = int.from_bytes(sent[999][20:28], "big")
    first_after = int.from_bytes(sent[1000][20:28], "big")
    assert first_after > last_before


class Daemon:
    """An agent's sending side: an engine that ticks every 100 ms and reserves
    packet numbers every PERSIST_INTERVAL_S, as agent.py does."""

    def __init__(self, state_dir, wall, now):
        self.clock = PacketClock(state_dir, wall=lambda: wall[0])
        self.engine = FrameEngine(H1, pn_start=self.clock.pn_start(), now0=now)
        self.engine.pn_limit = self.clock.reserved
        self.engine.install_pair_key(H2, "h2", PAIR_KEY, 1, now)
        self.next_reserve = now

    def run(self, t0, t1, wall, sent, step_back_at=None):
        t = t0
        while t < t1:
            if step_back_at is not None and t >= step_back_at:
                wall[0] -= 30.0  # NTP steps the wall clock back half a minute
                step_back_at = None
            if round(t * 100) % 10 == 0:
                if t >= self.next_reserve:
                    self.engine.pn_limit = self.clock.reserve(self.engine.send_pn)
                    self.next_reserve = t + PERSIST_INTERVAL_S
                self.engine.on_timer(t)
            sealed = self.engine.seal_from_tap(frame(H2, H1, round(t * 100)), t)
            assert sealed is not None, dict(self.engine.drops)
            sent.append(sealed)
            t = round(t + 0.01, 2)
            wall[0] += 0.01


@pytest.mark.parametrize("crash_after_s", [0.01, 0.37, 0.99])
def test_a_crash_between_reservations_after_a_clock_step_never_reuses_a_number(tmp_path, crash_after_s):
    """Issue 15, Medium 6: the stored floor went back with the wall clock, and
    a crash between two saves was never tested (the test above saves just
    before the crash).  The crash here comes ``crash_after_s`` after the last
    reservation, and the wall clock stepped back 30 s before it."""
    wall = [1_700_000_000.0]
    sent = []
    first = Daemon(tmp_path, wall, now=0.0)
    first.run(0.0, 6.0 + crash_after_s, wall, sent, step_back_at=2.5)
    used = [int.from_bytes(f[20:28], "big") for f in sent]
    # kill -9, restart at once (engine time starts anew; the wall clock is still 30 s behind)
    second = Daemon(tmp_path, wall, now=100.0)
    later = []
    second.run(100.0, 101.0, wall, later)
    again = [int.from_bytes(f[20:28], "big") for f in later]
    assert min(again) > max(used)
    keys_nonces = [(derive(f[6:12], f[0:6], f[15], 1), f[20:28]) for f in sent + later]
    assert len(set(keys_nonces)) == len(keys_nonces)


def test_the_clock_file_refuses_to_start_when_it_cannot_be_kept(tmp_path):
    with pytest.raises(LocalError, match="cannot write the packet clock"):
        PacketClock(tmp_path / "no-such-dir")
    (tmp_path / "clock").write_text("garbage\n")
    with pytest.raises(LocalError, match="not a packet clock file"):
        PacketClock(tmp_path)


def test_an_old_clock_file_is_read_and_a_failed_write_holds_the_limit(tmp_path):
    (tmp_path / "clock").write_text("1700000000.000000\n")  # the format of f3b867d
    wall = [1_600_000_000.0]  # and the wall clock went back a lot
    clock = PacketClock(tmp_path, wall=lambda: wall[0])
    assert clock.pn_start() > aead.initial_packet_number(1_700_000_000.0)
    assert json.loads((tmp_path / "clock").read_text())["reserved_pn"] == clock.reserved
    limit = clock.reserved
    (tmp_path / "clock").unlink()
    tmp_path.rename(tmp_path.with_name(tmp_path.name + "-gone"))  # the state dir goes away
    assert clock.reserve(limit + 10**12) == limit  # not written: the engines stop at the old limit


def test_start_value_outruns_any_sending_rate():
    # Frames sent in one second at any rate below 2**30/s stay below the next second's start.
    assert aead.initial_packet_number(101.0) - aead.initial_packet_number(100.0) == 2**30
    assert aead.initial_packet_number(4_000_000_000.0) < 2**64


def test_one_counter_for_every_key_of_a_sender():
    """(sender, packet number) is unique across peers, key versions and the multicast key."""
    e = FrameEngine(H1, pn_start=77)
    e.install_pair_key(H2, "h2", PAIR_KEY, 1, 0.0)
    e.install_pair_key(H3, "h3", os.urandom(32), 4, 0.0)
    e.install_multicast_key(MCAST_KEY, 1, 0.0)
    sent = []
    for i in range(60):
        dst = (H2, H3, b"\xff" * 6)[i % 3]
        sent.append(e.seal_from_tap(frame(dst, H1, i), 0.0))
    e.install_pair_key(H2, "h2", os.urandom(32), 2, 0.0)
    sent += [e.seal_from_tap(frame(H2, H1, i), 5.0) for i in range(20)]
    pns = [int.from_bytes(f[20:28], "big") for f in sent]
    assert pns == list(range(77, 77 + 80))
