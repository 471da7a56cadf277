"""TCP frames for the gso/gro tests, built with scapy so that lengths and
checksums come from an implementation independent of ours."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import checksum

from l2crypt.core.vnet_hdr import GSO_ECN, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, VnetHdr

MAC_A, MAC_B = "02:4c:32:00:00:01", "02:4c:32:00:00:02"
TIMESTAMPS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


@dataclass(frozen=True)
class Tcp:
    """The fields of one TCP frame; ``frame()`` builds it with scapy."""

    version: int = 4
    payload: bytes = b""
    seq: int = 1000
    ack: int = 77
    flags: str = "A"
    options: list = field(default_factory=lambda: list(TIMESTAMPS))
    ip_id: int = 100
    sport: int = 40000
    dport: int = 5201
    window: int = 502
    urgptr: int = 0
    vlan: int | None = None
    ip_options: bool = False
    hop_by_hop: bool = False
    src: str = ""
    dst: str = ""

    def with_(self, **changes) -> "Tcp":
        return replace(self, **changes)

    def packet(self):
        eth = Ether(src=MAC_A, dst=MAC_B)
        if self.vlan is not None:
            eth = eth / Dot1Q(vlan=self.vlan)
        if self.version == 4:
            ip = IP(src=self.src or "10.13.0.1", dst=self.dst or "10.13.0.2", id=self.ip_id, flags="DF", ttl=64,
                    options=[IPOption_RR(routers=["10.0.0.9"])] if self.ip_options else [])
        else:
            ip = IPv6(src=self.src or "fd13::1", dst=self.dst or "fd13::2", hlim=64, fl=0x12345)
            if self.hop_by_hop:
                ip = ip / IPv6ExtHdrHopByHop()
        tcp = TCP(sport=self.sport, dport=self.dport, seq=self.seq & 0xFFFFFFFF, ack=self.ack, flags=self.flags,
                  window=self.window, options=self.options, urgptr=self.urgptr)
        return eth / ip / tcp / Raw(self.payload)

    def frame(self) -> bytes:
        """The frame with every checksum computed by scapy."""
        return bytes(self.packet())

    def offsets(self) -> tuple[int, int]:
        """(TCP header offset, payload offset) in the frame."""
        frame = self.frame()
        return len(frame) - len(self.packet()[TCP]), len(frame) - len(self.payload)

    def vnet(self, gso_size: int) -> VnetHdr:
        """The header the kernel puts before this frame as a TSO super-frame."""
        l4, payload_offset = self.offsets()
        gso_type = GSO_TCPV4 if self.version == 4 else GSO_TCPV6
        if "C" in self.flags:
            gso_type |= GSO_ECN
        return VnetHdr(NEEDS_CSUM, gso_type, payload_offset, gso_size, l4, 16)


def udp_frame(version: int = 4, payload: bytes = b"udp payload") -> bytes:
    ip = IP(src="10.13.0.1", dst="10.13.0.2") if version == 4 else IPv6(src="fd13::1", dst="fd13::2")
    return bytes(Ether(src=MAC_A, dst=MAC_B) / ip / UDP(sport=5353, dport=5353) / Raw(payload))


def with_partial_checksum(frame: bytes, l4: int, field_offset: int) -> bytes:
    """``frame`` as the kernel hands out a CHECKSUM_PARTIAL frame: the L4 field
    holds the folded pseudo-header sum (the real checksum's complement minus the
    data): computed from scapy's own checksum so it is independent of ours."""
    real = int.from_bytes(frame[l4 + field_offset:l4 + field_offset + 2], "big")
    zeroed = frame[:l4 + field_offset] + b"\0\0" + frame[l4 + field_offset + 2:]
    data_sum = (~checksum(zeroed[l4:])) & 0xFFFF  # folded sum of the L4 bytes alone
    # real = ~(pseudo + data)  =>  pseudo = ~real - data (one's complement arithmetic)
    pseudo = ((~real & 0xFFFF) + (~data_sum & 0xFFFF)) % 0xFFFF or 0xFFFF
    return frame[:l4 + field_offset] + pseudo.to_bytes(2, "big") + frame[l4 + field_offset + 2:]


def completes_to(partial_l4: bytes, real_checksum: int) -> bool:
    """True if a receiver completing ``partial_l4`` (the pseudo-header sum in its
    field) gets ``real_checksum``: scapy's RFC 1071 ``checksum`` over it."""
    got = checksum(partial_l4)
    return got == real_checksum or {got, real_checksum} == {0, 0xFFFF}
