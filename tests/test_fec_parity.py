"""Parity over a stream: many groups, losses, frames and parity out of order, memory bounds
(tests/test_multipath_parts.py has the one-group tables)."""

from __future__ import annotations

import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway import fec_parity as F


def frames_of(rng: random.Random, count: int) -> list[bytes]:
    return [rng.randbytes(rng.randint(F.MIN_FRAME, 200)) for _ in range(count)]


def sent(k: int, base: int, frames: list[bytes]) -> list[tuple[str, int, bytes]]:
    """What the sender puts on the wire: ("frame", seq, frame) and ("parity", first, message)."""
    enc, out = F.ParityEncoder(k), []
    for i, frame in enumerate(frames):
        out.append(("frame", base + i, frame))
        parity = enc.add(base + i, frame)
        if parity is not None:
            out.append(("parity", base + i - k + 1, parity))
    return out


def receive(dec: F.ParityDecoder, wire: list[tuple[str, int, bytes]]) -> dict[int, bytes]:
    """Every frame the receiver ends up with, received or rebuilt."""
    have: dict[int, bytes] = {}
    for kind, seq, blob in wire:
        if kind == "frame":
            have[seq] = blob
            rebuilt = dec.on_frame(seq, blob)
        else:
            rebuilt = dec.on_parity(blob)
        for seq_, frame in rebuilt:
            assert have.setdefault(seq_, frame) == frame  # a rebuilt frame is the frame
    return have


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(1, 12), st.integers(0, 1 << 60), st.randoms(use_true_random=False), st.data())
def test_one_loss_per_group_is_rebuilt_in_any_order(k, groups, base, rng, data):
    frames = frames_of(rng, k * groups)
    wire = sent(k, base, frames)
    losses = data.draw(st.lists(st.integers(-1, k), min_size=groups, max_size=groups))  # per group: -1 none, k parity
    kept = [m for i, m in enumerate(wire) if losses[i // (k + 1)] != i % (k + 1)]
    # Reordered within a window of two groups, as sprayed paths of different delay do.
    window = 2 * (k + 1)
    kept = sorted(kept, key=lambda m: kept.index(m) + data.draw(st.integers(0, window)))
    dec = F.ParityDecoder()
    have = receive(dec, kept)
    assert have == {base + i: f for i, f in enumerate(frames)}
    lost_frames = sum(0 <= lost < k for lost in losses)
    assert dec.recovered >= lost_frames and dec.unrecoverable == dec.bad_parity == 0
    event(f"lost frames: {'some' if lost_frames else 'none'}")


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.randoms(use_true_random=False))
def test_two_losses_in_a_group_are_given_up_and_the_other_groups_still_rebuilt(k, rng):
    frames = frames_of(rng, k * 10)
    wire = sent(k, 0, frames)
    lost = {0, 1} | {(k + 1) * g + rng.randrange(k) for g in range(1, 10)}  # group 0 loses two
    dec = F.ParityDecoder(max_groups=4)
    have = receive(dec, [m for i, m in enumerate(wire) if i not in lost])
    assert set(have) == set(range(2, k * 10)) and dec.recovered == 9
    assert list(dec.groups) == [0] and dec.unrecoverable == 0  # still waiting for a second frame
    later = sent(k, 1000, frames_of(rng, 4 * k))
    for _, _, parity in [m for m in later if m[0] == "parity"]:  # four groups, every frame lost
        assert dec.on_parity(parity) == []
    assert dec.unrecoverable == 1 and 0 not in dec.groups and len(dec.groups) == 4


def test_memory_stays_bounded_over_a_long_stream():
    rng = random.Random(7)
    dec = F.ParityDecoder(max_frames=64, max_groups=8)
    enc = F.ParityEncoder(4)
    for seq in range(5000):
        frame = rng.randbytes(60)
        parity = enc.add(seq, frame)
        if seq % 3:  # every third frame lost: every third group of 4 loses two
            dec.on_frame(seq, frame)
        if parity is not None:
            dec.on_parity(parity)
        assert len(dec.frames) <= 64 and len(dec.groups) <= 8 and len(dec.member) <= 8 * 4
    assert dec.recovered == 833 and dec.unrecoverable + len(dec.groups) == 417  # of 1250 groups


def test_parity_messages_are_the_documented_layout():
    frames = [b"\x01" * 14, b"\x02" * 20, b"\x04" * 16]
    enc = F.ParityEncoder(3)
    msg = [enc.add(10 + i, f) for i, f in enumerate(frames)][-1]
    xor = bytes(a ^ b ^ c for a, b, c in zip(*(f.ljust(20, b"\0") for f in frames)))
    assert msg == (10).to_bytes(8, "big") + b"\x03" + (14 ^ 20 ^ 16).to_bytes(2, "big") + xor
    assert F.decode_parity(msg) == (10, 3, 14 ^ 20 ^ 16, xor)


structured_parity = st.builds(lambda first, k, lens, body: F.HEADER.pack(first, k, lens) + body,
                              st.integers(0, (1 << 64) - 1), st.integers(0, 34),
                              st.one_of(st.integers(0, 60), st.integers(0, 0xFFFF)),
                              st.binary(min_size=12, max_size=40))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=60), structured_parity))
def test_a_malformed_parity_never_raises_and_never_rebuilds_a_short_or_long_frame(message):
    dec = F.ParityDecoder()
    parsed = F.decode_parity(message)
    if parsed is not None:  # all members but the last present: the parity is used at once
        first, k, _, xor = parsed
        for seq in range(first, first + k - 1):
            assert dec.on_frame(seq, b"\x05" * 14) == []
    got = dec.on_parity(message)
    if parsed is None:
        event("refused")
        assert dec.bad_parity == 1 and got == []
    elif got:
        event("rebuilt")
        [(seq, frame)] = got
        assert seq == first + k - 1 and F.MIN_FRAME <= len(frame) <= len(xor) and dec.recovered == 1
    else:
        event("length out of range")
        assert dec.bad_parity == 1
