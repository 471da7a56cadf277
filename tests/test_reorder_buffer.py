"""The reorder buffer against a simulated clock: frames sprayed over paths of different delay,
some lost, the timer firing at ``next_deadline`` (tests/test_multipath_parts.py has the tables)."""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.reorder_buffer import ReorderBuffer

SEND_GAP_S = 0.001
WAIT_S = 0.03


def deliver(buf: ReorderBuffer, arrivals: list[tuple[float, int]]) -> list[int]:
    """Push ``(arrival time, seq)`` in time order, firing ``due`` at each deadline on the way
    and once at the end; the delivered seqs."""
    out: list[bytes] = []
    for at, seq in sorted(arrivals):
        while buf.next_deadline() is not None and buf.next_deadline() <= at:
            out += buf.due(buf.next_deadline())
        out += buf.push(seq, seq.to_bytes(8, "big") + b"frame", at)
    if buf.next_deadline() is not None:
        out += buf.due(buf.next_deadline() + 1.0)
    assert buf.next_deadline() is None and not buf.held
    return [int.from_bytes(f[:8], "big") for f in out]


def stream(count: int, data, max_delay_s: float, lose: bool) -> tuple[list[tuple[float, int]], set[int]]:
    base = data.draw(st.integers(0, 1 << 48))
    lost = set(data.draw(st.sets(st.integers(1, count - 2), max_size=count // 5))) if lose and count > 2 else set()
    arrivals = [(i * SEND_GAP_S + (data.draw(st.floats(0.0, max_delay_s)) if i else 0.0), base + i)
                for i in range(count) if i not in lost]  # the first seq seen starts the order: frame 0
    return arrivals, {base + i for i in lost}


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 200), st.booleans(), st.data())
def test_jitter_below_the_wait_comes_out_in_order_and_only_losses_are_skipped(count, lose, data):
    arrivals, lost = stream(count, data, WAIT_S * 0.9, lose)
    buf = ReorderBuffer(max_frames=256, max_wait_s=WAIT_S)
    out = deliver(buf, arrivals)
    assert out == sorted(seq for _, seq in arrivals)  # all, once, in order
    assert buf.late == 0
    assert buf.skipped == len(lost)  # the first and last arrive: every loss is a gap
    event("with losses" if lost else "no loss")
    event("reordered" if [s for _, s in sorted(arrivals)] != sorted(s for _, s in arrivals) else "in order")


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 200), st.data())
def test_frames_later_than_the_wait_are_delivered_once_and_counted_late(count, data):
    arrivals, lost = stream(count, data, WAIT_S * 4, True)
    buf = ReorderBuffer(max_frames=256, max_wait_s=WAIT_S)
    out = deliver(buf, arrivals)
    assert sorted(out) == sorted(seq for _, seq in arrivals)  # nothing lost, nothing doubled
    highest, behind = -1, 0
    for seq in out:
        behind += seq < highest
        highest = max(highest, seq)
    assert buf.late == behind  # those delivered after a later one were counted
    event(f"late: {'some' if buf.late else 'none'}")


def test_a_full_buffer_skips_the_gap_at_once():
    buf = ReorderBuffer(max_frames=8, max_wait_s=10.0)
    assert buf.push(0, b"0", 0.0) == [b"0"]
    assert [buf.push(s, bytes([s]), 0.0) for s in range(2, 10)] == [[]] * 8
    assert buf.push(10, b"x", 0.0) == [bytes([s]) for s in range(2, 10)] + [b"x"]
    assert buf.skipped == 1 and buf.next_deadline() is None


def test_a_duplicate_of_a_held_frame_is_held_once():
    buf = ReorderBuffer()
    buf.push(0, b"a", 0.0)
    assert buf.push(2, b"c", 0.0) == [] and buf.push(2, b"c", 0.001) == []
    assert buf.push(1, b"b", 0.002) == [b"b", b"c"] and buf.late == 0
