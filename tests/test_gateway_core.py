"""The gateway core over in-memory fakes: hosts are FrameEngines, the key server is a dict.
(An encrypted host reaching a plain host through the real gateway daemon, and back,
is a gateway scenario: tests/gateway_scenarios.py.)"""

import hashlib
import itertools

import pytest

from gateway import tunnel_wire
from gateway import core as C
from gateway.core import GatewayCore, GatewaySettings
from l2crypt.core.engine import GROUP_MAC, EngineSettings, FrameEngine
from l2crypt.core.tunnel_keys import Endpoint, link_keys

H1 = bytes.fromhex("024c32000011")
H2 = bytes.fromhex("024c32000012")
H3 = bytes.fromhex("024c32000013")
GA = bytes.fromhex("024c470000a1")
GB = bytes.fromhex("024c470000b1")
P1 = bytes.fromhex("024c50000001")
BCAST = b"\xff" * 6
MCAST_A = b"M" * 32
MCAST_B = b"N" * 32
NETKEY = b"K" * 32
MARKER = b"gateway-core-marker"


def pair_key(a: str, b: str, pw_id: int = 1) -> bytes:
    return hashlib.sha256(f"{min(a, b)}|{max(a, b)}|{pw_id}".encode()).digest()


def frame(dst, src, ethertype=0x0800, payload=MARKER):
    return dst + src + ethertype.to_bytes(2, "big") + payload + bytes(max(0, 30 - len(payload)))


def arp(src):
    return frame(BCAST, src, 0x0806, b"\x00\x01\x08\x00\x06\x04\x00\x01" + src + bytes(22))


_pn = itertools.count(1000, 1 << 20)


GW_IDS = {GA: "gA", GB: "gB"}
#: The segment (its key server's CA fingerprint) of each gateway: gA in A, gB and gC in B.
SEGMENT = {"gA": "sha256:" + "a" * 64, "gB": "sha256:" + "b" * 64, "gC": "sha256:" + "b" * 64}


def gateway(mac, peers=(), plain=True, gw_id=None, floors=None, **kw):
    gw = GatewayCore(mac, lambda: next(_pn), tunnel_peers=peers, has_plain=plain,
                     settings=GatewaySettings(**kw), engine_settings=EngineSettings(switch_after_s=1.0),
                     gw_id=gw_id or GW_IDS[mac], tunnel_floors=floors)
    return gw


def link_keys_of(gw_id, peer, netkey=NETKEY, pw_id=1):
    """(send, receive) keys of gw_id's link to peer: what gw_id's key server hands it."""
    return link_keys(netkey, pw_id, Endpoint(SEGMENT[gw_id], gw_id), Endpoint(SEGMENT[peer], peer))


def serve_netkey(gw, gw_id, netkey=NETKEY, pw_id=1, now=0.0):
    """The key server's answer to the gateway's netkey_req for each of its peers."""
    return [gw.install_tunnel_keys(peer, pw_id, *link_keys_of(gw_id, peer, netkey, pw_id), now) for peer in gw.peers]


def host(mac, mcast=MCAST_A):
    eng = FrameEngine(mac, EngineSettings())
    eng.install_multicast_key(mcast, 1, 0.0)
    return eng


def serve_keys(gw, gw_id, hosts, now):
    """Answer the gateway's key requests like the key server: KEY(host, gateway)."""
    out = C.Output()
    for mac in gw.take_key_requests(now):
        if mac == GROUP_MAC:
            continue
        name = hosts[mac]
        got = gw.install_pair_key(mac, name, pair_key(name, gw_id), 1, now)
        out.to_enc += got.to_enc
        out.to_plain += got.to_plain
        out.to_tunnel += got.to_tunnel
    return out


@pytest.fixture
def seg_a():
    h1, gw = host(H1), gateway(GA)
    gw.install_multicast_key(MCAST_A, 1, 0.0)
    # p1 speaks first (an ARP request): learned, held, mapped, then sealed onto the segment.
    out = gw.from_plain(arp(P1), 0.1)
    assert out.to_enc == [] and gw.take_map_requests() == [(P1, C.PLAIN)]
    out = gw.on_mapped(P1, C.PLAIN, 0.2)
    assert len(out.to_enc) == 1 and out.to_enc[0][6:12] == P1
    assert h1.open_from_wire(out.to_enc[0], 0.2) == arp(P1)
    return h1, gw


def test_frames_between_encrypted_hosts_never_reach_the_plain_port(seg_a):
    h1, gw = seg_a
    h1.install_pair_key(H2, "h2", pair_key("h1", "h2"), 1, 1.0)
    sealed = h1.seal_from_tap(frame(H2, H1), 1.0)
    out = gw.from_encrypted(sealed, 1.0)
    assert out.to_plain == [] and out.to_enc == [] and out.to_tunnel == []
    assert gw.counters["not_for_gateway"] == 1


def test_spoofed_host_mac_on_the_plain_side_gets_nothing(seg_a):
    h1, gw = seg_a
    # A MAC seen verified on the encrypted side is never learned on the plain side.
    h1.install_pair_key(P1, "gA", pair_key("h1", "gA"), 1, 1.0)
    gw.from_encrypted(h1.seal_from_tap(arp(H1), 1.0), 1.0)
    out = gw.from_plain(frame(BCAST, H1, 0x0806), 1.1)
    assert out.to_enc == [] and gw.take_map_requests() == []
    assert gw.all_drops()[C.SPOOFED_SOURCE] == 1
    # A MAC the key server says is bound to an enrolled host is refused and stays refused.
    gw.from_plain(frame(H1, H2), 1.2)
    assert gw.take_map_requests() == [(H2, C.PLAIN)]
    gw.on_map_refused(H2, 1.3)
    out = gw.from_plain(frame(H1, H2), 1.4)
    assert out.to_enc == [] and gw.take_map_requests() == []
    assert gw.all_drops()[C.SPOOFED_SOURCE] == 3  # the held frame and the later one
    assert H2 not in gw.virtual


@pytest.mark.parametrize("policy, passes", [("basic", False), ("all", True), ("none", False)])
def test_group_crossing_policy(policy, passes):
    gw = gateway(GA, group_crossing=policy)
    gw.install_multicast_key(MCAST_A, 1, 0.0)
    gw.from_plain(arp(P1), 0.0)
    arp_out = gw.on_mapped(P1, C.PLAIN, 0.0)
    assert len(arp_out.to_enc) == (0 if policy == "none" else 1)
    udp = bytearray(frame(BCAST, P1, 0x0800, bytes(40)))
    udp[14], udp[14 + 9], udp[14 + 22:14 + 24] = 0x45, 17, (5353).to_bytes(2, "big")
    assert len(gw.from_plain(bytes(udp), 0.1).to_enc) == (1 if passes else 0)
    udp[14 + 22:14 + 24] = (67).to_bytes(2, "big")  # DHCP crosses unless the policy is none
    assert len(gw.from_plain(bytes(udp), 0.2).to_enc) == (0 if policy == "none" else 1)


def _two_segments():
    h1, h3 = host(H1, MCAST_A), host(H3, MCAST_B)
    ga, gb = gateway(GA, peers=("gB",), plain=False), gateway(GB, peers=("gA",), plain=False)
    ga.install_multicast_key(MCAST_A, 1, 0.0)
    gb.install_multicast_key(MCAST_B, 1, 0.0)
    serve_netkey(ga, "gA")
    serve_netkey(gb, "gB")
    return h1, h3, ga, gb


def _tunnel_to(gw_out, peer):
    return [d for p, _, d in gw_out.to_tunnel if p == peer]


def test_frames_cross_subnets_sealed_with_netkey():
    h1, h3, ga, gb = _two_segments()
    # h1's broadcast: opened with the multicast key of A, sealed with NETKEY, resealed for B.
    out = ga.from_encrypted(h1.seal_from_tap(arp(H1), 1.0), 1.0)
    (datagram,) = _tunnel_to(out, "gB")
    assert b"\x88\xb5" not in datagram[:tunnel_wire.HEADER_LEN] and H3 not in datagram
    assert gb.from_tunnel("gA", datagram, 1.1).to_enc == []  # H1 learned on tunnel:gA, held
    assert gb.take_map_requests() == [(H1, "tunnel:gA")]
    (resealed,) = gb.on_mapped(H1, "tunnel:gA", 1.2).to_enc
    assert h3.open_from_wire(resealed, 1.2) == arp(H1)
    # h3 answers h1 (KEY(h3, gB) on B), gA learns H3 and seals toward h1 (KEY(h1, gA) on A).
    h3.install_pair_key(H1, "gB", pair_key("h3", "gB"), 1, 1.3)
    out = gb.from_encrypted(h3.seal_from_tap(frame(H1, H3), 1.3), 1.3)
    out = serve_keys(gb, "gB", {H3: "h3"}, 1.4)
    (datagram,) = _tunnel_to(out, "gA")
    assert MARKER not in datagram
    ga.from_tunnel("gB", datagram, 1.5)
    assert ga.take_map_requests() == [(H3, "tunnel:gB")]
    assert ga.on_mapped(H3, "tunnel:gB", 1.6).to_enc == []  # waits for KEY(gA, h1)
    (sealed,) = serve_keys(ga, "gA", {H1: "h1"}, 1.7).to_enc
    h1.install_pair_key(H3, "gA", pair_key("h1", "gA"), 1, 1.7)
    assert h1.open_from_wire(sealed, 1.8) == frame(H1, H3)
    # A replayed, a truncated and a forged datagram are dropped and counted.
    assert ga.from_tunnel("gB", datagram, 2.0).to_enc == []
    assert ga.from_tunnel("gB", datagram[:30], 2.0).to_enc == []
    forged = bytearray(datagram)
    forged[-1] ^= 1
    forged[12:20] = (2**40).to_bytes(8, "big")
    assert ga.from_tunnel("gB", bytes(forged), 2.0).to_enc == []
    assert ga.from_tunnel("nobody", datagram, 2.0).to_enc == []
    drops = ga.all_drops()
    assert (drops["tunnel_replayed"], drops["tunnel_truncated"], drops["tunnel_bad_tag"],
            drops[C.UNKNOWN_PEER]) == (1, 1, 1, 1)


def test_netkey_rotation_make_before_break():
    h1, h3, ga, gb = _two_segments()
    ga.from_encrypted(h1.seal_from_tap(arp(H1), 1.0), 1.0)
    new = b"L" * 32
    assert serve_netkey(ga, "gA", new, 2, 2.0) == [True] and serve_netkey(gb, "gB", new, 2, 2.5) == [True]
    # Before the switch delay gA still seals with version 1; gB opens both.
    for now, want in ((2.1, 1), (3.5, 2), (3.6, 2)):
        (datagram,) = _tunnel_to(ga.from_encrypted(h1.seal_from_tap(arp(H1), now), now), "gB")
        assert tunnel_wire.decode_header(datagram).pw_id == want
        gb.from_tunnel("gA", datagram, now)
    assert not {k: v for k, v in gb.all_drops().items() if k.startswith("tunnel")}
    # gB saw gA use version 2: it switches too, at once.
    gb.on_timer(3.7)
    assert gb.tunnel.links["gA"].keys.current.pw_id == 2


@pytest.mark.parametrize("module", ["core", "tunnel", "tunnel_wire", "group_policy"])
def test_gateway_core_does_no_io(module):
    import ast
    from pathlib import Path

    import gateway

    tree = ast.parse((Path(gateway.__file__).parent / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "asyncio", "time", "fcntl", "select", "subprocess", "os"}
