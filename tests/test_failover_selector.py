"""Key-server selection: priorities, probe failures, failover, fail-back after a hold-down."""

import pytest

from l2crypt.core.failover import Event, FailoverSelector, IllegalTransition, ServerEntry, ServerState

SERVERS = ("ks1:7788", "ks2:7788", "ks3:7788")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def states(sel: FailoverSelector) -> list[str]:
    return [s.state.value for s in sel.servers]


def test_first_choice_is_the_highest_priority():
    sel = FailoverSelector(SERVERS)
    assert sel.order() == [0, 1, 2]
    sel.connected(0, 0.0)
    assert sel.snapshot()["keyserver"] == "ks1:7788"
    assert states(sel) == ["in_use", "untried", "untried"]
    assert sel.failovers == 0


def test_connection_drop_fails_over_at_once_to_the_next_priority():
    clock = FakeClock()
    sel = FailoverSelector(SERVERS)
    sel.connected(0, clock.now)
    sel.lost(clock.advance(1))
    assert sel.order()[0] == 1, "the dead server is tried last"
    sel.connected(1, clock.now)
    assert sel.failovers == 1
    assert states(sel) == ["down", "in_use", "untried"]


def test_probe_failures_count_before_failover_and_a_pong_resets_them():
    clock = FakeClock()
    sel = FailoverSelector(SERVERS, probe_failures=3)
    sel.connected(0, clock.now)
    assert not sel.probe_missed(clock.advance(5))
    assert not sel.probe_missed(clock.advance(5))
    sel.pong(clock.advance(1))
    assert not sel.probe_missed(clock.advance(5))
    assert not sel.probe_missed(clock.advance(5))
    assert sel.probe_missed(clock.advance(5)), "third miss in a row fails over"


def test_unreachable_servers_are_skipped_in_priority_order():
    sel = FailoverSelector(SERVERS)
    sel.connect_failed(0, 0.0)
    sel.connect_failed(1, 0.0)
    assert sel.order() == [2, 0, 1]
    sel.connected(2, 1.0)
    assert sel.failovers == 0, "a first connection is not a failover"


def test_failback_waits_for_the_hold_down_and_restarts_it_after_a_miss():
    clock = FakeClock()
    sel = FailoverSelector(SERVERS, failback_holddown_s=30)
    sel.connected(0, clock.now)
    sel.lost(clock.advance(1))
    sel.connected(1, clock.now)
    assert sel.background_targets() == [0]
    sel.background_result(0, False, clock.advance(5))
    sel.background_result(0, True, clock.advance(5))
    assert sel.failback_due(clock.advance(29)) is None
    sel.background_result(0, False, clock.now)  # one miss restarts the hold-down
    sel.background_result(0, True, clock.advance(5))
    assert sel.failback_due(clock.advance(29)) is None
    sel.background_result(0, True, clock.now)
    assert sel.failback_due(clock.advance(1.5)) == 0
    sel.release()
    sel.lost(clock.now)
    assert states(sel) == ["answering", "answering", "untried"]
    assert sel.order()[0] == 0
    sel.connected(0, clock.now)
    assert (sel.failovers, sel.failbacks) == (1, 1)
    assert sel.background_targets() == []


def test_failback_prefers_the_best_answering_server():
    clock = FakeClock()
    sel = FailoverSelector(SERVERS, failback_holddown_s=10)
    sel.connected(2, clock.now)
    sel.background_result(1, True, clock.now)
    sel.background_result(0, True, clock.advance(1))
    assert sel.failback_due(clock.advance(9.5)) == 1
    assert sel.failback_due(clock.advance(1)) == 0


def test_no_background_probes_while_disconnected():
    sel = FailoverSelector(SERVERS)
    assert sel.background_targets() == []
    assert sel.failback_due(1e9) is None


def test_status_lists_every_server_with_its_state_and_the_counter():
    sel = FailoverSelector(SERVERS[:2])
    sel.connected(0, 0.0)
    sel.lost(1.0)
    sel.connected(1, 1.0)
    assert sel.snapshot() == {
        "keyserver": "ks2:7788",
        "keyservers": [{"server": "ks1:7788", "priority": 1, "state": "down"},
                       {"server": "ks2:7788", "priority": 2, "state": "in_use"}],
        "failovers": 1,
        "failbacks": 0,
    }


U, IN, A, D = ServerState.UNTRIED, ServerState.IN_USE, ServerState.ANSWERING, ServerState.DOWN
#: The moves the module docstring draws, written out here (not read from the
#: product): (state, event) -> next state; every pair not listed must raise.
EXPECTED_MOVES = {
    (U, Event.CONNECTED): IN, (U, Event.LOST): D, (U, Event.PROBE_OK): A, (U, Event.PROBE_FAILED): D,
    (A, Event.CONNECTED): IN, (A, Event.LOST): D, (A, Event.PROBE_OK): A, (A, Event.PROBE_FAILED): D,
    (D, Event.CONNECTED): IN, (D, Event.LOST): D, (D, Event.PROBE_OK): A, (D, Event.PROBE_FAILED): D,
    (IN, Event.LOST): D, (IN, Event.RELEASED): A, (IN, Event.PROBE_OK): IN,
}
ILLEGAL_MOVES = {(U, Event.RELEASED), (A, Event.RELEASED), (D, Event.RELEASED), (IN, Event.CONNECTED),
                 (IN, Event.PROBE_FAILED)}


def test_the_expected_table_names_every_state_and_event_once():
    every = {(state, event) for state in ServerState for event in Event}
    assert set(EXPECTED_MOVES) | ILLEGAL_MOVES == every
    assert not set(EXPECTED_MOVES) & ILLEGAL_MOVES


@pytest.mark.parametrize("state", list(ServerState))
@pytest.mark.parametrize("event", list(Event))
def test_each_state_and_event_moves_as_the_table_says_or_raises_without_change(state, event):
    entry = ServerEntry("ks", 1, state)
    if (state, event) in EXPECTED_MOVES:
        assert entry.apply(event, 0.0) == EXPECTED_MOVES[(state, event)]
        assert entry.state == EXPECTED_MOVES[(state, event)]
    else:
        with pytest.raises(IllegalTransition):
            entry.apply(event, 0.0)
        assert entry.state == state


def test_in_use_server_cannot_be_released_twice():
    entry = ServerEntry("ks", 1, ServerState.ANSWERING)
    with pytest.raises(IllegalTransition):
        entry.apply(Event.RELEASED, 0.0)
