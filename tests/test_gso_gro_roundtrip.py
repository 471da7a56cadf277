"""Segment, then coalesce: the receiver gets back the sender's stream bytes
and flags (super-frames built with scapy; ``gso`` output fed to ``gro``)."""

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from l2crypt.core import gro, gso
from l2crypt.core.vnet_hdr import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, ZERO_VNET_HDR
from tcp_frames import TIMESTAMPS, Tcp, completes_to

ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STREAM = bytes(range(253)) * 300
FIN, PSH, ACK, ECE, CWR = 0x01, 0x08, 0x10, 0x40, 0x80

super_frames = st.fixed_dictionaries({
    "version": st.sampled_from([4, 6]),
    "options": st.sampled_from([[], TIMESTAMPS]),
    "vlan": st.sampled_from([None, 5]),
    "seq": st.integers(0, 2**32 - 1),
    "ip_id": st.integers(0, 0xFFFF),
})
extra_flags = st.sets(st.sampled_from("FPCE")).map("".join)


def roundtrip(frames_and_vnets, mtu, csum):
    coalescer = gro.Coalescer()
    for frame, vnet in frames_and_vnets:
        result = gso.segment(frame, vnet, mtu, csum)
        assert not isinstance(result, str), result
        assert result.csum_partial == (not csum)
        for segment in result.frames:
            coalescer.add(segment, result.csum_partial)
    return coalescer.flush()


@ROUND_TRIP
@given(super_frames, extra_flags, st.integers(1, 20000), st.integers(64, 2000), st.integers(400, 9000), st.booleans())
def test_one_super_frame_comes_back_whole(fields, flags, length, gso_size, mtu, csum):
    sf = Tcp(payload=STREAM[:length], flags=flags + "A", **fields)
    l4, payload_offset = sf.offsets()
    original = sf.frame()
    out = roundtrip([(original, sf.vnet(gso_size))], mtu, csum)
    assert len(out) == 1
    hdr, frame = out[0]
    field = slice(l4 + 16, l4 + 18)
    assert frame[:field.start] + frame[field.stop:] == original[:field.start] + original[field.stop:]
    real_checksum = int.from_bytes(original[field], "big")
    mss = min(gso_size, mtu - (payload_offset - l4) - (l4 - (18 if sf.vlan else 14)))
    if length > mss:
        event("joined")
        gso_type = (GSO_TCPV4 if sf.version == 4 else GSO_TCPV6) | (GSO_ECN if "C" in flags else 0)
        assert hdr == (NEEDS_CSUM, gso_type, payload_offset, mss, l4, 16, 0)
        assert completes_to(frame[l4:], real_checksum)
    elif csum:
        event("one segment, checksum computed")
        assert hdr == ZERO_VNET_HDR and frame == original
    else:
        event("one segment, checksum left partial")
        assert hdr == (NEEDS_CSUM, GSO_NONE, l4 + 18, 0, l4, 16, 0)
        assert completes_to(frame[l4:], real_checksum)


@ROUND_TRIP
@given(super_frames, st.lists(st.tuples(st.integers(1, 6000), extra_flags), min_size=1, max_size=3),
       st.integers(200, 1500), st.booleans())
def test_a_stream_of_super_frames_keeps_bytes_and_flag_positions(fields, parts, gso_size, csum):
    first = Tcp(**fields)
    sent, position, ip_id = [], 0, first.ip_id
    for index, (length, flags) in enumerate(parts):
        if index < len(parts) - 1:
            flags = flags.replace("F", "")  # FIN only at the end of the stream
        sf = first.with_(payload=STREAM[position:position + length], seq=first.seq + position,
                         ip_id=ip_id & 0xFFFF, flags=flags + "A")
        count = max(1, -(-length // gso_size))
        sent.append((position, position + length, sf, count))
        position, ip_id = position + length, ip_id + count
    out = roundtrip([(sf.frame(), sf.vnet(gso_size)) for _, _, sf, _ in sent], 9000, csum)
    event(f"{len(sent)} super-frames -> {len(out)} frames")

    l4, payload_offset = first.offsets()
    received, starts, ends = b"", {}, {}
    for hdr, frame in out:
        seq = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
        start = (seq - first.seq) % 2**32
        assert start == len(received)  # in order, nothing lost or repeated
        received += frame[payload_offset:]
        starts[start], ends[len(received)] = frame[l4 + 13], frame[l4 + 13]
    assert received == STREAM[:position]

    for start, end, sf, _ in sent:
        assert ("P" in sf.flags) == bool(ends.get(end, 0) & PSH)
        assert ("F" in sf.flags) == bool(ends.get(end, 0) & FIN)
        assert ("C" in sf.flags) == bool(starts.get(start, 0) & CWR)
    for start, flags in starts.items():
        covering = next(sf for s, e, sf, _ in sent if s <= start < e)
        assert bool(flags & ECE) == ("E" in covering.flags)
        assert flags & ACK
    inner = [f for s, f in starts.items() if all(s != start for start, _, _, _ in sent)]
    assert not any(f & CWR for f in inner)
    assert not any(f & (PSH | FIN) for e, f in ends.items() if all(e != end for _, end, _, _ in sent))
