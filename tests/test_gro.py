"""Receive coalescing (l2crypt/gro.py): what the host's stack would get from the TAP."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from l2crypt import gro

MACS = dict(dst="02:4c:32:00:00:12", src="02:4c:32:00:00:11")


def seg(seq: int, size: int, flags: str = "A", sport: int = 40000, opts=(("NOP", None), ("NOP", None), ("Timestamp", (7, 9)))):
    payload = bytes((seq + i) & 0xFF for i in range(size))
    pkt = (Ether(**MACS) / IP(src="10.66.0.11", dst="10.66.0.12", flags="DF", id=seq & 0xFFFF)
           / TCP(sport=sport, dport=5201, seq=seq, ack=99, flags=flags, window=500, options=list(opts)) / payload)
    return bytes(pkt)


def merged(vec) -> bytes:
    return b"".join(bytes(p) for p in vec[1:])


def test_a_run_of_full_segments_becomes_one_gso_frame():
    frames = [seg(1000, 1348), seg(2348, 1348), seg(3696, 1348), seg(5044, 500, "PA")]
    out = gro.coalesce(frames)
    assert len(out) == 1
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = gro.VNET_HDR.unpack(out[0][0])
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (gro.F_NEEDS_CSUM, gro.GSO_TCPV4, 1348, 34, 16)
    frame = merged(out[0])
    assert hdr_len == 14 + 20 + 32
    pkt = Ether(frame)
    assert pkt[IP].len == len(frame) - 14
    assert bytes(pkt[TCP].payload) == b"".join(f[hdr_len:] for f in frames)
    assert pkt[TCP].seq == 1000 and pkt[TCP].flags == "PA"
    again = Ether(frame)
    del again[IP].chksum
    assert Ether(bytes(again))[IP].chksum == pkt[IP].chksum  # the IP checksum is right
    # The TCP checksum field holds the pseudo-header sum; completing it gives the real checksum.
    done = Ether(gro.tcp_checksum(frame, 34, 16))
    ref = Ether(frame)
    del ref[TCP].chksum
    assert done[TCP].chksum == Ether(bytes(ref))[TCP].chksum


def test_what_may_not_be_merged_goes_out_alone_and_in_order():
    frames = [
        seg(1000, 1348), seg(2348 + 1, 1348),                 # a gap in the sequence
        seg(5000, 1348), seg(6348, 1348, sport=40001),        # another flow
        seg(7000, 0),                                         # a pure ACK
        bytes(Ether(**MACS) / IP(src="10.66.0.11", dst="10.66.0.12") / UDP() / (b"u" * 100)),
        seg(9000, 700), seg(9700, 800),                       # a bigger segment after a short one
        seg(11000, 1348, "PA"), seg(12348, 1348),             # pushed first segment
    ]
    out = gro.coalesce(frames)
    assert [v[0] for v in out] == [gro.VNET_NONE] * len(frames)
    assert [merged(v) for v in out] == frames


def test_a_run_stops_at_a_push_and_the_rest_starts_anew():
    frames = [seg(1000, 1000), seg(2000, 1000, "PA"), seg(3000, 1000), seg(4000, 1000)]
    out = gro.coalesce(frames)
    assert len(out) == 2
    assert Ether(merged(out[0]))[TCP].seq == 1000 and Ether(merged(out[1]))[TCP].seq == 3000
    assert b"".join(bytes(Ether(merged(v))[TCP].payload) for v in out) == b"".join(f[66:] for f in frames)


def test_runs_are_bounded():
    frames = [seg(1000 + 100 * i, 100) for i in range(gro.MAX_SEGMENTS + 5)]
    out = gro.coalesce(frames)
    assert [len(v) - 2 for v in out] == [gro.MAX_SEGMENTS, 5]
