# The gateway under attack (issue 15: findings 7 and 8, and the tunnel's share of 1).
# Drawing in l2crypt/lab/gateway.py; this module adds a second plain host p2 and an
# attacker on the WAN router (raw sockets in its namespace, spoofing gB's address):
#
#   segment A: h1 h2 --br0-- gA --plain0-- p1 (10.66.0.31)
#                             |               `-- p2 (macvlan on p1's port, 10.66.0.32, made by a test)
#                            wan  <-- attacker: datagrams "from" gB's WAN address
#                             |
#   segment B: h3 ----br0---- gB        (and gX: a rogue gateway enrolled at B, a test makes it)
#
# gA runs with a short MAC ageing time and a small table (GA_ARGS) so that a flood's
# lifetime fits in a test; NETKEY does not rotate during the module.

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyroute2 import IPRoute, netns

from gateway import tunnel_wire
from helpers import KeyServerClient, ping, udp_payload, wait_for
from l2crypt.core.frame_wire import parse_mac
from l2crypt.lab import segment as L
from l2crypt.lab.gateway import GATEWAYS, GW_WAN_IFNAME, TUNNEL_PORT, GatewayLab

pytestmark = pytest.mark.lab

MAC_AGEING_S = 4.0
MAX_LEARNED = 300
GA_ARGS = ["--mac-ageing-s", str(MAC_AGEING_S), "--max-learned-macs", str(MAX_LEARNED)]
GATEWAY_ARGS = {"gA": GA_ARGS}  # the gateway lab of the module (conftest.py ``glab``) starts gA with them
P2_MAC, P2_IPV4 = "02:4c:50:00:00:32", "10.66.0.32"
GX_MAC = "02:4c:47:00:00:c1"


# --- helpers ---------------------------------------------------------------------------


def _ping_ok(lab, src, addr, count=3, extra=None):
    res = ping(lab.lab_of(src), src, addr, count=count, extra=extra, timeout=count * 0.5 + 20)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _reaches(lab, src, addr):
    return lambda: ping(lab.lab_of(src), src, addr, count=1, timeout=10).returncode == 0


def _restart_ga(glab) -> None:
    glab.stop_gateway("gA")  # kill -9
    glab.start_gateway("gA")
    glab.wait_gateway("gA", lambda st: st.get("connected") and st.get("netkey_pw_id"), 30)


def _tunnel_drops(glab, gw: str) -> int:
    return sum(n for reason, n in glab.gateway_status(gw)["drops"].items() if reason.startswith("tunnel_"))


def _spoof_from_gb(glab, payloads: list[bytes]) -> None:
    """UDP datagrams to gA's tunnel port with gB's WAN address as their source, sent
    through a raw socket in the WAN router's namespace (an attacker on the path)."""
    src, dst = socket.inet_aton(GATEWAYS["gB"][3]), GATEWAYS["gA"][3]
    sock = netns.create_socket(glab.a.ns("wan"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW, flags=0)
    try:
        for i, payload in enumerate(payloads):
            udp = struct.pack("!HHHH", TUNNEL_PORT, TUNNEL_PORT, 8 + len(payload), 0) + payload
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                             src, socket.inet_aton(dst))
            sock.sendto(ip + udp, (dst, 0))
            if i % 20 == 19:
                time.sleep(0.005)  # paced: gA's receive buffer must not overflow unseen
    finally:
        sock.close()


def _inner_udp(dst_mac: bytes, src_mac: bytes, dst_ip: str, marker: bytes) -> bytes:
    """An Ethernet frame with an IPv4/UDP packet to ``dst_ip`` port 9 carrying ``marker``."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(marker), 0) + marker
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(L.tap_ipv4("h3")), socket.inet_aton(dst_ip))
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


# --- finding 7: MAC learning cannot be frozen ----------------------------------------------


def _from_plain(lab) -> int | None:
    """gA's from_plain count, or None while gA is too busy with the flood to answer."""
    try:
        return lab.gateway_status("gA", timeout=15.0)["counters"]["from_plain"]
    except L.LabError:
        return None


def _settled_count(read, quiet_s: float = 0.6, timeout_s: float = 40.0) -> int:
    """``read()`` once it has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now is None or now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the count kept moving or went unread for {timeout_s} s (last {last})")


def _add_plain_host(a: L.Lab) -> None:
    """p2: a new host on the plain side, a macvlan of p1's port in its own namespace."""
    a._new_ns("p2")
    fd = os.open(f"/var/run/netns/{a.ns('p2')}", os.O_RDONLY)
    try:
        with IPRoute(netns=a.ns("p1"), flags=0) as ipr:
            parent = ipr.link_lookup(ifname=L.WIRE_IFNAME)[0]
            ipr.link("add", ifname="mv0", kind="macvlan", link=parent, macvlan_mode="bridge", address=P2_MAC)
            ipr.link("set", index=ipr.link_lookup(ifname="mv0")[0], net_ns_fd=fd)
    finally:
        os.close(fd)
    a._sysctl("p2", {"net.ipv6.conf.all.disable_ipv6": "1"})
    a._addr("p2", "mv0", P2_IPV4, 24)
    a._link("p2", "mv0", state="up")


def test_a_flood_of_random_source_macs_on_the_plain_side_does_not_stop_learning(glab):
    """1,500 frames with made-up source MACs from the plain side fill gA's table
    (300 here) and the rest are dropped as table_full; a new plain host p2 is then
    reachable from h1 within the ageing time and a few seconds."""
    a = glab.a
    rnd = random.Random(15_7)
    macs = {bytes([0x02 | (rnd.randrange(256) & 0xFC)]) + rnd.randbytes(5) for _ in range(1500)}
    frames = [b"\xff" * 6 + mac + b"\x88\xb6" + bytes(46) for mac in macs]  # broadcasts that never cross
    before = glab.gateway_status("gA")
    assert a.inject(frames, role="p1", ifname=L.WIRE_IFNAME) == len(frames)
    flood_end = time.monotonic()
    # A loaded machine may lose part of the burst in gA's socket buffer: count
    # what gA read (from_plain) once it stops growing, and judge on that.
    got = _settled_count(lambda: _from_plain(glab)) - before["counters"]["from_plain"]
    assert got >= 2 * MAX_LEARNED, f"gA read only {got} of the {len(frames)} flood frames"
    # Every flood frame gA read is learned or refused as table_full; on a slow
    # machine the first ones may age out (MAC_AGEING_S) before the burst is
    # read through, and the slots they free are learned again.
    def accounted(s):
        full = s["drops"].get("table_full", 0) - before["drops"].get("table_full", 0)
        learned = s["counters"]["macs_learned"] - before["counters"]["macs_learned"]
        return s if full > 0 and learned >= MAX_LEARNED and full + learned >= got - 10 else None  # 10: ARP, ND
    st = wait_for("gA to learn its fill and count the rest as table_full",
                  lambda: accounted(glab.gateway_status("gA")), timeout_s=20)
    assert st["drops"].get("table_full", 0) - before["drops"].get("table_full", 0) >= got - 2 * MAX_LEARNED - 200
    _add_plain_host(a)
    wait_for("h1 -> p2 (a new plain host) after the flood", _reaches(glab, "h1", P2_IPV4),
             timeout_s=MAC_AGEING_S + 20, every_s=1.0)
    assert time.monotonic() - flood_end <= MAC_AGEING_S + 30
    # The flood MACs were learned over a second or two and age out in that
    # order, so p2 may get a slot before the last of them goes.
    st = wait_for("gA to age out the flood MACs",
                  lambda: (lambda s: s if s["counters"].get("macs_aged_out", 0) >= MAX_LEARNED - 5 else None)(
                      glab.gateway_status("gA")), timeout_s=10)
    assert any(e["mac"] == P2_MAC and e["state"] == "mapped" for e in st["learned"])
    _ping_ok(glab, "h1", P2_IPV4, count=3)


# --- finding 1 (tunnel part): replay after a gateway restart -------------------------------


def test_tunnel_datagrams_replayed_after_a_gateway_restart_are_refused(glab):
    """Capture gB -> gA datagrams on the WAN, kill -9 and restart gA, replay the capture
    with gB's address: gA refuses every one (tunnel_replayed), h1 sees none of them, and
    genuine traffic flows afterwards."""
    a = glab.a
    marker, after_marker = b"TUNNEL-REPLAY-M!", b"AFTER-REPLAY-MK!"
    gb_ip, ga_ip = socket.inet_aton(GATEWAYS["gB"][3]), socket.inet_aton(GATEWAYS["gA"][3])
    wan = a.capture(GW_WAN_IFNAME["gA"], role="wan", name="tcpdump-hard-replay-wan")
    try:
        _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=5, extra=["-p", marker.hex()])
    finally:
        frames = L.read_pcap(wan.stop())
    recorded = [p for f in frames if f[26:30] == gb_ip and f[30:34] == ga_ip for p in [udp_payload(f)] if p]
    assert len(recorded) >= 5 and not any(marker in f for f in frames)  # sealed on the WAN
    _restart_ga(glab)
    before = glab.gateway_status("gA")["drops"].get("tunnel_replayed", 0)
    tap = a.capture(L.TAP_IFNAME, role="h1", name="tcpdump-hard-replay-h1")
    try:
        _spoof_from_gb(glab, recorded)
        wait_for("gA to refuse every replayed datagram", lambda: glab.gateway_status("gA")["drops"].get(
            "tunnel_replayed", 0) - before >= len(recorded), timeout_s=15)
        wait_for("h3 -> h1 after the restart", _reaches(glab, "h3", L.tap_ipv4("h1")), timeout_s=20, every_s=0.5)
        _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=3, extra=["-p", after_marker.hex()])
    finally:
        h1_frames = L.read_pcap(tap.stop())
    assert not any(marker in f for f in h1_frames), "a replayed datagram reached h1"
    assert any(after_marker in f for f in h1_frames)  # the capture on h1 works


# --- finding 8: sender tags -----------------------------------------------------------------


def _enroll_rogue_gateway(glab) -> "os.PathLike":
    """gX: a gateway enrolled at segment B, in the hands of an attacker."""
    b = glab.b
    token = GatewayLab._gateway_add(b, "gX")
    d = glab.gw_dir("gB").parent / "gX"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    res = b.exec("gB", [b.cmd("l2crypt-gateway"), "enroll", "--server", b.keyserver_addr, "--id", "gX",
                        "--token", token["token"], "--ca-fingerprint", token["ca_fingerprint"], "--state-dir", d],
                 timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return d


def _answers(client: KeyServerClient, msg: dict, settle_s: float = 1.0) -> list[dict]:
    """Every message answering ``msg`` (NETKEY comes as one message per version)."""
    try:
        out = [client.request(msg)]
    except Exception:  # noqa: BLE001 - a request this version of the protocol does not know
        return []
    deadline = time.monotonic() + settle_s
    client.sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = client.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        client.pending += client.reader.feed(data)
    out += [m for m in client.pending if m.get("rid") == msg["rid"]]
    return out


def _keys_of_a_gateway(glab, cert_dir) -> list[tuple[int, bytes]]:
    """(PW_ID, key) of every key the key server gives gX, whatever the protocol version."""
    b = glab.b
    client = KeyServerClient(b.ns("gB"), b.keyserver_addr, cert_dir)
    try:
        assert client.request({"t": "hello", "rid": 1, "mac": parse_mac(GX_MAC)})["t"] == "welcome"
        got = _answers(client, {"t": "netkey_req", "rid": 2})
        got += _answers(client, {"t": "netkey_req", "rid": 3, "peer_id": "gA"})
    finally:
        client.close()
    return [(m["pw_id"], m[k]) for m in got if m["t"] == "netkey" for k in ("key", "send_key", "recv_key") if k in m]


def _v1_sender_key(netkey: bytes, pw_id: int, tag: bytes) -> bytes:
    """The sending key any NETKEY holder could compute for any sender tag before issue 15."""
    info = b"l2crypt v1 tunnel" + tag + pw_id.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(netkey)


def _forged(key: bytes, tag: bytes, pw_id: int, pn: int, inner: bytes) -> bytes:
    aad = struct.pack("!BB6sIQ", tunnel_wire.TUNNEL_VERSION, tunnel_wire.KIND_DATA, tag, pw_id, pn)
    return aad + AESGCM(key).encrypt(struct.pack("!IQ", 0, pn), inner, aad)


def test_a_rogue_gateway_cannot_speak_for_gb_nor_lock_it_out(glab):
    """gX, a gateway of segment B, takes every key its key server gives it.  From the
    WAN, with gB's address, it sends gA datagrams under gB's tag (and gB's MAC), sealed
    with each of those keys and with each key a NETKEY holder could derive, and 300
    datagrams under made-up tags, right after gA restarted (no peer state yet).  gA opens
    none of them (h1 never sees the forged frame), counts them all, and gB's genuine
    traffic flows."""
    a = glab.a
    marker, genuine = b"FORGED-AS-GB-MK!", b"GENUINE-GB-MARK!"
    keys = _keys_of_a_gateway(glab, _enroll_rogue_gateway(glab))
    assert keys, "the rogue gateway got no key at all"
    h1_mac, h3_mac = parse_mac(a.status("h1")["mac"]), parse_mac(glab.b.status("h3")["mac"])
    inner = _inner_udp(h1_mac, h3_mac, L.tap_ipv4("h1"), marker)
    from l2crypt.core.tunnel_keys import sender_tag

    gb_tags = [parse_mac(GATEWAYS["gB"][1]), sender_tag("gB")]
    pn = int(time.time() * 2**30) + 2**40
    datagrams = []
    for pw_id, key in keys:
        for tag in gb_tags:
            for k in (key, _v1_sender_key(key, pw_id, tag)):
                pn += 1
                datagrams.append(_forged(k, tag, pw_id, pn, inner))
    pw_id, key = keys[0]
    rnd = random.Random(15_8)
    for _ in range(300):
        tag, pn = rnd.randbytes(6), pn + 1
        datagrams.append(_forged(_v1_sender_key(key, pw_id, tag), tag, pw_id, pn, inner))
    _restart_ga(glab)
    before = _tunnel_drops(glab, "gA")
    tap = a.capture(L.TAP_IFNAME, role="h1", name="tcpdump-hard-forged-h1")
    try:
        _spoof_from_gb(glab, datagrams)
        wait_for("gA to drop every forged datagram", lambda: _tunnel_drops(glab, "gA") - before >= len(datagrams),
                 timeout_s=20)
        wait_for("h3 -> h1 after the forgeries", _reaches(glab, "h3", L.tap_ipv4("h1")), timeout_s=15, every_s=0.5)
        _ping_ok(glab, "h3", L.tap_ipv4("h1"), count=3, extra=["-p", genuine.hex()])
    finally:
        h1_frames = L.read_pcap(tap.stop())
    assert not any(marker in f for f in h1_frames), "gA opened a datagram forged under gB's tag"
    assert any(genuine in f for f in h1_frames)  # the capture on h1 works
    st = glab.gateway_status("gA")
    assert st["counters"].get("tunnel_opened", 0) > 0
    print(json.dumps({k: v for k, v in st["drops"].items() if k.startswith("tunnel_")}))
