"""The coalescer: batches of segments built with scapy; each table row names
which segments must come out joined, and every super-frame must equal the
scapy frame of its joined payload, apart from the TCP checksum field, which
must complete (scapy's RFC 1071 sum) to scapy's checksum."""

import pytest
from scapy.layers.l2 import ARP, Ether

from l2crypt.core import gro, gso
from l2crypt.core.vnet_hdr import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, ZERO_VNET_HDR, VnetHdr
from tcp_frames import Tcp, completes_to, udp_frame, with_partial_checksum

MSS = 1000
DATA = bytes(range(251)) * 400


def segments(first: Tcp, sizes, flags=None, **per_segment) -> list[Tcp]:
    """Consecutive segments of one flow: payload sizes, flags per index."""
    out, seq, offset = [], first.seq, 0
    for index, size in enumerate(sizes):
        fields = {"payload": DATA[offset:offset + size], "seq": seq, "ip_id": first.ip_id + index,
                  "flags": (flags or {}).get(index, first.flags)}
        fields.update({key: value[index] for key, value in per_segment.items()})
        out.append(first.with_(**fields))
        seq, offset = seq + size, offset + size
    return out


def coalesce(frames, partial=False):
    coalescer = gro.Coalescer()
    for frame in frames:
        coalescer.add(frame, partial)
    return coalescer.flush(), coalescer


def joined(run: list[Tcp]) -> Tcp:
    """The segment scapy builds for a whole run: the first's fields, every
    payload, FIN/PSH of the last."""
    ends = "".join(f for f in "FP" if f in run[-1].flags)
    flags = run[0].flags + "".join(f for f in ends if f not in run[0].flags)
    return run[0].with_(payload=b"".join(s.payload for s in run), flags=flags)


def assert_super_frame(out, run: list[Tcp]):
    hdr, frame = out
    want = joined(run)
    wanted = want.frame()
    l4, payload_offset = want.offsets()
    field = slice(l4 + 16, l4 + 18)
    assert frame[:field.start] + frame[field.stop:] == wanted[:field.start] + wanted[field.stop:]
    assert completes_to(frame[l4:], int.from_bytes(wanted[field], "big"))
    gso_type = (GSO_TCPV4 if want.version == 4 else GSO_TCPV6) | (GSO_ECN if "C" in run[0].flags else 0)
    assert hdr == VnetHdr(NEEDS_CSUM, gso_type, payload_offset, len(run[0].payload), l4, 16)


A = Tcp(flags="A")
B = Tcp(flags="A", sport=40001, seq=9_000_000, ip_id=4000)

# name: (segments in arrival order, the runs that must come out, as index lists)
TABLE = {
    "ipv4 last short, PSH": (segments(A.with_(flags="A"), [MSS] * 3 + [300], {3: "PA"}), [[0, 1, 2, 3]]),
    "ipv6 equal sizes": (segments(Tcp(version=6, options=[]), [MSS] * 4), [[0, 1, 2, 3]]),
    "PSH in the middle ends the run": (segments(A, [MSS] * 5, {1: "PA"}), [[0, 1], [2, 3, 4]]),
    "FIN joins last": (segments(A, [MSS] * 3, {2: "FA"}), [[0, 1, 2]]),
    "short in the middle ends the run": (segments(A, [MSS, 400, MSS, MSS]), [[0, 1], [2, 3]]),
    "longer than the first does not join": (segments(A, [400, MSS]), [[0], [1]]),
    "SYN alone": (segments(A, [MSS] * 3, {0: "S"}), [[0], [1, 2]]),
    "RST alone": (segments(A, [MSS] * 4, {2: "RA"}), [[0, 1], [2], [3]]),
    "URG alone": (segments(A, [MSS] * 5, {2: "UA"}, urgptr=[0, 0, 3, 0, 0]), [[0, 1], [2], [3, 4]]),
    "CWR first joins, ECN type": (segments(A, [MSS] * 3, {0: "CEA", 1: "EA", 2: "EA"}), [[0, 1, 2]]),
    "CWR in the middle starts a run": (segments(A, [MSS] * 4, {2: "CA"}), [[0, 1], [2, 3]]),
    "ECE differs": (segments(A, [MSS] * 2, {1: "EA"}), [[0], [1]]),
    "ipv6 CWR/ECE": (segments(Tcp(version=6), [MSS] * 3, {0: "CEA", 1: "EA", 2: "EPA"}), [[0, 1, 2]]),
    "timestamps differ": (segments(A, [MSS] * 2, options=[[("Timestamp", (1, 2))], [("Timestamp", (2, 2))]]),
                          [[0], [1]]),
    "ack differs": (segments(A, [MSS] * 2, ack=[77, 78]), [[0], [1]]),
    "window differs": (segments(A, [MSS] * 2, window=[502, 503]), [[0], [1]]),
    "IP ID not consecutive": (segments(A, [MSS] * 2, ip_id=[100, 105]), [[0], [1]]),
    "IPv4 options not joined": (segments(A.with_(ip_options=True), [MSS] * 2), [[0], [1]]),
    "802.1Q tagged flow": (segments(A.with_(vlan=7), [MSS] * 3), [[0, 1, 2]]),
}


def test_table_covers_the_kinds():
    assert len(TABLE) >= 15


@pytest.mark.parametrize("name", TABLE)
def test_table(name):
    segs, runs = TABLE[name]
    out, coalescer = coalesce([s.frame() for s in segs])
    assert len(out) == len(runs)
    for got, run in zip(out, runs):
        if len(run) == 1:
            assert got == (ZERO_VNET_HDR, segs[run[0]].frame())
        else:
            assert_super_frame(got, [segs[i] for i in run])
    assert coalescer.super_frames == sum(len(r) > 1 for r in runs)
    assert coalescer.segments_joined == sum(len(r) for r in runs if len(r) > 1)


def test_out_of_order_segments_pass_as_they_are():
    segs = segments(A, [MSS] * 5)
    order = [0, 2, 1, 3, 4]
    out, _ = coalesce([segs[i].frame() for i in order])
    assert out[:3] == [(ZERO_VNET_HDR, segs[i].frame()) for i in (0, 2, 1)]
    assert_super_frame(out[3], segs[3:5])  # in order again: joined


def test_two_flows_interleaved():
    a, b = segments(A, [MSS] * 3), segments(B, [MSS] * 3 + [10])
    arrival = [a[0], b[0], a[1], b[1], a[2], b[2], b[3]]
    out, coalescer = coalesce([s.frame() for s in arrival])
    assert len(out) == 2 and coalescer.super_frames == 2
    assert_super_frame(out[0], a)
    assert_super_frame(out[1], b)


def test_other_frames_pass_untouched_in_place():
    segs = segments(A, [MSS] * 4)
    udp, arp = udp_frame(), bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.13.0.2"))
    pure_ack = A.with_(payload=b"", seq=segs[2].seq).frame()
    batch = [segs[0].frame(), udp, segs[1].frame(), arp, pure_ack, segs[2].frame(), segs[3].frame()]
    out, _ = coalesce(batch)
    assert_super_frame(out[0], segs[:2])
    assert out[1] == (ZERO_VNET_HDR, udp) and out[1][1] is udp
    assert out[2] == (ZERO_VNET_HDR, arp) and out[3] == (ZERO_VNET_HDR, pure_ack)  # ACK ended the run
    assert_super_frame(out[4], segs[2:])


def test_super_frame_stays_within_64_kb():
    segs = segments(A, [1400] * 50)
    out, _ = coalesce([s.frame() for s in segs])
    assert len(out) == 2
    first_ip_len = len(out[0][1]) - 14
    assert 65535 - 1400 < first_ip_len <= 65535
    count = (65535 - 52) // 1400
    assert_super_frame(out[0], segs[:count])
    assert_super_frame(out[1], segs[count:])


def test_partial_checksums_join_and_singles_get_needs_csum():
    sf = Tcp(payload=DATA[:2 * MSS + 100], flags="PA")
    parts = gso.segment(sf.frame(), sf.vnet(MSS), 1500, csum=False)
    assert parts.csum_partial
    lone = Tcp(sport=1, payload=b"lone", flags="PA")
    l4, payload_offset = lone.offsets()
    lone_partial = with_partial_checksum(lone.frame(), l4, 16)
    udp = udp_frame()
    udp_partial = with_partial_checksum(udp, 34, 6)
    out, coalescer = coalesce([*parts.frames, lone_partial, udp_partial], partial=True)
    assert_super_frame(out[0], segments(Tcp(flags="A"), [MSS, MSS, 100], {2: "PA"}))
    assert out[1] == (VnetHdr(NEEDS_CSUM, GSO_NONE, l4 + 18, 0, l4, 16), lone_partial)
    assert out[2] == (VnetHdr(NEEDS_CSUM, GSO_NONE, 34 + 8, 0, 34, 6), udp_partial)
    assert coalescer.csum_unresolved == 0


def test_malformed_and_unresolved_are_counted_and_passed():
    good = segments(A, [MSS] * 2)
    truncated = good[0].with_(sport=2).frame()[:-5]  # IP total length beyond the buffer
    arp = bytes(Ether() / ARP())
    coalescer = gro.Coalescer()
    for frame in (truncated, good[0].frame(), None, good[1].frame()):
        coalescer.add(frame)
    coalescer.add(arp, csum_partial=True)  # partial, but no checksum to find
    out = coalescer.flush()
    assert out[0] == (ZERO_VNET_HDR, truncated)
    assert_super_frame(out[1], good)
    assert out[2] == (ZERO_VNET_HDR, None) and out[3] == (ZERO_VNET_HDR, arp)
    assert (coalescer.malformed, coalescer.csum_unresolved, coalescer.super_frames) == (2, 1, 1)


def test_flush_ends_the_batch():
    segs = segments(A, [MSS] * 4)
    coalescer = gro.Coalescer()
    coalescer.add(segs[0].frame())
    coalescer.add(segs[1].frame())
    assert_super_frame(coalescer.flush()[0], segs[:2])
    assert coalescer.flush() == []
    coalescer.add(segs[2].frame())  # a new batch: does not join the flushed run
    coalescer.add(segs[3].frame())
    assert_super_frame(coalescer.flush()[0], segs[2:])
