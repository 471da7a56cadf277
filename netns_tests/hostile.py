"""Tools of the attack, fault and soak tests: forged and replayed frames,
bad certificates, raw floods, key-server latency probes.

Each helper takes the lab and role names, so gateway and failover cases can
reuse them (e.g. ``agent_key_latency_s(lab, "h1")`` in any segment lab,
``flood_random_macs(lab, "gw", ...)`` from a gateway).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyroute2 import IPRoute, netns

from helpers import KeyServerClient, l2c_frames, mac_bytes, ping
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.lab import segment as L

MARKER = b"L2CRYPT-HOSTILE-MARKER-5c1e"

# --- frames ------------------------------------------------------------------------


def sealed_as(claimed_src: str, dst: str, pair_key: bytes, pw_id: int, payloads: list[bytes],
              pn_start: int = (1 << 63) + 12345) -> list[bytes]:
    """Frames sealed with ``pair_key`` (a key the attacker really holds) but
    carrying ``claimed_src`` as their source MAC."""
    eng = FrameEngine(mac_bytes(claimed_src), EngineSettings(), pn_start=pn_start)
    eng.install_pair_key(mac_bytes(dst), "victim", pair_key, pw_id, 0.0)
    out = []
    for p in payloads:
        plain = mac_bytes(dst) + mac_bytes(claimed_src) + b"\x08\x00" + p
        out.append(eng.seal_from_tap(plain, 0.0))
    return out


def with_pn(frame: bytes, pn: int) -> bytes:
    """The same frame with another packet number (its tag no longer verifies)."""
    return frame[:20] + pn.to_bytes(8, "big") + frame[28:]


def captured_frames(lab: L.Lab, src: str, dst: str, count: int = 20) -> list[bytes]:
    """Real sealed frames src -> dst, taken off the switch during a ping."""
    cap = lab.capture("br0", name=f"tcpdump-cap-{src}-{dst}-{os.urandom(2).hex()}")
    try:
        res = ping(lab, src, L.tap_ipv4(dst), count=count, extra=["-i", "0.05"] if count > 5 else None)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        frames = L.read_pcap(cap.stop())
    mine = l2c_frames(frames, src=lab.tap_mac_of(src), dst=lab.tap_mac_of(dst))
    assert mine, f"no l2crypt frame {src} -> {dst} on br0"
    return mine


def marker_count(frames: list[bytes], marker: bytes = MARKER) -> int:
    return sum(f.count(marker[:16]) for f in frames)


# --- raw senders in a namespace --------------------------------------------------

_FLOOD = r"""
import os, socket, sys, time
ifname, src, count, per_s = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
start = time.monotonic()
for i in range(count):
    dst = bytes([0x02]) + os.urandom(5)
    s.send(dst + src + b"\x08\x00" + b"\x45" + bytes(45))
    wait = start + (i + 1) / per_s - time.monotonic()
    if wait > 0:
        time.sleep(wait)
print(count)
"""


def flood_random_macs(lab: L.Lab, role: str, src_mac: str, count: int, per_s: float,
                      ifname: str = L.TAP_IFNAME) -> L.Proc:
    """Start sending ``count`` frames to random unicast MACs out of ``ifname``
    (the TAP: the agent reads them as if the host sent them)."""
    return lab.popen(role, [sys.executable, "-c", _FLOOD, ifname, src_mac.replace(":", ""),
                            str(count), str(per_s)], name=f"flood-{role}-{os.urandom(2).hex()}")


# --- key server ------------------------------------------------------------------------


AGENT_METRICS = "http://127.0.0.1:9478/metrics"
_KEY_REQUEST_TIMES = (
    "import sys, urllib.request\n"
    "text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()\n"
    "v = {ln.split()[0]: ln.split()[1] for ln in text.splitlines() if ln.startswith('l2crypt_key_request_duration_seconds_')}\n"
    "print(v['l2crypt_key_request_duration_seconds_count'], v['l2crypt_key_request_duration_seconds_sum'])\n")


def _key_request_times(lab: L.Lab, host: str) -> tuple[float, float]:
    """(answers, seconds in total) of the agent's ``l2crypt_key_request_duration_seconds``."""
    res = lab.exec(host, [sys.executable, "-c", _KEY_REQUEST_TIMES, AGENT_METRICS], timeout=20, check=True)
    count, total = res.stdout.split()
    return float(count), float(total)


def agent_key_latency_s(lab: L.Lab, host: str, timeout_s: float = 10.0) -> float:
    """Seconds the agent of ``host`` waits for the key server's answer when it
    meets a peer MAC it has never seen: a frame to a fresh random MAC goes into
    its TAP, the agent asks for the pair key on its TLS session, and its own
    histogram (``l2crypt_key_request_duration_seconds``) times request ->
    answer.  No process start and no TLS handshake is in the figure."""
    count, total = _key_request_times(lab, host)
    peer_mac = bytes([0x02, 0xEE]) + os.urandom(4)
    lab.inject([peer_mac + mac_bytes(lab.tap_mac_of(host)) + b"\x08\x00" + bytes(46)], role=host,
               ifname=L.TAP_IFNAME)
    deadline = time.monotonic() + timeout_s
    while True:
        new_count, new_total = _key_request_times(lab, host)
        if new_count > count:
            return (new_total - total) / (new_count - count)
        assert time.monotonic() < deadline, f"the agent of {host} got no answer to a key request in {timeout_s} s"
        time.sleep(0.05)


def raw_tcp(lab: L.Lab, role: str, server: str | None = None, timeout_s: float = 10.0) -> socket.socket:
    host, port = (server or lab.keyserver_addr).rsplit(":", 1)
    sock = netns.create_socket(lab.ns(role), socket.AF_INET, socket.SOCK_STREAM, flags=0)
    sock.settimeout(timeout_s)
    sock.connect((host, int(port)))
    return sock


class Trickler:
    """Connections that send one byte every ``every_s`` seconds (slowloris)."""

    def __init__(self, socks: list[socket.socket], data: bytes, every_s: float = 0.5):
        self.socks, self.data, self.every_s = socks, data, every_s
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        live = list(self.socks)
        i = 0
        while live and not self._stop.is_set():
            for s in list(live):
                try:
                    s.send(self.data[i % len(self.data):i % len(self.data) + 1])
                except OSError:
                    live.remove(s)
                    self.closed_by_server += 1
            i += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Trickler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in self.socks:
            s.close()


# --- certificates --------------------------------------------------------------------


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_dir_with(path: Path, lab: L.Lab, cn: str, issuer_dir: Path, days_valid: tuple[int, int]) -> Path:
    """A host state dir (ca.crt of the lab, host.crt, host.key) whose certificate
    is signed by the CA in ``issuer_dir`` (ca.key, ca.crt) and valid from
    ``now + days_valid[0]`` to ``now + days_valid[1]`` days."""
    path.mkdir(parents=True, exist_ok=True)
    ca_key = serialization.load_pem_private_key((issuer_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((issuer_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days_valid[0]))
            .not_valid_after(now + datetime.timedelta(days=days_valid[1]))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (path / "host.key").write_bytes(_key_pem(key))
    (path / "host.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "ca.crt").write_bytes((lab.ks_dir / "ca.crt").read_bytes())
    return path


def other_ca(path: Path) -> Path:
    """A CA the lab does not trust (ca.key, ca.crt in ``path``)."""
    from keyserverd.ca import CertificateAuthority

    CertificateAuthority.open(path, ())
    return path


def new_log(lab: L.Lab, name: str, since: int) -> str:
    return lab.log_text(name)[since:]


# --- plain frames at a guarded port (issue 14.1) ------------------------------------------


def plain_frames(dst_macs: list[str], src_mac: str, src_ip: str, dst_ip: str, src_ip6: str, dst_ip6: str,
                 udp_port: int, marker: bytes) -> list[bytes]:
    """For each destination MAC: IPv4 UDP, IPv6 UDP, an ARP request and an ICMP echo
    request, from ``src_mac``/``src_ip`` (a spoofed peer), each carrying ``marker``
    (in the ARP frame as trailing padding)."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    out = []
    for i, dst in enumerate(dst_macs):
        eth = Ether(dst=dst, src=src_mac)
        out += [bytes(eth / IP(src=src_ip, dst=dst_ip) / UDP(sport=udp_port, dport=udp_port) / Raw(marker)),
                bytes(eth / IPv6(src=src_ip6, dst=dst_ip6) / UDP(sport=udp_port, dport=udp_port) / Raw(marker)),
                bytes(eth / ARP(op=1, hwsrc=src_mac, psrc=src_ip, pdst=dst_ip) / Raw(marker)),
                bytes(eth / IP(src=src_ip, dst=dst_ip) / ICMP(type=8, id=0x4C32, seq=i) / Raw(marker))]
    return out


_LISTEN = r"""
import select, socket, sys
port, ifname = int(sys.argv[1]), sys.argv[2]
tags = {"injected": bytes.fromhex(sys.argv[3]), "genuine": bytes.fromhex(sys.argv[4])}
socks = {}
for name, family, addr in (("udp4", socket.AF_INET, "0.0.0.0"), ("udp6", socket.AF_INET6, "::")):
    try:
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        socks[name] = s
    except OSError as exc:
        print("no", name, exc, flush=True)
for name, proto in (("pkt_ip", 0x0800), ("pkt_arp", 0x0806), ("pkt_ipv6", 0x86DD), ("pkt_all", 0x0003)):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((ifname, proto))
    socks[name] = s
print("listening", flush=True)
while True:
    ready, _, _ = select.select(list(socks.values()), [], [])
    for name, s in socks.items():
        if s in ready:
            data = s.recv(65536)
            for tag, marker in tags.items():
                if marker in data:
                    print("got", name, tag, flush=True)
"""


class StackListener:
    """Everything that could receive a plain frame in ``role``: UDP sockets on
    ``0.0.0.0`` and ``::`` (``udp4``, ``udp6``), and packet sockets on ``ifname`` for
    IPv4, ARP, IPv6 and ETH_P_ALL (``pkt_ip``, ``pkt_arp``, ``pkt_ipv6``,
    ``pkt_all``).  ``counts()`` says which of them got a frame with the
    injected or the genuine marker.  The kernel hands every frame to ETH_P_ALL
    sockets before the ingress hook, so ``pkt_all`` shows that the injected
    frames did reach the port."""

    def __init__(self, lab: L.Lab, role: str, ifname: str, udp_port: int, injected: bytes, genuine: bytes):
        self.lab = lab
        self.proc = lab.popen(role, [sys.executable, "-c", _LISTEN, str(udp_port), ifname, injected.hex(),
                                     genuine.hex()], name=f"listener-{role}-{os.urandom(2).hex()}")
        deadline = time.monotonic() + 10
        while "listening" not in self._log().splitlines():  # a line of its own (the log starts with the script)
            assert self.proc.alive() and time.monotonic() < deadline, f"listener did not start: {self._log()}"
            time.sleep(0.05)

    def _log(self) -> str:
        return self.lab.log_text(self.proc.name)

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        text = self._log()
        # The listener is still writing: a last line without its newline is not whole yet.
        for line in text[:text.rfind("\n") + 1].splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == "got":
                out[(fields[1], fields[2])] = out.get((fields[1], fields[2]), 0) + 1
        return out

    def has_udp6(self) -> bool:
        return "no udp6" not in self._log()

    def stop(self) -> None:
        self.lab.stop(self.proc)


def nstat(lab: L.Lab, role: str) -> dict[str, int]:
    """The kernel's SNMP counters in ``role`` (``nstat -asz``: absolute, all, history untouched)."""
    res = lab.exec(role, ["nstat", "-asz"], check=True)
    out = {}
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            out[fields[0]] = int(fields[1])
    return out


def link_mac(lab: L.Lab, role: str, ifname: str) -> str:
    """The MAC address of ``ifname`` in ``role``, as the kernel has it."""
    with IPRoute(netns=lab.ns(role), flags=0) as ipr:
        return ipr.get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS")
