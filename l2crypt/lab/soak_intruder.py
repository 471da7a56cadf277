"""The soak's intruder (issue 14): an unenrolled namespace on a switch that
injects plain frames and replays sealed ones, in short bursts, while the
soak's traffic, rekeys and restarts go on.

1. ``Intruder.open`` adds the lab's intruder namespace to the switch.  Its
   bridge port does not learn (a switch with port security), so replayed
   frames do not move the real hosts' MACs to the intruder's port.  It opens
   a sniffing socket on the switch (``br0`` hands it a copy of every frame,
   unicast included) and a sending socket in the intruder's namespace.
2. ``watch`` (every turn of the soak loop) keeps the sealed frames of the
   last ``RECENT_S`` seconds.
3. ``stash(mac)`` (just before a daemon restarts) keeps the sealed frames sent
   to that MAC in the last ``RECENT_S`` seconds; the next burst replays them
   to the restarted daemon (a replay across a receiver restart).
4. ``burst`` reads every daemon's counters on the switch, sends each victim
   plain IPv4 UDP, IPv6 UDP, ARP and ICMP, to its wire MAC, its TAP MAC and
   broadcast, with another host's MAC and address as the spoofed source, and
   replays the recent sealed frames and the stash unchanged.  After
   ``SETTLE_S`` it reads the counters again: the differences are what the
   burst caused (drops per reason, frames refused inbound).
5. ``sent_digests`` lets the switch scan leave the intruder's own frames out
   (its replays repeat packet numbers and its plain frames spoof known MACs:
   both by design).
6. The traffic programs (``soak_support.TRAFFIC``) count what got through:
   datagrams carrying ``INJECT_TAG``, and repeated (sender, sequence) pairs,
   which only a replay that was opened can produce.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections import Counter, deque
from typing import Callable

from pyroute2 import netns

from . import segment as L

INJECT_TAG = b"L2CINJ:"
RECENT_S = 1.5
SETTLE_S = 0.7
MAX_REPLAYS = 60
MAX_DRAIN = 5000
ETH_P_ALL = 0x0003
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, port: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", port, port, 8 + len(payload), 0) + payload
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + head + udp


def ipv6_udp(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, port: int, payload: bytes) -> bytes:
    src, dst = socket.inet_pton(socket.AF_INET6, src_ip), socket.inet_pton(socket.AF_INET6, dst_ip)
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", port, port, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    head = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst
    return _mac(dst_mac) + _mac(src_mac) + b"\x86\xdd" + head + udp


def arp_request(dst_mac: str, src_mac: str, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac(src_mac), socket.inet_aton(src_ip),
                       b"\x00" * 6, socket.inet_aton(target_ip))
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x06" + body


def icmp_echo(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4C32, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                       socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + head + icmp


def frame_digest(frame: bytes) -> bytes:
    """What identifies a frame the intruder sent, among a switch capture's frames."""
    return hashlib.blake2b(frame, digest_size=16).digest()


class Victim:
    """A host the intruder aims at, and the host whose identity it spoofs."""

    def __init__(self, lab: L.Lab, host: str, spoofed: str):
        self.host, self.wire_mac = host, L.wire_mac(host)
        self.tap_mac, self.ipv4, self.ipv6 = lab.tap_mac_of(host), L.tap_ipv4(host), L.tap_ipv6(host)
        self.src_mac, self.src_ipv4 = lab.tap_mac_of(spoofed), L.tap_ipv4(spoofed)
        self.src_ipv6 = L.tap_ipv6(spoofed)

    def plain_frames(self, port: int, seq: int) -> list[bytes]:
        """Plain IPv4 UDP, IPv6 UDP, ARP and ICMP to each of the victim's MACs and broadcast."""
        payload = INJECT_TAG + f"{self.host}:{seq}".encode()
        out = []
        for dst in (self.wire_mac, self.tap_mac, BROADCAST):
            out += [ipv4_udp(dst, self.src_mac, self.src_ipv4, self.ipv4, port, payload),
                    ipv6_udp(dst, self.src_mac, self.src_ipv6, self.ipv6, port, payload),
                    arp_request(dst, self.src_mac, self.src_ipv4, self.ipv4),
                    icmp_echo(dst, self.src_mac, self.src_ipv4, self.ipv4, payload)]
        return out


class Intruder:
    """Injects and replays on one switch; ``read_status(label)`` gives a daemon's status."""

    def __init__(self, lab: L.Lab, victims: list[Victim], labels: list[str],
                 read_status: Callable[[str], dict], port: int):
        self.lab, self.victims, self.labels, self.read_status, self.port = lab, victims, labels, read_status, port
        self.recent: deque[tuple[float, bytes]] = deque()
        self.stashed: list[bytes] = []
        self.seq = 0
        self.aimed: Counter = Counter()             # label -> plain frames aimed at it (read bursts)
        self.sent_digests: Counter = Counter()      # digest -> copies sent (the switch scan leaves them out)
        self.figures: Counter = Counter()
        self.burst_drops: Counter = Counter()       # (label, reason) -> drops during bursts
        self.refused: Counter = Counter()           # label -> frames refused inbound during bursts
        self.sniff = self.send = None

    def open(self) -> None:
        self.lab.add_intruder()
        port = self.lab.port_name("in")
        self.lab.exec("sw", ["ip", "link", "set", "dev", port, "type", "bridge_slave", "learning", "off"], check=True)
        self.sniff = self._socket("sw", L.BRIDGE)
        self.send = self._socket("in", L.WIRE_IFNAME)

    def _socket(self, role: str, ifname: str) -> socket.socket:
        netns.pushns(self.lab.ns(role))
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
        finally:
            netns.popns()
        s.setblocking(False)
        return s

    def close(self) -> None:
        for s in (self.sniff, self.send):
            if s is not None:
                s.close()

    def watch(self, now: float) -> None:
        """Keep the sealed frames the switch saw in the last ``RECENT_S`` seconds."""
        mine = _mac(L.INTRUDER_MAC)
        for _ in range(MAX_DRAIN):
            try:
                frame, addr = self.sniff.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            if addr[2] != socket.PACKET_OUTGOING and frame[12:14] == L.L2C_ETHERTYPE.to_bytes(2, "big") \
                    and frame[6:12] != mine:
                self.recent.append((now, frame))
        while self.recent and now - self.recent[0][0] > RECENT_S:
            self.recent.popleft()

    def stash(self, mac: str) -> None:
        """Keep the recent sealed frames sent to ``mac`` for the next burst."""
        self.watch(time.monotonic())
        dst = _mac(mac)
        self.stashed = [f for _, f in self.recent if f[0:6] == dst][-MAX_REPLAYS:]

    def _counters(self) -> dict[str, dict] | None:
        try:
            return {label: self.read_status(label) for label in self.labels}
        except (L.LabError, ValueError):
            self.figures["bursts_unreadable"] += 1
            return None

    def _inject(self, frames: list[bytes]) -> int:
        sent = 0
        for f in frames:
            try:
                self.send.send(f)
                sent += 1
                self.sent_digests[frame_digest(f)] += 1
            except OSError:
                self.figures["send_errors"] += 1
        return sent

    def burst(self) -> None:
        """Inject and replay once; count what the switch's daemons dropped and refused meanwhile."""
        self.watch(time.monotonic())
        before = self._counters()
        if before is None:
            return
        self.seq += 1
        aimed = Counter()
        for v in self.victims:
            aimed[f"agent-{v.host}"] += self._inject(v.plain_frames(self.port, self.seq))
        self.figures["plain_sent"] += sum(aimed.values())
        replays = [f for _, f in self.recent][-MAX_REPLAYS:]
        self.figures["replayed_sent"] += self._inject(replays)
        self.figures["replayed_unicast_sent"] += sum(1 for f in replays if not f[0] & 1)
        self.figures["replayed_after_restart_sent"] += self._inject(self.stashed)
        self.figures["replayed_unicast_sent"] += len(self.stashed)
        self.stashed = []
        time.sleep(SETTLE_S)
        after = self._counters()
        if after is None:
            return
        self.figures["bursts"] += 1
        self.aimed.update(aimed)
        for label in self.labels:
            b, a = before[label], after[label]
            self.refused[label] += max(0, a.get("inbound_refused", 0) - b.get("inbound_refused", 0))
            for reason, n in a.get("drops", {}).items():
                self.burst_drops[(label, reason)] += max(0, n - b.get("drops", {}).get(reason, 0))

    def report(self) -> dict:
        return {"figures": dict(self.figures),
                "burst_drops": {f"{label}:{reason}": n for (label, reason), n in sorted(self.burst_drops.items()) if n},
                "refused_inbound": dict(self.refused), "plain_aimed": dict(self.aimed)}


def intruder_failures(intruder: dict, traffic: list[dict], drops_by_reason: dict) -> list[str]:
    """The soak's verdict on the intruder: nothing it sent got through, and it really sent."""
    fig, bad = intruder["figures"], []
    delivered = sum(sum(r.get("injected", {}).values()) for r in traffic)
    replays = sum(sum(r.get("duplicates", {}).values()) for r in traffic)
    if delivered:
        bad.append(f"injected datagrams delivered = {delivered}")
    if replays:
        bad.append(f"replayed datagrams delivered = {replays}")
    if not fig.get("bursts") or not fig.get("plain_sent") or not fig.get("replayed_unicast_sent"):
        bad.append(f"the intruder did not run (figures {fig})")
    for label, aimed in intruder["plain_aimed"].items():
        if intruder["refused_inbound"].get(label, 0) < aimed:
            bad.append(f"{label}: {intruder['refused_inbound'].get(label, 0)} frames refused inbound "
                       f"of {aimed} aimed at it")
    burst_sum = sum(intruder["burst_drops"].values())
    if burst_sum < fig.get("replayed_unicast_sent", 0):
        bad.append(f"drops during bursts {burst_sum} < unicast replays sent {fig.get('replayed_unicast_sent', 0)}")
    stale_in_bursts = sum(n for k, n in intruder["burst_drops"].items() if k.endswith(":stale_key"))
    outside = drops_by_reason.get("stale_key", 0) - stale_in_bursts
    if outside > 0:
        bad.append(f"stale_key drops outside the intruder's bursts = {outside}")
    return bad
