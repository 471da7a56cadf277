"""Tools of the layer-3 lab tests (``test_l3.py``): what crossed the router,
traffic in both IP versions, a listener inside a host, raw packets sent from
any namespace of the lab, and the host's own kernel counters."""

from __future__ import annotations

import json
import socket
import time

from pyroute2 import netns

from helpers import listening, wait_for
from l2crypt.core.l3_wire import L3_IP_PROTOCOL, IPPROTO_UDP, decode_l3_header, parse_packet
from l2crypt.lab import routed as R

MARKER = b"L3CRYPT-MARKER-5e1d"
ETHERTYPES = {b"\x08\x00": 4, b"\x86\xdd": 6}


def ip_packets(frames: list[bytes]) -> list[bytes]:
    """The IPv4 and IPv6 packets of Ethernet frames (trailing padding cut off)."""
    out = []
    for f in frames:
        version = ETHERTYPES.get(f[12:14])
        ip = f[14:]
        if version == 4 and len(ip) >= 20:
            out.append(ip[:int.from_bytes(ip[2:4], "big")])
        elif version == 6 and len(ip) >= 40:
            out.append(ip[:40 + int.from_bytes(ip[4:6], "big")])
    return out


def _ends() -> set[bytes]:
    """Addresses of h1<->h2 traffic as the router sees it (the NAT's included)."""
    texts = [R.host_ip(h) for h in ("h1", "h2")] + [R.host_ip6(h) for h in ("h1", "h2")]
    texts += [R.gateway_ip("h2"), R.gateway_ip6("h2")]
    return {socket.inet_pton(socket.AF_INET6 if ":" in t else socket.AF_INET, t) for t in texts}


ND_TYPES = range(133, 138)  # router/neighbour solicitation and advertisement, redirect


def between_hosts(packets: list[bytes]) -> list[bytes]:
    """Packets of the h1<->h2 traffic as the router saw them (neighbour
    discovery between the router's NAT address and h2 left out)."""
    ends, out = _ends(), []
    for p in packets:
        ip = parse_packet(p)
        if isinstance(ip, str) or ip.src not in ends or ip.dst not in ends or ip.src == ip.dst:
            continue
        if ip.version == 6 and ip.protocol == 58 and len(p) > 40 and p[40] in ND_TYPES:
            continue
        out.append(p)
    return out


def sealed_counts(lab: R.RoutedLab, packets: list[bytes]) -> dict[int, int]:
    """Assert every h1<->h2 packet is sealed (protocol 253, or UDP with a valid
    L3 header in nat mode); return how many there were, by IP version."""
    counts = {4: 0, 6: 0}
    for p in between_hosts(packets):
        ip = parse_packet(p)
        if lab.nat:
            assert ip.protocol == IPPROTO_UDP, f"clear packet, protocol {ip.protocol}: {p[:60].hex()}"
            offset = ip.header_len + 8
        else:
            assert ip.protocol == L3_IP_PROTOCOL, f"clear packet, protocol {ip.protocol}: {p[:60].hex()}"
            offset = ip.header_len
        if ip.is_fragment and ip.version == 4 and int.from_bytes(p[6:8], "big") & 0x1FFF:
            continue  # a later fragment carries no header
        assert not isinstance(decode_l3_header(p, offset), str), p[:80].hex()
        counts[ip.version] += 1
    return counts


def ping(lab, src: str, dst: str, count: int = 5, extra=(), timeout: float = 30.0, wait_s: int = 2):
    """``wait_s``: how long ping waits for the last answer (a ping expected to fail costs that)."""
    version = "-6" if ":" in dst else "-4"
    return lab.exec(src, ["ping", version, "-c", str(count), "-i", "0.2", "-W", str(wait_s), *extra, dst],
                    timeout=timeout)


def flush_pmtu(lab, *hosts: str) -> None:
    """Forget learned path MTUs, so a test sees the first too-big answer itself."""
    for host in hosts:
        lab.exec(host, ["ip", "-4", "route", "flush", "cache"], check=True)
        lab.exec(host, ["ip", "-6", "route", "flush", "cache"], check=True)


def iperf3(lab, client: str, server: str, seconds: float = 2, port: int = 5201, v6: bool = False) -> dict:
    """One TCP stream client -> server (iperf3 writes 128 KiB at a time); its JSON."""
    addr = R.host_ip6(server) if v6 else R.host_ip(server)
    srv = lab.popen(server, ["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
                    name=f"iperf3-server-{server}-{port}-{time.monotonic_ns() % 10000}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = lab.exec(client, ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J"],
                       timeout=seconds + 30)
        assert res.returncode == 0, f"iperf3 {client}->{server} failed: {res.stdout[-1500:]}{res.stderr}"
        return json.loads(res.stdout)
    finally:
        lab.stop(srv)


SEND_UDP = ("import socket, sys\n"
            "host, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()\n"
            "s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(int(sys.argv[4])):\n"
            "    s.sendto(data, (host, port))\n")


def send_udp(lab, host: str, dst: str, port: int, data: bytes, count: int = 1) -> None:
    """Datagrams from a process of ``host`` (through its stack, and its agent)."""
    lab.exec(host, ["python3", "-c", SEND_UDP, dst, str(port), data.decode(), str(count)], check=True)


class UdpListener:
    """A dual-stack UDP socket bound inside a host's namespace, read by the test."""

    def __init__(self, lab, host: str, port: int):
        self.sock = netns.create_socket(lab.ns(host), socket.AF_INET6, socket.SOCK_DGRAM, flags=0)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", port))

    def received(self, wait_s: float = 1.0) -> list[bytes]:
        """Every datagram that arrived, waiting up to ``wait_s`` after the last one."""
        out = []
        self.sock.settimeout(wait_s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                out.append(self.sock.recv(65536))
            except socket.timeout:
                break
        return out

    def close(self) -> None:
        self.sock.close()


def raw_send(lab, role: str, packets: list[bytes]) -> None:
    """Send whole IP packets (their own headers) from ``role``'s namespace."""
    socks = {}
    try:
        for p in packets:
            version = p[0] >> 4
            if version not in socks:
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                socks[version] = netns.create_socket(lab.ns(role), family, socket.SOCK_RAW, socket.IPPROTO_RAW,
                                                     flags=0)
            dst = socket.inet_ntop(socket.AF_INET, p[16:20]) if version == 4 else \
                socket.inet_ntop(socket.AF_INET6, p[24:40])
            socks[version].sendto(p, (dst, 0))
    finally:
        for s in socks.values():
            s.close()


def echo_requests_received(lab, host: str) -> int:
    """ICMP and ICMPv6 echo requests the host's kernel took in (``Icmp: InEchos``, ``Icmp6InEchos``)."""
    snmp = lab.exec(host, ["cat", "/proc/net/snmp", "/proc/net/snmp6"], check=True).stdout.splitlines()
    icmp = [ln.split() for ln in snmp if ln.startswith("Icmp:")]
    v4 = int(dict(zip(icmp[0][1:], icmp[1][1:]))["InEchos"])
    v6 = next(int(ln.split()[1]) for ln in snmp if ln.startswith("Icmp6InEchos"))
    return v4 + v6


def metric(lab, host: str, name: str) -> float:
    """One sample of the host's l3 agent metrics (127.0.0.1:9481)."""
    code = ("import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9481/metrics', timeout=5).read().decode())")
    text = lab.exec(host, ["python3", "-c", code], check=True).stdout
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))
