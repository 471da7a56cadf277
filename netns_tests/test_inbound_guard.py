# The port guard on real kernels (issue 14.1): on a host's wire port only
# l2crypt frames reach anything, and only l2crypt frames leave it, while the
# agent runs, while it restarts and after it died.
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788 on bridge mbr0
#      +-----------+          +-----------+          +-----------+
#      | h1        |          | h2        |          | h3        |
#      | l2c0 TAP  |          | l2c0 TAP  |          | l2c0 TAP  |
#      | .11 ::11  |          | .12 ::12  |          | .13 ::13  |
#      |  agent    |          |  agent    |          |  agent    |
#      | eth0      |          | eth0 <------ plain frames from the intruder,
#      +----|------+          +----|------+   spoofed as h1 |
#           p1-<s>                 p2-<s>                 p3-<s>
#      +----|----------------------|----------------------|------+
#      |            br0 in l2c-sw-<s> (the switch)                |
#      +----|----------------------------------------------------+
#           pi-<s> -- eth0 of l2c-in-<s>: the intruder, no certificate
#
# A listener on h2 holds UDP sockets on 0.0.0.0 and :: and packet sockets
# for IPv4, ARP and IPv6 on h2's wire port; one ETH_P_ALL socket there shows
# that the injected frames did arrive (the kernel serves ETH_P_ALL sockets
# before the ingress hook).  Genuine datagrams h1 -> h2 through the TAPs
# show that the listener works.

from __future__ import annotations

import json
import os
import signal
import sys

from pyroute2 import IPRoute
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

import pytest

from helpers import mac_bytes, ping, wait_for
from hostile import StackListener, link_mac, nstat, plain_frames
from l2crypt.lab import segment as L
from test_operations import AGENT_METRICS, scrape

pytestmark = pytest.mark.lab

UDP_PORT = 7310
BROADCAST = "ff:ff:ff:ff:ff:ff"
STACK_COUNTERS = ("UdpInDatagrams", "Udp6InDatagrams", "IcmpInEchos", "Icmp6InEchos")
# h1's wire port and the intruder get these only in the egress test (and lose them after it).
EGRESS_NET = ("10.98.0.11", "10.98.0.66", 24)

_SEND_GENUINE = r"""
import socket, sys
v4, v6, port, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data, (v4, port))
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(data, (v6, port))
"""

_REPEAT = r"""
import socket, sys, time
ifname, per_s, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
frames = [bytes.fromhex(h) for h in sys.argv[4:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
start, n = time.monotonic(), 0
while time.monotonic() - start < seconds:
    s.send(frames[n % len(frames)])
    n += 1
    wait = start + n / per_s - time.monotonic()
    if wait > 0:
        time.sleep(wait)
print("sent", n, flush=True)
"""


_WRITE = r"""
import errno, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
written = refused = 0
for h in sys.argv[2:]:
    try:
        s.send(bytes.fromhex(h))
        written += 1
    except OSError as exc:  # ENOBUFS: the egress hook dropped it
        assert exc.errno == errno.ENOBUFS, exc
        refused += 1
print(written, refused)
"""


def _write(lab, role: str, frames: list[bytes]) -> tuple[int, int]:
    """Write raw frames out of ``role``'s wire port: (written, refused by the kernel)."""
    res = lab.exec(role, [sys.executable, "-c", _WRITE, L.WIRE_IFNAME, *(f.hex() for f in frames)], check=True)
    written, refused = map(int, res.stdout.split())
    return written, refused


def _markers() -> tuple[bytes, bytes]:
    tag = os.urandom(4).hex().encode()
    return b"L2C-INJECTED-" + tag, b"L2C-GENUINE-" + tag


def _delta(after: dict, before: dict, keys) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def _neighbours(lab, host: str) -> list:
    res = lab.exec(host, ["ip", "-j", "neigh", "show", "dev", L.WIRE_IFNAME], check=True)
    return json.loads(res.stdout or "[]")


def test_plain_frames_from_the_switch_never_reach_the_host(lab):
    """The intruder sends h2 plain IPv4 UDP, IPv6 UDP, ARP and ICMP echo frames as if
    from h1, to h2's wire MAC, h2's TAP MAC and broadcast: nothing on h2 gets one,
    h2's status counts every one, and a genuine h1 -> h2 datagram still arrives."""
    h1, h2 = lab.status("h1"), lab.status("h2")
    injected, genuine = _markers()
    frames = plain_frames([link_mac(lab, "h2", L.WIRE_IFNAME), h2["mac"], BROADCAST], h1["mac"],
                          L.tap_ipv4("h1"), L.tap_ipv4("h2"), L.tap_ipv6("h1"), L.tap_ipv6("h2"), UDP_PORT, injected)
    for addr in (L.tap_ipv4("h2"), L.tap_ipv6("h2")):  # neighbours resolved: the genuine datagrams go at once
        assert ping(lab, "h1", addr, count=1).returncode == 0
    listener = StackListener(lab, "h2", L.WIRE_IFNAME, UDP_PORT, injected, genuine)
    try:
        before, stack_before = lab.status("h2"), nstat(lab, "h2")
        metrics_before = scrape(lab, "h2", AGENT_METRICS)
        assert lab.inject(frames) == len(frames)
        wait_for("every injected frame to reach h2's wire port",
                 lambda: listener.counts().get(("pkt_all", "injected"), 0) >= len(frames), timeout_s=10)
        lab.exec("h1", [sys.executable, "-c", _SEND_GENUINE, L.tap_ipv4("h2"), L.tap_ipv6("h2"), str(UDP_PORT),
                        genuine.hex()], check=True)
        wait_for("the genuine datagrams at h2's listener",
                 lambda: all(listener.counts().get((s, "genuine")) for s in ("udp4", "udp6")), timeout_s=10)
        stack_after = nstat(lab, "h2")
        counts = listener.counts()
    finally:
        listener.stop()
    # The frames reached the port (ETH_P_ALL) and nothing else; the genuine ones reached the sockets.
    assert counts == {("pkt_all", "injected"): len(frames), ("udp4", "genuine"): 1, ("udp6", "genuine"): 1}
    assert _delta(stack_after, stack_before, STACK_COUNTERS) == {
        "UdpInDatagrams": 1, "Udp6InDatagrams": 1, "IcmpInEchos": 0, "Icmp6InEchos": 0}
    assert _neighbours(lab, "h2") == []  # the ARP requests taught h2 nothing
    # Status and metrics count every one of them.
    after = wait_for("h2 to count the refused frames", lambda: (
        lambda s: s if s.get("inbound_refused", 0) - before.get("inbound_refused", 0) >= len(frames) else None)(
            lab.status("h2")), timeout_s=10)
    assert after["inbound_refused"] - before["inbound_refused"] == len(frames)
    assert before["port_guard"] == after["port_guard"] == "intact"
    metrics_after = scrape(lab, "h2", AGENT_METRICS)
    inbound = "l2crypt_port_guard_frames_dropped_total{direction=inbound,port=eth0}"
    assert metrics_after[inbound] - metrics_before[inbound] == len(frames)
    assert metrics_after["l2crypt_port_guard_intact{port=eth0}"] == 1
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0


def test_an_agent_restart_opens_no_window(lab):
    """Plain frames flood h2's wire port while its agent stops and starts again (the
    guard stays while it is down and is replaced in one transaction at the start):
    none reaches h2's stack or its IPv4/ARP packet sockets."""
    h1 = lab.status("h1")
    injected, genuine = _markers()
    frames = [f for f in plain_frames([link_mac(lab, "h2", L.WIRE_IFNAME), BROADCAST], h1["mac"], L.tap_ipv4("h1"),
                                      L.tap_ipv4("h2"), L.tap_ipv6("h1"), L.tap_ipv6("h2"), UDP_PORT, injected)
              if f[12:14] in (b"\x08\x00", b"\x08\x06")]
    listener = StackListener(lab, "h2", L.WIRE_IFNAME, UDP_PORT, injected, genuine)
    flood = lab.popen("in", [sys.executable, "-c", _REPEAT, L.WIRE_IFNAME, "2000", "8", *(f.hex() for f in frames)],
                      name=f"flood-h2-{os.urandom(2).hex()}")
    try:
        wait_for("the flood to reach h2", lambda: listener.counts().get(("pkt_all", "injected"), 0) >= 100)
        lab.restart_agent("h2")
        reached = listener.counts().get(("pkt_all", "injected"), 0)
        wait_for("the flood to go on after the restart",
                 lambda: listener.counts().get(("pkt_all", "injected"), 0) >= reached + 100, timeout_s=10)
        counts = listener.counts()
    finally:
        lab.stop(flood)
        listener.stop()
    assert [k for k in counts if k[0] != "pkt_all"] == [], counts
    assert counts[("pkt_all", "injected")] >= 1000
    st = lab.status("h2")
    assert st["port_guard"] == "intact" and st["inbound_refused"] >= 100, st
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0


def _egress_blocked(lab, host: str) -> int:
    """The guard's egress counter, straight from nftables (works with the agent dead)."""
    res = lab.exec(host, ["nft", "-j", "list", "counter", "netdev", "l2crypt_" + L.WIRE_IFNAME, "egress_blocked"],
                   check=True)
    return next(item["counter"]["packets"] for item in json.loads(res.stdout)["nftables"] if "counter" in item)


def _set_address(lab, role: str, address: str | None, prefixlen: int = 24) -> None:
    with IPRoute(netns=lab.ns(role), flags=0) as ipr:
        index = ipr.link_lookup(ifname=L.WIRE_IFNAME)[0]
        if address is None:
            ipr.flush_addr(index=index)
        else:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def test_only_l2crypt_frames_leave_while_the_agent_runs_and_after_sigkill(lab):
    """h1's wire port gets an IPv4 address and sends through it, and raw IPv4, ARP
    and IPv6 frames are written to it, with the agent running and after kill -9:
    the switch port receives only 0x88B5 from h1, and the guard counts the rest."""
    h1_ip, in_ip, prefixlen = EGRESS_NET
    wire = link_mac(lab, "h1", L.WIRE_IFNAME)
    tap = lab.status("h1")["mac"]
    marker = _markers()[0]
    raw = [bytes(Ether(dst=L.INTRUDER_MAC, src=wire) / IP(src=h1_ip, dst=in_ip) / UDP(dport=UDP_PORT) / Raw(marker)),
           bytes(Ether(dst=BROADCAST, src=wire) / ARP(op=1, hwsrc=wire, psrc=h1_ip, pdst=in_ip) / Raw(marker)),
           bytes(Ether(dst=L.INTRUDER_MAC, src=wire) / IPv6(src="fd98::11", dst="fd98::66") / UDP(dport=UDP_PORT)
                 / Raw(marker))]
    probe = Ether(dst=L.INTRUDER_MAC, src=wire, type=L.L2C_ETHERTYPE) / Raw(b"\x01" * 46)  # passes, even now
    cap = lab.capture(lab.port_name("h1"), direction="in", name=f"tcpdump-egress-p1-{os.urandom(2).hex()}")
    blocked, written = {}, {}
    try:
        _set_address(lab, "h1", h1_ip, prefixlen)
        _set_address(lab, "in", in_ip, prefixlen)
        for phase in ("agent running", "agent killed"):
            if phase == "agent killed":
                lab.stop(lab.proc("agent-h1"), signal.SIGKILL)
            before = _egress_blocked(lab, "h1")
            assert ping(lab, "h1", in_ip, count=3, extra=["-W", "1"]).returncode != 0  # goes nowhere
            written[phase] = _write(lab, "h1", raw)
            if phase == "agent running":
                assert ping(lab, "h1", L.tap_ipv4("h2"), count=3).returncode == 0  # sealed, through the TAP
            else:
                assert _write(lab, "h1", [bytes(probe)]) == (1, 0)
            blocked[phase] = _egress_blocked(lab, "h1") - before
    finally:
        frames = L.read_pcap(cap.stop())
        _set_address(lab, "in", None)
        _set_address(lab, "h1", None)
        lab.restart_agent("h1")
    from_h1 = [f for f in frames if f[6:12] in (mac_bytes(wire), mac_bytes(tap))]
    assert from_h1, "the capture holds nothing from h1"
    assert {int.from_bytes(f[12:14], "big") for f in from_h1} == {L.L2C_ETHERTYPE}, L.ethertype_counts(from_h1)
    assert bytes(probe) in from_h1  # sent after kill -9: the port still passes 0x88B5
    assert len([f for f in from_h1 if f[6:12] == mac_bytes(tap)]) >= 3  # the sealed pings
    assert not any(marker in f for f in frames)
    for phase, n in blocked.items():
        assert n >= 3 + len(raw), (phase, blocked)  # three pings and the raw frames
        assert written[phase] == (0, len(raw)), (phase, written)  # each raw write refused (ENOBUFS)
    assert lab.status("h1")["port_guard"] == "intact"


def test_unguard_removes_the_guard_and_the_next_start_puts_it_back(lab):
    """``l2crypt unguard`` with the agent stopped: the table is gone and plain frames
    reach h3's packet sockets again; a second call says so in one line; the next
    agent start guards the port again."""
    agent = lab.proc("agent-h3")
    lab.stop(agent)
    injected, genuine = _markers()
    frame = plain_frames([link_mac(lab, "h3", L.WIRE_IFNAME)], L.INTRUDER_MAC, "10.98.0.66", "10.98.0.13",
                         "fd98::66", "fd98::13", UDP_PORT, injected)[0]  # IPv4 UDP
    try:
        listener = StackListener(lab, "h3", L.WIRE_IFNAME, UDP_PORT, injected, genuine)
        try:
            lab.inject([frame])
            wait_for("the frame at h3's wire port", lambda: listener.counts().get(("pkt_all", "injected")))
            guarded = listener.counts()
            res = lab.exec("h3", [lab.cmd("l2crypt"), "unguard", "--port", L.WIRE_IFNAME])
            assert res.returncode == 0, res.stderr
            lab.inject([frame])
            wait_for("the frame at h3's IPv4 socket", lambda: listener.counts().get(("pkt_ip", "injected")))
        finally:
            listener.stop()
        again = lab.exec("h3", [lab.cmd("l2crypt"), "unguard", "--port", L.WIRE_IFNAME])
        nft = lab.exec("h3", ["nft", "-j", "list", "tables", "netdev"], check=True)
    finally:
        st = lab.restart_agent("h3")
    assert guarded == {("pkt_all", "injected"): 1}  # while guarded (agent stopped): only the tap saw it
    assert "l2crypt_eth0" not in nft.stdout
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "no port guard on eth0" in again.stderr
    assert "Traceback" not in again.stderr
    assert st["port_guard"] == "intact"
    assert ping(lab, "h3", L.tap_ipv4("h1"), count=2).returncode == 0
