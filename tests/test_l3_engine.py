"""l2crypt.core.l3_engine: sealing, opening, holding and rekeying IP packets, without I/O.

Two engines (a: 10.71.0.2, b: 10.72.0.2) exchange packets through the test,
which plays the kernel (and, for nat mode, a NAT rewriting the outer header).
"""

import pytest

from l2crypt.core import l3_wire as W
from l2crypt.core import l3_engine as E
from l2crypt.l3.status import engine_snapshot

A_IP, B_IP = W.parse_ip("10.71.0.2"), W.parse_ip("10.72.0.2")
NAT_IP = W.parse_ip("10.72.0.1")
KEY1, KEY2 = b"\x11" * 32, b"\x22" * 32
MARKER = b"L3-MARKER-plaintext"


def packet(src=A_IP, dst=B_IP, proto=17, payload=MARKER * 3) -> bytes:
    return W.rebuild_ipv4(b"\x45\0\0\0\0\x07\x40\0\x40" + bytes([proto]) + b"\0\0" + src + dst,
                          proto, 20 + len(payload)) + payload


def engines(mode="routed", **kw):
    s = E.L3Settings(mode=mode, **kw)
    a = E.L3Engine("a", [A_IP], s, pn_start=100)
    b = E.L3Engine("b", [B_IP], s, pn_start=5000)
    return a, b


def keyed(mode="routed", **kw):
    a, b = engines(mode, **kw)
    a.install_key("b", KEY1, 1, [B_IP], 0.0)
    b.install_key("a", KEY1, 1, [A_IP], 0.0)
    return a, b


def nat(sealed: bytes, port: int = 40000) -> bytes:
    """What a MASQUERADE does to h1's outer packet: new source address and port."""
    ip = W.parse_ipv4(sealed)
    payload = sealed[ip.header_len + W.UDP_LEN:]
    sport, dport = W.udp_ports(sealed, ip.header_len)
    return W.encode_udp_packet(NAT_IP, ip.dst, port, dport, payload)


@pytest.mark.parametrize("mode", ["routed", "nat"])
def test_key_miss_holds_requests_once_and_releases(mode):
    a, b = engines(mode)
    assert a.outbound("t1", packet(), 0.0) is None
    assert a.outbound("t2", packet(), 0.1) is None
    assert a.take_key_requests(0.1) == [(E.BY_IP, B_IP)]
    assert a.take_key_requests(0.2) == []  # one request at a time, with backoff
    released = a.install_key("b", KEY1, 1, [B_IP], 0.3)
    assert [v.tag for v in released] == ["t1", "t2"] and all(v.payload for v in released)
    # b has no key yet: it holds the sealed packet and asks by the sender's ID.
    assert b.inbound("r1", released[0].payload, 0.4) is None
    assert b.take_key_requests(0.4) == [(E.BY_ID, "a")]
    opened = b.install_key("a", KEY1, 1, [A_IP], 0.5)
    assert [(v.tag, v.payload) for v in opened] == [("r1", packet())]


def test_routed_keeps_the_ip_header_and_hides_the_payload():
    a, b = keyed("routed")
    plain = packet(proto=6)
    sealed = a.outbound("t", plain, 1.0).payload
    ip = W.parse_ipv4(sealed)
    assert ip.protocol == W.L3_IP_PROTOCOL and ip.src == A_IP and ip.dst == B_IP
    assert W.ipv4_checksum(sealed[:20]) == 0 and MARKER not in sealed
    assert len(sealed) == len(plain) + W.overhead("routed", 1)
    assert b.inbound("r", sealed, 1.0).payload == plain


def test_nat_mode_crosses_a_nat_and_the_reply_goes_to_the_learned_endpoint():
    a, b = keyed("nat", udp_port=7789)
    sealed = a.outbound("t", packet(), 1.0).payload
    ip = W.parse_ipv4(sealed)
    assert ip.protocol == W.IPPROTO_UDP and ip.dst == B_IP and W.udp_ports(sealed, 20) == (7789, 7789)
    assert MARKER not in sealed
    assert b.inbound("r", nat(sealed), 1.0).payload == packet()
    assert b.peers["a"].endpoints == {4: (NAT_IP, 40000)}
    reply = b.outbound("t2", packet(src=B_IP, dst=A_IP), 1.1).payload
    assert W.parse_ipv4(reply).dst == NAT_IP and W.udp_ports(reply, 20) == (7789, 40000)
    assert a.inbound("r2", reply, 1.1).payload == packet(src=B_IP, dst=A_IP)


def test_replayed_tampered_and_readdressed_packets_are_refused():
    a, b = keyed("routed")
    sealed = a.outbound("t", packet(), 1.0).payload
    assert b.inbound("r1", sealed, 1.0).payload
    assert b.inbound("r2", sealed, 1.0) == E.Verdict("r2", None, E.REPLAYED)
    s2 = bytearray(a.outbound("t", packet(), 1.0).payload)
    s2[-1] ^= 1
    assert b.inbound("r3", bytes(s2), 1.0).reason == E.BAD_TAG
    # The addresses are authenticated: a packet moved to another source is refused.
    s3 = a.outbound("t", packet(), 1.0).payload
    moved = W.rebuild_ipv4(s3[:12] + W.parse_ip("10.71.0.9") + s3[16:20], W.L3_IP_PROTOCOL, len(s3)) + s3[20:]
    assert b.inbound("r4", moved, 1.0).reason == E.BAD_TAG
    assert b.drops == {E.REPLAYED: 1, E.BAD_TAG: 2}


def test_a_peer_cannot_speak_for_an_address_not_bound_to_it():
    a, b = keyed("nat")
    spoofed = a.outbound("t", packet(src=W.parse_ip("10.71.0.77")), 1.0)
    assert b.inbound("r", spoofed.payload, 1.0).reason == E.SPOOFED_SOURCE


def test_wrong_mode_own_packets_and_garbage():
    a, b = keyed("routed")
    _, bn = keyed("nat")
    routed = a.outbound("t", packet(), 1.0).payload
    hdr = routed[20:]
    as_nat = W.encode_udp_packet(A_IP, B_IP, 7789, 7789, hdr)
    assert bn.inbound("r", as_nat, 1.0).reason == E.WRONG_MODE
    assert a.inbound("r", routed, 1.0).reason == E.OWN_PACKET
    assert b.inbound("r", packet(proto=6), 1.0).reason == E.NOT_L3CRYPT
    assert b.inbound("r", b"\x45" + b"\0" * 5, 1.0).reason == W.TRUNCATED
    assert b.outbound("t", b"junk", 1.0).reason == W.TRUNCATED


def test_unknown_peer_drops_what_is_held_and_stops_asking():
    a, _ = engines()
    a.outbound("t1", packet(), 0.0)
    a.take_key_requests(0.0)
    assert a.mark_unknown((E.BY_IP, B_IP), 0.1) == [E.Verdict("t1", None, E.NO_KEY)]
    assert a.outbound("t2", packet(), 0.2).reason == E.NO_KEY
    assert a.take_key_requests(0.2) == []


def test_held_packets_age_out_with_a_drop_verdict_each():
    a, _ = engines(hold_frames=2, hold_age_s=1.0)
    tags = [f"t{i}" for i in range(3)]
    for i, tag in enumerate(tags):
        assert a.outbound(tag, packet(), 0.1 * i) is None
    assert a.take_late_verdicts() == [E.Verdict("t0", None, E.HOLD_OVERFLOW)]
    assert a.on_timer(0.5) == []
    assert [v.tag for v in a.on_timer(2.0)] == ["t1", "t2"]
    assert a.drops == {E.HOLD_OVERFLOW: 1, E.HOLD_EXPIRED: 2}


def test_directions_use_different_keys():
    a, b = keyed("routed")
    b.send_pn = a.send_pn  # same packet number both ways
    ab = a.outbound("t", packet(), 1.0).payload
    ba = b.outbound("t", packet(src=B_IP, dst=A_IP), 1.0).payload
    assert ab[20 + 18:] != ba[20 + 18:]


def test_rekey_make_before_break_loses_nothing():
    a, b = keyed("routed", switch_after_s=2.0, retire_after_s=5.0)
    a.install_key("b", KEY2, 2, [B_IP], 10.0)  # a got the push first
    old = a.outbound("t", packet(), 10.1).payload  # still pw_id 1 until b is seen with 2
    assert W.decode_l3_header(old, 20).pw_id == 1
    assert b.inbound("r", old, 10.1).payload
    b.install_key("a", KEY2, 2, [A_IP], 10.2)
    new = a.outbound("t", packet(), 12.5).payload  # switch delay passed
    assert W.decode_l3_header(new, 20).pw_id == 2
    assert b.inbound("r", new, 12.5).payload
    late_old = old[:20] + old[20:]
    assert b.inbound("r", late_old, 12.6).reason == E.REPLAYED  # pw 1 still held, replay caught
    for now in (13.0, 20.0, 30.0):
        a.on_timer(now), b.on_timer(now)
    assert b.peers["a"].keys.lookup(1) is None  # retired
    assert not b.drops.keys() - {E.REPLAYED}


def test_newer_version_held_and_requested_race_a():
    a, b = keyed("routed", switch_after_s=0.0)
    a.install_key("b", KEY2, 2, [B_IP], 1.0)
    sealed = a.outbound("t", packet(), 1.1).payload
    assert b.inbound("r", sealed, 1.1) is None  # b lacks pw_id 2: hold and ask
    assert b.take_key_requests(1.1) == [(E.BY_ID, "a")]
    assert b.install_key("a", KEY2, 2, [A_IP], 1.2)[0].payload == packet()


def test_data_volume_rekey_notice():
    a, _ = keyed("routed", rekey_after_frames=16)
    for _ in range(20):
        a.outbound("t", packet(), 1.0)
    assert a.take_notices() == [(E.REKEY, "b", 1)]


def test_revoked_peer_is_forgotten_and_refused():
    a, b = keyed("routed")
    sealed = a.outbound("t", packet(), 1.0).payload
    b.revoke_peer("a")
    assert b.inbound("r", sealed, 1.0).reason == E.REVOKED_SENDER
    assert B_IP not in b.ip_owner and "a" not in b.peers
    assert b.install_key("a", KEY2, 2, [A_IP], 2.0) == []


def test_snapshot_holds_no_key_material():
    a, _ = keyed("nat")
    text = repr(engine_snapshot(a, 1.0))
    assert KEY1.hex() not in text and "endpoint" in text
