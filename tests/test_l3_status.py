"""l2crypt.l3.status: the l3-status document and the Prometheus metrics of the layer-3 agent."""

from types import SimpleNamespace

from prometheus_client import generate_latest

from l2crypt.core import l3_wire as W
from l2crypt.core import l3_engine as E
from l2crypt.l3.status import engine_snapshot, l3_metrics
from l2crypt.ops.metrics import FunctionCollector, new_registry

A4, A6, B4 = W.parse_ip("10.71.0.2"), W.parse_ip("fd71::2"), W.parse_ip("10.72.0.2")
KEY = b"\x55" * 32


def test_status_and_metrics_show_refused_inbound_drops_and_ipv6_endpoints():
    b = E.L3Engine("b", [B4], E.L3Settings(mode="nat"))
    b.install_key("a", KEY, 3, [A4, A6], 0.0)
    b.peers["a"].endpoints = {4: (W.parse_ip("10.72.0.1"), 40000), 6: (W.parse_ip("fd72::1"), 40001)}
    b.drops[E.BAD_TAG] += 2
    doc = engine_snapshot(b, 5.0)
    [peer] = doc["peers"]
    assert peer["ips"] == ["10.71.0.2", "fd71::2"] and peer["pw_id"] == 3
    assert peer["endpoints"] == {"ipv4": "10.72.0.1:40000", "ipv6": "[fd72::1]:40001"}
    assert peer["endpoint"] == "10.72.0.1:40000" and doc["drops"] == {"bad_tag": 2}
    agent = SimpleNamespace(engine=b, client=None, host_id="b", refused_inbound=7)
    registry = new_registry()
    registry.register(FunctionCollector(lambda: l3_metrics(agent, 5.0)))
    text = generate_latest(registry).decode()
    assert "l2crypt_l3_packets_refused_inbound_total 7.0" in text
    assert 'l2crypt_l3_packets_dropped_total{reason="bad_tag"} 2.0' in text
    assert 'l2crypt_l3_key_pw_id{peer="a"} 3.0' in text
    assert "l2crypt_l3_mss_clamped_total 0.0" in text
    assert KEY.hex() not in text and KEY.hex() not in repr(doc)
