"""The checksum flag of frame version 2 (issue 13, step 4): a segment whose
TCP/UDP checksum the sender left partial is sealed with the flag, and every
receiver hands its host a frame the host accepts.

    batched sender --v2 + csum_partial--> simple receiver: completes the checksum
                                       -> offload receiver: keeps it partial (NEEDS_CSUM to its TAP)
                                       -> gateway plain port: completes it

Checksums are checked against scapy's (``tcp_frames``), not against ours."""

from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from l2crypt.core import gso
from l2crypt.core.constants import FRAME_VERSION, FRAME_VERSION_FLAGS, KEY_ID_PAIR
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.frame_wire import csum_partial_of, decode_header, parse_mac
from tcp_frames import MAC_A, MAC_B, Tcp, udp_frame, with_partial_checksum
from test_gateway_core import H1, P1, pair_key, serve_keys
from test_gateway_core import seg_a  # noqa: F401  (fixture)

A, B = parse_mac(MAC_A), parse_mac(MAC_B)
KEY = bytes(range(32))
SUPER = Tcp(payload=bytes(range(256)) * 16, flags="PA")  # 4096 bytes: 3 segments of 1448


def pair(receiver_settings=EngineSettings()):
    a, b = FrameEngine(A), FrameEngine(B, receiver_settings)
    a.install_pair_key(B, "b", KEY, 1, 0.0)
    b.install_pair_key(A, "a", KEY, 1, 0.0)
    return a, b


def segments(csum: bool) -> list[bytes]:
    result = gso.segment(SUPER.frame(), SUPER.vnet(1448), 1500, csum=csum)
    assert not isinstance(result, str) and len(result.frames) == 3 and result.csum_partial is not csum
    return result.frames


def tcp_checksum_ok(frame: bytes) -> bool:
    packet = Ether(frame)
    sent = packet[TCP].chksum
    del packet[TCP].chksum
    return Ether(bytes(packet))[TCP].chksum == sent


def test_a_partial_segment_is_sealed_as_version_2_and_completed_by_a_simple_receiver():
    a, b = pair()
    for partial, finished in zip(segments(csum=False), segments(csum=True)):
        assert not tcp_checksum_ok(partial) and tcp_checksum_ok(finished)
        sealed = a.seal_from_tap(partial, 1.0, csum_partial=True)
        assert sealed[14] == FRAME_VERSION_FLAGS and csum_partial_of(sealed)
        assert decode_header(sealed, 0x88B5).key_id == KEY_ID_PAIR
        assert b.open_from_wire(sealed, 1.0) == finished
    # Without the flag: version 1, as before, opened unchanged.
    plain = segments(csum=True)[0]
    sealed = a.seal_from_tap(plain, 1.0)
    assert sealed[14] == FRAME_VERSION and not csum_partial_of(sealed)
    assert b.open_from_wire(sealed, 1.0) == plain
    assert not +b.drops


def test_an_offload_receiver_keeps_the_checksum_partial_and_the_flag_is_authenticated():
    a, b = pair(EngineSettings(complete_checksums=False))
    partial = segments(csum=False)[1]
    sealed = a.seal_from_tap(partial, 1.0, csum_partial=True)
    assert b.open_from_wire(sealed, 1.0) == partial and csum_partial_of(sealed)
    flipped = bytearray(a.seal_from_tap(partial, 1.0, csum_partial=True))
    flipped[15] &= 0x7F  # an attacker clears the flag: the tag no longer verifies
    assert b.open_from_wire(bytes(flipped), 1.0) is None and b.drops["bad_tag"] == 1


def test_udp_partial_is_completed_and_a_partial_frame_without_l4_is_dropped():
    a, b = pair()
    real = udp_frame(payload=b"x" * 301)
    partial = with_partial_checksum(real, 34, 6)
    assert partial != real
    assert b.open_from_wire(a.seal_from_tap(partial, 1.0, csum_partial=True), 1.0) == real
    arp_like = B + A + b"\x08\x06" + bytes(28)
    assert b.open_from_wire(a.seal_from_tap(arp_like, 1.0, csum_partial=True), 1.0) is None
    assert +b.drops == {"csum_unresolved": 1}


def test_a_held_partial_frame_is_completed_before_it_waits():
    a, b = FrameEngine(A), FrameEngine(B)
    b.install_pair_key(A, "a", KEY, 1, 0.0)
    partial, finished = segments(csum=False)[0], segments(csum=True)[0]
    assert a.seal_from_tap(partial, 1.0, csum_partial=True) is None  # no key yet: held
    released = a.install_pair_key(B, "b", KEY, 1, 1.1).to_wire
    assert len(released) == 1 and not csum_partial_of(released[0])
    assert b.open_from_wire(released[0], 1.1) == finished


def test_a_receiver_releasing_held_partial_frames_completes_them_even_with_offloads():
    a = FrameEngine(A)
    a.install_pair_key(B, "b", KEY, 1, 0.0)
    b = FrameEngine(B, EngineSettings(complete_checksums=False))
    sealed = a.seal_from_tap(segments(csum=False)[2], 1.0, csum_partial=True)
    assert b.open_from_wire(sealed, 1.0) is None  # no key: held
    assert b.install_pair_key(A, "a", KEY, 1, 1.1).to_tap == [segments(csum=True)[2]]


def test_the_gateway_plain_port_gets_completed_checksums(seg_a):  # noqa: F811
    h1, gw = seg_a
    to_p1 = Tcp(payload=b"p" * 3000, flags="PA")
    frames = []
    for version in (4, 6):
        sf = to_p1.with_(version=version)
        raw = bytearray(sf.frame())
        raw[0:6], raw[6:12] = P1, H1
        vnet = sf.vnet(1448)
        frames += list(zip(gso.segment(bytes(raw), vnet, 1500, csum=False).frames,
                           gso.segment(bytes(raw), vnet, 1500, csum=True).frames))
    assert h1.seal_from_tap(frames[0][0], 1.0, csum_partial=True) is None  # h1 has no key for p1 yet: held
    first = h1.install_pair_key(P1, "gA", pair_key("h1", "gA"), 1, 1.0).to_wire
    assert gw.from_encrypted(first[0], 1.1).to_plain == []  # the gateway asks for KEY(gA, h1): held
    got = serve_keys(gw, "gA", {H1: "h1"}, 1.2).to_plain
    for partial, _ in frames[1:]:
        sealed = h1.seal_from_tap(partial, 1.3, csum_partial=True)
        assert csum_partial_of(sealed)
        got += gw.from_encrypted(sealed, 1.3).to_plain
    assert got == [finished for _, finished in frames]
    assert all(tcp_checksum_ok(f) for f in got) and not any(tcp_checksum_ok(p) for p, _ in frames)
