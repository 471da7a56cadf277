"""Fuzzing the receive path: the frame decoder and ``FrameEngine.open_from_wire``.

Whatever arrives, nothing raises; a frame is accepted only if a real sender
sealed exactly those bytes (and only once); everything else is counted under a
named drop reason, so (after held frames age out) accepted + drops == inputs.
Bounded examples keep CI fast.  The scapy corpus in ``corpus_frames`` is run
through the same engine with the outcome each frame must get.

Every drop reason of the receive path must be reached: ``RX_REASONS`` is
checked against what the engine's source can count, each fuzz test records
its reasons with ``hypothesis.event``, and a seeded fuzz loop of real sealed
frames, mutated, asserts it reached every one of them.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

from corpus_frames import HELD, PEER_MAC, RX_MAC, STRANGER_MAC, crafted
from drop_reasons import counted, returned
from mutations import mutation
from l2crypt.core import engine as engine_mod, engine_keys, frame_wire, peer_table
from l2crypt.core.constants import DEFAULT_KEY_MAX_AGE_S
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.frame_wire import parse_mac
from l2crypt.core.replay_floor import FloorBook

RX = parse_mac(RX_MAC)
PEER = parse_mac(PEER_MAC)
STRANGER = parse_mac(STRANGER_MAC)
REVOKED = parse_mac("02:4c:32:00:00:66")   # the key server revoked this host
UNKNOWN = parse_mac("02:4c:32:00:00:77")   # the key server said no host holds this MAC
EXPIRED = parse_mac("02:4c:32:00:00:88")   # the key server offered only an expired key for it
BCAST = b"\xff" * 6
PAIR_KEY = bytes(range(100, 132))
MCAST_KEY = bytes(range(32))
#: Every drop reason of the receive path (``open_from_wire``, holding, ``on_timer``).
RX_REASONS = {
    "truncated", "not_l2crypt", "unknown_version", "floors_unsaved", "own_frame", "revoked_sender",
    "not_for_us", "unknown_key_id", "unknown_sender", "stale_key", "replayed", "bad_tag", "no_key",
    "key_expired", "pending_full", "hold_overflow", "hold_expired",
}
#: Counted on both paths, only for a frame flagged csum_partial by a genuine
#: sender whose checksum cannot be found (no fuzzed frame gets past the tag
#: with it; tests/test_engine_csum.py reaches it).
BOTH_REASONS = {"csum_unresolved"}
#: Reasons only the send path counts.
TX_REASONS = {"runt", "foreign_source", "pn_exhausted", "pn_unreserved"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_reason_lists_are_what_the_engine_can_count():
    in_code = (counted(engine_mod) | counted(engine_keys) | returned(frame_wire.decode_fields)
               | returned(peer_table.PeerTable.send))  # the send step's refusals
    assert RX_REASONS | TX_REASONS | BOTH_REASONS == in_code
    assert not RX_REASONS & TX_REASONS


def receiver(floors: FloorBook | None = None) -> FrameEngine:
    """RX with a pair key for PEER (PW_ID 1), multicast PW_ID 1, a revoked
    host, an unknown MAC and one whose key came expired."""
    eng = FrameEngine(RX, EngineSettings(max_pending_keys=8, hold_frames=4), floors=floors)
    eng.install_pair_key(PEER, "peer", PAIR_KEY, 1, 0.0)
    eng.install_multicast_key(MCAST_KEY, 1, 0.0)
    eng.revoke_peer(REVOKED)
    eng.mark_unknown(UNKNOWN, 0.0)
    eng.install_pair_key(EXPIRED, "expired", bytes(32), 1, 0.0, age_s=DEFAULT_KEY_MAX_AGE_S)
    return eng


def _genuine() -> dict[bytes, bytes]:
    """Frames sealed by the peer (unicast to RX and broadcast) -> their plain frame."""
    sender = FrameEngine(PEER, EngineSettings(), pn_start=1000)
    sender.install_pair_key(RX, "rx", PAIR_KEY, 1, 0.0)
    sender.install_multicast_key(MCAST_KEY, 1, 0.0)
    out = {}
    for i in range(6):
        for dst in (RX, BCAST):
            plain = dst + PEER + b"\x08\x00" + bytes([i]) * (46 + 50 * i)
            out[sender.seal_from_tap(plain, 0.0)] = plain
    return out


GENUINE = _genuine()
GENUINE_LIST = list(GENUINE)


def run(eng: FrameEngine, frames: list[bytes]) -> list[bytes]:
    """Feed frames (never raising), age out held ones; check the books balance."""
    accepted = []
    for i, frame in enumerate(frames):
        plain = eng.open_from_wire(frame, 1.0 + i * 1e-3)
        if plain is not None:
            accepted.append((frame, plain))
        eng.take_key_requests(1.0 + i * 1e-3)  # nobody answers
    eng.on_timer(1e3)
    assert not eng.holds.pending
    if currently_in_test_context():
        for reason in +eng.drops:
            event(f"drop: {reason}")
        event(f"opened: {len(accepted) > 0}")
    assert set(+eng.drops) <= RX_REASONS, eng.drops
    assert len(accepted) + sum(eng.drops.values()) == len(frames), (len(accepted), eng.drops)
    assert eng.counters["opened"] == len(accepted)
    for frame, plain in accepted:
        assert GENUINE.get(frame) == plain  # only genuine frames, with their own plaintext
    return [f for f, _ in accepted]


@FUZZ
@given(st.binary(max_size=2000))
def test_decode_header_never_raises(data):
    out = frame_wire.decode_header(data, 0x88B5)
    event(out if isinstance(out, str) else "header")
    assert isinstance(out, frame_wire.FrameHeader) or out in RX_REASONS


def _any_bytes():
    """Mostly long enough to pass the length check, sometimes not."""
    return st.one_of(st.binary(min_size=frame_wire.MIN_SEALED_FRAME, max_size=300),
                     st.binary(max_size=frame_wire.MIN_SEALED_FRAME - 1))


@FUZZ
@given(st.lists(_any_bytes(), max_size=30))
def test_arbitrary_bytes_are_dropped_and_counted(frames):
    assert run(receiver(), frames) == []


def _l2c_shaped():
    macs = st.sampled_from([RX, PEER, STRANGER, REVOKED, UNKNOWN, EXPIRED, BCAST, b"\x01\x00\x5e\x00\x00\x01"])
    return st.builds(
        lambda dst, src, et, ver, kid, pw, pn, body: dst + src + frame_wire.HEADER.pack(et, ver, kid, pw, pn) + body,
        macs, macs, st.sampled_from([0x88B5, 0x88B5, 0x88B5, 0x0800]), st.sampled_from([1, 1, 1, 0, 255]),
        st.one_of(st.sampled_from([1, 1, 2, 2, 0]), st.integers(0, 255)), st.sampled_from([0, 1, 1, 2, 0xFFFFFFFF]),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1])),
        st.binary(min_size=frame_wire.MIN_SEALED_FRAME - frame_wire.AAD_LEN, max_size=120),
    )


@FUZZ
@given(st.lists(_l2c_shaped(), max_size=30))
def test_l2crypt_shaped_garbage_is_dropped_and_counted(frames):
    assert run(receiver(), frames) == []


def _mutation(frame: bytes, data) -> bytes:
    return mutation(frame, data, GENUINE_LIST, 28, [(0, 6), (6, 6), (12, 2), (14, 1), (15, 1), (16, 4), (20, 8)])


@FUZZ
@given(st.data())
def test_mutated_real_frames_only_genuine_ones_get_through_once(data):
    frames = []
    for _ in range(data.draw(st.integers(1, 25))):
        frame = data.draw(st.sampled_from(GENUINE_LIST))
        if data.draw(st.booleans()):
            frame = _mutation(frame, data)
        frames.append(frame)
    accepted = run(receiver(), frames)
    assert len(accepted) == len(set(accepted))  # a replay never gets through
    assert set(accepted) == {f for f in frames if f in GENUINE}  # every genuine frame once


SOURCES = [RX, PEER, PEER, STRANGER, REVOKED, UNKNOWN, EXPIRED, BCAST]
DESTINATIONS = [RX, RX, PEER, STRANGER, BCAST, b"\x01\x00\x5e\x00\x00\x01"]


def _fuzzed(rng: random.Random, count: int) -> list[bytes]:
    """Real sealed frames, resent or mutated in one place each (and some garbage)."""
    frames = []
    for _ in range(count):
        frame = rng.choice(GENUINE_LIST)
        kind = rng.choice(["resend", "flip", "truncate", "extend", "splice", "field", "field", "field", "garbage"])
        if kind == "flip":
            pos = rng.randrange(frame_wire.AAD_LEN, len(frame))
            frame = frame[:pos] + bytes([frame[pos] ^ rng.randrange(1, 256)]) + frame[pos + 1:]
        elif kind == "truncate":
            frame = frame[:rng.randrange(len(frame))]
        elif kind == "extend":
            frame += rng.randbytes(rng.randrange(1, 20))
        elif kind == "splice":
            frame = frame[:frame_wire.AAD_LEN] + rng.choice(GENUINE_LIST)[frame_wire.AAD_LEN:]
        elif kind == "garbage":
            frame = rng.randbytes(rng.randrange(200))
        elif kind == "field":
            offset, value = rng.choice([
                (0, rng.choice(DESTINATIONS)),
                (6, rng.choice(SOURCES + [bytes([2]) + rng.randbytes(5)])),  # last: a made-up host
                (12, rng.choice([0x88B5, 0x0800, 0x8100]).to_bytes(2, "big")),
                (14, bytes([rng.choice([0, 2, 255])])),                       # version
                (15, bytes([rng.choice([0, 1, 2, 3, 255])])),                 # key id
                (16, rng.choice([0, 1, 2, 7, 2**32 - 1]).to_bytes(4, "big")),  # PW_ID
                (20, rng.randrange(2**64).to_bytes(8, "big")),                # packet number
            ])
            frame = frame[:offset] + value + frame[offset + len(value):]
        frames.append(frame)
    return frames


def test_fuzz_loop_reaches_every_receive_drop_reason():
    """A seeded loop (it runs the same alone or in any order): real frames,
    mutated, reach every reason in ``RX_REASONS``, and the books balance."""
    rng = random.Random(0x12C)
    frames = _fuzzed(rng, 1500)
    eng = receiver()
    accepted = run(eng, frames)
    assert accepted and set(accepted) <= set(GENUINE_LIST)
    # The same frames once the replay floors went unsaved too long: all refused.
    late = receiver(FloorBook())
    assert [late.open_from_wire(f, 1.0) for f in frames[:20]] == [None] * 20
    reached = set(+eng.drops) | set(+late.drops)
    assert reached == RX_REASONS, sorted(RX_REASONS - reached)
    assert +late.drops == {"floors_unsaved": 20}


def test_forged_huge_packet_numbers_do_not_poison_the_window():
    eng = receiver()
    forged = [f[:20] + (2**64 - 1 - i).to_bytes(8, "big") + f[28:] for i, f in enumerate(GENUINE_LIST * 20)]
    assert run(eng, forged) == []
    assert eng.drops["bad_tag"] == len(forged)
    # The genuine frames (PN ~1000) still open: the window never moved.
    for frame in GENUINE_LIST:
        assert eng.open_from_wire(frame, 2e3) == GENUINE[frame]


@pytest.mark.parametrize("name,frame,outcome", crafted(), ids=[c[0] for c in crafted()])
def test_crafted_corpus(name, frame, outcome):
    eng = receiver()
    assert eng.open_from_wire(frame, 1.0) is None
    if outcome == HELD:
        assert not +eng.drops and eng.counters["held"] == 1
        assert eng.take_key_requests(1.0)  # a key request goes out
        eng.on_timer(1e3)
        assert +eng.drops == {"hold_expired": 1}
    else:
        assert +eng.drops == {outcome: 1}, name


def test_crafted_corpus_mixed_with_real_traffic():
    """The whole corpus between genuine frames: the genuine ones all open."""
    frames = []
    for (_, frame, _), good in zip(crafted() * 2, GENUINE_LIST * 5):
        frames += [frame, good]
    accepted = run(receiver(), frames)
    assert set(accepted) == set(GENUINE_LIST)
