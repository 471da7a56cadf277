"""Small helpers for the namespace tests: waits, pcaps, frames, iperf3, a raw key-server client."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Callable, TypeVar

from pyroute2 import netns

from l2crypt.core import frame_wire
from l2crypt.core.constants import FRAME_VERSION, KEY_ID_PAIR, KEYSERVER_TLS_NAME
from l2crypt.core.frame_wire import parse_mac
from l2crypt.core.ks_messages import FrameReader, encode_message
from l2crypt.lab import segment as L

T = TypeVar("T")

REQUIRED_TOOLS = ("ip", "tcpdump", "iperf3", "ping")


def skip_reason() -> str | None:
    """Why the lab tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the namespace tests need root (they create netns, veth, bridges and TAPs)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    bin_dir = Path(os.sys.executable).parent
    for cmd in ("l2crypt", "keyserverd"):
        if not (bin_dir / cmd).exists():
            return f"{bin_dir / cmd} is missing: install the project (pip install -e .)"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support"
    return None


def skip_unless_gateway_lab() -> None:
    """Skip the test when the gateway lab cannot run here; else make signals take labs down."""
    import pytest

    reason = skip_reason()
    if reason is None and not (Path(os.sys.executable).parent / "l2crypt-gateway").exists():
        reason = "l2crypt-gateway is not installed in this virtualenv"
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()


def wait_for(what: str, probe: Callable[[], T], timeout_s: float = 10.0, every_s: float = 0.2) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


# --- status ------------------------------------------------------------------------


def drops_total(status: dict) -> int:
    return sum(status.get("drops", {}).values())


def drop(status: dict, reason: str) -> int:
    return status.get("drops", {}).get(reason, 0)


def peer(status: dict, mac: str) -> dict | None:
    return next((p for p in status.get("peers", []) if p["mac"].lower() == mac.lower()), None)


# --- frames ------------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    return parse_mac(mac)


def l2c_frames(frames: list[bytes], src: str | None = None, dst: str | None = None) -> list[bytes]:
    """The l2crypt frames among ``frames``, optionally from/to the given MACs."""
    out = []
    for f in frames:
        if len(f) < 14 or int.from_bytes(f[12:14], "big") != L.L2C_ETHERTYPE:
            continue
        if dst is not None and f[0:6] != mac_bytes(dst):
            continue
        if src is not None and f[6:12] != mac_bytes(src):
            continue
        out.append(f)
    return out


def assert_hosts_sent_only_sealed(lab: L.Lab, markers: tuple[bytes, ...] = ()) -> dict[str, int]:
    """The lab's lifetime captures (what each host put on its switch port since
    before its agent started) hold sealed frames from every host, and nothing
    else: no other EtherType, none of ``markers`` (their first 16 bytes, what
    ``ping -p`` repeats).  Returns the count of sealed frames per host."""
    sealed = {}
    for host, frames in lab.lifetime_frames().items():
        sealed[host] = len(l2c_frames(frames))
        assert sealed[host] > 0, f"the lifetime capture of {host} holds {len(frames)} frames, none sealed"
        other = {hex(et): n for et, n in L.ethertype_counts(frames).items() if et != L.L2C_ETHERTYPE}
        assert not other, f"{host} put non-l2crypt frames on the switch: {other}"
        for marker in markers:
            assert not any(marker[:16] in f for f in frames), f"{host} put {marker[:16]!r} on the switch in clear"
    assert set(sealed) == set(lab.hosts) - {"in"}, sealed
    return sealed


def forged_frame(dst: str, src: str, pw_id: int, body: bytes) -> bytes:
    """An l2crypt-shaped frame (the current frame version, pair key id) whose body is not sealed by any key."""
    header = frame_wire.HEADER.pack(L.L2C_ETHERTYPE, FRAME_VERSION, KEY_ID_PAIR, pw_id,
                                    0xFFFF_0000_0000_0000 | int.from_bytes(os.urandom(4), "big"))
    return mac_bytes(dst) + mac_bytes(src) + header + body


def udp_payload(frame: bytes) -> bytes | None:
    """The UDP payload of an unfragmented IPv4 frame (None for anything else)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if int.from_bytes(frame[20:22], "big") & 0x3FFF:  # a fragment
        return None
    return frame[14 + ihl + 8:]


# --- traffic -----------------------------------------------------------------------


def ping(lab: L.Lab, src: str, dst_addr: str, count: int = 3, extra: list[str] | None = None,
         timeout: float = 20.0):
    v6 = ":" in dst_addr
    argv = ["ping", "-6" if v6 else "-4", "-c", str(count), "-i", "0.2", "-W", "2",
            *(extra or []), dst_addr]
    return lab.exec(src, argv, timeout=timeout)


def listening(pid: int, port: int) -> bool:
    """True when ``pid`` (in its own netns) has a TCP socket listening on ``port``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[1].endswith(f":{port:04X}") and f[3] == "0A":
                return True
    return False


def iperf3(lab: L.Lab, client: str, server: str, seconds: float = 3, port: int = 5201) -> dict:
    """One TCP stream client -> server for ``seconds``; returns iperf3's JSON."""
    import json

    srv = lab.popen(server, ["iperf3", "-s", "-1", "-B", L.tap_ipv4(server), "-p", str(port)],
                    name=f"iperf3-server-{server}-{port}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = lab.exec(client, ["iperf3", "-c", L.tap_ipv4(server), "-p", str(port),
                                "-t", str(seconds), "-J"], timeout=seconds + 20)
        assert res.returncode == 0, f"iperf3 {client}->{server} failed: {res.stdout[-1500:]}{res.stderr}"
        return json.loads(res.stdout)
    finally:
        lab.stop(srv)


# --- a raw key-server client ---------------------------------------------------------


class KeyServerClient:
    """Speaks the key-server protocol with a host's certificate, from inside a netns."""

    def __init__(self, ns: str, server: str, cert_dir: Path, timeout_s: float = 10.0):
        host, port = server.rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cert_dir / "ca.crt")
        ctx.load_cert_chain(cert_dir / "host.crt", cert_dir / "host.key")
        raw = netns.create_socket(ns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
        raw.settimeout(timeout_s)
        raw.connect((host, int(port)))
        self.sock = ctx.wrap_socket(raw, server_hostname=KEYSERVER_TLS_NAME)
        self.reader = FrameReader()
        self.pending: list[dict] = []

    def request(self, msg: dict, timeout_s: float = 10.0) -> dict:
        """Send ``msg`` and return the answer with the same rid (pushes are skipped)."""
        self.sock.sendall(encode_message(msg))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.pending:
                if m.get("rid") == msg["rid"]:
                    self.pending.remove(m)
                    return m
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the key server closed the connection")
            self.pending += self.reader.feed(data)
        raise AssertionError(f"no answer to {msg['t']} within {timeout_s} s")

    def close(self) -> None:
        self.sock.close()


# --- keys the key server holds (sealed under its KEK) ----------------------------------


def stored_keys(state_dir: Path, kek_path: Path | None = None) -> dict[tuple, bytes]:
    """Every key in a key server's SQLite store, opened with its KEK (``state_dir/kek``
    unless given): ``("pair", id1, id2, pw_id)`` and ``("multicast", pw_id)`` -> key.
    Reads the file only; the running key server is not disturbed."""
    import sqlite3

    from keyserverd.store.kek import multicast_aad, pair_aad, read_kek_file

    kek = read_kek_file(kek_path or Path(state_dir) / "kek")
    db = sqlite3.connect(f"file:{Path(state_dir) / 'keyserver.db'}?mode=ro", uri=True, timeout=10)
    try:
        out = {("pair", i1, i2, p): kek.open(pair_aad(i1, i2, p), k, "pair key")
               for i1, i2, p, k in db.execute("SELECT id1, id2, pw_id, key FROM pair_keys")}
        out.update({("multicast", p): kek.open(multicast_aad(p), k, "multicast key")
                    for p, k in db.execute("SELECT pw_id, key FROM multicast_keys")})
    finally:
        db.close()
    return out
