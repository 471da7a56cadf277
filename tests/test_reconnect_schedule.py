"""failover.ReconnectSchedule (sans-I/O): the key client's waits between
connection attempts -- jitter after a session ends, jittered exponential
backoff while no server takes it."""

import itertools
import random

import pytest

from l2crypt.core.failover import ReconnectSchedule


def fixed(*values):
    cycle = itertools.cycle(values)
    return lambda: next(cycle)


def test_after_a_session_the_wait_is_spread_over_the_jitter():
    schedule = ReconnectSchedule(jitter_s=2.0, rand=fixed(0.0, 0.5, 0.999))
    assert [schedule.after_session() for _ in range(3)] == [0.0, 1.0, pytest.approx(1.998)]
    schedule = ReconnectSchedule(jitter_s=2.0, rand=random.Random(7).random)
    assert all(0 <= schedule.after_session() < 2.0 for _ in range(1000))


def test_failures_back_off_doubling_to_the_ceiling_never_below_half():
    top = ReconnectSchedule(min_s=0.2, max_s=5.0, rand=fixed(0.999999))
    assert [round(top.after_failure(), 3) for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    bottom = ReconnectSchedule(min_s=0.2, max_s=5.0, rand=fixed(0.0))
    assert [round(bottom.after_failure(), 3) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5]


def test_a_session_or_a_fixed_wait_starts_the_backoff_again():
    schedule = ReconnectSchedule(min_s=0.2, max_s=5.0, rand=fixed(0.999999))
    for _ in range(4):
        schedule.after_failure()
    schedule.after_session()
    assert round(schedule.after_failure(), 3) == 0.2
    schedule.after_failure()
    assert schedule.fixed(10.0) == 10.0
    assert round(schedule.after_failure(), 3) == 0.2


def test_hosts_dropped_together_come_back_spread_out():
    """10,000 clients of one server that restarts: their first attempts spread
    evenly over the jitter, not in one instant."""
    rng = random.Random(1)
    waits = sorted(ReconnectSchedule(jitter_s=1.0, rand=rng.random).after_session() for _ in range(10_000))
    per_tenth = [sum(1 for w in waits if k / 10 <= w < (k + 1) / 10) for k in range(10)]
    assert max(per_tenth) < 1_100 and min(per_tenth) > 900


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ReconnectSchedule(min_s=0)
    with pytest.raises(ValueError):
        ReconnectSchedule(min_s=2.0, max_s=1.0)
