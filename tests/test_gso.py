"""The segmenter: each case builds a super-frame with scapy, and the segments
``gso`` makes must equal byte for byte the segments scapy builds from the
same fields (scapy computes the lengths and both checksums)."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.utils import checksum

from l2crypt.core import gso
from l2crypt.core.vnet_hdr import GSO_NONE, GSO_TCPV6, GSO_UDP, GSO_UDP_L4, NEEDS_CSUM, VnetHdr
from tcp_frames import Tcp, completes_to, udp_frame, with_partial_checksum

STREAM = bytes(range(256)) * 40  # 10,240 bytes with no two equal neighbours


def expected_segments(sf: Tcp, mss: int) -> list[bytes]:
    """What the kernel would send: scapy frames of each chunk, flags split."""
    chunks = [sf.payload[i:i + mss] for i in range(0, len(sf.payload), mss)] or [b""]
    out = []
    for index, chunk in enumerate(chunks):
        flags = sf.flags
        if index:
            flags = flags.replace("C", "")
        if index < len(chunks) - 1:
            flags = flags.replace("F", "").replace("P", "")
        out.append(sf.with_(payload=chunk, seq=sf.seq + index * mss, ip_id=(sf.ip_id + index) & 0xFFFF,
                            flags=flags).frame())
    return out


CASES = {
    "ipv4 timestamps last short": (Tcp(payload=STREAM[:5000], flags="PA"), 1448, 1500),
    "ipv6 no options equal sizes": (Tcp(version=6, payload=STREAM[:3 * 1420], options=[]), 1420, 1500),
    "ipv4 FIN and PSH on the last only": (Tcp(payload=STREAM[:4000], flags="FPA"), 1000, 1500),
    "ipv6 CWR on the first only, ECE on all": (Tcp(version=6, payload=STREAM, flags="CEA"), 1388, 1500),
    "ipv4 URG copied as the kernel does": (Tcp(payload=STREAM[:3000], flags="UA", urgptr=10), 1448, 1500),
    "ipv4 802.1Q tag in every segment": (Tcp(payload=STREAM[:3000], vlan=42, flags="PA"), 1448, 1500),
    "ipv4 with IP options": (Tcp(payload=STREAM[:3000], ip_options=True), 1400, 1500),
    "ipv6 hop-by-hop header": (Tcp(version=6, payload=STREAM[:3000], hop_by_hop=True), 1400, 1500),
    "gso_size over the MTU lowers the MSS": (Tcp(payload=STREAM[:5000]), 1448, 1414),
    "odd MSS": (Tcp(payload=STREAM[:3001]), 999, 1500),
    "one segment only": (Tcp(payload=STREAM[:500], flags="FPA"), 1448, 1500),
    "no payload": (Tcp(payload=b"", flags="FA"), 1448, 1500),
    "sequence and IP ID wrap": (Tcp(payload=STREAM[:5000], seq=0xFFFFF000, ip_id=0xFFFE), 1448, 1500),
    "64 KB super-frame": (Tcp(payload=(STREAM * 7)[:65483]), 1362, 1414),
}


@pytest.mark.parametrize("name", CASES)
def test_segments_match_scapy(name):
    sf, gso_size, mtu = CASES[name]
    _, payload_offset = sf.offsets()
    header_len = payload_offset - (18 if sf.vlan is not None else 14)
    mss = min(gso_size, mtu - header_len)
    result = gso.segment(sf.frame(), sf.vnet(gso_size), mtu)
    assert not isinstance(result, str), result
    assert result.csum_partial is False
    assert result.frames == expected_segments(sf, mss)
    assert all(len(f) - (18 if sf.vlan is not None else 14) <= mtu for f in result.frames)


@pytest.mark.parametrize("name", ["ipv4 timestamps last short", "ipv6 CWR on the first only, ECE on all",
                                  "ipv4 802.1Q tag in every segment", "odd MSS"])
def test_partial_mode_leaves_the_pseudo_header_sum(name):
    sf, gso_size, mtu = CASES[name]
    tcp_offset = sf.offsets()[0]
    result = gso.segment(sf.frame(), sf.vnet(gso_size), mtu, csum=False)
    assert result.csum_partial is True
    expected = expected_segments(sf, gso_size)
    assert len(result.frames) == len(expected) > 1
    for got, want in zip(result.frames, expected):
        field = slice(tcp_offset + 16, tcp_offset + 18)
        assert got[:field.start] + got[field.stop:] == want[:field.start] + want[field.stop:]
        assert got[field] != want[field]
        assert completes_to(got[tcp_offset:], int.from_bytes(want[field], "big"))


def test_flags_table():
    sf = Tcp(payload=STREAM[:4000], flags="FPUCEA", urgptr=5)
    frames = gso.segment(sf.frame(), sf.vnet(1000), 1500).frames
    flags = [f[sf.offsets()[0] + 13] for f in frames]
    assert flags == [0x80 | 0x40 | 0x20 | 0x10] + [0x40 | 0x20 | 0x10] * 2 + [0x40 | 0x20 | 0x10 | 0x08 | 0x01]


def test_udp_and_plain_frames_pass_untouched():
    frame = udp_frame()
    result = gso.segment(frame, VnetHdr(), 1500)
    assert result.frames[0] is frame and result.csum_partial is False
    tcp = Tcp(payload=b"x" * 3000).frame()  # GSO_NONE: even an oversized TCP frame is not cut
    assert gso.segment(tcp, VnetHdr(), 1500).frames == [tcp]


@pytest.mark.parametrize("version, kind", [(4, "udp"), (6, "udp"), (4, "tcp"), (6, "tcp")])
def test_needs_csum_without_gso_is_completed_or_left(version, kind):
    if kind == "udp":
        finished = udp_frame(version)
        l4, field = len(finished) - 8 - len(b"udp payload"), 6
    else:
        sf = Tcp(version=version, payload=b"hello", flags="PA")
        finished, (l4, _), field = sf.frame(), sf.offsets(), 16
    partial = with_partial_checksum(finished, l4, field)
    assert partial != finished
    vnet = VnetHdr(NEEDS_CSUM, GSO_NONE, l4 + field + 2, 0, l4, field)
    assert gso.segment(partial, vnet, 1500).frames == [finished]
    left = gso.segment(partial, vnet, 1500, csum=False)
    assert left.frames == [partial] and left.csum_partial is True


def test_needs_csum_the_receiver_cannot_find_is_completed_even_in_partial_mode():
    finished = bytes(Ether() / IP(src="10.13.0.1", dst="10.13.0.2") / ICMP(id=7, seq=1) / b"ping")
    zeroed = finished[:36] + b"\0\0" + finished[38:]  # ICMP: no pseudo-header, so the field starts at 0
    result = gso.segment(zeroed, VnetHdr(NEEDS_CSUM, GSO_NONE, 38, 0, 34, 2), 1500, csum=False)
    assert result.frames == [finished] and result.csum_partial is False
    assert checksum(finished[34:]) == 0


def _malformed_cases():
    sf = Tcp(payload=STREAM[:3000])
    good, vnet = sf.frame(), sf.vnet(1448)
    six = Tcp(version=6, payload=STREAM[:3000])
    ipv4_mf = bytearray(good)
    ipv4_mf[20] |= 0x20
    bad_doff = bytearray(good)
    bad_doff[14 + 20 + 12] = 0x40
    huge_doff = bytearray(Tcp(payload=b"", options=[]).frame())
    huge_doff[14 + 20 + 12] = 0xF0
    routing = bytearray(six.frame())
    routing[14 + 6] = 43
    return {
        "unknown gso_type": (good, vnet._replace(gso_type=2), "gso_malformed"),
        "UDP_L4 (USO) not turned on": (good, vnet._replace(gso_type=GSO_UDP_L4), "gso_unsupported"),
        "UFO not turned on": (good, vnet._replace(gso_type=GSO_UDP), "gso_unsupported"),
        "gso_size 0": (good, vnet._replace(gso_size=0), "gso_malformed"),
        "TCPV4 on an IPv6 frame": (six.frame(), vnet, "gso_malformed"),
        "TCPV6 on an IPv4 frame": (good, vnet._replace(gso_type=GSO_TCPV6), "gso_malformed"),
        "TCPV4 on UDP": (udp_frame(), vnet._replace(hdr_len=20), "gso_malformed"),
        "IP length beyond the buffer": (good[:-1], vnet, "gso_malformed"),
        "IPv6 length beyond the buffer": (six.frame()[:-1], six.vnet(1448), "gso_malformed"),
        "hdr_len beyond the buffer": (good[:60], vnet._replace(hdr_len=61), "gso_malformed"),
        "TCP data offset below 5": (bytes(bad_doff), vnet, "gso_malformed"),
        "TCP header beyond the packet": (bytes(huge_doff), vnet, "gso_malformed"),
        "shorter than Ethernet": (good[:10], vnet._replace(hdr_len=0), "gso_malformed"),
        "csum_start not at TCP": (good, vnet._replace(csum_start=30), "gso_malformed"),
        "csum_offset not TCP's": (good, vnet._replace(csum_offset=6), "gso_malformed"),
        "IPv4 fragment": (bytes(ipv4_mf), vnet, "gso_malformed"),
        "IPv6 routing header": (bytes(routing), six.vnet(1448), "gso_unsupported"),
        "MTU smaller than the headers": (good, vnet, "gso_mtu_too_small"),
        "NEEDS_CSUM field beyond the frame": (udp_frame(), VnetHdr(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 100),
                                              "gso_malformed"),
        "not bytes at all": (None, vnet, "gso_malformed"),
    }


MALFORMED = _malformed_cases()


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_is_a_drop_reason(name):
    frame, vnet, reason = MALFORMED[name]
    mtu = 40 if reason == "gso_mtu_too_small" else 1500
    assert gso.segment(frame, vnet, mtu) == reason


FUZZ_BASES = [Tcp(version=v, payload=STREAM[:n]) for v in (4, 6) for n in (0, 1, 1447, 3000)]
FUZZ_FRAMES = [(sf.frame(), sf.offsets()[1], sf.vnet(0)) for sf in FUZZ_BASES]  # built once: scapy is slow


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_super_frames_never_raise(data):
    original, header_len, vnet = data.draw(st.sampled_from(FUZZ_FRAMES))
    frame = bytearray(original)
    for _ in range(data.draw(st.integers(0, 2))):  # mutate the headers, where the parsing is
        frame[data.draw(st.integers(0, header_len - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[:data.draw(st.integers(0, len(frame)))]
    vnet = vnet._replace(gso_size=data.draw(st.integers(0, 2000)))
    result = gso.segment(bytes(frame), vnet, data.draw(st.integers(0, 9000)), data.draw(st.booleans()))
    if isinstance(result, str):
        event(f"dropped: {result}")
        assert result in ("gso_malformed", "gso_unsupported", "gso_mtu_too_small")
    else:
        event("segmented")
        assert result.frames and all(isinstance(f, bytes) for f in result.frames)
