"""Replay window: a table test after RFC 6479's sliding-window semantics."""

import pytest

from l2crypt.core.replay import ReplayWindow

# (packet number, accepted?) in arrival order, window of 128 frames
# (3 blocks of 64 bits: (3 - 1) * 64 = 128).  Source: the rules of RFC 6479
# section 2 — new highest accepted; duplicates refused; within the window
# accepted once; older than the window refused; a jump clears the skipped blocks.
TABLE_128 = [
    (1, True),
    (1, False),          # duplicate
    (2, True),
    (200, True),         # jump forward
    (2, False),          # now older than the window (200 - 128 = 72)
    (72, False),         # exactly at the edge: 72 + 128 <= 200
    (73, True),          # just inside
    (73, False),
    (199, True),         # reordered, inside
    (150, True),
    (150, False),
    (201, True),
    (10_000, True),      # big jump clears everything
    (9_873, True),       # inside (10_000 - 127)
    (9_872, False),      # outside
    (200, False),
    (10_000, False),
]


def test_table():
    window = ReplayWindow(128)
    assert window.window_frames == 128
    for pn, accepted in TABLE_128:
        assert window.check(pn) == accepted, pn
        assert window.update(pn) == accepted, pn


def test_check_does_not_move_the_window():
    window = ReplayWindow(128)
    window.update(10)
    assert window.check(1_000_000)
    assert window.check(11)
    assert window.highest == 10  # a forged frame that fails its tag never moves it
    assert window.update(11)


def test_default_is_at_least_1024():
    from l2crypt.core.constants import DEFAULT_REPLAY_WINDOW_FRAMES

    assert ReplayWindow(DEFAULT_REPLAY_WINDOW_FRAMES).window_frames >= 1024


def test_every_number_once_under_reordering():
    window = ReplayWindow(1024)
    order = [5000 + ((i * 37) % 1000) for i in range(1000)]
    assert all(window.update(pn) for pn in order)
    assert not any(window.update(pn) for pn in order)


def test_wraparound_of_ring_blocks():
    window = ReplayWindow(64)  # two blocks
    sent = list(range(0, 64 * 10, 3))
    for pn in sent:
        assert window.update(pn)
    assert not window.update(sent[-1])
    assert not window.update(sent[-2])
    assert window.update(sent[-1] - 1)  # never seen, inside the window


def test_too_small():
    with pytest.raises(ValueError):
        ReplayWindow(10)
