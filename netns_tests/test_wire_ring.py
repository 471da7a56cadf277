# The wire port over PACKET_MMAP rings (issue 13, step 2) on a real kernel.
#
#      +---------------------+            +----------------------+
#      | l2c-ra-<s>          |            | l2c-rb-<s>           |
#      |  RingWire (and a    |   veth     |  plain AF_PACKET     |
#      |  LinuxWire) on  wr0 |------------| wr1  socket (all     |
#      |  + the port guard   |  MTU 2000  |      EtherTypes)     |
#      +---------------------+            +----------------------+
#
# The sockets are opened in their namespaces (setns) and used from this
# process.  Then the lab of test_segment with every agent on the ring
# (agents started with --wire-ring v3).

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute, netns

from helpers import assert_hosts_sent_only_sealed, iperf3, ping, skip_reason
from l2crypt.io.linux_wire import LinuxWire
from l2crypt.io.wire_ring import TPACKET_V2, TPACKET_V3, RingWire, open_wire
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

L2C = 0x88B5
MTU = 2000
ETH_P_ALL = 3
SO_RCVBUFFORCE = 33  # asm-generic/socket.h
SRC, DST = bytes.fromhex("020000000a01"), bytes.fromhex("020000000b01")
SIZES = (60, 61, 64, 100, 511, 1000, 1414, 1500, 1514, 1999, MTU + 14)


def frame(seq: int, size: int, ethertype: int = L2C) -> bytes:
    """A frame of ``size`` bytes whose body says its number and size."""
    head = DST + SRC + ethertype.to_bytes(2, "big") + seq.to_bytes(4, "big") + size.to_bytes(2, "big")
    return head + bytes((seq + i) & 0xFF for i in range(size - len(head)))


def drain(read, want: int, timeout_s: float = 5.0) -> list[bytes]:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        more = read()
        got += more
        if not more:
            time.sleep(0.002)
    return got


class Pair:
    """Two namespaces joined by a veth; sockets opened inside them."""

    def __init__(self):
        s = os.urandom(3).hex()
        self.ns_a, self.ns_b = f"l2c-ra-{s}", f"l2c-rb-{s}"
        for name in (self.ns_a, self.ns_b):
            netns.create(name)
        fd = os.open(f"/var/run/netns/{self.ns_b}", os.O_RDONLY)
        try:
            with IPRoute(netns=self.ns_a, flags=0) as ipr:
                ipr.link("add", ifname="wr0", kind="veth", peer={"ifname": "wr1", "net_ns_fd": fd})
        finally:
            os.close(fd)
        for name, ifname in ((self.ns_a, "wr0"), (self.ns_b, "wr1")):
            with IPRoute(netns=name, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=MTU, state="up")

    def inside(self, ns: str, make):
        netns.pushns(ns)
        try:
            return make()
        finally:
            netns.popns()

    def peer_socket(self) -> socket.socket:
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            s.bind(("wr1", ETH_P_ALL))
            return s
        s = self.inside(self.ns_b, make)
        s.setblocking(False)
        return s

    def run_a(self, code: str) -> str:
        res = subprocess.run(["ip", "netns", "exec", self.ns_a, sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=30, check=True)
        return res.stdout

    def remove(self):
        for name in (self.ns_a, self.ns_b):
            try:
                netns.remove(name)
            except OSError:
                pass


@pytest.fixture
def pair():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    p = Pair()
    try:
        yield p
    finally:
        p.remove()


def peer_read(sock: socket.socket):
    def read():
        out = []
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            if addr[2] != socket.PACKET_OUTGOING:
                out.append(data)
        return out
    return read


@pytest.mark.parametrize("version", [TPACKET_V3, TPACKET_V2])
def test_frames_of_every_size_and_batch_go_through_the_rings_both_ways_in_order(pair, version):
    ring = pair.inside(pair.ns_a, lambda: RingWire("wr0", L2C, version))
    peer = pair.peer_socket()
    try:
        assert ring.max_frame == MTU + 14
        seq = 0
        for batch in (1, 64, ring.tx_slots * 2 + 7):  # the last one more than the TX ring holds
            sent = [frame(seq + i, SIZES[(seq + i) % len(SIZES)]) for i in range(batch)]
            seq += batch
            assert ring.write_frames(sent) == batch
            got = [f for f in drain(peer_read(peer), batch) if f[12:14] == b"\x88\xb5"]
            assert got == sent, (batch, len(got))
        # Receive: more than the RX ring holds, sent in chunks while it is read.
        capacity = ring.rx_blocks * ring.rx_block_bytes // (MTU + 14 + 68)
        sent, got = [], []
        for chunk in range(capacity // 200 + 3):
            for i in range(200):
                f = frame(seq, SIZES[seq % len(SIZES)])
                peer.send(f)
                sent.append(f)
                seq += 1
            got += drain(lambda: ring.read_frames(64), 200 * (chunk + 1) - len(got))
        assert len(sent) > capacity
        assert got == sent
        assert ring.rx_truncated == 0 and ring.write_errors == 0
    finally:
        ring.close()
        peer.close()


def test_only_the_l2crypt_ethertype_arrives_and_tagged_frames_come_as_linux_wire_gets_them(pair):
    ring = pair.inside(pair.ns_a, lambda: RingWire("wr0", L2C))
    plain = pair.inside(pair.ns_a, lambda: LinuxWire("wr0", L2C))
    peer = pair.peer_socket()
    try:
        mixed = [frame(1, 100), frame(2, 100, 0x0800), frame(3, 200, 0x88B6), frame(4, 300),
                 frame(5, 60, 0x86DD), frame(6, 1514)]
        tagged = DST + SRC + b"\x81\x00\x00\x05" + frame(7, 120)[12:]  # VLAN 5, then 0x88B5
        for f in mixed + [tagged]:
            peer.send(f)
        wanted = [f for f in mixed if f[12:14] == b"\x88\xb5"]
        from_ring = drain(lambda: ring.read_frames(64), len(wanted) + 1)
        from_plain = drain(lambda: plain.read_frames(64), len(wanted) + 1)
        # The l2crypt frames in order, and nothing else; the tagged one arrives
        # without its tag (the kernel took it off), from both ports alike.
        assert from_ring == wanted + [frame(7, 120)]
        assert from_plain == from_ring
    finally:
        for s in (ring, plain, peer):
            s.close()


def test_a_frame_too_big_is_refused_and_counted_and_close_releases_everything(pair):
    ring = pair.inside(pair.ns_a, lambda: RingWire("wr0", L2C))
    peer = pair.peer_socket()
    fd = ring.fileno()
    maps_before = open("/proc/self/maps").read().count("\n")
    ok = frame(1, 200)
    assert ring.write_frame(frame(0, ring.max_frame + 1)) is False
    assert ring.write_frame(b"\x00" * (ring.slot_bytes + 1)) is False
    assert ring.tx_slot(ring.slot_bytes) is None
    assert ring.write_errors == 3
    assert ring.write_frames([ok]) == 1  # the ring still works after the refusals
    assert drain(peer_read(peer), 1) == [ok]
    ring.close()
    ring.close()  # idempotent
    peer.close()
    assert ring.fileno() == -1 and not os.path.exists(f"/proc/self/fd/{fd}")
    assert open("/proc/self/maps").read().count("\n") < maps_before  # the ring mapping is gone
    again = pair.inside(pair.ns_a, lambda: open_wire("wr0", L2C, batched=True))  # the port is free again
    again[0].close()
    assert again[1] == "batched: packet rings (TPACKET_V3)"


@pytest.mark.parametrize("version", [TPACKET_V3, TPACKET_V2])
def test_the_egress_guard_sees_and_counts_what_the_ring_sends(pair, version):
    """With the port guard on wr0, a non-l2crypt frame written through the ring is
    blocked and counted by the guard's egress chain (no qdisc bypass), the
    l2crypt frames around it arrive, and the ring keeps working after."""
    guard = ("from l2crypt.io.port_guard import guard_port; import json; "
             f"print(json.dumps(guard_port('wr0', {L2C}).read()))")
    read = ("from l2crypt.io.port_guard import PortGuard; import json; "
            f"print(json.dumps(PortGuard('wr0', {L2C}).read()))")
    before = json.loads(pair.run_a(guard))
    ring = pair.inside(pair.ns_a, lambda: RingWire("wr0", L2C, version))
    peer = pair.peer_socket()
    try:
        batch = [frame(1, 100), frame(2, 100, 0x0800), frame(3, 100), frame(4, 100, 0x0806), frame(5, 100)]
        assert ring.write_frames(batch) == 3
        assert ring.write_errors == 2
        after = json.loads(pair.run_a(read))
        got = drain(peer_read(peer), 3)
        assert got == [batch[0], batch[2], batch[4]]
        assert after["egress_blocked"] - before["egress_blocked"] == 2, (before, after)
        assert after["port_guard"] == "intact"
        more = [frame(6 + i, 700) for i in range(100)]
        assert ring.write_frames(more) == 100
        assert drain(peer_read(peer), 100) == more
    finally:
        ring.close()
        peer.close()


# ---------------------------------------------------------------- the agents


@pytest.fixture(scope="module")
def ring_lab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = L.Lab(state_dir=tmp_path_factory.mktemp("ringlab"), hosts=("h1", "h2"), capture_from_start=True,
                    agent_args=("--wire-ring", "v3"))
    try:
        the_lab.up(timeout_s=90)
        yield the_lab
    finally:
        the_lab.down()


def test_agents_on_the_ring_carry_ping_and_iperf3_and_send_only_sealed_frames(ring_lab):
    lab = ring_lab
    for host in ("h1", "h2"):
        log = open(lab.proc(f"agent-{host}").log).read()
        assert "wire_opened" in log and "batched: packet rings (TPACKET_V3)" in log, log[-2000:]
        assert lab.status(host)["wire_path"] == "batched: packet rings (TPACKET_V3)"
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=5).returncode == 0
    result = iperf3(lab, "h1", "h2", seconds=2)
    assert result["end"]["sum_received"]["bits_per_second"] > 1e6, result["end"]
    counts = assert_hosts_sent_only_sealed(lab)
    assert all(counts.get(h) for h in ("h1", "h2")), counts
