"""The gateway's plain port with ``datapath = "batched"`` (issue 13.6), over in-memory ports:

    p1 --GRO super-frame--> [plain: VnetChannelPort] gA [enc: ChannelPort] --sealed segments--> h1
    h1 --sealed segments--> [enc] gA [plain] --one GSO super-frame (NEEDS_CSUM)--> p1

A real ``daemon.Gateway`` (its ``_on_plain``/``_on_enc`` and ``_flush``) on a real core,
real engines and the real gso/gro; the frames are built by scapy (``tcp_frames``)."""

import asyncio

import pytest

from gateway import core as C
from l2crypt.core import gso
from l2crypt.core.gro import Coalescer
from l2crypt.core.vnet_hdr import GSO_TCPV4, NEEDS_CSUM, decode_vnet_hdr, encode_vnet_hdr
from l2crypt.io.fakes import ChannelPort, VnetChannelPort
from tcp_frames import Tcp
from test_gateway_core import GA, H1, MCAST_A, P1, arp, gateway, host, pair_key, serve_keys
from test_gateway_operations import real_gateway
from test_tap_path import checksum_ok

MARKER = b"gw-batched-mark!"
ENC_MTU = 1500


def between(dst: bytes, src: bytes, tcp: Tcp) -> bytes:
    return dst + src + tcp.frame()[12:]


@pytest.fixture
def gw_h1(tmp_path):
    """gA (p1 mapped behind its plain port, keys with h1 in place) in a real Gateway whose
    plain port is a vnet port on the batched path; and h1's engine."""
    h1, core = host(H1), gateway(GA)
    core.install_multicast_key(MCAST_A, 1, 0.0)
    core.from_plain(arp(P1), 0.1)
    core.on_mapped(P1, C.PLAIN, 0.2)
    assert h1.seal_from_tap(between(P1, H1, Tcp()), 1.0) is None  # held: h1 asks for KEY(h1, gA)
    first = h1.install_pair_key(P1, "gA", pair_key("h1", "gA"), 1, 1.0).to_wire
    core.from_encrypted(first[0], 1.1)
    serve_keys(core, "gA", {H1: "h1"}, 1.2)  # gA's engine for p1 holds KEY(h1, gA) now
    gw = real_gateway(tmp_path, core)
    gw._loop = asyncio.new_event_loop()
    gw.enc, gw.plain, gw.enc_max_frame = ChannelPort("eth0"), VnetChannelPort("plain0"), 14 + ENC_MTU
    gw.datapath, gw.datapath_reason, gw.coalescer = "batched", "", Coalescer()
    yield gw, h1
    gw.tunnel.close()
    gw._loop.close()


def test_a_gro_super_frame_from_the_plain_side_leaves_as_sealed_segments(gw_h1):
    gw, h1 = gw_h1
    sf = Tcp(payload=MARKER * 600, flags="PA")  # 9600 bytes, as GRO hands it over
    gw.plain.inbox.append(encode_vnet_hdr(sf.vnet(1448)) + between(H1, P1, sf))
    gw._on_plain()
    sealed = list(gw.enc.outbox)
    mss = ENC_MTU - 32 - (sf.offsets()[1] - 14)
    assert len(sealed) == -(-len(sf.payload) // mss) > 1
    assert all(len(f) <= 14 + ENC_MTU and MARKER not in f for f in sealed)
    opened = [h1.open_from_wire(f, 2.0) for f in sealed]
    assert all(opened) and all(checksum_ok(f) for f in opened)  # h1 (no offloads) gets finished segments
    assert b"".join(f[sf.offsets()[1]:] for f in opened) == sf.payload
    assert gw.core.counters["super_frames_read"] == 1 and gw.core.counters["segments_cut"] == len(sealed)


def test_segments_to_the_plain_side_leave_as_one_gso_super_frame_with_correct_checksums(gw_h1):
    gw, h1 = gw_h1
    segments = [Tcp(seq=5000 + 1400 * i, ip_id=300 + i, payload=bytes([65 + i]) * 1400) for i in range(8)]
    gw.enc.inbox.extend(h1.seal_from_tap(between(P1, H1, s), 2.0) for s in segments)
    gw._on_enc()
    assert len(gw.plain.outbox) == 1 and gw.core.counters["super_frames_written"] == 1
    buffer = gw.plain.outbox[0]
    hdr, frame = decode_vnet_hdr(buffer[:10]), buffer[10:]
    assert hdr.flags == NEEDS_CSUM and hdr.gso_type == GSO_TCPV4 and hdr.gso_size == 1400
    # What the kernel (or the NIC) puts on the plain network: the same segments, checksums right.
    cut, partial = gso.segment(frame, hdr, ENC_MTU, True)
    assert not partial and len(cut) == len(segments) and all(checksum_ok(f) for f in cut)
    assert [f[-1400:] for f in cut] == [s.payload for s in segments]


def test_a_frame_that_cannot_be_cut_is_counted_not_raised(gw_h1):
    gw, _ = gw_h1
    gw.plain.inbox.extend([b"\x01" * 5, encode_vnet_hdr(Tcp(payload=b"x" * 3000).vnet(1448)) + b"\x00" * 40])
    gw._on_plain()
    assert not gw.enc.outbox
    assert sum(n for reason, n in gw.core.drops.items() if reason.startswith(("vnet", "gso"))) == 2
