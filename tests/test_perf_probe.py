"""The network-free part of scripts/bench (l2crypt/lab/perf_probe.py)."""

from __future__ import annotations

from l2crypt.lab import perf_probe


def test_engine_cost_reports_positive_per_frame_costs_for_frames_that_round_trip():
    cost = perf_probe.engine_cost(size=200, frames=300, rounds=1)
    assert cost["frame_bytes"] == 200 and cost["frames"] == 300
    assert cost["seal_us"] > 0 and cost["open_us"] > 0


def test_peer_table_rss_grows_with_the_peers_installed():
    rss = perf_probe.peer_table_rss(300)
    assert rss["peers"] == 300
    assert rss["rss_mib"] > rss["rss_mib_no_peers"] > 5
    assert rss["per_peer_kib"] > 0
