"""Crafted frames for the receive path, built with scapy, each with the drop
reason (or outcome) the engine must give it.

The receiver is ``RX_MAC`` holding a pair key for ``PEER_MAC`` (PW_ID 1) and
multicast key PW_ID 1; ``genuine`` frames are sealed by the peer's engine.
Every crafted frame names what a receiver must do with it:
a drop reason of ``engine``/``frame_wire``, or ``HELD`` (a key request for an
unknown sender or a newer PW_ID; the frame is held and, unanswered, expires).
"""

from __future__ import annotations

from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw, bind_layers

from l2crypt.core.constants import DEFAULT_ETHERTYPE, KEY_ID_MULTICAST, KEY_ID_PAIR

RX_MAC = "02:4c:32:00:00:12"
PEER_MAC = "02:4c:32:00:00:11"
STRANGER_MAC = "02:4c:32:00:00:99"
BCAST = "ff:ff:ff:ff:ff:ff"
HELD = "held"


class L2c(Packet):
    """The clear l2crypt header after the MACs (see ``frame_wire``)."""

    name = "l2crypt"
    from scapy.fields import ByteField, IntField, LongField  # noqa: E402 (scapy style)

    fields_desc = [
        ByteField("version", 1),
        ByteField("key_id", KEY_ID_PAIR),
        IntField("pw_id", 1),
        LongField("pn", 1),
    ]


bind_layers(Ether, L2c, type=DEFAULT_ETHERTYPE)


def _l2c(dst=RX_MAC, src=PEER_MAC, **fields) -> Packet:
    return Ether(dst=dst, src=src, type=DEFAULT_ETHERTYPE) / L2c(**fields)


def crafted() -> list[tuple[str, bytes, str]]:
    """(name, frame bytes, expected outcome) for frames no key sealed."""
    body = Raw(b"\x08\x00" + b"\xab" * 62)  # plausible ciphertext + tag, wrong tag
    frames: list[tuple[str, Packet | bytes, str]] = [
        ("empty", b"", "truncated"),
        ("runt_6", bytes(Ether(dst=RX_MAC, src=PEER_MAC))[:6], "truncated"),
        ("runt_ether_only", Ether(dst=RX_MAC, src=PEER_MAC, type=DEFAULT_ETHERTYPE), "truncated"),
        ("truncated_l2c_header", bytes(_l2c())[:20], "truncated"),
        ("header_no_tag", _l2c() / Raw(b"\x08\x00"), "truncated"),
        ("ipv4_frame", Ether(dst=RX_MAC, src=PEER_MAC, type=0x0800) / Raw(b"\x45" + b"\0" * 60), "not_l2crypt"),
        ("arp_broadcast", Ether(dst=BCAST, src=PEER_MAC, type=0x0806) / Raw(b"\0" * 46), "not_l2crypt"),
        ("vlan_tagged_l2crypt", Ether(dst=RX_MAC, src=PEER_MAC) / Dot1Q(vlan=7, type=DEFAULT_ETHERTYPE)
         / L2c() / body, "not_l2crypt"),
        ("wrong_ethertype_88b6", Ether(dst=RX_MAC, src=PEER_MAC, type=0x88B6) / L2c() / body, "not_l2crypt"),
        ("version_0", _l2c(version=0) / body, "unknown_version"),
        ("version_255", _l2c(version=255) / body, "unknown_version"),
        ("key_id_0", _l2c(key_id=0) / body, "unknown_key_id"),
        ("key_id_255", _l2c(key_id=255) / body, "unknown_key_id"),
        ("multicast_key_to_unicast", _l2c(key_id=KEY_ID_MULTICAST) / body, "unknown_key_id"),
        ("for_another_host", _l2c(dst=STRANGER_MAC) / body, "not_for_us"),
        ("own_source", _l2c(src=RX_MAC) / body, "own_frame"),
        ("zero_pn", _l2c(pn=0) / body, "bad_tag"),
        ("huge_pn", _l2c(pn=2**64 - 1) / body, "bad_tag"),
        ("pn_near_wrap", _l2c(pn=2**64 - 2) / body, "bad_tag"),
        ("jumbo_9000", _l2c(pn=77) / Raw(b"\x08\x00" + b"\xcd" * 9000), "bad_tag"),
        ("zero_pw_id", _l2c(pw_id=0) / body, "stale_key"),
        ("all_ones_pw_id", _l2c(pw_id=0xFFFFFFFF) / body, HELD),
        ("unknown_sender", _l2c(src=STRANGER_MAC) / body, HELD),
        ("broadcast_group_bad_tag", _l2c(dst=BCAST, key_id=KEY_ID_MULTICAST, pn=5) / body, "bad_tag"),
        ("broadcast_group_old_pw_id", _l2c(dst=BCAST, key_id=KEY_ID_MULTICAST, pw_id=0) / body, "no_key"),
        ("broadcast_group_all_ones_pw_id", _l2c(dst=BCAST, key_id=KEY_ID_MULTICAST, pw_id=0xFFFFFFFF) / body, HELD),
        ("broadcast_pair_key_id", _l2c(dst=BCAST, key_id=KEY_ID_PAIR) / body, "not_for_us"),
    ]
    return [(name, bytes(f), outcome) for name, f, outcome in frames]
