"""The agent's batched TAP path over in-memory ports (issue 13, steps 1, 3, 4):

    super-frame --VnetChannelPort--> [A: BatchedTapPath] --wire--> [B: simple engine]     -> TAP
                                                               \\-> [C: BatchedTapPath]   -> vnet TAP

Real engines, real gso/gro; the frames are built by scapy (``tcp_frames``)."""

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from l2crypt.agent.tap_path import BatchedTapPath
from l2crypt.core import gso
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.frame_wire import csum_partial_of, parse_mac
from l2crypt.core.vnet_hdr import GSO_TCPV4, GSO_TCPV6, GSO_UDP, NEEDS_CSUM, VnetHdr, decode_vnet_hdr, encode_vnet_hdr
from l2crypt.io.fakes import ChannelPort, VnetChannelPort
from tcp_frames import MAC_A, MAC_B, Tcp

A, B = parse_mac(MAC_A), parse_mac(MAC_B)
KEY = bytes(range(32))
TAP_MTU = 1468  # wire MTU 1500 - 32
MARKER = b"tap-path-marker!"


def host(mac, peer, batched: bool):
    engine = FrameEngine(mac, EngineSettings(complete_checksums=not batched))
    engine.install_pair_key(peer, "peer", KEY, 1, 0.0)
    tap, wire = (VnetChannelPort if batched else ChannelPort)("tap"), ChannelPort("wire")
    return engine, tap, wire, (BatchedTapPath(engine, tap, wire, TAP_MTU) if batched else None)


def checksum_ok(frame: bytes) -> bool:
    packet = Ether(frame)
    sent = packet[TCP].chksum
    del packet[TCP].chksum
    return Ether(bytes(packet))[TCP].chksum == sent


@pytest.mark.parametrize("version", [4, 6])
def test_a_super_frame_leaves_as_sealed_segments_and_arrives_whole_or_completed(version):
    sf = Tcp(version=version, payload=MARKER * 600, flags="PA")  # 9600 bytes
    a_engine, a_tap, a_wire, a_path = host(A, B, batched=True)
    a_path.seal_batch([encode_vnet_hdr(sf.vnet(1448)) + sf.frame()], 1.0)
    sealed = list(a_wire.outbox)
    mss = TAP_MTU - (sf.offsets()[1] - 14)
    assert len(sealed) == -(-len(sf.payload) // mss) > 1
    assert all(len(f) <= TAP_MTU + 14 + 32 and f[12:14] == b"\x88\xb5" and MARKER not in f for f in sealed)
    assert all(csum_partial_of(f) for f in sealed)
    assert a_engine.counters["super_frames_read"] == 1 and a_engine.counters["segments_cut"] == len(sealed)
    # A simple receiver gets finished segments with correct checksums.
    b_engine = host(B, A, batched=False)[0]
    opened = [b_engine.open_from_wire(f, 1.0) for f in sealed]
    assert all(opened) and all(checksum_ok(f) for f in opened)
    assert b"".join(f[sf.offsets()[1]:] for f in opened) == sf.payload
    # A batched receiver writes one super-frame with a NEEDS_CSUM header to its TAP.
    c_engine, c_tap, _, c_path = host(B, A, batched=True)
    c_path.open_batch(sealed, 1.0)
    assert len(c_tap.outbox) == 1 and c_engine.counters["super_frames_written"] == 1
    hdr = decode_vnet_hdr(c_tap.outbox[0])
    frame = c_tap.outbox[0][10:]
    assert hdr.flags == NEEDS_CSUM and hdr.gso_type == (GSO_TCPV4 if version == 4 else GSO_TCPV6)
    assert hdr.gso_size == mss and frame[sf.offsets()[1]:] == sf.payload
    assert not +a_engine.drops and not +b_engine.drops and not +c_engine.drops


def test_segments_of_a_simple_sender_are_joined_by_a_batched_receiver():
    segments = gso.segment(Tcp(payload=MARKER * 300).frame(), Tcp(payload=MARKER * 300).vnet(1400), TAP_MTU).frames
    a_engine, a_tap, a_wire, _ = host(A, B, batched=False)
    sealed = [a_engine.seal_from_tap(f, 1.0) for f in segments]
    assert len(sealed) == 4 and not any(csum_partial_of(f) for f in sealed)
    c_engine, c_tap, _, c_path = host(B, A, batched=True)
    c_path.open_batch(sealed, 1.0)
    assert len(c_tap.outbox) == 1 and decode_vnet_hdr(c_tap.outbox[0]).gso_type == GSO_TCPV4
    assert c_tap.outbox[0][10 + Tcp().offsets()[1]:] == MARKER * 300


def test_bad_vnet_input_is_a_counted_drop_and_the_batch_goes_on():
    sf = Tcp(payload=MARKER * 200)
    udp_gso = VnetHdr(NEEDS_CSUM, GSO_UDP, 42, 1400, 34, 6)
    lying = sf.vnet(1448)._replace(csum_start=3)  # the checksum field is not where the TCP header is
    a_engine, _, a_wire, a_path = host(A, B, batched=True)
    a_path.seal_batch([b"\x01\x00\x00", encode_vnet_hdr(udp_gso) + sf.frame(),
                       encode_vnet_hdr(lying) + sf.frame(), encode_vnet_hdr(sf.vnet(1448)) + sf.frame()], 1.0)
    assert +a_engine.drops == {"vnet_truncated": 1, "gso_unsupported": 1, "gso_malformed": 1}
    assert len(a_wire.outbox) == 3  # the good super-frame after them still went out
