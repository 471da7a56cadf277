"""Helpers of ``scripts/soak`` (issue 8): traffic, daemon lives, capture scans.

* ``TRAFFIC`` is a small program run in each traffic namespace: it sends UDP
  datagrams carrying a per-pair plaintext marker (``marker(src, dst)``) to
  each peer, counts what it receives per sender, stops sending on SIGUSR1
  and prints one JSON line on SIGTERM.
* ``Lives`` samples the RSS of every daemon life (a life is one PID).
* ``scan_bridge``, ``scan_wan`` and ``scan_plain`` read captured frames and
  return the report's figures; they are pure functions of the frames.
* ``TRAFFIC`` also counts datagrams of the intruder (``soak_intruder``) that
  got through: injected ones and repeated (sender, sequence) pairs.
* ``SegmentTarget`` (h1-h3 on one switch) and ``GatewayTarget`` (segments A
  and B, gateways gA and gB, the plain host p1; see ``lab_gateway``) tell the
  soak loop what runs where, what to restart and what to capture.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from gateway import tunnel_wire

from . import segment as L
from .gateway import GATEWAYS, GW_WAN_IFNAME, P1_IPV4, P1_MAC, TUNNEL_PORT, GatewayLab
from .soak_intruder import Intruder, Victim, frame_digest

MARKER_TAG = b"L2CSOAK:"
UDP_PORT = 9999
WARM_S = 5.0


def marker(src: str, dst: str) -> bytes:
    """The plaintext marker of the datagrams ``src`` sends to ``dst`` (18 bytes for 2-letter names)."""
    return MARKER_TAG + f"{src}>{dst}:93be".encode()


TRAFFIC = r"""
import json, signal, socket, sys, time
from collections import Counter
me, port, per_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
peers = dict(p.split("=") for p in sys.argv[4].split(",") if p)
try:  # dual stack where the namespace has IPv6: the intruder also injects IPv6 UDP
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    rx.bind(("::", port))
except OSError:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", port))
rx.settimeout(0.01)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, errors, received = Counter(), Counter(), Counter()
injected, duplicates, seen = Counter(), Counter(), set()
state = {"send": True, "run": True}
signal.signal(signal.SIGUSR1, lambda *a: state.update(send=False))
signal.signal(signal.SIGTERM, lambda *a: state.update(run=False))
signal.signal(signal.SIGINT, lambda *a: state.update(run=False))
seq, next_at = 0, time.monotonic()
while state["run"]:
    if state["send"] and time.monotonic() >= next_at:
        for name, ip in peers.items():
            m = b"L2CSOAK:" + f"{me}>{name}:93be".encode()
            try:
                tx.sendto(m * 8 + seq.to_bytes(8, "big"), (ip, port)); sent[name] += 1
            except OSError:
                errors[name] += 1
        seq += 1
        next_at += 1.0 / per_s
    try:
        data = rx.recv(4096)
    except OSError:
        continue
    if data.startswith(b"L2CINJ:"):  # the intruder's plain injection got through
        injected[data[7:].split(b":")[0].decode(errors="replace")] += 1
        continue
    head = data[8:data.find(b":", 8)].decode(errors="replace").split(">")
    if data.startswith(b"L2CSOAK:") and len(head) == 2 and head[1] == me:
        if (head[0], data[-8:]) in seen:  # only an opened replay repeats a sequence number
            duplicates[head[0]] += 1
            continue
        seen.add((head[0], data[-8:]))
        received[head[0]] += 1
print(json.dumps({"host": me, "sent": sent, "send_errors": errors, "received": received,
                  "injected": injected, "duplicates": duplicates}), flush=True)
"""


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Lives:
    """RSS of each daemon life: the first sample after ``WARM_S`` and the last one."""

    def __init__(self):
        self.lives: dict[str, list[dict]] = {}

    def track(self, label: str, proc: L.Proc | None) -> None:
        if proc is None or not proc.alive():
            return
        lives = self.lives.setdefault(label, [])
        now = time.monotonic()
        if not lives or lives[-1]["pid"] != proc.pid:
            lives.append({"pid": proc.pid, "born": now, "rss_start_kb": None, "rss_end_kb": None})
        life = lives[-1]
        life["last"] = now
        rss = rss_kb(proc.pid)
        if rss is None:
            return
        if life["rss_start_kb"] is None and now - life["born"] >= WARM_S:
            life["rss_start_kb"] = rss
        if life["rss_start_kb"] is not None:
            life["rss_end_kb"] = rss

    def report(self) -> dict[str, list[dict]]:
        return {label: [{"rss_start_kb": lv["rss_start_kb"], "rss_end_kb": lv["rss_end_kb"],
                         "growth_kb": (lv["rss_end_kb"] - lv["rss_start_kb"]) if lv["rss_start_kb"] else None,
                         "life_s": round(lv.get("last", lv["born"]) - lv["born"])} for lv in lives]
                for label, lives in self.lives.items()}


# --- capture scans (pure) ------------------------------------------------------


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def marker_pairs(frame: bytes) -> set[str]:
    """The ``src>dst`` pairs whose marker appears in ``frame``."""
    pairs, at = set(), frame.find(MARKER_TAG)
    while at >= 0:
        end = frame.find(b":", at + len(MARKER_TAG))
        if end > 0:
            pairs.add(frame[at + len(MARKER_TAG):end].decode(errors="replace"))
        at = frame.find(MARKER_TAG, at + 1)
    return pairs


def scan_bridge(frames: list[bytes], known_macs: set[bytes], injected: Counter | None = None) -> dict:
    """A switch capture: markers, repeated (source MAC, packet number), clear frames.

    ``injected`` counts the intruder's frames by ``frame_digest``: that many
    copies of each are left out (they are counted as ``intruder_frames``)."""
    markers, repeats, l2c, skipped = Counter(), 0, 0, 0
    seen: set[tuple[bytes, bytes]] = set()
    clear, pw_ids = Counter(), set()
    left = Counter(injected or {})
    for f in frames:
        if left:
            d = frame_digest(f)
            if left[d] > 0:
                left[d] -= 1
                skipped += 1
                continue
        for pair in marker_pairs(f):
            markers[pair] += 1
        if len(f) < 28:
            continue
        et = int.from_bytes(f[12:14], "big")
        if et != L.L2C_ETHERTYPE:
            if f[6:12] in known_macs:
                clear[hex(et)] += 1
            continue
        l2c += 1
        pw_ids.add(f[16:20])
        key = (f[6:12], f[20:28])
        repeats += key in seen
        seen.add(key)
    return {"frames": len(frames), "l2crypt_frames": l2c, "plaintext_markers": sum(markers.values()),
            "markers_by_pair": dict(markers), "repeated_src_pn": repeats, "distinct_pw_ids": len(pw_ids),
            "clear_frames_from_known_macs": sum(clear.values()), "clear_by_ethertype": dict(clear),
            "intruder_frames": skipped}


def udp_payload(frame: bytes, port: int | None = None) -> bytes | None:
    """The UDP payload of an unfragmented IPv4 frame (to or from ``port`` if given), else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    if int.from_bytes(frame[20:22], "big") & 0x3FFF:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = frame[14 + ihl:]
    if len(udp) < 8:
        return None
    if port is not None and port not in (int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big")):
        return None
    return udp[8:]


def scan_wan(frames: list[bytes], inner_macs: set[bytes], port: int = TUNNEL_PORT) -> dict:
    """The routed WAN: markers, tunnel datagrams, repeated (sender, PW_ID, packet number)."""
    markers, repeats, tunnel, undecodable, inner = Counter(), 0, 0, 0, 0
    seen: set[tuple[bytes, int, int]] = set()
    pw_ids: set[int] = set()
    for f in frames:
        for pair in marker_pairs(f):
            markers[pair] += 1
        inner += any(m in f for m in inner_macs)
        payload = udp_payload(f, port)
        if payload is None:
            continue
        header = tunnel_wire.decode_header(payload)
        if isinstance(header, str):
            undecodable += 1
            continue
        tunnel += 1
        pw_ids.add(header.pw_id)
        key = (header.sender, header.pw_id, header.packet_number)
        repeats += key in seen
        seen.add(key)
    return {"frames": len(frames), "tunnel_datagrams": tunnel, "undecodable_datagrams": undecodable,
            "plaintext_markers": sum(markers.values()), "markers_by_pair": dict(markers),
            "repeated_sender_pwid_pn": repeats, "frames_with_inner_macs": inner,
            "netkey_pw_ids": sorted(pw_ids)}


def scan_plain(frames: list[bytes], plain_hosts: set[str]) -> dict:
    """The plain side: markers of pairs with a plain host are expected, any other must be 0."""
    allowed, forbidden = Counter(), Counter()
    for f in frames:
        for pair in marker_pairs(f):
            ends = set(pair.split(">"))
            (allowed if ends & plain_hosts else forbidden)[pair] += 1
    return {"frames": len(frames), "plain_host_markers": sum(allowed.values()),
            "plain_host_markers_by_pair": dict(allowed),
            "encrypted_only_markers": sum(forbidden.values()), "encrypted_only_by_pair": dict(forbidden)}


# --- what runs where -----------------------------------------------------------


def _restart_keyserver(lab: L.Lab, rng: random.Random) -> str:
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    lab.kill_keyserver(sig)
    time.sleep(rng.uniform(0.5, 3.0))
    lab.start_keyserver()
    return signal.Signals(sig).name


def _restart_agent(lab: L.Lab, host: str, rng: random.Random) -> str:
    """Kill or stop the agent and start it with the same command (as systemd
    would); nothing is added to the host: it keeps its TAP and addresses."""
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    lab.restart_agent(host, timeout_s=60, sig=sig)
    return f"agent_restarts_{signal.Signals(sig).name}"


class SegmentTarget:
    """The single-segment lab: a key server, the switch, h1-h3."""

    name = "segment"

    def __init__(self, state_dir: Path, **_):
        self.lab = L.Lab(state_dir=state_dir)
        self.hosts = self.lab.hosts

    def up(self) -> None:
        self.lab.up(timeout_s=120)

    def down(self) -> None:
        self.lab.down()

    def daemons(self) -> dict[str, tuple[L.Lab, str]]:
        """label -> (lab, process name)."""
        return {"keyserverd": (self.lab, "keyserverd"), **{f"agent-{h}": (self.lab, f"agent-{h}") for h in self.hosts}}

    def restartable(self) -> list[str]:
        return list(self.daemons())

    def traffic(self) -> dict[str, tuple[L.Lab, dict[str, str]]]:
        """sender -> (lab, {peer: IPv4})."""
        return {h: (self.lab, {p: L.tap_ipv4(p) for p in self.hosts if p != h}) for h in self.hosts}

    def captures(self) -> dict[str, tuple[str, L.Lab, str, str]]:
        """label -> (kind, lab, interface, role)."""
        return {"segment": ("bridge", self.lab, L.BRIDGE, "sw")}

    def intruder(self) -> Intruder:
        """The intruder on the switch: every host a victim (spoofing the next one)."""
        hosts = list(self.hosts)
        victims = [Victim(self.lab, h, hosts[(i + 1) % len(hosts)]) for i, h in enumerate(hosts)]
        return Intruder(self.lab, victims, [f"agent-{h}" for h in hosts], self.status, UDP_PORT)

    def daemon_mac(self, label: str) -> str | None:
        """The MAC sealed frames to the daemon ``label`` are sent to on the intruder's switch."""
        return self.lab.tap_mac_of(label.removeprefix("agent-")) if label.startswith("agent-") else None

    def known_macs(self) -> set[bytes]:
        return {_mac(self.lab.tap_mac_of(h)) for h in self.hosts} | {_mac(L.wire_mac(h)) for h in self.hosts}

    def rekey(self) -> list[bool]:
        return [self.lab.keyserverd("rekey", "--all", timeout=30).returncode == 0]

    def status(self, label: str) -> dict:
        return self.lab.status(label.removeprefix("agent-"), timeout=10)

    def drops(self, label: str) -> dict[str, int]:
        return self.status(label).get("drops", {})

    def restart(self, label: str, rng: random.Random) -> str:
        """Restart one daemon; returns the event name."""
        if label == "keyserverd":
            return f"keyserverd_restarts_{_restart_keyserver(self.lab, rng)}"
        return _restart_agent(self.lab, label.removeprefix("agent-"), rng)


class GatewayTarget:
    """The gateway lab: h1, h2, gA and p1 on segment A; h3 and gB on segment B; the WAN."""

    name = "gateway"
    PAIRS = {"h1": ("h2", "p1", "h3"), "h2": ("h1", "p1", "h3"), "h3": ("h1", "h2"), "p1": ("h1", "h2")}

    def __init__(self, state_dir: Path, netkey_rekey_after_s: float = 30.0):
        self.glab = GatewayLab(state_dir, netkey_rekey_after_s=netkey_rekey_after_s)
        self.hosts = ("h1", "h2", "h3")

    def up(self) -> None:
        self.glab.up(timeout_s=180)

    def down(self) -> None:
        self.glab.down()

    def daemons(self) -> dict[str, tuple[L.Lab, str]]:
        g = self.glab
        return {"keyserverd-A": (g.a, "keyserverd"), "keyserverd-B": (g.b, "keyserverd"),
                **{f"agent-{h}": (g.lab_of(h), f"agent-{h}") for h in self.hosts},
                **{f"gateway-{gw}": (g.lab_of(gw), f"gateway-{gw}") for gw in GATEWAYS}}

    def restartable(self) -> list[str]:
        return list(self.daemons())

    def traffic(self) -> dict[str, tuple[L.Lab, dict[str, str]]]:
        ip = {h: L.tap_ipv4(h) for h in self.hosts} | {"p1": P1_IPV4}
        return {src: (self.glab.lab_of(src), {dst: ip[dst] for dst in dsts}) for src, dsts in self.PAIRS.items()}

    def captures(self) -> dict[str, tuple[str, L.Lab, str, str]]:
        g = self.glab
        return {"segment A": ("bridge", g.a, L.BRIDGE, "sw"), "segment B": ("bridge", g.b, L.BRIDGE, "sw"),
                "wan": ("wan", g.a, GW_WAN_IFNAME["gA"], "wan"), "plain side": ("plain", g.a, "plain0", "gA")}

    def known_macs(self) -> set[bytes]:
        macs = self._tap_macs() | {_mac(L.wire_mac(h)) for h in self.hosts}
        return macs | {_mac(P1_MAC)} | {_mac(v[1]) for v in GATEWAYS.values()}

    def _tap_macs(self) -> set[bytes]:
        return {_mac(self.glab.lab_of(h).tap_mac_of(h)) for h in self.hosts}

    def inner_macs(self) -> set[bytes]:
        return self._tap_macs() | {_mac(P1_MAC)}

    def rekey(self) -> list[bool]:
        return [lab.keyserverd("rekey", "--all", timeout=30).returncode == 0 for lab in self.glab.seg.values()]

    def status(self, label: str) -> dict:
        if label.startswith("gateway-"):
            return self.glab.gateway_status(label.removeprefix("gateway-"), timeout=10)
        host = label.removeprefix("agent-")
        return self.glab.lab_of(host).status(host, timeout=10)

    def drops(self, label: str) -> dict[str, int]:
        return self.status(label).get("drops", {})

    def intruder(self) -> Intruder:
        """The intruder on segment A: h1 and h2 are victims (each spoofing the other); gA is watched too."""
        a = self.glab.a
        return Intruder(a, [Victim(a, "h1", "h2"), Victim(a, "h2", "h1")],
                        ["agent-h1", "agent-h2", "gateway-gA"], self.status, UDP_PORT)

    def daemon_mac(self, label: str) -> str | None:
        if label in ("agent-h1", "agent-h2"):
            return self.glab.a.tap_mac_of(label.removeprefix("agent-"))
        return GATEWAYS["gA"][1] if label == "gateway-gA" else None

    def restart(self, label: str, rng: random.Random) -> str:
        if label.startswith("keyserverd-"):
            return f"keyserverd_restarts_{_restart_keyserver(self.glab.seg[label[-1]], rng)}"
        if label.startswith("gateway-"):
            gw = label.removeprefix("gateway-")
            self.glab.stop_gateway(gw, signal.SIGKILL)
            self.glab.start_gateway(gw)
            self.glab.wait_gateway(gw, lambda st: st.get("connected") and st.get("netkey_pw_id"), 60)
            return "gateway_restarts_SIGKILL"
        host = label.removeprefix("agent-")
        return _restart_agent(self.glab.lab_of(host), host, rng)


def start_traffic(lab: L.Lab, sender: str, peers: dict[str, str], per_s: float) -> L.Proc:
    arg = ",".join(f"{n}={ip}" for n, ip in peers.items())
    return lab.popen(sender, [sys.executable, "-c", TRAFFIC, sender, str(UDP_PORT), str(per_s), arg],
                     name=f"traffic-{sender}")


def signal_proc(proc: L.Proc, sig: int) -> None:
    """Send ``sig`` to a process the lab started (if it is still that process)."""
    if proc.alive():
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def traffic_result(lab: L.Lab, sender: str) -> dict | None:
    lines = [ln for ln in lab.log_text(f"traffic-{sender}").splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def pair_delivery(results: list[dict]) -> dict[str, dict]:
    """``src>dst`` -> sent, delivered (received by dst), send errors and the ratio."""
    received = {r["host"]: r["received"] for r in results}
    out = {}
    for r in results:
        for dst, n in r["sent"].items():
            got = received.get(dst, {}).get(r["host"], 0)
            out[f"{r['host']}>{dst}"] = {"sent": n, "delivered": got, "send_errors": r["send_errors"].get(dst, 0),
                                         "ratio": round(got / n, 4) if n else None}
    return out

