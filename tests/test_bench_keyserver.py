"""``scripts/bench keyserver`` at toy scale: the open loop, the mix, the
storm and the figures it reports are all there (the real runs are big)."""

import json

from l2crypt.lab import bench_keyserver


def test_a_small_run_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_keyserver.main(["--hosts", "8", "--rate", "200", "--seconds", "1", "--workers", "2",
                                 "--clients", "2", "--storm", "--storm-jitter", "0.2", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["connected"] == 8 and result["errors"] == {}
    assert result["answered"] == result["requests"] == 200
    assert 150 < result["achieved_per_s"] < 260
    assert all(result["mix"][k] > 0 for k in ("existing", "new", "rotate"))
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["p999_ms"]
    assert result["server_cpu_us_per_request"] > 0 and result["generator_cpu_cores"] > 0
    assert 0 < result["machine_busy"] <= 1
    assert result["server_rss_mib_connected"] > 10
    storm = result["storm"]
    assert storm["served"] == 8 and storm["failed"] == 0 and storm["all_served_s"] < 10
    assert storm["resumed"] == 8
    assert "storm: 8/8 served" in capsys.readouterr().out


def test_percentiles_count_a_lost_request_as_slowest():
    figures = bench_keyserver.percentiles([0.001] * 998 + [0.002, float("inf")])
    assert figures == {"p50_ms": 1.0, "p99_ms": 1.0, "p999_ms": 2.0, "max_ms": "lost"}
