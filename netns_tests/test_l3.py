"""Layer-3 modes end to end: routed (IP protocol 253) and NAT (UDP) across a router.

Topology (see ``l2crypt.lab_routed``)::

    keyserverd (l2c-ks) --- management veths --- h1, h2

    h1 eth0 10.71.0.2 --- r1 [ l2c-rt: router | nat: MASQUERADE ] r2 --- eth0 10.72.0.2 h2
                          ^ captures here show what crosses the router

h1's policy is 10.72.0.0/24, h2's is 10.71.0.0/24.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import listening, skip_reason, wait_for  # noqa: E402

from l2crypt import lab as L  # noqa: E402
from l2crypt import lab_routed as R  # noqa: E402
from l2crypt.l3_wire import L3_IP_PROTOCOL, decode_l3_header, parse_ipv4  # noqa: E402

MARKER = b"L3CRYPT-MARKER-5e1d"
H1, H2 = R.host_ip("h1"), R.host_ip("h2")


def _routed_lab(tmp_path_factory, nat: bool):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        pytest.skip("netfilterqueue is not installed (pip install -e '.[l3]')")
    L.install_signal_cleanup()
    lab = R.RoutedLab(state_dir=tmp_path_factory.mktemp("nat" if nat else "routed"), nat=nat)
    return lab


@pytest.fixture(scope="module", params=["routed", "nat"])
def rlab(request, tmp_path_factory):
    lab = _routed_lab(tmp_path_factory, request.param == "nat")
    try:
        lab.up(timeout_s=90)
        yield lab
    finally:
        lab.down()


def ip_packets(frames: list[bytes]) -> list[bytes]:
    """The IPv4 packets of Ethernet frames."""
    return [f[14:] for f in frames if len(f) > 34 and f[12:14] == b"\x08\x00"]


def between_hosts(lab: R.RoutedLab, packets: list[bytes]) -> list[bytes]:
    """Packets of the h1<->h2 traffic as the router saw them (NAT address included)."""
    ends = {bytes(map(int, a.split("."))) for a in (H1, H2, R.gateway_ip("h2"))}
    return [p for p in packets if p[12:16] in ends and p[16:20] in ends and p[12:16] != p[16:20]]


def assert_sealed_only(lab: R.RoutedLab, packets: list[bytes]) -> int:
    """Every h1<->h2 packet is sealed (proto 253, or UDP to/from the l2crypt port
    with a valid L3 header); returns how many there were."""
    sealed = 0
    for p in between_hosts(lab, packets):
        ip = parse_ipv4(p[: int.from_bytes(p[2:4], "big")])
        assert not isinstance(ip, str), ip
        if lab.nat:
            assert ip.protocol == 17, f"clear packet, protocol {ip.protocol}"
            offset = ip.header_len + 8
        else:
            assert ip.protocol == L3_IP_PROTOCOL, f"clear packet, protocol {ip.protocol}"
            offset = ip.header_len
        assert not isinstance(decode_l3_header(p, offset), str)
        sealed += 1
    return sealed


def ping(lab, src: str, dst: str, count: int = 5, extra=(), timeout: float = 30.0):
    return lab.exec(src, ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "2", *extra, dst], timeout=timeout)


def iperf3(lab, client: str, server: str, seconds: float = 3, port: int = 5201) -> dict:
    srv = lab.popen(server, ["iperf3", "-s", "-1", "-B", R.host_ip(server), "-p", str(port)],
                    name=f"iperf3-server-{server}-{port}-{time.monotonic_ns() % 10000}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = lab.exec(client, ["iperf3", "-c", R.host_ip(server), "-p", str(port), "-t", str(seconds), "-J"],
                       timeout=seconds + 30)
        assert res.returncode == 0, f"iperf3 {client}->{server} failed: {res.stdout[-1500:]}{res.stderr}"
        return json.loads(res.stdout)
    finally:
        lab.stop(srv)


def test_ping_and_iperf3_across_the_router_are_sealed(rlab):
    cap = rlab.capture("r1", role=R.ROUTER, name=f"tcpdump-r1-{rlab.mode}")
    cap2 = rlab.capture("r2", role=R.ROUTER, name=f"tcpdump-r2-{rlab.mode}")
    try:
        res = ping(rlab, "h1", H2, count=5, extra=["-s", "1000", "-p", MARKER[:16].hex()])
        assert res.returncode == 0, res.stdout + res.stderr
        result = iperf3(rlab, "h1", "h2", seconds=3)
        assert result["end"]["sum_received"]["bytes"] > 0
    finally:
        frames = L.read_pcap(cap.stop()) + L.read_pcap(cap2.stop())
    assert sum(f.count(MARKER[:16]) for f in frames) == 0, "the marker crossed the router in clear"
    assert assert_sealed_only(rlab, ip_packets(frames)) >= 20
    st1, st2 = rlab.l3_status("h1"), rlab.l3_status("h2")
    assert st1["counters"]["sealed"] > 0 and st2["counters"]["opened"] > 0
    assert not {k: v for k, v in st2["drops"].items() if k in ("bad_tag", "replayed", "spoofed_source")}
    if rlab.nat:
        # h2 knows h1 only by its ID: the endpoint it learned is the NAT's address.
        peer = next(p for p in st2["peers"] if p["id"] == "h1")
        assert peer["endpoint"].startswith(R.gateway_ip("h2") + ":")


def test_rekey_during_traffic_loses_nothing(rlab):
    before1 = rlab.l3_status("h1")
    pw_before = next(p for p in before1["peers"] if p["id"] == "h2")["pw_id"]
    result = {}

    def traffic():
        result["ping"] = ping(rlab, "h1", H2, count=40, extra=[], timeout=60)

    t = threading.Thread(target=traffic)
    t.start()
    time.sleep(2)
    res = rlab.keyserverd("rekey", "--pair", "h1", "h2")
    assert res.returncode == 0, res.stdout + res.stderr
    t.join(timeout=90)
    out = result["ping"].stdout
    assert " 0% packet loss" in out, out
    st1 = wait_for("new key on h1", lambda: (lambda s: s if next(
        p for p in s["peers"] if p["id"] == "h2")["pw_id"] > pw_before else None)(rlab.l3_status("h1")),
        timeout_s=20)
    st2 = rlab.l3_status("h2")
    for st in (st1, st2):
        assert not {k: v for k, v in st["drops"].items()
                    if k in ("stale_key", "bad_tag", "no_key", "hold_expired", "unknown_sender")}, st["drops"]


def test_fail_closed_when_the_agent_stops(rlab):
    cap = rlab.capture("r1", role=R.ROUTER, name=f"tcpdump-fc-{rlab.mode}")
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            rlab.stop_l3_agent("h1", sig)
            res = ping(rlab, "h1", H2, count=3, extra=["-p", MARKER[:16].hex()])
            assert res.returncode != 0, f"ping went through with the agent stopped ({sig!r})"
            # A drop rule in OUTPUT answers the sender with EPERM; a queue with no
            # listener drops silently.  Either way nothing may leave.
            udp = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   "for _ in range(10):\n"
                   "    try: s.sendto(sys.argv[2].encode() * 20, (sys.argv[1], 9))\n"
                   "    except OSError: pass\n")
            rlab.exec("h1", ["python3", "-c", udp, H2, MARKER.decode()], check=True)
            if sig == signal.SIGTERM:
                assert "drop" in rlab.netfilter_rules("h1").lower()
            rlab.start_l3_agent("h1")
            rlab.wait_l3_connected("h1")
    finally:
        frames = L.read_pcap(cap.stop())
    assert sum(f.count(MARKER[:16]) for f in frames) == 0
    assert all(p[9] != 1 for p in between_hosts(rlab, ip_packets(frames))), "an ICMP packet left in clear"
    # Back up: the restarted agent replaced its stale rules and traffic flows.
    res = ping(rlab, "h1", H2, count=3)
    assert res.returncode == 0, res.stdout + res.stderr
