# Multipath inter-subnet tunnels (issue 17); drawing in l2crypt/lab/multipath.py.
#
#   segment A: h1 h2 --br0-- gA ==== wan (one path, as the gateway lab) ==== gB --br0-- h3
#                             |  wan1 -- r1 -- wan1  |
#                             |  wan2 -- r2 -- wan2  |
#                             |  wan3 -- r3 -- wan3  |
#                                         |
#                                        rly (l2crypt-gateway relay 10.73.3.1:4789)
#
# For now the gateways run as in the gateway lab (multipath=False): these tests
# check the lab itself (each path carries traffic through its own router, the
# relay forwards between its endpoints only, shaping, loss, a path going down).

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from pyroute2 import netns

from helpers import listening, ping, skip_unless_gateway_lab, wait_for
from l2crypt.lab.gateway import TUNNEL_PORT
from l2crypt.lab.multipath import PATHS, RELAY_IP, MultipathLab, path_ip

pytestmark = pytest.mark.lab

RELAY = (RELAY_IP, TUNNEL_PORT)


@pytest.fixture(scope="module")
def mlab(tmp_path_factory):
    skip_unless_gateway_lab()
    the_lab = MultipathLab(tmp_path_factory.mktemp("mplab"))
    try:
        the_lab.up(timeout_s=150)
        yield the_lab
    finally:
        the_lab.down()


def _udp(mlab, role: str, addr: tuple[str, int], timeout_s: float = 3.0) -> socket.socket:
    """A UDP socket bound to ``addr`` inside ``role``'s namespace (gA, gB or a router)."""
    ns = mlab.lab_of(role).ns(role)
    s = netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    s.bind(addr)
    s.settimeout(timeout_s)
    return s


def _relay_counts(stats: dict) -> dict[str, int]:
    fwd = stats.get("forwarded", {})
    ab = fwd.get(f"{path_ip('gA', 3)}:{TUNNEL_PORT}->{path_ip('gB', 3)}:{TUNNEL_PORT}", {})
    ba = fwd.get(f"{path_ip('gB', 3)}:{TUNNEL_PORT}->{path_ip('gA', 3)}:{TUNNEL_PORT}", {})
    return {"ab": ab.get("datagrams", 0), "ab_bytes": ab.get("bytes", 0), "ba": ba.get("datagrams", 0),
            **stats.get("drops", {})}


def _no_more(sock: socket.socket) -> None:
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        sock.recvfrom(65535)


def test_the_relay_forwards_between_its_endpoints_and_drops_and_counts_the_rest(mlab):
    before = _relay_counts(wait_for("relay stats", mlab.relay_stats, timeout_s=10))
    sa = _udp(mlab, "gA", (path_ip("gA", 3), TUNNEL_PORT))
    sb = _udp(mlab, "gB", (path_ip("gB", 3), TUNNEL_PORT))
    other_port = _udp(mlab, "gA", (path_ip("gA", 3), TUNNEL_PORT + 1))
    other_ip = _udp(mlab, "r3", ("10.73.2.254", 0))
    try:
        jumbo = os.urandom(8900)  # one unfragmented datagram on the 9000-byte path
        sa.sendto(jumbo, RELAY)
        assert sb.recvfrom(65535) == (jumbo, RELAY)
        sb.sendto(b"back", RELAY)
        assert sa.recvfrom(65535) == (b"back", RELAY)
        other_port.sendto(b"right IP, wrong port", RELAY)
        other_ip.sendto(b"a third address", RELAY)
        sa.sendto(b"", RELAY)
        sa.sendto(b"x" * 20000, RELAY)
        sa.sendto(b"last", RELAY)
        assert sb.recvfrom(65535) == (b"last", RELAY)
        _no_more(sb)
        _no_more(sa)
        _no_more(other_port)
        want = dict(before, ab=before["ab"] + 2, ab_bytes=before["ab_bytes"] + 8904, ba=before["ba"] + 1,
                    unknown_sender=before["unknown_sender"] + 2, empty=before["empty"] + 1,
                    oversized=before["oversized"] + 1)
        wait_for("the relay's counters", lambda: _relay_counts(mlab.relay_stats()) == want, timeout_s=5)
    finally:
        for s in (sa, sb, other_port, other_ip):
            s.close()
    # The lab can read the relay's memory (for "it holds no key"): its own listen address is in it.
    memory = mlab.process_memory(mlab.relay_pid())
    assert len(memory) > 1_000_000 and f"{RELAY_IP}:{TUNNEL_PORT}".encode() in memory


def test_each_path_carries_traffic_through_its_own_router(mlab):
    for k in PATHS:
        res = mlab.a.exec("gA", ["ip", "-4", "-j", "route", "get", path_ip("gB", k)], check=True)
        route = json.loads(res.stdout)[0]
        assert (route["dev"], route["prefsrc"]) == (f"wan{k}", path_ip("gA", k))
        res = ping(mlab.a, "gA", path_ip("gB", k), count=2)
        assert res.returncode == 0, res.stdout + res.stderr
    # Path 3 through the relay: a round trip gA -> relay -> gB -> relay -> gA.
    sa = _udp(mlab, "gA", (path_ip("gA", 3), TUNNEL_PORT))
    sb = _udp(mlab, "gB", (path_ip("gB", 3), TUNNEL_PORT))
    try:
        sa.sendto(b"ping via the relay", RELAY)
        data, src = sb.recvfrom(65535)
        assert (data, src) == (b"ping via the relay", RELAY)
        sb.sendto(b"pong via the relay", src)
        assert sa.recvfrom(65535) == (b"pong via the relay", RELAY)
    finally:
        sa.close()
        sb.close()


def test_a_path_down_drops_everything_on_that_path_only(mlab):
    mlab.path_down(2)
    try:
        res = ping(mlab.a, "gA", path_ip("gB", 2), count=2)
        assert res.returncode != 0 and " 100% packet loss" in res.stdout, res.stdout
        assert ping(mlab.a, "gA", path_ip("gB", 1), count=2).returncode == 0
        links = json.loads(mlab.a.exec("gA", ["ip", "-j", "link", "show", "wan2"], check=True).stdout)
        assert links[0]["operstate"] == "UP"  # as with a failure upstream: the link stays up
    finally:
        mlab.path_up(2)
    assert ping(mlab.a, "gA", path_ip("gB", 2), count=2).returncode == 0


def test_shape_caps_a_path_near_its_rate(mlab):
    k, port = 1, 5211
    server_addr = path_ip("gB", k)
    mlab.shape(k, 100)
    srv = mlab.b.popen("gB", ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)], name=f"iperf3-path{k}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = mlab.a.exec("gA", ["iperf3", "-c", server_addr, "-p", str(port), "-t", "3", "-J"], timeout=30)
        assert res.returncode == 0, res.stdout[-1500:] + res.stderr
        mbit = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        mlab.b.stop(srv)
        mlab.shape(k, None)
    assert 80 <= mbit <= 110, f"{mbit:.1f} Mbit/s over path {k} shaped to 100"


def _one_way_received(mlab, k: int, count: int) -> int:
    port = 6000 + k
    tx = _udp(mlab, "gA", (path_ip("gA", k), port))
    rx = _udp(mlab, "gB", (path_ip("gB", k), port), timeout_s=0.5)
    got = 0
    try:
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big"), (path_ip("gB", k), port))
            if i % 50 == 49:  # drain as we go: the receive buffer stays small
                time.sleep(0.005)
                rx.setblocking(False)
                while True:
                    try:
                        rx.recvfrom(64)
                        got += 1
                    except BlockingIOError:
                        break
        rx.settimeout(0.5)
        while True:
            try:
                rx.recvfrom(64)
                got += 1
            except socket.timeout:
                return got
    finally:
        tx.close()
        rx.close()


def test_set_loss_drops_about_that_share(mlab):
    k = 2
    assert _one_way_received(mlab, k, 200) == 200  # no loss before
    mlab.set_loss(k, 20)
    try:
        got = _one_way_received(mlab, k, 1000)
        res = ping(mlab.a, "gA", path_ip("gB", k), count=100, extra=["-i", "0.01", "-q"], timeout=30)
    finally:
        mlab.set_loss(k, 0)
    assert 700 <= got <= 900, f"{got} of 1000 datagrams crossed path {k} at 20% loss"
    lost = int(res.stdout.split("% packet loss")[0].rsplit(" ", 1)[-1])
    # 20% each way: a round trip is lost with 1 - 0.8 ** 2 = 36%.
    assert 20 <= lost <= 55, res.stdout
    assert _one_way_received(mlab, k, 200) == 200  # and none once removed
