"""Key versions at the agent (issue 14 section 4, issue 15 High 4, Medium 5 and
the key lifetime of High 2): every live version after a restart, missed
rotations, forged PW_IDs, expired keys, a MAC that changes hands, and the
cipher in the HKDF info.  Over in-memory engines and a tiny key server.
"""

from __future__ import annotations

import os

import pytest

from l2crypt.core import replay_floor as rf
from l2crypt.core import engine as E
from l2crypt.core import aead
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.peer_keys import KeySlot

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
SETTINGS = EngineSettings(switch_after_s=2.0, retire_after_s=30.0)
WALL0 = 1_700_000_000  # the wall clock at engine time 0


def started(mac, t, settings=SETTINGS):
    """An engine started at engine time ``t``, its counter from the packet clock (as the agent does)."""
    return FrameEngine(mac, settings, pn_start=int((WALL0 + t) * aead.PN_PER_SECOND), now0=t)


def frame(dst, src, tag=b"x"):
    return dst + src + b"\x08\x00" + tag * 40


def pw_of(sealed):
    return int.from_bytes(sealed[16:20], "big")


class PairServer:
    """The versions of one pair key as keyserverd keeps them (made at server time)."""

    def __init__(self):
        self.versions: list[tuple[int, bytes, float]] = []

    def rotate(self, t):
        self.versions.append((len(self.versions) + 1, os.urandom(32), t))
        return self.versions[-1]

    def answer(self, t, limit=3, upto=None):
        """(pw_id, key, age_s, older) as the key answer carries them (ages in whole seconds)."""
        live = [v for v in self.versions if upto is None or v[0] <= upto][-limit:][::-1]
        (pw, key, made), rest = live[0], live[1:]
        return pw, key, int(t - made), [(p, k, int(t - m)) for p, k, m in rest]

    def install(self, engine, peer_mac, peer_id, t, **kw):
        pw, key, age, older = self.answer(t, **kw)
        return engine.install_pair_key(peer_mac, peer_id, key, pw, t, age_s=age, older=older)

    def push(self, engine, peer_mac, peer_id, t):
        """A push of the version just made (age 0; the older ones ride along)."""
        return self.install(engine, peer_mac, peer_id, t)


# --- a restarted agent gets every live version ------------------------------------------


@pytest.mark.parametrize("down", [(9.5, 10.5), (12.3, 13.3), (14.9, 15.2)],
                         ids=["back-before-the-switch", "back-after-the-switch", "missed-a-push"])
def test_a_restart_during_rotations_loses_no_frame_after_the_keys_are_back(down):
    """The soak's case in small: the server rotates every 5 s (pushes to both
    ends), frames flow both ways every 10 ms, and B is killed and restarted.
    Only B's downtime may cost frames; no ``stale_key`` (f3b867d gave B the
    newest version only, and dropped A's frames under the one before)."""
    server = PairServer()
    a, b = started(A, 0.0), started(B, 0.0)
    server.rotate(0.0)
    server.install(a, B, "b", 0.0)
    server.install(b, A, "a", 0.0)
    lost_after_restart = []
    for step in range(3000):
        t = round(step * 0.01, 2)
        if step % 500 == 0 and step:
            server.rotate(t)
            server.push(a, B, "b", t)
            if not down[0] <= t < down[1]:
                server.push(b, A, "a", t + 0.01)
        if t == down[1]:  # B comes back: fresh engine, asks for A's key at its first frame
            b = started(B, t)
        a.on_timer(t)
        b.on_timer(t)
        for src, dst in ((a, b), (b, a)):
            if down[0] <= t < down[1]:
                continue
            sealed = src.seal_from_tap(frame(dst.my_mac, src.my_mac), t)
            if sealed is None:  # B holds its frame and asks: the server answers at once
                assert src.take_key_requests(t) == [A]
                out = server.install(src, A, "a", t)
                sealed = out.to_wire[0]
            opened = dst.open_from_wire(sealed, t)
            if opened is None and dst.take_key_requests(t):
                opened = (server.install(dst, A, "a", t).to_tap or [None])[0]
            if opened is None:
                lost_after_restart.append((t, src.my_mac, pw_of(sealed), dict(dst.drops)))
    assert not lost_after_restart, lost_after_restart[:3]
    assert not a.drops and not b.drops


def test_the_versions_are_placed_as_the_peer_holds_them():
    """Versions 3 (1 s old), 2 (6 s) and 1 (11 s), switch delay 2 s: the peer
    sends with 2 and switches to 3 within a second; 1 is still open."""
    server = PairServer()
    for t in (0.0, 5.0, 10.0):
        server.rotate(t)
    b = FrameEngine(B, SETTINGS)
    server.install(b, A, "a", 11.0)
    ring = b.peers[A].keys
    assert (ring.previous.pw_id, ring.current.pw_id, ring.next.pw_id) == (1, 2, 3)
    assert pw_of(b.seal_from_tap(frame(A, B), 11.0)) == 2
    assert pw_of(b.seal_from_tap(frame(A, B), 12.1)) == 3  # version 3 is 2 s old
    assert ring.previous.pw_id == 2


def test_a_version_the_peer_has_retired_is_never_chosen():
    """Version 1 was superseded 100 s ago (retire after 30 s): it is not even held."""
    server = PairServer()
    server.rotate(0.0)
    server.rotate(100.0)
    b = FrameEngine(B, SETTINGS)
    server.install(b, A, "a", 200.0)
    ring = b.peers[A].keys
    assert ring.current.pw_id == 2 and ring.previous is None and ring.next is None
    assert pw_of(b.seal_from_tap(frame(A, B), 200.0)) == 2


def test_all_young_versions_send_with_the_oldest():
    server = PairServer()
    server.rotate(0.0)
    server.rotate(0.5)
    b = FrameEngine(B, SETTINGS)
    server.install(b, A, "a", 1.0)
    ring = b.peers[A].keys
    assert (ring.current.pw_id, ring.next.pw_id) == (1, 2)


class Slot:
    def __init__(self, pw_id, created_at=0.0):
        self.pw_id, self.created_at = pw_id, created_at


@pytest.mark.parametrize("held, offered, expect", [
    # (previous, current, next) held; (pw_id, age) offered at now = 100; switch 2 s, retire 30 s
    ((None, None, None), [(1, 50)], (None, 1, None)),
    ((None, None, None), [(3, 1), (2, 6), (1, 11)], (1, 2, 3)),
    ((None, None, None), [(2, 1), (1, 1.5)], (None, 1, 2)),          # all young: the oldest is current
    ((None, None, None), [(2, 50), (1, 100)], (None, 2, None)),      # 1 retired by the peer long ago
    ((None, 1, None), [(3, 0.5), (2, 5), (1, 10)], (1, 2, 3)),       # two missed rotations
    ((None, 1, 3), [(2, 5)], (1, 2, 3)),                             # the middle version
    ((None, 5, None), [(6, 0)], (None, 5, 6)),                       # a push: as offer()
    ((4, 5, 6), [(7, 0)], (5, 6, 7)),                                # a pending next is promoted
    ((None, 5, None), [(4, 100)], (4, 5, None)),                     # an older one, never held: receive only
])
def test_merge_places_versions_as_the_peer_holds_them(held, offered, expect):
    from l2crypt.core.key_ring import KeyRing
    ring = KeyRing()
    ring.previous, ring.current, ring.next = (Slot(p) if p else None for p in held)
    now = 100.0
    ring.merge([(Slot(p), now - age) for p, age in offered], now, switch_after_s=2.0, retire_after_s=30.0)
    got = tuple(s.pw_id if s else None for s in (ring.previous, ring.current, ring.next))
    assert got == expect


# --- missed rotations: the version in between -------------------------------------------


def test_two_missed_rotations_the_frame_under_the_middle_version_is_held_and_opens():
    server = PairServer()
    server.rotate(0.0)
    a, b = FrameEngine(A, SETTINGS), FrameEngine(B, SETTINGS)
    key1 = server.versions[0][1]
    a.install_pair_key(B, "b", key1, 1, 0.0)
    b.install_pair_key(A, "a", key1, 1, 0.0)
    for t in (10.0, 20.0):  # b is cut off from the server for both pushes
        _, key, _ = server.rotate(t)
        a.install_pair_key(B, "b", key, len(server.versions), t)
    sealed = a.seal_from_tap(frame(B, A, b"m"), 21.0)  # a switched to 2 and holds 3 as next
    assert pw_of(sealed) == 2
    b.install_pair_key(A, "a", server.versions[2][1], 3, 21.0)  # b gets version 3 late, alone
    ring = b.peers[A].keys
    assert (ring.current.pw_id, ring.next.pw_id) == (1, 3)  # 2 is in between
    assert b.open_from_wire(sealed, 21.0) is None
    assert not b.drops[E.STALE_KEY]  # f3b867d dropped it here
    assert b.take_key_requests(21.0) == [A]
    out = server.install(b, A, "a", 21.0)  # the answer carries 3, 2 and 1
    assert out.to_tap == [frame(B, A, b"m")]
    assert not b.drops


def test_middle_version_answer_without_it_drops_once():
    """If the answer does not carry the version either, the frame is dropped
    (no_key), not held again."""
    server = PairServer()
    server.rotate(0.0)
    a, b = FrameEngine(A, SETTINGS), FrameEngine(B, SETTINGS)
    server.install(a, B, "b", 0.0)
    server.install(b, A, "a", 0.0)
    server.rotate(10.0)
    server.rotate(20.0)
    server.install(b, A, "a", 20.0, limit=1)  # b holds 1 and 3
    genuine = a.seal_from_tap(frame(B, A), 21.0)
    forged = genuine[:16] + (2).to_bytes(4, "big") + genuine[20:]
    assert b.open_from_wire(forged, 21.0) is None
    assert b.take_key_requests(21.0) == [A]
    server.install(b, A, "a", 21.0, limit=1)
    assert b.drops[E.NO_KEY] == 1 and not b.holds.pending


# --- forged PW_IDs do not loop (issue 15, High 4) -----------------------------------------


def test_two_forged_frames_cause_a_bounded_number_of_key_requests():
    """Two frames under a PW_ID nobody holds, the server answering every request
    with the newest version at once, for 60 s of engine time: f3b867d kept
    asking (1,200 requests a minute); now each forged frame costs one."""
    key = os.urandom(32)
    a, b = FrameEngine(A, SETTINGS), FrameEngine(B, SETTINGS)
    a.install_pair_key(B, "b", key, 1, 0.0)
    b.install_pair_key(A, "a", key, 1, 0.0)
    genuine = a.seal_from_tap(frame(B, A), 0.0)
    forged = [genuine[:16] + (0xFFFF0000 + i).to_bytes(4, "big") + genuine[20:] for i in range(2)]
    for f in forged:
        assert b.open_from_wire(f, 0.0) is None
    requests = 0
    for step in range(6000):
        t = step * 0.01
        b.on_timer(t)
        for mac in b.take_key_requests(t):
            requests += 1
            b.install_pair_key(mac, "a", key, 1, t)  # the server's newest version, at once
    assert requests <= 2
    assert b.drops[E.NO_KEY] == 2 and not b.holds.pending


# --- a maximum key lifetime at the agent -------------------------------------------------


def test_a_key_older_than_the_maximum_age_is_dropped_and_a_fresh_one_asked():
    settings = EngineSettings(key_max_age_s=100.0)
    server = PairServer()
    server.rotate(0.0)
    b = FrameEngine(B, settings)
    a = FrameEngine(A, settings)
    server.install(b, A, "a", 50.0)
    server.install(a, B, "b", 50.0)
    assert b.open_from_wire(a.seal_from_tap(frame(B, A), 60.0), 60.0) is not None
    b.on_timer(100.5)  # version 1 was made 100.5 s ago
    assert A not in b.peers and b.counters["keys_expired"] == 1
    # A revoked host whose revocation b missed keeps sending: b asks and is told "unknown".
    assert b.open_from_wire(a.seal_from_tap(frame(B, A), 101.0), 101.0) is None
    assert b.take_key_requests(101.0) == [A]
    # The server still offers only version 1 (too old): refused, the server is asked to rotate.
    assert b.seal_from_tap(frame(A, B), 101.0) is None
    server.install(b, A, "a", 101.0)
    assert A not in b.peers and b.drops[E.KEY_EXPIRED] == 2
    assert b.take_notices() == [(E.REKEY, A, 1)]
    # It rotates: the fresh version is taken at once.
    server.rotate(102.0)
    server.install(b, A, "a", 102.0)
    assert b.peers[A].keys.current.pw_id == 2
    assert pw_of(b.seal_from_tap(frame(A, B), 102.0)) == 2


def test_a_lower_maximum_age_from_the_server_applies_at_the_next_tick():
    b = FrameEngine(B, SETTINGS)
    b.install_pair_key(A, "a", os.urandom(32), 1, 10.0, age_s=500)
    b.on_timer(11.0)
    assert A in b.peers
    b.set_key_max_age(300.0)  # the welcome's key_max_age_s
    b.on_timer(11.1)
    assert A not in b.peers and b.counters["keys_expired"] == 1


def test_a_late_answer_with_only_old_versions_leaves_the_held_key_alone():
    settings = EngineSettings(key_max_age_s=100.0)
    b = FrameEngine(B, settings)
    b.install_pair_key(A, "a", os.urandom(32), 5, 10.0, age_s=1)
    b.install_pair_key(A, "a", os.urandom(32), 3, 10.0, age_s=150)  # out of order, too old
    assert b.peers[A].keys.current.pw_id == 5
    assert not b.expired_until and not b.take_notices() and not b.drops


def test_an_expired_multicast_key_is_dropped_too():
    b = FrameEngine(B, EngineSettings(key_max_age_s=100.0))
    b.install_multicast_key(os.urandom(32), 1, 0.0)
    b.on_timer(100.0)
    assert b.group.current is None and b.counters["keys_expired"] == 1
    assert b.seal_from_tap(frame(b"\xff" * 6, B), 100.0) is None
    assert b.take_key_requests(100.0) == [E.GROUP_MAC]


# --- a key for the same MAC from another peer ID replaces the old one (Medium 5) ---------


def test_a_key_under_another_peer_id_replaces_the_old_one():
    b = FrameEngine(B, SETTINGS)
    old_key, new_key = os.urandom(32), os.urandom(32)
    b.install_pair_key(A, "gw-1", old_key, 4, 0.0)
    b.install_pair_key(A, "h7", new_key, 1, 1.0)  # a lower PW_ID: another pair, not a rotation
    assert b.peers[A].peer_id == "h7"
    assert [s.pw_id for s in b.peers[A].keys.slots()] == [1]
    new_owner = FrameEngine(A, SETTINGS)
    new_owner.install_pair_key(B, "b", new_key, 1, 1.0)
    assert new_owner.open_from_wire(b.seal_from_tap(frame(A, B), 1.1), 1.1) is not None
    old_owner = FrameEngine(A, SETTINGS)
    old_owner.install_pair_key(B, "b", old_key, 4, 0.0)
    assert b.open_from_wire(old_owner.seal_from_tap(frame(B, A), 1.2), 1.2) is None
    assert b.counters["peers_replaced"] == 1


# --- the cipher is in the HKDF info (issue 15, Low) --------------------------------------


def test_the_same_pair_key_under_the_two_ciphers_gives_different_direction_keys(monkeypatch):
    made = []
    real = aead.make_aead
    monkeypatch.setattr(aead, "make_aead", lambda cipher, key: made.append(key) or real(cipher, key))
    key = os.urandom(32)
    for cipher in (aead.AES_256_GCM, aead.CHACHA20_POLY1305):
        KeySlot.from_pair_key(cipher, key, 7, A, B, 2048, 0.0)
    aes_send, aes_recv, chacha_send, chacha_recv = made
    assert aes_send != chacha_send and aes_recv != chacha_recv


@pytest.mark.parametrize("cipher", [aead.AES_256_GCM, aead.CHACHA20_POLY1305])
def test_both_ciphers_still_round_trip(cipher):
    a = FrameEngine(A, EngineSettings(cipher=cipher))
    b = FrameEngine(B, EngineSettings(cipher=cipher))
    key = os.urandom(32)
    a.install_pair_key(B, "b", key, 1, 0.0)
    b.install_pair_key(A, "a", key, 1, 0.0)
    assert b.open_from_wire(a.seal_from_tap(frame(B, A), 0.0), 0.0) == frame(B, A)


def test_floor_book_is_optional():
    """Engines without a book (tests, tools) keep working; with one, frames wait for a save."""
    assert FrameEngine(A).floors is None
    engine = FrameEngine(A, floors=rf.FloorBook(), now0=0.0)
    engine.install_pair_key(B, "b", os.urandom(32), 1, 0.0)
    assert engine.open_from_wire(bytes(80), 0.0) is None and engine.drops[E.FLOORS_UNSAVED] == 1
