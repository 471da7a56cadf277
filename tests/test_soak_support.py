"""The capture scans and pair accounting of scripts/soak (l2crypt/lab/soak.py)."""

import struct

from gateway import tunnel_wire
from l2crypt.lab import soak as S

H1 = bytes.fromhex("024c32000011")
H2 = bytes.fromhex("024c32000012")
GA = bytes.fromhex("024c470000a1")


def sealed(src: bytes, pn: int, body: bytes = b"\x00" * 40) -> bytes:
    return H2 + src + struct.pack("!HBBIQ", 0x88B5, 1, 0, 7, pn) + body


def wan_frame(payload: bytes, frag: int = 0) -> bytes:
    udp = struct.pack("!HHHH", 40000, S.TUNNEL_PORT, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, frag, 64, 17, 0,
                     bytes([10, 69, 1, 1]), bytes([10, 69, 2, 1]))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def tunnel(sender: bytes, pw_id: int, pn: int, body: bytes = b"\x11" * 40) -> bytes:
    return tunnel_wire.encode_header(sender, pw_id, pn) + body


def test_marker_pairs_finds_every_pair_in_a_frame():
    frame = b"xx" + S.marker("h1", "h2") * 2 + b"yy" + S.marker("p1", "h3")
    assert S.marker_pairs(frame) == {"h1>h2", "p1>h3"}
    assert S.marker_pairs(b"L2CSOAK" + b"\x00" * 30) == set()


def test_bridge_scan_counts_markers_repeats_and_clear_frames():
    clear = H2 + H1 + b"\x08\x00" + S.marker("h1", "h2") * 8
    frames = [sealed(H1, 1), sealed(H1, 2), sealed(H1, 2), sealed(GA, 2), clear,
              H2 + b"\x06" * 6 + b"\x08\x06" + bytes(28)]
    out = S.scan_bridge(frames, {H1, H2, GA})
    assert out["l2crypt_frames"] == 4 and out["distinct_pw_ids"] == 1
    assert out["repeated_src_pn"] == 1  # H1 with 2 twice; GA with 2 is another sender
    assert out["plaintext_markers"] == 1 and out["markers_by_pair"] == {"h1>h2": 1}
    assert out["clear_frames_from_known_macs"] == 1 and out["clear_by_ethertype"] == {"0x800": 1}


def test_bridge_scan_of_clean_traffic_is_all_zero():
    out = S.scan_bridge([sealed(H1, n) for n in range(50)] + [sealed(H2, n) for n in range(50)], {H1, H2})
    assert (out["repeated_src_pn"], out["plaintext_markers"], out["clear_frames_from_known_macs"]) == (0, 0, 0)


def test_wan_scan_counts_repeats_per_sender_and_pw_id():
    gb = bytes.fromhex("024c470000b1")
    frames = [wan_frame(tunnel(GA, 1, 5)), wan_frame(tunnel(GA, 2, 5)), wan_frame(tunnel(gb, 1, 5)),
              wan_frame(tunnel(GA, 1, 5)), wan_frame(b"\x09" + tunnel(GA, 1, 6)[1:]),
              wan_frame(tunnel(GA, 1, 7), frag=0x2000)]
    out = S.scan_wan(frames, {H1})
    assert out["tunnel_datagrams"] == 4
    assert out["repeated_sender_pwid_pn"] == 1
    assert out["undecodable_datagrams"] == 1
    assert out["netkey_pw_ids"] == [1, 2]
    assert out["plaintext_markers"] == 0 and out["frames_with_inner_macs"] == 0


def test_wan_scan_sees_markers_and_inner_macs_in_clear():
    leak = wan_frame(H2 + H1 + b"\x08\x00" + S.marker("h1", "h3") * 4)
    out = S.scan_wan([leak], {H1})
    assert out["plaintext_markers"] == 1 and out["frames_with_inner_macs"] == 1


def test_plain_scan_separates_plain_host_pairs_from_encrypted_only_pairs():
    frames = [b"\x00" * 14 + S.marker("h1", "p1") * 8, b"\x00" * 14 + S.marker("p1", "h2") * 8,
              b"\x00" * 14 + S.marker("h1", "h3") * 8]
    out = S.scan_plain(frames, {"p1"})
    assert out["plain_host_markers"] == 2
    assert out["encrypted_only_markers"] == 1 and out["encrypted_only_by_pair"] == {"h1>h3": 1}


def test_pair_delivery_matches_each_sender_with_its_receiver():
    results = [{"host": "h1", "sent": {"h2": 100, "p1": 50}, "send_errors": {"p1": 2}, "received": {"h2": 90}},
               {"host": "h2", "sent": {"h1": 90}, "send_errors": {}, "received": {"h1": 99}}]
    out = S.pair_delivery(results)
    assert out["h1>h2"] == {"sent": 100, "delivered": 99, "send_errors": 0, "ratio": 0.99}
    assert out["h2>h1"]["delivered"] == 90 and out["h2>h1"]["ratio"] == 1.0
    assert out["h1>p1"] == {"sent": 50, "delivered": 0, "send_errors": 2, "ratio": 0.0}


def test_traffic_program_compiles():
    compile(S.TRAFFIC, "traffic", "exec")
