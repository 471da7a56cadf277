# End-to-end tests of the gateway (issue 4, "Acceptance"); drawing in l2crypt/lab/gateway.py.
#
#   segment A: h1 h2 --br0-- gA --plain0-- p1 (plain host 10.66.0.31)
#                             |
#                            wan (routed; UDP tunnel sealed with NETKEY)
#                             |
#   segment B: h3 ----br0---- gB
#
# Key servers A and B peer over mutual TLS through the WAN and rotate NETKEY
# every NETKEY_REKEY_S seconds, so every test below runs across rotations.
# h1 -> p1 through gA and back, and plain frames an intruder puts on segment A,
# are gateway scenarios (tests/gateway_scenarios.py), run over these
# namespaces by test_gateway_scenarios_netns.py and over fakes in tests/.

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

from prometheus_client.parser import text_string_to_metric_families

from helpers import listening, ping, udp_payload as _udp_payload, wait_for
from hostile import StackListener, link_mac, nstat, plain_frames
from gateway import tunnel_wire
from l2crypt.core.aead import PN_PER_SECOND
from l2crypt.core.tunnel_keys import sender_tag
from l2crypt.lab import segment as L
from l2crypt.lab.gateway import GW_WAN_IFNAME, GATEWAYS, P1_IPV4, P1_MAC, TUNNEL_PORT

pytestmark = pytest.mark.lab

MARKER = b"L2CRYPT-GW-MARK!"  # 16 bytes: ping -p repeats it through the payload
NETKEY_REKEY_S = 6.0
KEY_DROPS = ("tunnel_no_netkey", "tunnel_stale_netkey", "tunnel_bad_tag", "no_key", "stale_key", "bad_tag")


def _ping_ok(lab, src, addr, count=3, extra=None):
    res = ping(lab.lab_of(src), src, addr, count=count, extra=extra, timeout=count * 0.5 + 20)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _iperf3(glab, client: str, server: str, server_addr: str, port: int, extra: tuple = ("-t", "3")) -> dict:
    slab, clab = glab.lab_of(server), glab.lab_of(client)
    srv = slab.popen(server, ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
                     name=f"iperf3-{server}-{port}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = clab.exec(client, ["iperf3", "-c", server_addr, "-p", str(port), *extra, "-J"], timeout=40)
        assert res.returncode == 0, f"iperf3 {client}->{server}: {res.stdout[-1500:]}{res.stderr}"
        doc = json.loads(res.stdout)
        assert doc["end"]["sum_received"]["bytes"] > 0
        return doc
    finally:
        slab.stop(srv)


GW_TAGS = {sender_tag(g) for g in GATEWAYS}
GW_WAN_IPS = {socket.inet_aton(GATEWAYS[g][3]) for g in GATEWAYS}


def _is_tunnel_datagram(payload: bytes) -> bool:
    return payload[0:2] == bytes([tunnel_wire.TUNNEL_VERSION, tunnel_wire.KIND_DATA]) and payload[2:8] in GW_TAGS


def _quotes_a_tunnel_datagram(frame: bytes) -> bool:
    """An ICMP destination-unreachable error (a gateway was down, so its host answered
    "port unreachable") quoting a datagram from one gateway's tunnel port to the other's."""
    ihl = (frame[14] & 0x0F) * 4
    icmp = frame[14 + ihl:]
    if len(icmp) < 8 + 20 + 8 + 8 or icmp[0] != 3:
        return False
    quoted = icmp[8:]
    qihl = (quoted[0] & 0x0F) * 4
    udp = quoted[qihl:]
    return (quoted[9] == 17 and {quoted[12:16], quoted[16:20]} <= GW_WAN_IPS
            and int.from_bytes(udp[0:2], "big") == int.from_bytes(udp[2:4], "big") == TUNNEL_PORT
            and _is_tunnel_datagram(udp[8:]))


def _assert_only_tunnel_on_wan(frames: list[bytes]) -> int:
    """Every IPv4 frame on the WAN is a tunnel datagram between the gateways, or an ICMP
    error quoting one (sealed bytes only); returns how many tunnel datagrams there were.
    The callers also look for their plaintext markers in every frame."""
    datagrams = 0
    for f in frames:
        if f[12:14] != b"\x08\x00":
            continue
        if f[23] == 1 and _quotes_a_tunnel_datagram(f):
            continue
        assert f[23] == 17, f"only UDP crosses the WAN, got IP protocol {f[23]}: {f[:80].hex()}"
        payload = _udp_payload(f)
        if payload is not None:  # (a later fragment carries no UDP header)
            assert _is_tunnel_datagram(payload), f"not a tunnel datagram: {payload[:40].hex()}"
            datagrams += 1
    return datagrams


def _key_drops(status: dict) -> dict:
    return {k: v for k, v in status["drops"].items() if k in KEY_DROPS}


def test_plain_hosts_keep_mtu_1500_large_frames_are_counted_and_gro_is_off(glab):
    """Issue 16.4: the plain side has the MTU of 1500 a plain host has and
    plain0 had GRO on (as a NIC has) until gA turned it off.
    - p1 -> h1, ``ping -s 1472`` with and without DF (``-M do``, ``-M dont``):
      the 1514-byte frames do not fit the encrypted port once sealed; gA counts
      each (``too_big``), no answer comes;
    - h1 -> p1: h1's TAP has MTU 1468, so with DF h1's own stack refuses
      (ping reports the MTU); without, the fragments reach p1 and its
      1500-byte answer is counted at gA;
    - the largest packets that fit go through both ways, and a TCP stream from
      p1 (its segments would merge under GRO) loses nothing to ``too_big``."""
    a = glab.a
    assert "generic-receive-offload: off" in a.exec("gA", ["ethtool", "-k", "plain0"], check=True).stdout
    assert "plain_port_offloads_off port=plain0 turned_off=gro" in a.log_text("gateway-gA")
    _ping_ok(glab, "h1", P1_IPV4, count=1)  # neighbours and keys in place
    before = glab.gateway_status("gA")["drops"].get("too_big", 0)
    for df in ("do", "dont"):
        res = ping(a, "p1", L.tap_ipv4("h1"), count=2, extra=["-s", "1472", "-M", df])
        assert " 0 received" in res.stdout, res.stdout + res.stderr
    res = ping(a, "h1", P1_IPV4, count=2, extra=["-s", "1472", "-M", "do"])
    assert res.returncode != 0 and "mtu=1468" in res.stdout + res.stderr, res.stdout + res.stderr
    res = ping(a, "h1", P1_IPV4, count=2, extra=["-s", "1472"])
    assert " 0 received" in res.stdout, res.stdout + res.stderr
    too_big = wait_for("gA to count 6 frames too big", lambda: (lambda n: n if n >= before + 6 else None)(
        glab.gateway_status("gA")["drops"].get("too_big", 0)), timeout_s=5)
    assert too_big == before + 6
    for src, dst in (("p1", L.tap_ipv4("h1")), ("h1", P1_IPV4)):
        _ping_ok(glab, src, dst, count=2, extra=["-s", str(1468 - 28), "-M", "do"])
    doc = _iperf3(glab, "p1", "h1", L.tap_ipv4("h1"), 5303)
    assert doc["end"]["sum_received"]["bytes"] > 1_000_000
    assert glab.gateway_status("gA")["drops"].get("too_big", 0) == too_big


def test_across_subnets(glab):
    wan = glab.a.capture(GW_WAN_IFNAME["gA"], role="wan", name="tcpdump-gw-wan")
    try:
        _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=3, extra=["-p", MARKER.hex()])
        _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=3, extra=["-p", MARKER.hex()])
        doc = _iperf3(glab, "h1", "h3", L.tap_ipv4("h3"), 5302)
    finally:
        frames = L.read_pcap(wan.stop())
    assert doc["end"]["sum_received"]["bytes"] > 100_000
    assert frames and set(L.ethertype_counts(frames)) <= {0x0800, 0x0806}
    assert _assert_only_tunnel_on_wan(frames) > 10  # every datagram is a tunnel datagram from a gateway
    host_macs = [bytes.fromhex(glab.lab_of(h).tap_mac_of(h).replace(":", "")) for h in ("h1", "h3")]
    # A subnet-key frame (or any inner frame in clear) would carry the hosts' MACs.
    for f in frames:
        assert MARKER not in f
        assert not any(m in f for m in host_macs), "an inner MAC crossed the WAN in clear"


def test_spoofing_an_enrolled_hosts_mac_from_the_plain_side(glab):
    a = glab.a
    h2 = bytes.fromhex(glab.lab_of("h2").tap_mac_of("h2").replace(":", ""))
    h1 = bytes.fromhex(glab.lab_of("h1").tap_mac_of("h1").replace(":", ""))
    before = glab.gateway_status("gA")["drops"].get("spoofed_source", 0)
    # p1 claims h2's MAC and IP: a gratuitous ARP and an ARP reply to h1.
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x02" + h2 + socket.inet_aton(L.tap_ipv4("h2"))
           + h1 + socket.inet_aton(L.tap_ipv4("h1")))
    frames = [b"\xff" * 6 + h2 + b"\x08\x06" + arp + bytes(18), h1 + h2 + b"\x08\x06" + arp + bytes(18)]
    sent_by_gw = a.capture(f"pga-{a.suffix}", direction="in", name="tcpdump-gw-spoof")
    plain = a.capture("plain0", role="gA", name="tcpdump-gw-spoof-plain")
    try:
        a.inject(frames * 3, role="p1", ifname="eth0")
        st = wait_for("spoofed frames counted", lambda: (
            lambda s: s if s["drops"].get("spoofed_source", 0) >= before + 6 else None)(glab.gateway_status("gA")))
        # h2 still gets what is meant for it, and the plain side sees none of it.
        _ping_ok(glab, "h1", L.tap_ipv4("h2"), count=3, extra=["-p", b"FOR-H2-ONLY-MRK!".hex()])
    finally:
        gw_frames, plain_frames = L.read_pcap(sent_by_gw.stop()), L.read_pcap(plain.stop())
    assert not any(e["mac"] == glab.lab_of("h2").tap_mac_of("h2") for e in st["learned"])
    assert not any(f[6:12] == h2 for f in gw_frames), "the gateway spoke for h2's MAC"
    assert not any(b"FOR-H2-ONLY-MRK!" in f for f in plain_frames)


def test_a_plain_side_spoof_of_a_host_not_yet_connected_loses_the_mac_when_the_host_connects(glab):
    """p1 (plain side) spoofs the MAC of h9, enrolled (without --mac) but not yet
    connected: gA learns it and the key server maps it, since nobody holds it
    yet.  When h9 connects, its hello wins: the key server drops the mapping and
    tells gA, gA stops speaking for the MAC, and after a rekey of every pair
    (gA's included) h1's traffic to h9 reaches h9 and never the plain side."""
    a = glab.a
    h9_mac = "02:4c:32:00:00:19"  # the TAP MAC h9's agent will use (an attacker may know it)
    h9 = bytes.fromhex(h9_mac.replace(":", ""))
    _ping_ok(glab, "h1", P1_IPV4, count=2)  # h1 and gA share a pair key
    if "h9" not in a.namespaces:
        a._build_host("h9")
    token = a.host_add("h9")
    res = a.enroll("h9", token["token"], token["ca_fingerprint"])
    assert res.returncode == 0, res.stdout + res.stderr
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x02" + h9 + socket.inet_aton(L.tap_ipv4("h9"))
           + b"\xff" * 6 + socket.inet_aton(L.tap_ipv4("h9")))
    spoof = [b"\xff" * 6 + h9 + b"\x08\x06" + arp + bytes(18)]
    a.inject(spoof * 3, role="p1", ifname="eth0")
    wait_for("gA to speak for h9's MAC", lambda: any(
        e["mac"] == h9_mac and e["state"] == "mapped" for e in glab.gateway_status("gA")["learned"]))
    since_ks, since_gw = len(a.log_text("keyserverd")), len(a.log_text("gateway-gA"))
    agent = a.popen("h9", [a.cmd("l2crypt"), "agent", "--port", L.WIRE_IFNAME, "--tap", L.TAP_IFNAME,
                           "--server", a.keyserver_addr, "--state-dir", a.host_dir("h9"),
                           "--tap-mac", h9_mac, "--metrics-listen", ""], name="agent-h9")
    try:
        a.wait_connected("h9", timeout_s=30)
        st = wait_for("gA to drop h9's MAC", lambda: (lambda s: s if not any(
            e["mac"] == h9_mac for e in s["learned"]) else None)(glab.gateway_status("gA")), timeout_s=10)
        assert f"gateway_mapping_dropped mac={h9_mac} gateway=gA host=h9" in a.log_text("keyserverd")[since_ks:]
        assert "mac_unmapped" in a.log_text("gateway-gA")[since_gw:]
        assert st["connected"]
        res = a.keyserverd("rekey", "--all")
        assert res.returncode == 0, res.stderr
        time.sleep(1.0)  # the pushes of the rotation reach the agents
        plain = a.capture("plain0", role="gA", name="tcpdump-gw-claim-plain")
        try:
            _ping_ok(glab, "h1", L.tap_ipv4("h9"), count=3, extra=["-p", b"FOR-H9-ONLY-MRK!".hex()])
            before = glab.gateway_status("gA")["drops"].get("spoofed_source", 0)
            a.inject(spoof * 3, role="p1", ifname="eth0")  # p1 goes on spoofing: dropped now
            wait_for("the spoof dropped", lambda: glab.gateway_status("gA")["drops"].get(
                "spoofed_source", 0) >= before + 3)
        finally:
            plain_frames = L.read_pcap(plain.stop())
        assert plain_frames, "the plain-side capture saw nothing at all"
        assert not any(b"FOR-H9-ONLY-MRK!" in f for f in plain_frames), "h1's traffic to h9 reached the plain side"
        assert not any(e["mac"] == h9_mac for e in glab.gateway_status("gA")["learned"])
    finally:
        a.stop(agent)


def test_netkey_rotation_during_traffic_loses_nothing(glab):
    before = {g: glab.gateway_status(g) for g in GATEWAYS}
    res = _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=int(NETKEY_REKEY_S * 2.5 / 0.2))
    after = {g: glab.gateway_status(g) for g in GATEWAYS}
    assert " 0% packet loss" in res.stdout, res.stdout[-300:]
    for g in GATEWAYS:
        assert after[g]["netkey_pw_id"] > before[g]["netkey_pw_id"], (g, before[g]["netkey_pw_id"])
        assert _key_drops(after[g]) == _key_drops(before[g]), g


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_gateway_restart_flows_recover(glab, sig):
    """kill -9 (a crash) or SIGTERM (systemctl restart) of gA during traffic, then
    the same command again: flows recover, gA keeps its MAC, nothing but sealed
    frames leaves its encrypted port (while it is down too), and no clear frame
    shows anywhere it must not (the segment and the WAN carry ciphertext only; the
    plain side never sees traffic between encrypted hosts or toward the other segment)."""
    a = glab.a
    mac = glab.gateway_status("gA")["mac"]
    to_p1, to_h2, to_h3 = b"RESTART-TO-P1-M!", b"RESTART-TO-H2-M!", b"RESTART-TO-H3-M!"
    caps = {"seg": a.capture("br0", name=f"tcpdump-gw-restart-seg-{sig.name}"),
            "gA": a.capture(glab.switch_port("gA"), direction="in", name=f"tcpdump-gw-restart-port-{sig.name}"),
            "plain": a.capture("plain0", role="gA", name=f"tcpdump-gw-restart-plain-{sig.name}"),
            "wan": a.capture(GW_WAN_IFNAME["gA"], role="wan", name=f"tcpdump-gw-restart-wan-{sig.name}")}
    pingers = [a.popen("h1", ["ping", "-4", "-i", "0.2", "-c", "200", "-W", "1", "-p", marker.hex(), addr],
                       name=f"ping-restart-{n}-{sig.name}")
               for n, (marker, addr) in enumerate(((to_p1, P1_IPV4), (to_h2, L.tap_ipv4("h2")),
                                                   (to_h3, L.tap_ipv4("h3"))))]
    # p1 keeps sending toward h1 through gA's plain port while gA is down.
    pingers.append(a.popen("p1", ["ping", "-4", "-i", "0.2", "-c", "200", "-W", "1", "-p", to_p1.hex(),
                                  L.tap_ipv4("h1")], name=f"ping-restart-p1-{sig.name}"))
    try:
        time.sleep(1.5)
        t_stop = time.time()
        glab.stop_gateway("gA", sig)
        t_down = time.time()
        time.sleep(1.0)
        t_start = time.time()
        glab.start_gateway("gA")
        glab.wait_gateway("gA", lambda st: st.get("connected") and st.get("netkey_pw_id"), 30)
        t_back = time.time()  # its tunnel socket is bound again

        def recovered(src, addr):
            return lambda: ping(glab.lab_of(src), src, addr, count=1, timeout=10).returncode == 0

        wait_for("h1 -> p1 after the restart", recovered("h1", P1_IPV4), timeout_s=30, every_s=0.5)
        wait_for("h1 -> h3 after the restart", recovered("h1", L.tap_ipv4("h3")), timeout_s=30, every_s=0.5)
        _ping_ok(glab, "h1", P1_IPV4, count=5)
        _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=5)
    finally:
        for proc in pingers:
            a.stop(proc, signal.SIGINT)
        records = {k: L.read_pcap_records(c.stop()) for k, c in caps.items()}
    frames = {k: [f for _, f in recs] for k, recs in records.items()}
    assert glab.gateway_status("gA")["mac"] == mac
    assert set(L.ethertype_counts(frames["seg"])) == {L.L2C_ETHERTYPE}
    # gA's encrypted port: sealed frames only, nothing at all in clear while it was down,
    # and (the capture works) gA's sealed frames before the stop and after the start.
    assert set(L.ethertype_counts(frames["gA"])) == {L.L2C_ETHERTYPE}
    assert not [f for t, f in records["gA"] if t_down < t < t_start and f[12:14] != b"\x88\xb5"]
    # (gA seals under the MACs it speaks for: p1's, and h3's from the tunnel.)
    for who in (P1_MAC, glab.lab_of("h3").tap_mac_of("h3")):
        src = bytes.fromhex(who.replace(":", ""))
        times = [t for t, f in records["gA"] if f[6:12] == src]
        assert [t for t in times if t < t_stop] and [t for t in times if t > t_start], who
    for where in ("seg", "wan"):
        assert not any(m in f for f in frames[where] for m in (to_p1, to_h2, to_h3)), f"a marker in clear on {where}"
    assert any(to_p1 in f for f in frames["plain"]), "h1 -> p1 never reached the plain side"
    assert not any(m in f for f in frames["plain"] for m in (to_h2, to_h3)), "a clear frame leaked to the plain side"
    # Only tunnel datagrams cross the WAN (and, while gA is down, its host's "port
    # unreachable" errors quoting gB's sealed datagrams); no marker anywhere (above).
    assert _assert_only_tunnel_on_wan(frames["wan"]) > 0


def test_malformed_and_replayed_tunnel_packets_are_dropped_and_counted(glab):
    a = glab.a
    # The tunnel first settles (an earlier test restarts the gateways): the
    # datagram replayed below must be one gB opened, every ping answered.
    wait_for("h1 -> h3 answered 3 of 3", lambda: "3 received" in ping(a, "h1", L.tap_ipv4("h3"), count=3).stdout,
             timeout_s=20, every_s=0.5)
    wan = a.capture(GW_WAN_IFNAME["gA"], role="wan", name="tcpdump-gw-replay")
    try:
        res = _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=2)
    finally:
        frames = L.read_pcap(wan.stop())
    assert "2 received" in res.stdout, res.stdout
    src_ip = socket.inet_aton(GATEWAYS["gA"][3])
    real = [p for f in frames if f[26:30] == src_ip for p in [_udp_payload(f)] if p]
    assert real, "no gA -> gB datagram captured"
    good = real[-1]
    bad_version = b"\x09" + good[1:]
    # An hour of the sender's clock ahead (packet numbers follow it, PN_PER_SECOND
    # a second): ahead of whatever gA sends meanwhile, so the tag decides.
    pn = int.from_bytes(good[12:20], "big") + 3600 * PN_PER_SECOND
    forged = good[:12] + pn.to_bytes(8, "big") + good[20:]
    datagrams = [good[:10], bad_version, forged, good, good]
    before = glab.gateway_status("gB")["drops"]
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for h in sys.stdin.read().split():\n"
            "    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))\n")
    a.exec("gA", [sys.executable, "-c", code, GATEWAYS["gB"][3], str(TUNNEL_PORT)],
           input="\n".join(d.hex() for d in datagrams).encode(), check=True)

    seen = {}

    def counted():
        drops = glab.gateway_status("gB")["drops"]
        seen.update({k: n - before.get(k, 0) for k, n in drops.items() if n != before.get(k, 0)})
        delta = {k: seen.get(k, 0) for k in
                 ("tunnel_truncated", "tunnel_unknown_version", "tunnel_bad_tag", "tunnel_replayed")}
        return delta == {"tunnel_truncated": 1, "tunnel_unknown_version": 1, "tunnel_bad_tag": 1,
                         "tunnel_replayed": 2}
    try:
        wait_for("bad tunnel datagrams counted by reason", counted, timeout_s=10)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; gB's drops since: {seen}") from None
    _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=2)  # the tunnel still works


# --- metrics, status and attacks on the inter-subnet port (issues 7 and 8) -------------

GW_METRICS = "http://127.0.0.1:9480/metrics"
SCRAPE = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n")
SEND_UDP = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i, h in enumerate(sys.stdin.read().split()):\n"
            "    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))\n"
            "    if i % 20 == 19:\n"
            "        time.sleep(0.005)\n")  # paced: the receive buffer must not overflow unseen


def scrape_gw(glab, gw: str) -> dict:
    lab = glab.lab_of(gw)
    res = lab.exec(gw, [sys.executable, "-c", SCRAPE, GW_METRICS], timeout=20)
    assert res.returncode == 0, f"scrape of {gw} failed: {res.stderr[-800:]}"
    out = {}
    for fam in text_string_to_metric_families(res.stdout):
        for smp in fam.samples:
            out[smp.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items())) + "}"
                            if smp.labels else "")] = smp.value
    return out


def _delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def _send_to_gb(glab, datagrams: list[bytes]) -> None:
    """Datagrams from gA's WAN address to gB's tunnel port (gB takes them as from peer gA)."""
    glab.a.exec("gA", [sys.executable, "-c", SEND_UDP, GATEWAYS["gB"][3], str(TUNNEL_PORT)],
                input="\n".join(d.hex() for d in datagrams).encode(), check=True, timeout=60)


def _captured_ga_to_gb(glab, count: int = 3) -> list[bytes]:
    wan = glab.a.capture(GW_WAN_IFNAME["gA"], role="wan", name=f"tcpdump-gw-take-{time.monotonic_ns()}")
    try:
        _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=count)
    finally:
        frames = L.read_pcap(wan.stop())
    src_ip = socket.inet_aton(GATEWAYS["gA"][3])
    real = [p for f in frames if f[26:30] == src_ip for p in [_udp_payload(f)] if p]
    assert real, "no gA -> gB datagram captured"
    return real


def test_gateway_metrics_move_with_traffic_and_bad_datagrams(glab):
    before = {g: scrape_gw(glab, g) for g in GATEWAYS}
    _ping_ok(glab, "h1", P1_IPV4, count=4, extra=["-s", "400"])
    _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=4, extra=["-s", "400"])
    after = {g: scrape_gw(glab, g) for g in GATEWAYS}
    ga, gb = (after["gA"], before["gA"]), (after["gB"], before["gB"])
    # gA: h1's requests opened from the segment, to p1 in clear and into the tunnel; the replies back.
    assert _delta(*ga, "l2crypt_gateway_frames_opened_total{port=encrypted}") >= 8
    assert _delta(*ga, "l2crypt_gateway_frames_sealed_total{port=encrypted}") >= 8
    assert _delta(*ga, "l2crypt_gateway_bytes_opened_total{port=encrypted}") >= 8 * 442
    assert _delta(*ga, "l2crypt_gateway_plain_frames_total{direction=out}") >= 4
    assert _delta(*ga, "l2crypt_gateway_plain_frames_total{direction=in}") >= 4
    assert _delta(*ga, "l2crypt_gateway_frames_sealed_total{port=tunnel}") >= 4
    assert _delta(*ga, "l2crypt_gateway_frames_opened_total{port=tunnel}") >= 4
    assert _delta(*gb, "l2crypt_gateway_frames_opened_total{port=tunnel}") >= 4
    assert _delta(*gb, "l2crypt_gateway_frames_sealed_total{port=encrypted}") >= 4
    for g in GATEWAYS:
        m = after[g]
        assert m["l2crypt_gateway_keyserver_connected"] == 1
        assert m["l2crypt_gateway_netkey_pw_id"] >= 1 and m["l2crypt_gateway_netkey_age_seconds"] >= 0
    assert after["gA"]["l2crypt_gateway_macs{side=plain,state=mapped}"] >= 1
    assert after["gA"]["l2crypt_gateway_rekeys_total{key=netkey}"] >= 1  # NETKEY rotates every few seconds

    # Malformed tunnel datagrams raise gB's drop reasons, one each.
    good = _captured_ga_to_gb(glab)[-1]
    m0 = scrape_gw(glab, "gB")
    _send_to_gb(glab, [good[:30], b"\x07" + good[1:], good[:1] + b"\x09" + good[2:]])
    reasons = ("tunnel_truncated", "tunnel_unknown_version", "tunnel_unknown_kind")

    def counted():
        m = scrape_gw(glab, "gB")
        got = {r: _delta(m, m0, f"l2crypt_gateway_frames_dropped_total{{reason={r}}}") for r in reasons}
        return got if all(v >= 1 for v in got.values()) else None
    got = wait_for("gB's drop metrics to count the bad datagrams", counted, timeout_s=15)
    assert got == {r: 1 for r in reasons}

    # The status command: a readable table, and the same facts as JSON.
    lab = glab.a
    res = lab.exec("gA", [lab.cmd("l2crypt-gateway"), "status", "--state-dir", glab.gw_dir("gA")], timeout=15)
    assert res.returncode == 0, res.stderr
    assert "ports" in res.stdout and "encrypted" in res.stdout and "plain0" in res.stdout
    assert P1_MAC in res.stdout and "connected" in res.stdout
    st = glab.gateway_status("gA")
    assert st["counters"]["to_plain"] >= 4 and st["plain_port"] == "plain0"


def _storm(glab, datagrams: list[bytes], reason: str) -> None:
    """Send ``datagrams`` to gB; each must be dropped under ``reason`` (or, when a NETKEY
    rotation retired their version meanwhile, as stale), none accepted."""
    key = f"l2crypt_gateway_frames_dropped_total{{reason={reason}}}"
    stale = "l2crypt_gateway_frames_dropped_total{reason=tunnel_stale_netkey}"
    before = scrape_gw(glab, "gB")
    _send_to_gb(glab, datagrams)

    def counted():
        m = scrape_gw(glab, "gB")
        return m if _delta(m, before, key) + _delta(m, before, stale) >= len(datagrams) else None
    after = wait_for(f"gB to count {len(datagrams)} datagrams as {reason}", counted, timeout_s=60, every_s=1.0)
    assert _delta(after, before, key) + _delta(after, before, stale) == len(datagrams)
    assert _delta(after, before, key) > 0


def test_replay_storm_and_huge_packet_numbers_on_the_tunnel(glab):
    """Replayed and forged (huge PN) datagrams from gA's address: each is counted under
    its reason, the replay window is not moved, and traffic keeps flowing both ways."""
    pinger = glab.b.popen("h3", ["ping", "-4", "-i", "0.2", "-c", "60", "-W", "2", L.tap_ipv4("h1")],
                          name="ping-tunnel-storm")
    try:
        real = _captured_ga_to_gb(glab, count=5)
        _storm(glab, real * max(1, 1500 // len(real)), "tunnel_replayed")
        real = _captured_ga_to_gb(glab, count=3)
        forged = [d[:12] + (2**64 - 1 - i).to_bytes(8, "big") + d[20:]
                  for i, d in enumerate(real * (600 // len(real) + 1))]
        _storm(glab, forged, "tunnel_bad_tag")
        # Traffic still flows after the storm, across the tunnel both ways, without loss:
        # the forged packet numbers did not move gB's replay window for gA.
        before = scrape_gw(glab, "gB")
        res = _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=5)
        assert " 0% packet loss" in res.stdout, res.stdout[-300:]
        _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=3)
        after = scrape_gw(glab, "gB")
        assert _delta(after, before, "l2crypt_gateway_frames_opened_total{port=tunnel}") >= 8
    finally:
        glab.b.stop(pinger, signal.SIGINT)
    during = glab.b.log_text("ping-tunnel-storm")
    assert "received" in during and " 0 received" not in during, during[-400:]


# --- the port guard on the gateway's ports (issue 14.1) ---------------------------------

GUARD_UDP_PORT = 7311


def _guard_markers() -> tuple[bytes, bytes]:
    tag = os.urandom(4).hex().encode()
    return b"L2C-GW-INJECTED-" + tag, b"L2C-GW-GENUINE-" + tag


def _genuine_from_the_wan(glab, genuine: bytes) -> None:
    """A datagram to gA's WAN address from the WAN: the gateway's stack does take that."""
    code = ("import socket, sys\n"
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(bytes.fromhex(sys.argv[3]), "
            "(sys.argv[1], int(sys.argv[2])))\n")
    glab.a.exec("wan", [sys.executable, "-c", code, GATEWAYS["gA"][3], str(GUARD_UDP_PORT), genuine.hex()],
                check=True)


def _inject_at_gA(glab, port, frames, inject_kwargs, injected, genuine):
    """Inject ``frames`` (by ``a.inject(frames, **inject_kwargs)``) while a
    listener on gA's ``port`` and stack watches, then send one genuine datagram
    from the WAN: the port saw every injected frame, the stack only the genuine
    datagram and no echo request. Returns gA's nstat before and after."""
    a = glab.a
    listener = StackListener(a, "gA", port, GUARD_UDP_PORT, injected, genuine)
    try:
        stack_before = nstat(a, "gA")
        assert a.inject(frames, **inject_kwargs) == len(frames)
        wait_for(f"every injected frame to reach gA's {port}",
                 lambda: listener.counts().get(("pkt_all", "injected"), 0) >= len(frames), timeout_s=10)
        _genuine_from_the_wan(glab, genuine)
        wait_for("the genuine datagram at gA's listener",
                 lambda: listener.counts().get(("udp4", "genuine")), timeout_s=10)
        stack_after = nstat(a, "gA")
        counts = listener.counts()
    finally:
        listener.stop()
    assert counts == {("pkt_all", "injected"): len(frames), ("udp4", "genuine"): 1}
    assert stack_after["IcmpInEchos"] - stack_before["IcmpInEchos"] == 0
    return stack_before, stack_after


def test_plain_frames_on_the_gateways_encrypted_port_reach_nothing(glab):
    """An intruder on segment A sends gA's encrypted port plain IPv4 UDP, IPv6 UDP,
    ARP and ICMP echo frames as if from h1, to gA's MAC, to a plain-side MAC the
    gateway speaks for and to broadcast, addressed to gA's WAN address (the weak host
    model would take them): gA's stack gets none, its status and metrics count all."""
    a = glab.a
    a.add_intruder()
    h1 = a.status("h1")
    injected, genuine = _guard_markers()
    frames = plain_frames([GATEWAYS["gA"][1], P1_MAC, "ff:ff:ff:ff:ff:ff"], h1["mac"], L.tap_ipv4("h1"),
                          GATEWAYS["gA"][3], L.tap_ipv6("h1"), "fd66::21", GUARD_UDP_PORT, injected)
    before, m_before = glab.gateway_status("gA"), scrape_gw(glab, "gA")
    stack_before, stack_after = _inject_at_gA(glab, L.WIRE_IFNAME, frames, {}, injected, genuine)
    assert stack_after["UdpInDatagrams"] - stack_before["UdpInDatagrams"] >= 1  # the genuine one
    after = wait_for("gA to count the refused frames", lambda: (
        lambda s: s if s.get("inbound_refused", 0) - before.get("inbound_refused", 0) >= len(frames) else None)(
            glab.gateway_status("gA")), timeout_s=10)
    assert after["inbound_refused"] - before["inbound_refused"] == len(frames)
    assert before["port_guard"] == after["port_guard"] == "intact"
    m_after = scrape_gw(glab, "gA")
    key = "l2crypt_gateway_port_guard_frames_dropped_total{direction=inbound,port=encrypted}"
    assert m_after[key] - m_before[key] == len(frames)
    assert m_after["l2crypt_gateway_port_guard_intact{port=encrypted}"] == 1
    _ping_ok(glab, "h1", P1_IPV4, count=2)


def test_the_plain_port_feeds_the_gateway_but_not_its_stack(glab):
    """p1 sends gA's plain port frames addressed to gA's own WAN address: the gateway
    still reads every frame (as it must, to bridge them), its IP stack gets none."""
    a = glab.a
    injected, genuine = _guard_markers()
    plain_mac = link_mac(a, "gA", "plain0")
    frames = plain_frames([plain_mac, "ff:ff:ff:ff:ff:ff"], P1_MAC, P1_IPV4, GATEWAYS["gA"][3], "fd66::31",
                          "fd66::21", GUARD_UDP_PORT, injected)
    before = glab.gateway_status("gA")
    _inject_at_gA(glab, "plain0", frames, {"role": "p1", "ifname": L.WIRE_IFNAME}, injected, genuine)
    after = wait_for("gA to read and count the frames", lambda: (
        lambda s: s if s.get("plain_inbound_refused", 0) - before.get("plain_inbound_refused", 0) >= len(frames)
        and s["counters"]["from_plain"] - before["counters"]["from_plain"] >= len(frames) else None)(
            glab.gateway_status("gA")), timeout_s=10)
    assert before["plain_port_guard"] == after["plain_port_guard"] == "intact"
    _ping_ok(glab, "h1", P1_IPV4, count=3)  # the plain side still works both ways


NEW_PATH = ["--wire-ring", "v2", "--datapath", "batched", "--tunnel-offload"]


def _csum_errors(glab, roles) -> dict:
    return {r: nstat(glab.lab_of(r), r).get("TcpInCsumErrors", 0) for r in roles}


def _restart_gateways(glab, extra: dict) -> None:
    for gw in GATEWAYS:
        glab.stop_gateway(gw, signal.SIGTERM)
        glab.gateway_args[gw] = extra[gw]
    for gw in GATEWAYS:
        glab.start_gateway(gw)
    for gw in GATEWAYS:
        glab.wait_gateway(gw, lambda st: st.get("connected") and st.get("netkey_pw_id"), 30)


@pytest.fixture
def gateways_on_the_new_path(glab):
    """gA and gB restarted with ``NEW_PATH``; afterwards with the options they had."""
    before = {gw: list(glab.gateway_args.get(gw, [])) for gw in GATEWAYS}
    _restart_gateways(glab, {gw: NEW_PATH for gw in GATEWAYS})
    yield
    _restart_gateways(glab, before)


def test_gateways_on_packet_rings_with_plain_port_offloads(glab, gateways_on_the_new_path):
    """Issue 13.6 (the gateways restarted on the new path, and back after): gA and gB with ``wire_ring =
    "v2"``, ``datapath = "batched"`` and ``tunnel_offload`` carry h1 -> p1 (both
    ways: p1's stream reaches gA as GRO super-frames, h1's leaves it as GSO
    super-frames) and h1 -> h3 TCP (UDP GSO and GRO on the tunnel); the segments'
    bridges carry only sealed frames, and no receiver counts a bad TCP checksum."""
    st = glab.gateway_status("gA")
    assert st["wire_path"] == "batched: packet rings (TPACKET_V2)" and st["datapath"] == "batched", st
    assert glab.gateway_status("gB")["wire_path"] == "batched: packet rings (TPACKET_V2)"
    assert st["tunnel_path"] == glab.gateway_status("gB")["tunnel_path"] == "batched: UDP GSO and GRO"
    assert "generic-receive-offload: on" in glab.a.exec("gA", ["ethtool", "-k", "plain0"], check=True).stdout
    caps = {"A": glab.a.capture("br0", name="tcpdump-gw-newpath-A", snaplen=256),
            "B": glab.b.capture("br0", name="tcpdump-gw-newpath-B", snaplen=256)}
    before = _csum_errors(glab, ("p1", "h1", "h3"))
    try:
        _ping_ok(glab, "h1", P1_IPV4, count=2, extra=["-p", MARKER.hex()])
        _ping_ok(glab, "h1", L.tap_ipv4("h3"), count=2, extra=["-p", MARKER.hex()])
        both = _iperf3(glab, "h1", "p1", P1_IPV4, 5304, extra=("-t", "2", "--bidir"))
        across = _iperf3(glab, "h1", "h3", L.tap_ipv4("h3"), 5305, extra=("-t", "2"))
    finally:
        frames = {k: L.read_pcap(c.stop()) for k, c in caps.items()}
    for key in ("sum_received", "sum_received_bidir_reverse"):
        assert both["end"][key]["bytes"] > 1_000_000, key
    assert across["end"]["sum_received"]["bytes"] > 1_000_000
    for seg, seen in frames.items():
        assert set(L.ethertype_counts(seen)) == {L.L2C_ETHERTYPE}, seg
        assert not any(MARKER in f for f in seen), seg
    assert _csum_errors(glab, ("p1", "h1", "h3")) == before
    c = glab.gateway_status("gA")["counters"]
    assert c.get("super_frames_written", 0) > 0 and c.get("super_frames_read", 0) > 0, c
