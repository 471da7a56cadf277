"""Layer-3 modes end to end: routed (IP protocol 253) and NAT (UDP) across a
router, IPv4 and IPv6.

Topology (see ``l2crypt.lab.routed``)::

    keyserverd (l2c-ks) --- management veths --- h1, h2

    h1 eth0 10.71.0.2 --- r1 [ l2c-rt: router | nat: MASQUERADE ] r2 --- eth0 10.72.0.2 h2
            fd71::2          ^ captures here show what crosses  ^          fd72::2
                             | the router; raw packets are sent |
                             | from its namespace               |

h1's policy is 10.72.0.0/24 and fd72::/64, h2's is 10.71.0.0/24 and fd71::/64.
Every link has MTU 1500 and no route carries an advmss.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import skip_reason, wait_for  # noqa: E402
from l3_tools import (  # noqa: E402
    MARKER,
    UdpListener,
    between_hosts,
    echo_requests_received,
    flush_pmtu,
    ip_packets,
    iperf3,
    metric,
    ping,
    raw_send,
    sealed_counts,
    send_udp,
)
from scapy.layers.inet import ICMP, IP, UDP  # noqa: E402
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6  # noqa: E402

from l2crypt.lab import segment as L  # noqa: E402
from l2crypt.lab import routed as R  # noqa: E402
from l2crypt.core.l3_wire import decode_l3_header, overhead, parse_packet  # noqa: E402

H1, H2 = R.host_ip("h1"), R.host_ip("h2")
H1_6, H2_6 = R.host_ip6("h1"), R.host_ip6("h2")
UDP_LISTEN_PORT = 9101


@pytest.fixture(scope="module", params=["routed", "nat"])
def rlab(request, tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        pytest.skip("netfilterqueue is not installed (pip install -e '.[l3]')")
    L.install_signal_cleanup()
    lab = R.RoutedLab(state_dir=tmp_path_factory.mktemp(request.param), nat=request.param == "nat")
    try:
        lab.up(timeout_s=90)
        yield lab
    finally:
        lab.down()


def drops(lab, host: str) -> dict:
    return lab.l3_status(host)["drops"]


def ping_until_answered(lab, src: str, dst: str, timeout_s: float = 10.0) -> None:
    """Ping until one answer comes: a restarted agent refuses its peer's packets
    until the peer's clock passes the replay floor it saved (about 1.5 s)."""
    wait_for(f"an answer from {dst}", lambda: ping(lab, src, dst, count=1).returncode == 0, timeout_s=timeout_s)


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_ping_and_tcp_across_the_router_are_sealed_ipv4_and_ipv6(rlab):
    """Also the MSS clamp: iperf3 writes 128 KiB at a time over a path of MTU
    1500 with no advmss on any route, and nothing is too big once sealed."""
    flush_pmtu(rlab, "h1", "h2")
    before = drops(rlab, "h1"), drops(rlab, "h2")
    cap = rlab.capture("r1", role=R.ROUTER, name=f"tcpdump-r1-{rlab.mode}")
    cap2 = rlab.capture("r2", role=R.ROUTER, name=f"tcpdump-r2-{rlab.mode}")
    try:
        for dst in (H2, H2_6):
            res = ping(rlab, "h1", dst, count=3, extra=["-s", "1000", "-p", MARKER[:16].hex()])
            assert res.returncode == 0, res.stdout + res.stderr
        for v6 in (False, True):
            result = iperf3(rlab, "h1", "h2", seconds=2, v6=v6)
            assert result["end"]["sum_received"]["bytes"] > 1_000_000
    finally:
        frames = L.read_pcap(cap.stop()) + L.read_pcap(cap2.stop())
    assert sum(f.count(MARKER[:16]) for f in frames) == 0, "the marker crossed the router in clear"
    counts = sealed_counts(rlab, ip_packets(frames))
    assert counts[4] >= 20 and counts[6] >= 20, counts
    st1, st2 = rlab.l3_status("h1"), rlab.l3_status("h2")
    assert st1["counters"]["sealed"] > 0 and st2["counters"]["opened"] > 0
    assert st1["counters"]["mss_clamped"] >= 2 and st2["counters"]["mss_clamped"] >= 2
    for st, old in zip((st1, st2), before):
        new = delta(st["drops"], old)
        assert not {k: v for k, v in new.items() if k in ("too_big", "fragment", "bad_tag", "replayed",
                                                          "spoofed_source")}, new
    assert st1["tcp_mss_ipv4"] == 1500 - st1["overhead_bytes"] - 40
    if rlab.nat:
        # h2 knows h1 only by its ID: the endpoints it learned are the NAT's addresses.
        peer = next(p for p in st2["peers"] if p["id"] == "h1")
        assert peer["endpoints"]["ipv4"].startswith(R.gateway_ip("h2") + ":")
        assert peer["endpoints"]["ipv6"].startswith(f"[{R.gateway_ip6('h2')}]:")


def test_large_pings_are_dropped_and_counted(rlab):
    """Issue 16, finding 4: ``ping -s 1472`` (a 1500-byte packet, 1452 bytes
    of data for IPv6) across a path of MTU 1500, which no longer fits once
    sealed.  In both modes:
    - IPv4 with DF (``-M do``, and ping's default, which sets DF too) and every
      IPv6 packet: dropped by the sending agent and counted (``too_big``);
      no ICMP answer (it would shrink the route the sealed packets take);
    - IPv4 without DF (``-M dont``): sealed and fragmented by the kernel; the
      receiving agent reassembles nothing and drops them (``fragment``);
    - the largest packets that fit once sealed go through."""
    st1 = rlab.l3_status("h1")
    fit4, fit6 = 1500 - st1["overhead_bytes"] - 28, 1500 - st1["overhead_bytes_ipv6"] - 48
    flush_pmtu(rlab, "h1")
    b1, b2 = drops(rlab, "h1"), drops(rlab, "h2")
    for dst, size in ((H2, 1472), (H2_6, 1452)):
        for extra in (["-M", "do"], []):
            res = ping(rlab, "h1", dst, count=2, extra=["-s", str(size), *extra], wait_s=1)
            assert " 0 received" in res.stdout, res.stdout + res.stderr
    assert delta(drops(rlab, "h1"), b1) == {"too_big": 8}
    assert delta(drops(rlab, "h2"), b2) == {}
    res = ping(rlab, "h1", H2, count=2, extra=["-s", "1472", "-M", "dont"], wait_s=1)
    assert " 0 received" in res.stdout, res.stdout
    wait_for("fragments counted at h2", lambda: delta(drops(rlab, "h2"), b2).get("fragment", 0) >= 2, timeout_s=5)
    assert delta(drops(rlab, "h1"), b1) == {"too_big": 8}
    for dst, size in ((H2, fit4), (H2_6, fit6)):
        res = ping(rlab, "h1", dst, count=2, extra=["-s", str(size), "-M", "do"])
        assert res.returncode == 0, res.stdout + res.stderr


def test_plain_packets_from_a_peer_address_are_refused(rlab):
    """Issue 14.1, layer 3: from the router, plain IPv4 and IPv6 UDP and ICMP
    echo with h1's source addresses, at h2.  h2's listener gets none, its
    kernel answers no echo, and the count of packets refused inbound (status
    and metrics) grows by what was sent; sealed traffic still flows."""
    listener = UdpListener(rlab, "h2", UDP_LISTEN_PORT)
    try:
        res = ping(rlab, "h1", H2, count=1)  # keys in place, so the positive control below is prompt
        assert res.returncode == 0, res.stdout
        before, echoes = rlab.l3_status("h2")["packets_refused_inbound"], echo_requests_received(rlab, "h2")
        forged = []
        for i in range(5):
            forged += [
                bytes(IP(src=H1, dst=H2) / UDP(sport=4000, dport=UDP_LISTEN_PORT) / (MARKER + b"-v4")),
                bytes(IP(src=H1, dst=H2) / ICMP(id=77, seq=i) / MARKER),
                bytes(IPv6(src=H1_6, dst=H2_6) / UDP(sport=4000, dport=UDP_LISTEN_PORT) / (MARKER + b"-v6")),
                bytes(IPv6(src=H1_6, dst=H2_6) / ICMPv6EchoRequest(id=77, seq=i) / MARKER),
            ]
        raw_send(rlab, R.ROUTER, forged)
        st = wait_for("refused count", lambda: (lambda s: s if s["packets_refused_inbound"] >= before + 20 else None)(
            rlab.l3_status("h2")), timeout_s=10)
        assert listener.received(0.5) == [], "a plain packet from a peer address reached the listener"
        assert echo_requests_received(rlab, "h2") == echoes, "h2's kernel took a plain echo request"
        assert metric(rlab, "h2", "l2crypt_l3_packets_refused_inbound_total") >= before + 20
        assert st["packets_refused_inbound"] - before < 40  # what was sent, not every packet
        # Positive control: sealed datagrams and pings from h1 itself arrive.
        send_udp(rlab, "h1", H2, UDP_LISTEN_PORT, MARKER + b"-genuine4")
        send_udp(rlab, "h1", H2_6, UDP_LISTEN_PORT, MARKER + b"-genuine6")
        assert sorted(listener.received(2.0)) == [MARKER + b"-genuine4", MARKER + b"-genuine6"]
        for dst in (H2, H2_6):
            assert ping(rlab, "h1", dst, count=2).returncode == 0
        assert echo_requests_received(rlab, "h2") >= echoes + 4
    finally:
        listener.close()


def test_captured_traffic_does_not_replay_after_the_receiver_restarts(rlab):
    """Issue 15, High 1 (layer 3): sealed datagrams h1 -> h2 are captured on
    the router; h2's agent is killed (-9) and started again, gets the same key
    and PW_ID back, and the capture is replayed from the router.  Nothing
    reaches h2's listener, ``replayed`` grows, and h1's new traffic arrives."""
    listener = UdpListener(rlab, "h2", UDP_LISTEN_PORT + 1)
    cap = rlab.capture("r2", role=R.ROUTER, name=f"tcpdump-replay-{rlab.mode}")
    try:
        for dst in (H2, H2_6):
            send_udp(rlab, "h1", dst, UDP_LISTEN_PORT + 1, MARKER + b"-once", count=3)
        got = listener.received(1.0)
        assert got == [MARKER + b"-once"] * 6, got
    finally:
        frames = L.read_pcap(cap.stop())
    h2_addrs = {socket.inet_pton(socket.AF_INET, H2), socket.inet_pton(socket.AF_INET6, H2_6)}
    to_h2 = [p for p in between_hosts(ip_packets(frames)) if parse_packet(p).dst in h2_addrs]
    assert sealed_counts(rlab, to_h2)[4] >= 3 and sealed_counts(rlab, to_h2)[6] >= 3
    try:
        pw_before = next(p for p in rlab.l3_status("h1")["peers"] if p["id"] == "h2")["pw_id"]
        rlab.restart_l3_agent("h2", sig=signal.SIGKILL)
        replayed_before = drops(rlab, "h2").get("replayed", 0)
        raw_send(rlab, R.ROUTER, to_h2)
        wait_for("replayed packets counted", lambda: drops(rlab, "h2").get("replayed", 0) >= replayed_before
                 + len(to_h2), timeout_s=15)
        assert listener.received(1.0) == [], "a replayed packet was delivered after the restart"
        peer = next(p for p in rlab.l3_status("h2")["peers"] if p["id"] == "h1")
        assert peer["pw_id"] == pw_before  # the same key came back: the floors did the work
        # h1's genuine traffic opens again (once its clock is past h2's floor).
        for dst in (H2, H2_6):
            def arrives(dst=dst):
                send_udp(rlab, "h1", dst, UDP_LISTEN_PORT + 1, MARKER + b"-again")
                return listener.received(0.3)
            assert wait_for(f"new datagrams to {dst}", arrives, timeout_s=10)
    finally:
        listener.close()


@pytest.mark.parametrize("rlab", ["nat"], indirect=True)
def test_nat_keepalives_keep_the_mapping_alive(rlab):
    """The router forgets UDP mappings after 3 s.  Without keepalives h2
    cannot reach h1 after 5 s of silence; with ``--nat-keepalive-s 1`` it
    can, and the router saw the sealed keepalives go by."""
    keys = ("net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream")
    old = {k: rlab.exec(R.ROUTER, ["sysctl", "-n", k], check=True).stdout.strip() for k in keys}
    rlab._sysctl(R.ROUTER, {k: "3" for k in keys})
    try:
        rlab.restart_l3_agent("h1", "--nat-keepalive-s", "0")
        ping_until_answered(rlab, "h1", H2)
        time.sleep(5)
        res = ping(rlab, "h2", H1, count=2, wait_s=1)
        assert res.returncode != 0, "the router kept the mapping without keepalives: the test proves nothing"

        rlab.restart_l3_agent("h1", "--nat-keepalive-s", "1")
        ping_until_answered(rlab, "h1", H2)
        received, old_drops = rlab.l3_status("h2")["counters"]["keepalives_received"], drops(rlab, "h2")
        cap = rlab.capture("r1", role=R.ROUTER, name="tcpdump-keepalive")
        try:
            time.sleep(5)
            res = ping(rlab, "h2", H1, count=2)
            assert res.returncode == 0, res.stdout + res.stderr
        finally:
            frames = L.read_pcap(cap.stop())
        keepalives = []
        for p in between_hosts(ip_packets(frames)):
            ip = parse_packet(p)
            header = decode_l3_header(p, ip.header_len + 8)
            if ip.src == socket.inet_pton(socket.AF_INET, H1) and not isinstance(header, str) \
                    and len(p) == ip.header_len + 8 + header.length + 16:
                keepalives.append(p)
        assert len(keepalives) >= 3, f"{len(keepalives)} keepalives in 5 s"
        assert len(keepalives[0]) == overhead("nat", len("h1"))  # sealed, and empty inside
        assert rlab.l3_status("h2")["counters"]["keepalives_received"] >= received + 3
        assert delta(drops(rlab, "h2"), old_drops) == {}
    finally:
        rlab._sysctl(R.ROUTER, old)
        rlab.restart_l3_agent("h1")
        ping_until_answered(rlab, "h1", H2)


def test_rekey_during_traffic_loses_nothing(rlab):
    ping_until_answered(rlab, "h1", H2)  # the pair has a key, whatever ran before
    before1 = wait_for("h1's key for h2", lambda: (lambda s: s if any(
        p["id"] == "h2" for p in s["peers"]) else None)(rlab.l3_status("h1")), timeout_s=10)
    pw_before = next(p for p in before1["peers"] if p["id"] == "h2")["pw_id"]
    old_drops = drops(rlab, "h1"), drops(rlab, "h2")
    result = {}

    def traffic():
        result["ping"] = ping(rlab, "h1", H2, count=40, timeout=60)

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
    for st, old in zip((st1, st2), old_drops):
        new = delta(st["drops"], old)
        assert not {k: v for k, v in new.items()
                    if k in ("stale_key", "bad_tag", "no_key", "hold_expired", "unknown_sender")}, new


def test_fail_closed_when_the_agent_stops(rlab):
    cap = rlab.capture("r1", role=R.ROUTER, name=f"tcpdump-fc-{rlab.mode}")
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            rlab.stop_l3_agent("h1", sig)
            for dst in (H2, H2_6):
                res = ping(rlab, "h1", dst, count=2, extra=["-p", MARKER[:16].hex()], wait_s=1)
                assert res.returncode != 0, f"ping {dst} went through with the agent stopped ({sig!r})"
            # A drop rule in OUTPUT answers the sender with EPERM; a queue with no
            # listener drops silently.  Either way nothing may leave.
            udp = ("import socket, sys\n"
                   "for host in sys.argv[1:3]:\n"
                   "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)\n"
                   "    for _ in range(10):\n"
                   "        try: s.sendto(sys.argv[3].encode() * 20, (host, 9))\n"
                   "        except OSError: pass\n")
            rlab.exec("h1", ["python3", "-c", udp, H2, H2_6, MARKER.decode()], check=True)
            if sig == signal.SIGTERM:
                assert "drop" in rlab.netfilter_rules("h1").lower()
            rlab.start_l3_agent("h1")
            rlab.wait_l3_connected("h1")
        # Back up: the restarted agent replaced its stale rules and traffic flows,
        # sealed, in the same capture (which shows the capture saw the link).
        for dst in (H2, H2_6):
            res = ping(rlab, "h1", dst, count=3, extra=["-p", MARKER[:16].hex()])
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        frames = L.read_pcap(cap.stop())
    assert sum(f.count(MARKER[:16]) for f in frames) == 0
    counts = sealed_counts(rlab, ip_packets(frames))
    assert counts[4] >= 6 and counts[6] >= 6, counts  # the recovery pings, sealed


@pytest.mark.parametrize("rlab", ["routed"], indirect=True)
def test_nft_backend_writes_json_rules_and_reads_its_counter(rlab):
    """The nft backend on a real kernel: its rule set, written as nft JSON, is
    loaded in the router's namespace (the closed variant: this kernel has no
    nft_queue), drops plain packets from a protected prefix, and its counter
    is read back through ``nft -j``."""
    table = "l3jsontest"
    prefixes = ["10.79.0.0/24", "fd79::/64"]
    script = ("import sys, json\nfrom l2crypt.io.nft_rules import NftBackend\n"
              f"b = NftBackend({table!r})\n"
              "if sys.argv[1] == 'apply': b.apply(sys.argv[2:], None, 'routed', 7789)\n"
              "elif sys.argv[1] == 'count': print(json.dumps(b.refused_inbound()))\n"
              "else: b.remove()\n")
    for dst in (H2, H2_6):  # the router's neighbours are known on both sides
        assert ping(rlab, "h1", dst, count=1).returncode == 0
    rlab.exec(R.ROUTER, [sys.executable, "-c", script, "apply", *prefixes], check=True)
    try:
        listing = json.loads(rlab.exec(R.ROUTER, ["nft", "-j", "list", "table", "inet", table], check=True).stdout)
        assert any(item.get("counter", {}).get("name") == "refused_inbound" for item in listing["nftables"])
        count = lambda: json.loads(rlab.exec(R.ROUTER, [sys.executable, "-c", script, "count"], check=True).stdout)  # noqa: E731
        assert count() == 0
        plain = [bytes(IP(src="10.79.0.5", dst=R.gateway_ip("h1")) / UDP(dport=9) / MARKER)] * 3 + \
                [bytes(IPv6(src="fd79::5", dst=R.gateway_ip6("h1")) / UDP(dport=9) / MARKER)] * 3 + \
                [bytes(IP(src="10.78.0.5", dst=R.gateway_ip("h1")) / UDP(dport=9) / MARKER)] * 2  # not protected
        raw_send(rlab, "h1", plain)
        assert wait_for("the nft counter", lambda: count() == 6, timeout_s=5)
    finally:
        rlab.exec(R.ROUTER, [sys.executable, "-c", script, "remove"], check=True)
    assert rlab.exec(R.ROUTER, ["nft", "list", "table", "inet", table]).returncode != 0
