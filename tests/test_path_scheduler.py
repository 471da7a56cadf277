"""The path scheduler beyond tests/test_multipath_parts.py: flows coming back to a path,
paths without keys, the status shares, the flow table's bound and flow hashes."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_multipath_parts import pair, run

from gateway import path_scheduler as S

ETH = b"\x02" * 6 + b"\x04" * 6


def spread(a: S.PathScheduler, flows, now: float) -> dict[int, int]:
    """How many of ``flows`` each path carries (one frame of each flow picked)."""
    counts = {p: 0 for p in a.paths}
    for f in flows:
        counts[a.pick(f, now)[0]] += 1
    return counts


def run_flows(a: S.PathScheduler, b: S.PathScheduler, now: float, seconds: float, flows, **kw) -> float:
    """``run`` with a frame of each of ``flows`` every tick: the flows stay active."""
    end = now + seconds
    while now < end - 1e-9:
        now = run(a, b, now, 0.05, **kw)
        spread(a, flows, now)
    return now


def test_a_path_back_from_down_gets_its_share_of_long_lived_flows():
    a, b = pair()
    now = run(a, b, 0.0, 1.0, frames=10)
    flows = range(30)
    assert spread(a, flows, now) == {1: 10, 2: 10, 3: 10}
    now = run_flows(a, b, now, 1.0, flows, lost_paths=(2,), frames=10)
    assert a.paths[2].state == S.DOWN and spread(a, flows, now) == {1: 15, 2: 0, 3: 15}
    before = a.moved_flows
    now = run_flows(a, b, now, 4.0, flows, frames=10)  # past the hold-down; the flows never went idle
    assert a.paths[2].state == S.UP
    assert spread(a, flows, now) == {1: 10, 2: 10, 3: 10}
    assert a.moved_flows - before == 10  # only the excess moved back
    moved = a.moved_flows
    now = run_flows(a, b, now, 3.0, flows, frames=10)  # steady: nothing moves any more
    assert spread(a, flows, now) == {1: 10, 2: 10, 3: 10} and a.moved_flows == moved


def test_flows_driven_off_a_lossy_path_come_back_when_the_loss_ends():
    a, b = pair()
    now = run(a, b, 0.0, 1.0, frames=40)
    flows = range(30)
    spread(a, flows, now)
    now = run_flows(a, b, now, 2.0, flows, frames=40, loss={1: 0.05})
    assert spread(a, flows, now)[1] <= 3
    now = run_flows(a, b, now, 4.0, flows, frames=40)
    assert a.paths[1].weight == pytest.approx(1 / 3, abs=0.05)
    assert spread(a, flows, now)[1] >= 8


def test_a_few_flows_over_more_paths_do_not_move_back_and_forth():
    a, b = pair()
    now = run(a, b, 0.0, 1.0, frames=10)
    first = {f: a.pick(f, now) for f in range(4)}
    now = run_flows(a, b, now, 5.0, range(4), frames=10)
    assert {f: a.pick(f, now) for f in range(4)} == first and a.moved_flows == 0
    assert len(set(first.values())) == 3


def test_a_path_without_keys_does_not_make_the_timer_spin():
    a = S.PathScheduler((1, 2))
    keyed = {1}
    now = 0.0
    wakeups = 0
    while now < 1.0:
        a.probes_due(now, lambda p: p in keyed)
        a.on_timer(now)
        deadline = a.next_deadline()
        assert deadline > now
        now = deadline
        wakeups += 1
    assert wakeups <= 1.0 / a.settings.probe_interval_s + 2  # one per probe interval, not one per ms
    keyed.add(2)
    assert [p for p, _ in a.probes_due(now + 0.1, lambda p: p in keyed)] == [1, 2]  # probed once keyed


def test_the_status_shares_sum_to_one_over_the_live_paths():
    a, b = pair()
    now = run(a, b, 0.0, 2.0, frames=40, loss={3: 0.1})
    now = run(a, b, now, 1.0, lost_paths=(2,), frames=40, loss={3: 0.1})
    rows = {r["id"]: r for r in a.snapshot()}
    assert rows[2]["state"] == "down" and rows[2]["weight"] == 0
    assert rows[1]["weight"] + rows[3]["weight"] == pytest.approx(1.0, abs=1e-3)
    assert rows[1]["weight"] > 0.9 > rows[3]["weight"] > 0  # lossy but live: not zero
    assert rows[3]["loss"] == pytest.approx(0.1, abs=0.04) and rows[1]["loss"] < 0.01
    assert rows[1]["rtt_ms"] == pytest.approx(1.0, abs=0.01)  # echoes came 1 ms after their probes
    assert rows[1]["tx_frames"] > 0 and rows[1]["tx_bytes"] == 1000 * rows[1]["tx_frames"]
    assert rows[1]["delivered_bps"] == pytest.approx(40 * 20 * 1000 * 8, rel=0.05)  # 40 frames / 50 ms
    assert rows[2]["rx_frames"] == 0  # a's receive counts: nothing came back to a


def test_the_flow_table_is_bounded():
    a = S.PathScheduler((1, 2, 3), S.SchedulerSettings(max_flows=100))
    for f in range(1000):
        assert a.pick(f, 0.0)[0] in (1, 2, 3)
        assert len(a.flows) <= 100
    assert sum(p.flows for p in a.paths.values()) == len(a.flows)


def test_spraying_skips_a_down_path_and_keeps_the_weights_of_the_others():
    a, b = pair(spray=True, weights={1: 1.0, 2: 1.0, 3: 3.0})
    now = run(a, b, 0.0, 1.0, lost_paths=(2,))
    picks = [a.pick(0, now)[0] for _ in range(4000)]
    assert [picks.count(p) / 4000 for p in (1, 2, 3)] == pytest.approx([0.25, 0.0, 0.75], abs=0.02)


def ipv6_frame(sport: int, proto: int = 17, vlan: bool = False) -> bytes:
    tag = b"\x81\x00\x00\x07" if vlan else b""
    ip = bytes([0x60, 0, 0, 0, 0, 8, proto, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    return ETH + tag + b"\x86\xdd" + ip + sport.to_bytes(2, "big") + b"\x00\x35" + bytes(4)


def test_flows_of_ipv6_and_non_ip_frames():
    assert S.flow_of(ipv6_frame(1000)) == S.flow_of(ipv6_frame(1000, vlan=True)) != S.flow_of(ipv6_frame(1001))
    assert S.flow_of(ipv6_frame(1000, proto=58)) == S.flow_of(ipv6_frame(1001, proto=58))  # ICMPv6: no ports
    arp = ETH + b"\x08\x06" + bytes(28)
    assert S.flow_of(arp) == S.flow_of(arp[:14] + b"\x01" * 28) != S.flow_of(b"\x03" + arp[1:])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([b"", b"\x81\x00\x00\x01"]), st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06"]),
       st.binary(max_size=80))
def test_flow_of_never_raises_on_junk_behind_a_plausible_header(tag, ethertype, rest):
    frame = ETH + tag + ethertype + rest
    event(f"{ethertype.hex()} {'tagged' if tag else 'untagged'} {'long' if len(rest) >= 44 else 'short'}")
    assert isinstance(S.flow_of(frame), int) and S.flow_of(frame) == S.flow_of(bytes(frame))
