"""l2crypt.core.l3_wire: round trips, truncation, wrong lengths, checksums."""

import struct

import pytest

from l2crypt.core import l3_wire as W

# A 20-byte IPv4 header from RFC 1071-style worked examples (Wikipedia "IPv4
# header checksum"): its checksum field is 0xb861.
RFC_HEADER = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
RFC_CHECKSUM = 0xB861


def ipv4(proto: int, payload: bytes, src=b"\x0a\x47\x00\x02", dst=b"\x0a\x48\x00\x02", frag=0x4000) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, frag, 64, proto, 0, src, dst)
    return W.rebuild_ipv4(header, proto, 20 + len(payload)) + payload


def test_ipv4_checksum_matches_the_published_example():
    assert W.ipv4_checksum(RFC_HEADER) == RFC_CHECKSUM
    fixed = RFC_HEADER[:10] + RFC_CHECKSUM.to_bytes(2, "big") + RFC_HEADER[12:]
    assert W.ipv4_checksum(fixed) == 0  # a header with a right checksum sums to zero


def test_parse_ipv4_fields():
    p = ipv4(6, b"x" * 30)
    ip = W.parse_ipv4(p)
    assert (ip.header_len, ip.total_len, ip.protocol) == (20, 50, 6)
    assert ip.src == b"\x0a\x47\x00\x02" and ip.dst == b"\x0a\x48\x00\x02"
    assert ip.is_fragment is False  # DF alone is not a fragment
    assert W.parse_ipv4(ipv4(6, b"x", frag=0x2000)).is_fragment  # MF


@pytest.mark.parametrize("packet, reason", [
    (b"", W.TRUNCATED),
    (b"\x45" + b"\0" * 10, W.TRUNCATED),
    (b"\x65" + b"\0" * 19, W.NOT_IP),
    (b"\x44" + b"\0" + (20).to_bytes(2, "big") + b"\0" * 16, W.MALFORMED),  # IHL 4 < 5
])
def test_parse_ipv4_refuses_bad_packets(packet, reason):
    assert W.parse_ipv4(packet) == reason


def test_parse_ipv4_wrong_total_length():
    p = ipv4(6, b"y" * 10)
    assert W.parse_ipv4(p[:-1]) == W.TRUNCATED
    assert W.parse_ipv4(p + b"z") == W.MALFORMED


def test_rebuild_ipv4_gives_a_valid_checksum():
    h = W.rebuild_ipv4(RFC_HEADER, 253, 500)
    assert h[9] == 253 and int.from_bytes(h[2:4], "big") == 500
    assert W.ipv4_checksum(h) == 0


def test_l3_header_round_trip():
    body = b"\xaa" * 16
    header = W.encode_l3_header(W.MODE_NAT, 7, 2**40 + 3, "host-1")
    assert len(header) == W.L3_FIXED_LEN + 6
    got = W.decode_l3_header(b"pre" + header + body, 3)
    assert got == W.L3Header(W.MODE_NAT, W.KEY_ID_PAIR, 7, 2**40 + 3, "host-1", len(header))


def test_l3_header_truncation_and_bad_fields():
    header = W.encode_l3_header(W.MODE_ROUTED, 1, 1, "h1")
    tag = b"\0" * 16
    assert W.decode_l3_header(header[:10]) == W.TRUNCATED
    assert W.decode_l3_header(header + tag[:-1]) == W.TRUNCATED  # no room for the tag
    assert W.decode_l3_header(b"\x02" + header[1:] + tag) == W.UNKNOWN_VERSION
    assert W.decode_l3_header(header[:2] + b"\x09" + header[3:] + tag) == W.UNKNOWN_KEY_ID
    assert W.decode_l3_header(header[:3] + b"\x00" + header[4:] + tag) == W.MALFORMED  # empty ID
    assert W.decode_l3_header(header[:3] + b"\x41" + header[4:] + tag) == W.MALFORMED  # ID > 64
    assert W.decode_l3_header(header[:3] + b"\x05" + header[4:] + tag) == W.TRUNCATED  # ID runs past the end
    assert W.decode_l3_header(header[:-1] + b"\xff" + tag) == W.MALFORMED  # not ASCII


def test_encode_l3_header_refuses_bad_ids():
    with pytest.raises(ValueError):
        W.encode_l3_header(W.MODE_ROUTED, 1, 1, "")
    with pytest.raises(ValueError):
        W.encode_l3_header(W.MODE_ROUTED, 1, 1, "x" * 65)


def test_udp_packet_round_trip():
    p = W.encode_udp_packet(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 7789, 40000, b"payload", ident=9)
    ip = W.parse_ipv4(p)
    assert ip.protocol == W.IPPROTO_UDP and ip.src == b"\x01\x02\x03\x04"
    assert W.ipv4_checksum(p[:20]) == 0
    assert W.udp_ports(p, 20) == (7789, 40000)
    assert p[28:] == b"payload"
    assert W.udp_ports(p[:25], 20) == W.TRUNCATED
    assert W.udp_ports(p + b"x", 20) == W.MALFORMED  # UDP length disagrees


def test_overhead():
    assert W.overhead("routed", 2) == 16 + 2 + 16 + 1
    assert W.overhead("nat", 2) == 16 + 2 + 16 + 20 + 8


def test_parse_ip():
    assert W.parse_ip("10.71.0.2") == b"\x0a\x47\x00\x02"
    assert W.format_ip(b"\x0a\x47\x00\x02") == "10.71.0.2"
    for bad in ("10.71.0", "10.71.0.256", "a.b.c.d", ""):
        with pytest.raises(ValueError):
            W.parse_ip(bad)


# --- IPv6 --------------------------------------------------------------------------

SRC6, DST6 = W.parse_ip("fd71::2"), W.parse_ip("fd72::2")


def ipv6(next_header: int, payload: bytes, src=SRC6, dst=DST6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


def test_parse_ipv6_fields():
    ip = W.parse_ipv6(ipv6(17, b"u" * 12))
    assert (ip.version, ip.header_len, ip.total_len, ip.protocol) == (6, 40, 52, 17)
    assert (ip.src, ip.dst) == (SRC6, DST6)
    assert ip.dont_fragment and not ip.is_fragment  # routers never fragment IPv6
    assert W.parse_ipv6(ipv6(W.IPPROTO_FRAGMENT, b"f" * 8)).is_fragment
    assert W.parse_packet(ipv6(6, b"")) == W.parse_ipv6(ipv6(6, b""))
    assert W.parse_packet(ipv4(6, b"x")).version == 4


@pytest.mark.parametrize("packet, reason", [
    (ipv6(17, b"abcd")[:39], W.TRUNCATED),
    (ipv6(17, b"abcd")[:-1], W.TRUNCATED),
    (ipv6(17, b"abcd") + b"!", W.MALFORMED),
    (ipv6(0, b""), W.MALFORMED),  # payload length 0 with hop-by-hop first: a jumbogram
    (b"\x50" + b"\0" * 39, W.NOT_IP),
    (b"", W.TRUNCATED),
])
def test_parse_packet_refuses_bad_ipv6(packet, reason):
    assert W.parse_packet(packet) == reason


def test_rebuild_ipv6_sets_payload_length_and_next_header():
    h = W.rebuild_ip(ipv6(6, b"")[:40], 6, 253, 140)
    assert h[6] == 253 and int.from_bytes(h[4:6], "big") == 100 and h[8:40] == SRC6 + DST6


def test_ipv6_udp_packet_carries_the_checksum_scapy_computes():
    from scapy.layers.inet6 import IPv6
    from scapy.layers.inet import UDP

    p = W.encode_udp_packet(SRC6, DST6, 7789, 40000, b"sealed-payload")
    ip = W.parse_packet(p)
    assert (ip.version, ip.protocol) == (6, W.IPPROTO_UDP) and W.udp_ports(p, 40) == (7789, 40000)
    theirs = IPv6(src="fd71::2", dst="fd72::2", hlim=64) / UDP(sport=7789, dport=40000) / b"sealed-payload"
    assert p == bytes(theirs)


def test_internet_checksum_odd_length_and_initial_sum():
    # RFC 1071 section 3's worked example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert W.internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert W.internet_checksum(b"\x01") == ~0x0100 & 0xFFFF
    assert W.internet_checksum(b"\x00\x01", initial=0x0001) == ~0x0002 & 0xFFFF


def test_overhead_by_version():
    assert W.overhead("routed", 2, 6) == W.overhead("routed", 2, 4) == 35
    assert W.overhead("nat", 2, 6) == 16 + 2 + 16 + 40 + 8


def test_ipv6_addresses_as_text():
    assert W.format_ip(SRC6) == "fd71::2" and len(SRC6) == 16
    with pytest.raises(ValueError):
        W.parse_ip("fd71::2::3")
