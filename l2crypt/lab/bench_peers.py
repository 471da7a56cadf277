"""The segments ``scripts/bench`` compares l2crypt with, built on a plain lab.

Each segment is the lab's two host namespaces on its bridge (``Lab(agents=
False)``), with the test addresses (``tap_ipv4``) on an inner interface of
MTU ``INNER_MTU`` in every host:

* ``plain``: the test addresses stay on eth0, its MTU set to ``INNER_MTU``;
* ``l2crypt``: the lab's agents; the TAP's MTU is set to ``INNER_MTU``;
* ``openvpn``: OpenVPN 2 in tap mode, UDP, TLS (a throw-away CA made with
  openssl in the lab's state directory), data cipher AES-256-GCM; eth0 holds
  an underlay address (``underlay_ip``);
* ``tinc``: tinc 1.0 in switch mode over the same underlay, RSA keys made by
  ``tincd -K``, cipher aes-256-cbc with HMAC-SHA256 (tinc 1.0 has no GCM).

``install_peers`` installs the two with apt-get when they are missing.
Everything lives in the lab's namespaces and state directory, so
``Lab.down()`` removes it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from . import segment as L
from .support import LabError

INNER_MTU = 1400
OVPN_IF = "ovpn0"
TINC_IF = "tinc0"
PEER_PACKAGES = {"openvpn": "openvpn", "tincd": "tinc"}


def underlay_ip(host: str) -> str:
    return f"10.68.0.{10 + int(host.lstrip('h'))}"


def install_peers() -> None:
    """apt-get install OpenVPN and tinc if their programs are missing (root)."""
    missing = [pkg for prog, pkg in PEER_PACKAGES.items() if shutil.which(prog) is None]
    if not missing:
        return
    print(f"bench: installing {' '.join(missing)} with apt-get ...", flush=True)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")


def _ip(lab: L.Lab, host: str, *args: str) -> None:
    lab.exec(host, ["ip", *args], check=True)


def _inner_up(lab: L.Lab, host: str, ifname: str) -> None:
    _ip(lab, host, "link", "set", ifname, "mtu", str(INNER_MTU), "up")
    _ip(lab, host, "addr", "add", f"{L.tap_ipv4(host)}/24", "dev", ifname)


def _to_underlay(lab: L.Lab, hosts: tuple[str, ...]) -> None:
    for host in hosts:
        _ip(lab, host, "addr", "flush", "dev", L.WIRE_IFNAME)
        _ip(lab, host, "addr", "add", f"{underlay_ip(host)}/24", "dev", L.WIRE_IFNAME)


def wait_ping(lab: L.Lab, src: str, dst_ip: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.exec(src, ["ping", "-c", "1", "-W", "1", dst_ip], timeout=5).returncode == 0:
            return
        time.sleep(0.2)
    raise LabError(f"{src} cannot ping {dst_ip} within {timeout_s} s")


def setup_plain(lab: L.Lab) -> list[str]:
    for host in lab.hosts:
        _ip(lab, host, "link", "set", L.WIRE_IFNAME, "mtu", str(INNER_MTU))
    return []


def setup_l2crypt(lab: L.Lab) -> list[str]:
    for host in lab.hosts:
        _ip(lab, host, "link", "set", L.TAP_IFNAME, "mtu", str(INNER_MTU))
    return [f"agent-{h}" for h in lab.hosts]


def _openssl(workdir: Path, *args: str) -> None:
    res = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise LabError(f"openssl {' '.join(args[:2])} failed: {res.stderr[-1000:]}")


def openvpn_certs(d: Path, names) -> Path:
    """A throw-away CA and an EC certificate per name in ``d`` (made if missing); returns ``d``."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-subj", "/CN=bench-ca", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt")
    for name in names:
        _openssl(d, "req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt")
    return d


def start_openvpn(lab: L.Lab, role: str, cert_dir: Path, cert: str, dev: str, local: str, remote: str,
                  port: int, server: bool, name: str) -> None:
    """One point-to-point OpenVPN 2 in tap mode (UDP, TLS with ``cert`` of ``openvpn_certs``,
    AES-256-GCM, tun-mtu ``INNER_MTU``) in ``role``, TAP ``dev``; the lab process ``name``."""
    argv = ["openvpn", "--dev", dev, "--dev-type", "tap", "--proto", "udp",
            "--local", local, "--remote", remote, "--port", str(port),
            "--tls-server" if server else "--tls-client", "--ca", cert_dir / "ca.crt",
            "--cert", cert_dir / f"{cert}.crt", "--key", cert_dir / f"{cert}.key",
            "--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM",
            "--tun-mtu", str(INNER_MTU), "--verb", "3", "--ping", "10"]
    if server:
        argv += ["--dh", "none"]
    lab.popen(role, argv, name=name)


def wait_link(lab: L.Lab, host: str, ifname: str, proc_name: str, timeout_s: float = 20.0) -> None:
    """Wait until ``ifname`` exists in ``host`` (made by the process ``proc_name``)."""
    deadline = time.monotonic() + timeout_s
    while not lab.has_link(host, ifname):
        proc = lab.proc(proc_name)
        if proc is None or not proc.alive() or time.monotonic() > deadline:
            raise LabError(f"{proc_name}: no {ifname} in {host}:\n{lab.log_text(proc_name)[-3000:]}")
        time.sleep(0.1)


def setup_openvpn(lab: L.Lab) -> list[str]:
    h1, h2 = lab.hosts
    d = openvpn_certs(lab.state_dir / "openvpn", (h1, h2))
    _to_underlay(lab, lab.hosts)
    for host, peer, server in ((h1, h2, True), (h2, h1, False)):
        start_openvpn(lab, host, d, host, OVPN_IF, underlay_ip(host), underlay_ip(peer), 1194, server,
                      f"openvpn-{host}")
    for host in (h1, h2):
        wait_link(lab, host, OVPN_IF, f"openvpn-{host}")
        _inner_up(lab, host, OVPN_IF)
    wait_ping(lab, h1, L.tap_ipv4(h2), 45)
    return [f"openvpn-{h}" for h in (h1, h2)]


def setup_tinc(lab: L.Lab) -> list[str]:
    h1, h2 = lab.hosts
    base = lab.state_dir / "tinc"
    for host in (h1, h2):
        d = base / host
        (d / "hosts").mkdir(parents=True, exist_ok=True)
        peer = h2 if host == h1 else h1
        (d / "tinc.conf").write_text(
            f"Name = {host}\nMode = switch\nDeviceType = tap\nInterface = {TINC_IF}\n"
            f"ConnectTo = {peer}\nAddressFamily = ipv4\nBindToAddress = {underlay_ip(host)}\n")
        (d / "hosts" / host).write_text(
            f"Address = {underlay_ip(host)}\nPort = 655\nCipher = aes-256-cbc\nDigest = sha256\n")
        res = subprocess.run(["tincd", "-c", str(d), "-K", "2048"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise LabError(f"tincd -K failed: {res.stdout}{res.stderr}")
    for host in (h1, h2):  # each holds the other's host file (address and public key)
        peer = h2 if host == h1 else h1
        shutil.copy(base / peer / "hosts" / peer, base / host / "hosts" / peer)
    _to_underlay(lab, lab.hosts)
    for host in (h1, h2):
        d = base / host
        lab.popen(host, ["tincd", "-c", d, "-D", "--pidfile", d / "tinc.pid",
                         "--logfile", d / "tinc.log"], name=f"tincd-{host}")
    for host in (h1, h2):
        wait_link(lab, host, TINC_IF, f"tincd-{host}")
        _inner_up(lab, host, TINC_IF)
    wait_ping(lab, h1, L.tap_ipv4(h2), 45)
    return [f"tincd-{h}" for h in (h1, h2)]


#: name -> (agent options or None for no agents, setup returning the names of the
#: processes that carry frames)
SEGMENTS = {
    "plain veth": (None, setup_plain),
    "l2crypt": ((), setup_l2crypt),
    "OpenVPN tap": (None, setup_openvpn),
    "tinc switch": (None, setup_tinc),
}
