"""Crafted inter-subnet tunnel datagrams (UDP payloads), built with scapy, each
with the drop reason a receiving gateway must give it.

The receiver is gateway ``RX_GW`` (an enrolled ID) holding the keys of its
links to ``PEER_GW`` and ``OTHER_PEER_GW`` (gateways of the other segment)
under NETKEY version ``HELD_PW_ID`` (2) only; the datagrams come from
``PEER_GW``'s address.  No datagram here carries a tag made with a link key,
so none may be accepted: each names one reason of ``gateway.tunnel_wire`` or
``gateway.tunnel``.
"""

from __future__ import annotations

from scapy.fields import ByteField, IntField, LongField, MACField
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from gateway import tunnel_wire
from l2crypt.core.frame_wire import format_mac
from l2crypt.core.tunnel_keys import sender_tag

RX_GW = "gB"
PEER_GW = "gA"
OTHER_PEER_GW = "gC"
HELD_PW_ID = 2
INNER_SRC = "02:4c:50:00:00:0a"


def tag(gateway_id: str) -> str:
    """A gateway's sender tag, written as a MAC (scapy's MACField)."""
    return format_mac(sender_tag(gateway_id))


class L2cTunnel(Packet):
    """The clear header of a tunnel datagram (see ``gateway.tunnel_wire``)."""

    name = "l2crypt tunnel"
    fields_desc = [
        ByteField("version", tunnel_wire.TUNNEL_VERSION),
        ByteField("kind", tunnel_wire.KIND_DATA),
        MACField("sender", tag(PEER_GW)),
        IntField("pw_id", HELD_PW_ID),
        LongField("pn", 1),
    ]


def _tun(**fields) -> Packet:
    return L2cTunnel(**fields)


#: Plausible ciphertext of a 64-byte inner frame plus a 16-byte tag: the tag is wrong.
BODY = Raw(b"\x5a" * 80)


def crafted() -> list[tuple[str, bytes, str]]:
    """(name, datagram bytes, expected drop reason)."""
    inner = Ether(dst="ff:ff:ff:ff:ff:ff", src=INNER_SRC, type=0x0806) / Raw(b"\x00" * 46)
    too_big = tunnel_wire.MAX_DATAGRAM - tunnel_wire.HEADER_LEN + 1
    datagrams: list[tuple[str, Packet | bytes, str]] = [
        ("empty", b"", "tunnel_truncated"),
        ("one_byte", b"\x01", "tunnel_truncated"),
        ("header_only", _tun(), "tunnel_truncated"),
        ("header_and_tag_only", _tun() / Raw(b"\x00" * 16), "tunnel_truncated"),
        ("one_short_of_minimum", _tun() / Raw(b"\x00" * (tunnel_wire.MIN_DATAGRAM - 21)), "tunnel_truncated"),
        ("oversized", _tun() / Raw(b"\x00" * too_big), "tunnel_oversized"),
        ("version_0", _tun(version=0) / BODY, "tunnel_unknown_version"),
        ("version_1", _tun(version=1) / BODY, "tunnel_unknown_version"),
        ("version_2", _tun(version=2) / BODY, "tunnel_unknown_version"),
        ("version_255", _tun(version=255) / BODY, "tunnel_unknown_version"),
        ("kind_0", _tun(kind=0) / BODY, "tunnel_unknown_kind"),
        ("kind_5", _tun(kind=5) / BODY, "tunnel_unknown_kind"),
        ("path_9", _tun(kind=0x91) / BODY, "tunnel_unknown_path"),
        ("kind_255", _tun(kind=255) / BODY, "tunnel_unknown_kind"),
        # Something else on the port: a whole IP packet, a VXLAN packet, a clear Ethernet frame.
        ("ip_udp_packet", IP(src="10.69.1.1", dst="10.69.2.1") / UDP(sport=4789, dport=4789) / BODY,
         "tunnel_unknown_version"),
        ("vxlan_header", Raw(b"\x08\x00\x00\x00\x00\x00\x07\x00") / inner, "tunnel_unknown_version"),
        ("clear_ethernet_frame", inner, "tunnel_unknown_version"),
        ("own_sender", _tun(sender=tag(RX_GW)) / BODY, "tunnel_unknown_tag"),
        ("other_peers_tag", _tun(sender=tag(OTHER_PEER_GW)) / BODY, "tunnel_tag_address"),
        ("gateway_mac_as_sender", _tun(sender="02:4c:47:00:00:a1") / BODY, "tunnel_unknown_tag"),
        ("stale_pw_id_0", _tun(pw_id=0) / BODY, "tunnel_stale_netkey"),
        ("stale_pw_id_1", _tun(pw_id=HELD_PW_ID - 1) / BODY, "tunnel_stale_netkey"),
        ("newer_pw_id", _tun(pw_id=HELD_PW_ID + 1) / BODY, "tunnel_no_netkey"),
        ("all_ones_pw_id", _tun(pw_id=0xFFFFFFFF) / BODY, "tunnel_no_netkey"),
        ("bad_tag", _tun(pn=7) / BODY, "tunnel_bad_tag"),
        ("zero_pn", _tun(pn=0) / BODY, "tunnel_bad_tag"),
        ("huge_pn", _tun(pn=2**64 - 1) / BODY, "tunnel_bad_tag"),
        ("pn_near_wrap", _tun(pn=2**64 - 2) / BODY, "tunnel_bad_tag"),
        ("unknown_sender", _tun(sender="02:4c:47:00:00:99") / BODY, "tunnel_unknown_tag"),
        ("group_sender", _tun(sender="ff:ff:ff:ff:ff:ff") / BODY, "tunnel_unknown_tag"),
        ("unknown_sender_newer_pw_id", _tun(sender="02:4c:47:00:00:99", pw_id=0xFFFFFFFF) / BODY,
         "tunnel_unknown_tag"),
        ("largest_accepted_size", _tun(pn=9) / Raw(b"\x00" * (too_big - 1)), "tunnel_bad_tag"),
        ("inner_frame_in_clear", _tun(pn=11) / inner / Raw(b"\x00" * 16), "tunnel_bad_tag"),
    ]
    return [(name, bytes(d), reason) for name, d, reason in datagrams]
