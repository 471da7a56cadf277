"""l2crypt.core.l3_engine: IPv6 in both modes, the path MTU (MSS clamp, too-big
answers) and nat keepalives, without I/O.

Two engines (a: 10.71.0.2 and fd71::2, b: 10.72.0.2 and fd72::2) exchange
packets through the test, which plays the kernel and, for nat mode, a NAT.
"""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from l2crypt.core import l3_wire as W
from l2crypt.core import l3_engine as E

A4, B4 = W.parse_ip("10.71.0.2"), W.parse_ip("10.72.0.2")
A6, B6 = W.parse_ip("fd71::2"), W.parse_ip("fd72::2")
NAT6 = W.parse_ip("fd72::1")
KEY = b"\x33" * 32
MARKER = b"L3-V6-MARKER"


def engines(mode, **kw):
    s = E.L3Settings(mode=mode, **kw)
    a = E.L3Engine("a", [A4, A6], s, pn_start=100)
    b = E.L3Engine("b", [B4, B6], s, pn_start=5000)
    a.install_key("b", KEY, 1, [B4, B6], 0.0)
    b.install_key("a", KEY, 1, [A4, A6], 0.0)
    return a, b


def udp6(src="fd71::2", dst="fd72::2", size=40) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=5000, dport=6000) / (MARKER * (size // len(MARKER) + 1))[:size])


def nat6(sealed: bytes, port: int = 41000) -> bytes:
    ip = W.parse_packet(sealed)
    _, dport = W.udp_ports(sealed, ip.header_len)
    return W.encode_udp_packet(NAT6, ip.dst, port, dport, sealed[ip.header_len + W.UDP_LEN:])


@pytest.mark.parametrize("mode", ["routed", "nat"])
def test_ipv6_round_trip_hides_the_payload(mode):
    a, b = engines(mode)
    plain = udp6()
    sealed = a.outbound("t", plain, 1.0).payload
    outer = IPv6(sealed)
    assert MARKER not in sealed and (outer.src, outer.dst) == ("fd71::2", "fd72::2")
    assert outer.nh == (W.L3_IP_PROTOCOL if mode == "routed" else W.IPPROTO_UDP)
    assert len(sealed) == len(plain) + W.overhead(mode, 1, 6)
    assert b.inbound("r", sealed, 1.0).payload == plain
    assert b.drops == {}


def test_ipv6_routed_addresses_are_authenticated():
    a, b = engines("routed")
    sealed = a.outbound("t", udp6(), 1.0).payload
    moved = sealed[:8] + W.parse_ip("fd71::9") + sealed[24:]
    assert b.inbound("r", moved, 1.0).reason == E.BAD_TAG


def test_ipv6_nat_learns_an_endpoint_per_version():
    a, b = engines("nat")
    sealed = a.outbound("t", udp6(), 1.0).payload
    assert b.inbound("r", nat6(sealed), 1.0).payload == udp6()
    assert b.peers["a"].endpoints == {6: (NAT6, 41000)}
    reply = IPv6(b.outbound("t2", udp6("fd72::2", "fd71::2"), 1.1).payload)
    assert (reply.dst, reply[UDP].dport) == ("fd72::1", 41000)
    # IPv4 still goes to the peer's own address until a packet shows another.
    v4 = b.outbound("t3", bytes(IP(src="10.72.0.2", dst="10.71.0.2") / UDP() / b"x"), 1.2).payload
    assert W.parse_packet(v4).dst == A4


def test_nat_inner_version_must_match_the_outer_one():
    a, b = engines("nat")
    sealed = a.outbound("t", udp6(), 1.0).payload
    header_and_body = sealed[40 + 8:]
    as_v4 = W.encode_udp_packet(A4, B4, 7789, 7789, header_and_body)
    assert b.inbound("r", as_v4, 1.0).reason == W.MALFORMED


@pytest.mark.parametrize("mode", ["routed", "nat"])
@pytest.mark.parametrize("version", [4, 6])
def test_a_syn_leaves_and_arrives_with_an_mss_that_fits_once_sealed(mode, version):
    a, b = engines(mode)
    ip = IP(src="10.71.0.2", dst="10.72.0.2") if version == 4 else IPv6(src="fd71::2", dst="fd72::2")
    syn = bytes(ip / TCP(flags="S", options=[("MSS", 1460)]))
    sealed = a.outbound("t", syn, 1.0).payload
    opened = b.inbound("r", sealed, 1.0).payload
    parse = IP if version == 4 else IPv6
    mss = dict(parse(opened)[TCP].options)["MSS"]
    assert mss == 1500 - W.overhead(mode, 1, version) - (20 if version == 4 else 40) - 20
    # A full segment of that MSS (with 12 bytes of timestamps) fits the path once sealed.
    full = bytes(ip / TCP(flags="A", options=[("Timestamp", (1, 2))]) / (b"d" * (mss - 12)))
    assert len(a.outbound("t", full, 1.1).payload) <= 1500
    # A SYN-ACK from a peer that does not clamp (larger path MTU) is clamped on arrival.
    b.max_mss = {4: 65535, 6: 65535}
    back = IP(src="10.72.0.2", dst="10.71.0.2") if version == 4 else IPv6(src="fd72::2", dst="fd71::2")
    synack = bytes(back / TCP(flags="SA", options=[("MSS", 65000)]))
    got = parse(a.inbound("r", b.outbound("t", synack, 1.2).payload, 1.2).payload)
    assert dict(got[TCP].options)["MSS"] == mss
    # a clamped its SYN and the SYN-ACK it got; b nothing (the SYN already fitted).
    assert a.counters["mss_clamped"] == 2 and b.counters["mss_clamped"] == 0


@pytest.mark.parametrize("mode", ["routed", "nat"])
def test_ipv4_with_df_too_big_once_sealed_is_dropped_and_counted_without_an_answer(mode):
    a, _ = engines(mode)
    over = W.overhead(mode, 1, 4)
    ping = bytes(IP(src="10.71.0.2", dst="10.72.0.2", flags="DF") / ICMP() / (b"p" * (1500 - 28)))
    assert a.outbound("t", ping, 1.0) == E.Verdict("t", None, E.TOO_BIG)
    assert a.take_packets_to_send() == []  # an ICMP answer would shrink the route the sealed packets take
    fits = bytes(IP(src="10.71.0.2", dst="10.72.0.2", flags="DF") / ICMP() / (b"p" * (1500 - 28 - over)))
    assert len(a.outbound("t", fits, 1.0).payload) == 1500 and a.drops == {E.TOO_BIG: 1}


def test_ipv4_without_df_is_sealed_and_left_to_fragment():
    a, _ = engines("routed")
    ping = bytes(IP(src="10.71.0.2", dst="10.72.0.2", flags=0) / ICMP() / (b"p" * (1500 - 28)))
    sealed = a.outbound("t", ping, 1.0).payload
    assert len(sealed) == 1500 + W.overhead("routed", 1, 4) and not W.parse_packet(sealed).dont_fragment
    assert a.drops == {}


def test_ipv6_too_big_once_sealed_is_dropped():
    a, _ = engines("nat")
    assert a.outbound("t", udp6(size=1500 - 48), 1.0).reason == E.TOO_BIG
    fits = 1500 - W.overhead("nat", 1, 6) - 48
    assert len(a.outbound("t", udp6(size=fits), 1.0).payload) == 1500


def test_path_mtu_setting_is_honoured():
    a, _ = engines("routed", path_mtu=1400)
    assert a.outbound("t", udp6(size=1400 - 48 - 30), 1.0).reason == E.TOO_BIG
    assert a.max_mss[4] == 1400 - W.overhead("routed", 1, 4) - 40


def test_nat_keepalive_is_sealed_sent_when_idle_and_dropped_at_the_receiver():
    a, b = engines("nat", nat_keepalive_s=5.0)
    plain = bytes(IP(src="10.71.0.2", dst="10.72.0.2") / UDP() / b"hi")
    b.inbound("r", a.outbound("t", plain, 1.0).payload, 1.0)
    a.on_timer(5.9)
    assert a.take_packets_to_send() == []  # the path was used less than 5 s ago
    a.on_timer(6.1)
    [keepalive] = a.take_packets_to_send()
    ip = W.parse_packet(keepalive)
    assert (ip.src, ip.dst, W.udp_ports(keepalive, 20)) == (A4, B4, (7789, 7789))
    header = W.decode_l3_header(keepalive, 28)
    assert len(keepalive) == 28 + header.length + 16  # the header and a tag, nothing else
    assert b.inbound("r", keepalive, 6.2) == E.Verdict("r", None, E.KEEPALIVE)
    assert b.counters["keepalives_received"] == 1 and b.drops == {}
    assert b.inbound("r", keepalive, 6.3).reason == E.REPLAYED  # authenticated and replay-checked
    a.on_timer(8.0)
    assert a.take_packets_to_send() == []  # next one 5 s after the last
    a.on_timer(11.2)
    [second] = a.take_packets_to_send()
    assert a.counters["keepalives_sent"] == 2
    forged = bytearray(second)
    forged[-1] ^= 1
    assert b.inbound("r", bytes(forged), 11.3).reason == E.BAD_TAG


def test_no_keepalives_when_off_or_in_routed_mode():
    for a, _ in (engines("nat", nat_keepalive_s=0.0), engines("routed", nat_keepalive_s=1.0)):
        a.outbound("t", bytes(IP(src="10.71.0.2", dst="10.72.0.2") / UDP() / b"hi"), 1.0)
        a.on_timer(100.0)
        assert a.take_packets_to_send() == []
