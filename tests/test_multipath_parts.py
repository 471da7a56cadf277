"""The sans-I/O parts of multipath tunnels (issue 17): reorder buffer, parity, probes, scheduler."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import fec_parity as F
from gateway import path_scheduler as S
from gateway import probe_wire as P
from gateway.reorder_buffer import RESET_GAP, ReorderBuffer


def frame(i: int, size: int = 60) -> bytes:
    return bytes([i % 256]) * 14 + i.to_bytes(4, "big") + bytes(size)


# --- reorder buffer -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.permutations(range(40)), st.integers(0, 1 << 40))
def test_any_order_within_the_bound_comes_out_in_order_once(order, base):
    buf = ReorderBuffer(max_frames=64, max_wait_s=1.0)
    buf.push(base - 1, b"start", 0.0)
    out = []
    for seq in order:
        out += buf.push(base + seq, frame(seq), 0.0)
    assert out == [frame(i) for i in range(40)] and not buf.held and buf.late == buf.skipped == 0


def test_a_gap_is_skipped_after_the_wait_or_when_the_buffer_is_full():
    buf = ReorderBuffer(max_frames=3, max_wait_s=0.03)
    assert buf.push(10, b"a", 0.0) == [b"a"]
    assert buf.push(12, b"c", 0.0) == [] and buf.next_deadline() == pytest.approx(0.03)
    assert buf.due(0.02) == [] and buf.due(0.031) == [b"c"] and buf.skipped == 1
    assert buf.push(11, b"b-late", 0.04) == [b"b-late"] and buf.late == 1  # after its gap: on at once
    for seq in (14, 15, 16):
        assert buf.push(seq, b"x", 0.05) == []
    assert buf.push(17, b"y", 0.05) == [b"x", b"x", b"x", b"y"]  # four held: over the bound
    assert buf.skipped == 2


def test_a_sender_restart_jump_starts_a_new_order():
    buf = ReorderBuffer()
    buf.push(5, b"a", 0.0)
    buf.push(7, b"held", 0.0)
    assert buf.push(5 + RESET_GAP + 10, b"new", 0.0) == [b"held", b"new"]
    assert buf.push(5 + RESET_GAP + 11, b"next", 0.0) == [b"next"]


# --- parity ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.data())
def test_any_one_lost_frame_of_a_group_is_rebuilt_byte_for_byte(k, data):
    frames = [data.draw(st.binary(min_size=14, max_size=300)) for _ in range(k)]
    enc = F.ParityEncoder(k)
    outs = [enc.add(1000 + i, f) for i, f in enumerate(frames)]
    assert outs[:-1] == [None] * (k - 1) and outs[-1] is not None
    lost = data.draw(st.integers(0, k - 1))
    parity_first = data.draw(st.booleans())
    dec = F.ParityDecoder()
    got = dec.on_parity(outs[-1]) if parity_first else []
    for i, f in enumerate(frames):
        if i != lost:
            got += dec.on_frame(1000 + i, f)
    if not parity_first:
        got += dec.on_parity(outs[-1])
    assert got == [(1000 + lost, frames[lost])] and dec.recovered == 1
    assert not dec.groups and not dec.member  # nothing left pending


def test_two_lost_frames_are_not_rebuilt_and_bad_parity_is_counted():
    enc, dec = F.ParityEncoder(4), F.ParityDecoder(max_groups=1)
    parity = [enc.add(i, frame(i)) for i in range(4)][-1]
    assert dec.on_frame(0, frame(0)) == [] and dec.on_frame(1, frame(1)) == []
    assert dec.on_parity(parity) == []
    assert dec.on_parity(bytes(5)) == [] and dec.on_parity(parity[:8] + b"\x01" + parity[9:]) == []
    assert dec.bad_parity == 2
    second = [enc.add(i, frame(i)) for i in range(10, 14)][-1]
    dec.on_parity(second)  # pushes the first group out: given up
    assert dec.unrecoverable == 1


def test_a_gap_in_the_numbers_starts_a_new_group():
    enc = F.ParityEncoder(3)
    assert [enc.add(s, frame(s)) for s in (1, 2, 4, 5)] == [None] * 4
    parity = enc.add(6, frame(6))
    assert F.decode_parity(parity)[:2] == (4, 3)


# --- probes ------------------------------------------------------------------------------


def test_probe_round_trip_and_malformed_probes():
    msg = P.encode_probe(7, 12.5, 100, 150_000)
    assert len(msg) == P.LEN == 28 and P.decode_probe(msg) == (7, 12.5, 100, 150_000)
    assert P.decode_probe(msg[:-1]) is None and P.decode_probe(msg + b"x") is None
    assert P.decode_probe(P.PROBE.pack(1, float("nan"), 0, 0)) is None


# --- scheduler ----------------------------------------------------------------------------


def settings_(**kw) -> S.SchedulerSettings:
    return S.SchedulerSettings(**kw)


def evenly_lost(count: int, share: float) -> bool:
    """Whether the ``count``-th frame sent is lost when ``share`` of them are, evenly spread
    (the same for every test order, unlike a shared random generator)."""
    return int(count * share) > int((count - 1) * share)


def exchange(a: S.PathScheduler, b: S.PathScheduler, now: float, lost_paths=(), loss: dict | None = None,
             frames: int = 0) -> None:
    """One tick: ``frames`` frames per path a -> b (``loss`` share lost), then a's due probes
    answered by b unless their path is in ``lost_paths``."""
    for path, state in a.paths.items():
        for _ in range(frames if state.state == S.UP else 0):  # the scheduler sends on no other
            a.on_sent(path, 1000)
            if path not in lost_paths and not evenly_lost(state.tx_frames, (loss or {}).get(path, 0.0)):
                b.on_received(path, 1000)
    for path, probe in a.probes_due(now):
        if path in lost_paths:
            continue
        echo = b.on_probe(path, probe, now)
        assert a.on_echo(path, echo, now + 0.001)
    a.on_timer(now)


def run(a, b, start: float, seconds: float, **kw) -> float:
    now = start
    while now < start + seconds:
        exchange(a, b, now, **kw)
        now = round(now + 0.05, 6)
    return now


def pair(**kw):
    return S.PathScheduler((1, 2, 3), settings_(**kw)), S.PathScheduler((1, 2, 3), settings_(**kw))


def test_a_path_whose_echoes_stop_is_out_within_a_second_and_its_flows_move():
    a, b = pair()
    now = run(a, b, 0.0, 2.0, frames=10)
    flows = {f: a.pick(f, now)[0] for f in range(30)}
    assert set(flows.values()) == {1, 2, 3}
    start = now
    while a.paths[2].state == S.UP:
        now = run(a, b, now, 0.05, lost_paths=(2,), frames=10)
        assert now - start <= 1.0
    assert {a.pick(f, now)[0] for f in range(30)} == {1, 3}
    assert all(a.pick(f, now)[0] == p for f, p in flows.items() if p != 2)  # the others stay put
    # Back after the hold-down, not before.
    now = run(a, b, now, 1.0, frames=10)
    assert a.paths[2].state == S.HOLDDOWN
    now = run(a, b, now, 2.5, frames=10)
    assert a.paths[2].state == S.UP and a.paths[2].weight > 0.2


def test_a_path_with_5_percent_loss_loses_most_of_its_weight_in_two_intervals_and_gets_it_back():
    a, b = pair()
    now = run(a, b, 0.0, 2.0, frames=40)
    assert a.paths[1].weight == pytest.approx(1 / 3, abs=0.02)
    flows = [f for f in range(60) if a.pick(f, now) == (1,)]
    assert flows
    now = run(a, b, now, 2.0, frames=40, loss={1: 0.05})
    assert a.paths[1].loss == pytest.approx(0.05, abs=0.02)
    assert a.paths[1].weight < 1 / 6  # less than half its share, two intervals in
    assert sum(a.pick(f, now) == (1,) for f in flows) < len(flows) / 2  # its flows moved off
    now = run(a, b, now, 1.0, frames=40, loss={1: 0.05})
    assert a.paths[1].weight < 1 / 8
    now = run(a, b, now, 2.0, frames=40)
    assert a.paths[1].weight == pytest.approx(1 / 3, abs=0.05)


def test_four_flows_on_three_equal_paths_use_all_three():
    a = S.PathScheduler((1, 2, 3))
    assert sorted(a.pick(f, 0.0)[0] for f in (11, 22, 33, 44)).count(1) >= 1
    assert {a.pick(f, 0.0)[0] for f in (11, 22, 33, 44)} == {1, 2, 3}


def test_spraying_follows_the_weights():
    a = S.PathScheduler((1, 2, 3), settings_(spray=True, weights={1: 1.0, 2: 2.0, 3: 1.0}))
    picks = [a.pick(0, 0.0)[0] for _ in range(4000)]
    assert [picks.count(p) / 4000 for p in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.25], abs=0.01)


def test_redundant_gives_two_distinct_live_paths_and_never_none():
    a, b = pair(mode="redundant")
    now = run(a, b, 0.0, 1.0)
    assert len(set(a.pick(1, now))) == 2
    now = run(a, b, now, 1.0, lost_paths=(1, 2))
    assert a.pick(1, now) == (3,)
    now = run(a, b, now, 1.0, lost_paths=(1, 2, 3))
    assert len(a.pick(1, now)) >= 1  # nothing up: still sends


def test_paths_without_keys_are_not_probed_and_stay_up():
    a = S.PathScheduler((1, 2))
    assert a.probes_due(0.0, lambda p: p == 1) and a.paths[2].waiting_since is None
    a.on_timer(5.0)
    assert (a.paths[1].state, a.paths[2].state) == (S.DOWN, S.UP)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_junk_never_raises(junk):
    a = S.PathScheduler((1, 2))
    assert a.on_echo(1, junk, 1.0) in (True, False) and a.on_echo(9, junk, 1.0) is False
    a.on_probe(1, junk, 1.0)
    assert isinstance(S.flow_of(junk), int)
    F.ParityDecoder().on_parity(junk)


def test_flows_of_tcp_and_udp_frames():
    eth = b"\x02" * 12 + b"\x08\x00"
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    one, two = eth + ip + b"\x00\x50\x10\x00" + bytes(16), eth + ip + b"\x00\x50\x10\x01" + bytes(16)
    assert S.flow_of(one) == S.flow_of(one + b"payload") != S.flow_of(two)
    vlan = b"\x02" * 12 + b"\x81\x00\x00\x05" + b"\x08\x00" + ip + b"\x00\x50\x10\x00" + bytes(16)
    assert S.flow_of(vlan) == S.flow_of(one)
