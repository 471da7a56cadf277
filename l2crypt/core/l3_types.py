"""The state types of the layer-3 engine (``l3_engine``): its settings, a
verdict on one queued packet, and one peer host with its key ring and, in nat
mode, its endpoints and paths.  Owned by the engine; sans-I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import DEFAULT_WIRE_MTU
from .key_ring import KeyRing
from .peer_table import PeerSettings

#: Packets held at once, all peers together (they occupy the kernel's queue).
DEFAULT_MAX_HELD_PACKETS = 2048
#: A nat-mode path idle this long gets a keepalive (seconds); 0 turns them off.
DEFAULT_NAT_KEEPALIVE_S = 25.0


@dataclass(frozen=True)
class L3Settings(PeerSettings):
    """Tuning of one L3 engine (the shared fields are ``PeerSettings``': key
    versions, holding, ``max_pending_keys``, ``key_requests_per_s``).  Units
    are in the names."""

    mode: str = "routed"           # "routed" or "nat"
    udp_port: int = 7789           # nat mode: our UDP port, and the peers' by default
    max_held_packets: int = DEFAULT_MAX_HELD_PACKETS
    path_mtu: int = DEFAULT_WIRE_MTU
    nat_keepalive_s: float = DEFAULT_NAT_KEEPALIVE_S


@dataclass(slots=True)
class Verdict:
    """What to do with one queued packet: let ``payload`` through, or drop (None)."""

    tag: object
    payload: bytes | None
    reason: str = ""


@dataclass(slots=True)
class NatPath:
    """Where we last sent a peer's sealed packets in one IP version (nat mode)."""

    src: bytes
    dst: bytes
    port: int
    sent_at: float


@dataclass(slots=True, eq=False)
class L3Peer:
    """One peer host, by ID: its bound IPs, its key ring, where it sends from."""

    peer_id: str
    ips: frozenset
    keys: KeyRing
    #: nat mode: IP version -> (address, port) learned from verified packets.
    endpoints: dict = field(default_factory=dict)
    #: nat mode: IP version -> the path our packets take (keepalives follow it).
    paths: dict = field(default_factory=dict)
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def sender(self) -> bytes:
        """The peer's name in the replay floors."""
        return self.peer_id.encode()


@dataclass(slots=True)
class HeldPacket:
    """A queued packet waiting for its key (the tag is the caller's handle)."""

    tag: object
    packet: bytes
