"""Tools of the attack, fault and soak tests: forged and replayed frames,
bad certificates, raw floods, key-server latency probes.

Each helper takes the lab and role names, so gateway and failover cases can
reuse them (e.g. ``fresh_key_latency_s(lab, "h1", "h2", server=...)`` against
another key server, ``flood_random_macs(lab, "gw", ...)`` from a gateway).
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
from pyroute2 import netns

from helpers import KeyServerClient, l2c_frames, mac_bytes, ping
from l2crypt import lab as L
from l2crypt.engine import EngineSettings, FrameEngine

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


def fresh_key_latency_s(lab: L.Lab, host: str, peer: str, server: str | None = None,
                        cert_dir: Path | None = None) -> float:
    """Seconds for a new connection of ``host`` to say hello and get its pair key with ``peer``."""
    start = time.monotonic()
    client = KeyServerClient(lab.ns(host), server or lab.keyserver_addr, cert_dir or lab.host_dir(host))
    try:
        welcome = client.request({"t": "hello", "rid": 1, "mac": mac_bytes(lab.tap_mac_of(host))})
        assert welcome["t"] == "welcome", welcome
        key = client.request({"t": "key_req", "rid": 2, "peer_mac": mac_bytes(lab.tap_mac_of(peer))})
        assert key["t"] == "key", key
    finally:
        client.close()
    return time.monotonic() - start


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
