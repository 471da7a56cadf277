"""l2crypt.l3_wire: round trips, truncation, wrong lengths, checksums."""

import struct

import pytest

from l2crypt import l3_wire as W

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
    (b"\x65" + b"\0" * 19, W.NOT_IPV4),
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
