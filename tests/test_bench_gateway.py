"""``scripts/bench gateway``'s pure parts: rows, medians of rounds, ratios to OpenVPN."""

import pytest

from l2crypt.lab.bench_gateway import OPENVPN, PATHS, median_rounds, parse_rows, ratios

X86, NETID = PATHS


def test_rows():
    assert parse_rows([]) == {"l2crypt": []}
    assert parse_rows(["simple=", "fast=--datapath batched --wire-ring v2"]) == {
        "simple": [], "fast": ["--datapath", "batched", "--wire-ring", "v2"]}
    for bad in ("no-equals", "=--datapath batched"):
        with pytest.raises(ValueError, match="NAME=OPTIONS"):
            parse_rows([bad])


def run(tcp: float, rtt: float) -> dict:
    return {"tcp_mbit_s": tcp, "rtt_avg_ms": rtt, "retransmits": 0, "gw_cpu_s_per_gb": None}


def test_medians_and_ratios():
    rounds = [{"l2crypt": {X86: run(t, 1.0), NETID: run(t / 2, 2.0), "status": {"gA": {}}},
               OPENVPN: {X86: run(200, 0.5), NETID: run(100, 1.0)}} for t in (300, 500, 400)]
    results = median_rounds(rounds)
    assert results["l2crypt"][X86]["tcp_mbit_s"] == 400 and results["l2crypt"][NETID]["tcp_mbit_s"] == 200
    assert results["l2crypt"][X86]["gw_cpu_s_per_gb"] is None and results["l2crypt"]["status"] == {"gA": {}}
    assert ratios(results) == {"l2crypt": {X86: {"tcp": 2.0, "rtt": 2.0}, NETID: {"tcp": 2.0, "rtt": 2.0}}}
    assert ratios({"l2crypt": results["l2crypt"]}) == {}
