"""l2crypt.core.l3_pmtu: MSS clamping, checked against scapy's parsers."""

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from l2crypt.core import l3_wire as W
from l2crypt.core import l3_pmtu as P


def syn(version: int, mss: int | None = 1460, flags="S", options=None) -> bytes:
    opts = options if options is not None else ([("MSS", mss), ("SAckOK", b""), ("NOP", None), ("WScale", 7)]
                                                 if mss is not None else [])
    tcp = TCP(sport=40000, dport=5201, flags=flags, seq=7, options=opts)
    ip = IP(src="10.71.0.2", dst="10.72.0.2") if version == 4 else IPv6(src="fd71::2", dst="fd72::2")
    return bytes(ip / tcp)


def parsed(version: int, data: bytes):
    return IP(data) if version == 4 else IPv6(data)


def tcp_checksum_ok(version: int, data: bytes) -> bool:
    pkt = parsed(version, data)
    sent = pkt[TCP].chksum
    del pkt[TCP].chksum
    return parsed(version, bytes(pkt))[TCP].chksum == sent


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("flags", ["S", "SA"])
def test_a_syn_gets_the_mss_that_fits_and_a_valid_checksum(version, flags):
    p = syn(version, 1460, flags)
    out = P.clamp_mss(p, W.parse_packet(p), 1390)
    assert dict(parsed(version, out)[TCP].options)["MSS"] == 1390
    assert tcp_checksum_ok(version, out) and len(out) == len(p)
    assert dict(parsed(version, out)[TCP].options)["WScale"] == 7  # other options untouched


@pytest.mark.parametrize("packet", [
    syn(4, 1200),                       # already small enough
    syn(4, None),                       # no MSS option
    syn(4, 1460, flags="A"),            # not a SYN
    bytes(IP(src="10.71.0.2", dst="10.72.0.2") / (b"x" * 40)),  # not TCP
    syn(4)[:32] + b"\xf0" + syn(4)[33:],  # a data offset past the end of the packet
    syn(4, options=[("NOP", None), ("Timestamp", (1, 2)), ("MSS", 1460)])[:-2],  # MSS cut short
])
def test_other_packets_pass_unchanged(packet):
    if W.parse_packet(packet) == W.TRUNCATED:  # cut by the test: fix the IP length only
        packet = W.rebuild_ipv4(packet[:20], 6, len(packet)) + packet[20:]
    assert P.clamp_mss(packet, W.parse_packet(packet), 1390) is packet


def test_mss_option_after_nops_at_an_odd_offset():
    p = syn(4, options=[("NOP", None), ("MSS", 1460), ("NOP", None), ("NOP", None), ("NOP", None)])
    out = P.clamp_mss(p, W.parse_packet(p), 1000)
    assert dict(IP(out)[TCP].options)["MSS"] == 1000 and tcp_checksum_ok(4, out)


def test_max_mss():
    assert P.max_mss(1500, 35, 4) == 1500 - 35 - 20 - 20
    assert P.max_mss(1500, 82, 6) == 1500 - 82 - 40 - 20
