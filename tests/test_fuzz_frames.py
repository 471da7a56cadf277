"""Fuzzing the receive path: the frame decoder and ``FrameEngine.open_from_wire``.

Whatever arrives, nothing raises; a frame is accepted only if a real sender
sealed exactly those bytes (and only once); everything else is counted under a
named drop reason, so (after held frames age out) accepted + drops == inputs.
Bounded examples keep CI fast.  The scapy corpus in ``corpus_frames`` is run
through the same engine with the outcome each frame must get.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from corpus_frames import HELD, PEER_MAC, RX_MAC, STRANGER_MAC, crafted
from l2crypt import engine as engine_mod, frame_wire
from l2crypt.engine import EngineSettings, FrameEngine
from l2crypt.frame_wire import parse_mac

RX = parse_mac(RX_MAC)
PEER = parse_mac(PEER_MAC)
STRANGER = parse_mac(STRANGER_MAC)
BCAST = b"\xff" * 6
PAIR_KEY = bytes(range(100, 132))
MCAST_KEY = bytes(range(32))
KNOWN_REASONS = {
    frame_wire.TRUNCATED, frame_wire.NOT_L2CRYPT, frame_wire.UNKNOWN_VERSION,
    engine_mod.NO_KEY, engine_mod.NOT_FOR_US, engine_mod.OWN_FRAME, engine_mod.UNKNOWN_SENDER,
    engine_mod.UNKNOWN_KEY_ID, engine_mod.STALE_KEY, engine_mod.REPLAYED, engine_mod.BAD_TAG,
    engine_mod.HOLD_OVERFLOW, engine_mod.HOLD_EXPIRED, engine_mod.REVOKED_SENDER, engine_mod.PENDING_FULL,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def receiver() -> FrameEngine:
    eng = FrameEngine(RX, EngineSettings(max_pending_keys=8))
    eng.install_pair_key(PEER, "peer", PAIR_KEY, 1, 0.0)
    eng.install_multicast_key(MCAST_KEY, 1, 0.0)
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
    assert set(eng.drops) <= KNOWN_REASONS, eng.drops
    assert len(accepted) + sum(eng.drops.values()) == len(frames), (len(accepted), eng.drops)
    assert eng.counters["opened"] == len(accepted)
    for frame, plain in accepted:
        assert GENUINE.get(frame) == plain  # only genuine frames, with their own plaintext
    return [f for f, _ in accepted]


@FUZZ
@given(st.binary(max_size=2000))
def test_decode_header_never_raises(data):
    out = frame_wire.decode_header(data, 0x88B5)
    assert isinstance(out, frame_wire.FrameHeader) or out in KNOWN_REASONS


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=30))
def test_arbitrary_bytes_are_dropped_and_counted(frames):
    assert run(receiver(), frames) == []


def _l2c_shaped():
    macs = st.sampled_from([RX, PEER, STRANGER, BCAST, b"\x01\x00\x5e\x00\x00\x01"])
    return st.builds(
        lambda dst, src, et, ver, kid, pw, pn, body: dst + src + frame_wire.HEADER.pack(et, ver, kid, pw, pn) + body,
        macs, macs, st.sampled_from([0x88B5, 0x88B5, 0x0800, 0x8100]), st.sampled_from([1, 1, 0, 2, 255]),
        st.integers(0, 255), st.sampled_from([0, 1, 1, 2, 0xFFFFFFFF]),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1])),
        st.binary(max_size=120),
    )


@FUZZ
@given(st.lists(_l2c_shaped(), max_size=30))
def test_l2crypt_shaped_garbage_is_dropped_and_counted(frames):
    assert run(receiver(), frames) == []


def _mutation(frame: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "field", "splice"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(frame) - 1))
        return frame[:pos] + bytes([frame[pos] ^ data.draw(st.integers(1, 255))]) + frame[pos + 1:]
    if kind == "truncate":
        return frame[:data.draw(st.integers(0, len(frame) - 1))]
    if kind == "extend":
        return frame + data.draw(st.binary(min_size=1, max_size=20))
    if kind == "splice":  # another genuine frame's body under this header
        other = data.draw(st.sampled_from(GENUINE_LIST))
        return frame[:28] + other[28:]
    offset, size = data.draw(st.sampled_from([(0, 6), (6, 6), (12, 2), (14, 1), (15, 1), (16, 4), (20, 8)]))
    value = data.draw(st.integers(0, 2 ** (8 * size) - 1))
    return frame[:offset] + value.to_bytes(size, "big") + frame[offset + size:]


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
        assert sum(eng.drops.values()) == 0 and eng.counters["held"] == 1
        assert eng.take_key_requests(1.0)  # a key request goes out
        eng.on_timer(1e3)
        assert dict(eng.drops) == {"hold_expired": 1}
    else:
        assert dict(eng.drops) == {outcome: 1}, name


def test_crafted_corpus_mixed_with_real_traffic():
    """The whole corpus between genuine frames: the genuine ones all open."""
    frames = []
    for (_, frame, _), good in zip(crafted() * 2, GENUINE_LIST * 5):
        frames += [frame, good]
    accepted = run(receiver(), frames)
    assert set(accepted) == set(GENUINE_LIST)
