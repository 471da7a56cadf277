"""The sans-I/O layer-3 engine of one ``l2crypt l3-agent``.

It takes IPv4 and IPv6 packets (as netfilter queued them), an opaque ``tag``
for each (the caller's handle, e.g. a netfilterqueue packet) and a clock
value, and returns ``Verdict``s: the tag with the bytes to let through, or
with None to drop it.  A packet with no key yet is held, and its verdict
comes later from ``install_key``, ``mark_unknown`` or ``on_timer``: every
tag taken gets exactly one verdict.  It never touches a socket or the clock,
never raises on a packet, and counts every drop under a reason name.

Sending (``outbound``: a packet to a policy prefix, caught in OUTPUT):
1. parse the IP header; the destination IP names the peer (``ip_owner``,
   filled from the key server's ``l3_key`` answers);
2. no key yet: hold the packet (at most ``max_pending_keys`` destinations
   and ``max_held_packets`` packets, which sit in the kernel's queue) and
   queue a key request by IP (``take_key_requests``: at most
   ``key_requests_per_s``);
3. keep it within ``path_mtu`` once sealed (``l3_pmtu``): clamp the MSS of a
   TCP SYN; a packet too big that may not be fragmented is dropped and
   counted (``too_big``); an IPv4 packet without DF is sealed and left to the
   kernel to fragment;
4. seal with the peer's current pair-key version (``l3_wire`` formats):
   routed keeps the IP header and sets protocol 253; nat seals the whole
   packet into UDP toward the peer's endpoint (learned from its packets, or
   its own address and the configured port).

Receiving (``inbound``: protocol 253 or the nat UDP port, caught in PREROUTING):
1. parse the outer headers and the L3 header; the *sender ID* in it names the
   peer, never an address a NAT may have rewritten;
2. no key yet: hold (at most half the pending and held limits: forged
   senders cannot crowd out our own destinations), queue a key request by ID;
3. check the replay window (which starts at the sender's replay floor after a
   restart, ``replay_floor``), open the AEAD, check that the plain packet's
   source is an address bound to that sender (and its destination is ours),
   move the window, learn the sender's endpoint (nat mode), clamp a SYN's MSS;
   an empty packet is a NAT keepalive: counted and dropped.  While the
   replay floors are not on disk, everything is refused
   (``replay_floors_unsaved``).

Timers (``on_timer``, every tick): held packets age out, key versions switch
and retire (``retire_after_s``), the packet counter follows the clock
(``replay_floor.raise_to_clock``), and in nat mode every path idle for
``nat_keepalive_s`` gets a sealed keepalive.

Key versions follow ``key_ring`` (make before break) through the same
``peer_table`` as ``engine``: every version dropped leaves its floor, and
holding goes through the shared ``hold_queue`` (its caps and rate limit).  A
packet released when its key arrives that still finds no key is dropped
(``no_key``), never held again: a forged packet cannot keep a key request
loop going.
"""

from __future__ import annotations

from collections import Counter

from cryptography.exceptions import InvalidTag

from . import aead, l3_pmtu, l3_wire
from .hold_queue import HOLD_OVERFLOW, PENDING_FULL, RX, TX, HoldTable
from .key_ring import KeyRing
from .ks_messages import valid_host_id
from .l3_types import HeldPacket, L3Peer, L3Settings, NatPath, Verdict
from .peer_keys import KeySlot
from .peer_table import NO_KEY, PN_EXHAUSTED, REKEY, REPORT, PeerTable, TableOwner
from .replay_floor import FloorBook

__all__ = ["L3Engine", "L3Peer", "L3Settings", "Verdict", "use_cipher", "NO_KEY", "HOLD_OVERFLOW", "PENDING_FULL",
           "PN_EXHAUSTED", "REKEY", "REPORT"]

# Drop reasons (besides those of l3_wire, hold_queue and peer_table).
UNKNOWN_SENDER = "unknown_sender"
STALE_KEY = "stale_key"
REPLAYED = "replayed"
BAD_TAG = "bad_tag"
WRONG_MODE = "wrong_mode"
NOT_L3CRYPT = "not_l3crypt"
OWN_PACKET = "own_packet"
REVOKED_SENDER = "revoked_sender"
SPOOFED_SOURCE = "spoofed_source"
NOT_FOR_US = "not_for_us"
FRAGMENT = "fragment"
TOO_BIG = "too_big"
HOLD_EXPIRED = "hold_expired"
FLOORS_UNSAVED = "replay_floors_unsaved"
#: Not a drop reason: the verdict of a keepalive (dropped on purpose, counted).
KEEPALIVE = "keepalive"

#: Key-request keys: ("ip", 4 or 16 bytes) for a destination, ("id", host ID) for a sender.
BY_IP = "ip"
BY_ID = "id"

class L3Engine(TableOwner):
    """The layer-3 engine of one agent (see the module docstring).  Owned by
    the agent's event loop; nothing in it is shared between threads."""

    def __init__(self, my_id: str, my_ips, settings: L3Settings = L3Settings(), pn_start: int = 1,
                 now: float = 0.0, floors: FloorBook | None = None):
        if settings.mode not in l3_wire.MODES:
            raise ValueError(f"mode must be one of {', '.join(l3_wire.MODES)}")
        self.my_id = my_id
        self.my_ips = frozenset(my_ips)
        self.settings = settings
        self.mode = l3_wire.MODES[settings.mode]
        self.cipher = settings.cipher
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        #: The peers by ID, their key rings, the packet counter (``send_pn``:
        #: one counter for every key this host sends with, see ``aead``; it
        #: follows the clock from (pn_start, now) on) and the notices.
        self.table: PeerTable[str, L3Peer] = PeerTable(settings, pn_start, now, floors, sender_name=str.encode,
                                                       counters=self.counters)
        self.peers = self.table.peers
        #: Replay floors of the senders (None: not persisted, no floors).
        self.floors = floors
        self.ip_owner: dict[bytes, str] = {}
        self.revoked: set[str] = set()
        self.unknown_until: dict[tuple, float] = {}
        self.holds = HoldTable(settings.hold_frames, settings.hold_age_s, settings.key_retry_s,
                               settings.key_retry_max_s, max_pending=settings.max_pending_keys,
                               requests_per_s=settings.key_requests_per_s, max_held=settings.max_held_packets)
        #: Drop verdicts of held packets pushed out by newer ones (``take_late_verdicts``).
        self._late: list[Verdict] = []
        #: Whole IP packets the agent sends itself (``take_packets_to_send``): keepalives.
        self._to_send: list[bytes] = []
        mode_name, id_len = settings.mode, len(my_id.encode())
        self.overhead = {v: l3_wire.overhead(mode_name, id_len, v) for v in (4, 6)}
        self.max_mss = {v: l3_pmtu.max_mss(settings.path_mtu, self.overhead[v], v) for v in (4, 6)}
        self._header_len = l3_wire.L3_FIXED_LEN + id_len

    def _drop(self, tag, reason: str) -> Verdict:
        self.drops[reason] += 1
        return Verdict(tag, None, reason)

    # ------------------------------------------------------------------ sending

    def outbound(self, tag, packet: bytes, now: float, released: bool = False) -> Verdict | None:
        """Seal one plain packet to a policy prefix; None means held."""
        ip = l3_wire.parse_packet(packet)
        if isinstance(ip, str):
            return self._drop(tag, ip)
        owner = self.ip_owner.get(ip.dst)
        peer = self.peers.get(owner) if owner is not None else None
        if peer is None:
            return self._hold((BY_IP, ip.dst), TX, HeldPacket(tag, packet), now, released)
        return self._seal(tag, peer, packet, ip, now)

    def _seal(self, tag, peer: L3Peer, packet: bytes, ip: l3_wire.IpHeader, now: float) -> Verdict:
        over = self.overhead[ip.version]
        sealed_len = len(packet) + over
        if sealed_len > self.settings.path_mtu and (ip.dont_fragment or sealed_len > l3_wire.IP_MAX[ip.version]):
            return self._drop(tag, TOO_BIG)  # no ICMP answer: see l3_pmtu
        step = self.table.send(peer.peer_id, peer.keys, now)
        if step.__class__ is str:
            return self._drop(tag, step)
        slot, pn = step
        plain = self._clamp(packet, ip)
        header = l3_wire.encode_l3_header(self.mode, slot.pw_id, pn, self.my_id)
        nonce = aead.nonce(pn)
        if self.mode == l3_wire.MODE_ROUTED:
            aad = ip.src + ip.dst + header
            body = slot.send_aead.encrypt(nonce, bytes([ip.protocol]) + plain[ip.header_len:], aad)
            out = l3_wire.rebuild_ip(plain[:ip.header_len], ip.version, l3_wire.L3_IP_PROTOCOL, sealed_len) \
                + header + body
        else:
            body = slot.send_aead.encrypt(nonce, plain, header)
            ep_ip, ep_port = peer.endpoints.get(ip.version) or (ip.dst, self.settings.udp_port)
            ident = int.from_bytes(packet[4:6], "big") if ip.version == 4 else 0
            out = l3_wire.encode_udp_packet(ip.src, ep_ip, self.settings.udp_port, ep_port, header + body, ident)
            peer.paths[ip.version] = NatPath(ip.src, ep_ip, ep_port, now)
        peer.packets_out += 1
        peer.bytes_out += len(packet)
        self.counters["sealed"] += 1
        return Verdict(tag, out)

    def _clamp(self, packet: bytes, ip: l3_wire.IpHeader) -> bytes:
        clamped = l3_pmtu.clamp_mss(packet, ip, self.max_mss[ip.version])
        if clamped is not packet:
            self.counters["mss_clamped"] += 1
        return clamped

    # ---------------------------------------------------------------- receiving

    def inbound(self, tag, packet: bytes, now: float, released: bool = False) -> Verdict | None:
        """Open one sealed packet; None means held."""
        if self.floors is not None and self.floors.stale(now):
            return self._drop(tag, FLOORS_UNSAVED)  # fail closed until the floors are on disk
        ip = l3_wire.parse_packet(packet)
        if isinstance(ip, str):
            return self._drop(tag, ip)
        if ip.is_fragment:
            return self._drop(tag, FRAGMENT)
        endpoint = None
        if self.mode == l3_wire.MODE_ROUTED:
            if ip.protocol != l3_wire.L3_IP_PROTOCOL:
                return self._drop(tag, NOT_L3CRYPT)
            offset = ip.header_len
        else:
            if ip.protocol != l3_wire.IPPROTO_UDP:
                return self._drop(tag, NOT_L3CRYPT)
            ports = l3_wire.udp_ports(packet, ip.header_len)
            if isinstance(ports, str):
                return self._drop(tag, ports)
            endpoint = (ip.src, ports[0])
            offset = ip.header_len + l3_wire.UDP_LEN
        header = l3_wire.decode_l3_header(packet, offset)
        if isinstance(header, str):
            return self._drop(tag, header)
        if header.mode != self.mode:
            return self._drop(tag, WRONG_MODE)
        sender = header.sender_id
        if sender == self.my_id:
            return self._drop(tag, OWN_PACKET)
        if not valid_host_id(sender):
            return self._drop(tag, l3_wire.MALFORMED)
        if sender in self.revoked:
            return self._drop(tag, REVOKED_SENDER)
        peer = self.peers.get(sender)
        if peer is None:
            if self.unknown_until.get((BY_ID, sender), 0.0) > now:
                return self._drop(tag, UNKNOWN_SENDER)
            return self._hold((BY_ID, sender), RX, HeldPacket(tag, packet), now, released)
        return self._open(tag, peer, packet, ip, offset, header, endpoint, now, released)

    def _open(self, tag, peer: L3Peer, packet: bytes, ip: l3_wire.IpHeader, offset: int,
              header: l3_wire.L3Header, endpoint, now: float, released: bool) -> Verdict | None:
        ring = peer.keys
        pw_id, pn = header.pw_id, header.packet_number
        slot = ring.lookup(pw_id)
        if slot is None:
            if pw_id > ring.newest_pw_id():  # race a: the peer holds a newer version
                return self._hold((BY_ID, peer.peer_id), RX, HeldPacket(tag, packet), now, released)
            self.table.report_lag(peer.peer_id, ring, now)
            return self._drop(tag, STALE_KEY)
        if not slot.replay.check(pn):
            return self._drop(tag, REPLAYED)
        body_at = offset + header.length
        if self.mode == l3_wire.MODE_ROUTED:
            aad = ip.src + ip.dst + packet[offset:body_at]
        else:
            aad = packet[offset:body_at]
        try:
            plain = slot.recv_aead.decrypt(aead.nonce(pn), packet[body_at:], aad)
        except InvalidTag:
            return self._drop(tag, BAD_TAG)
        if self.mode == l3_wire.MODE_ROUTED:
            if not plain:
                return self._drop(tag, l3_wire.MALFORMED)
            out = l3_wire.rebuild_ip(packet[:ip.header_len], ip.version, plain[0],
                                     ip.header_len + len(plain) - 1) + plain[1:]
            inner = ip._replace(protocol=plain[0], total_len=len(out))
        elif not plain:
            inner = None  # a keepalive
        else:
            inner = l3_wire.parse_packet(plain)
            if isinstance(inner, str) or inner.version != ip.version:
                return self._drop(tag, l3_wire.MALFORMED)
            out = plain
        if inner is not None:
            if inner.src not in peer.ips:
                return self._drop(tag, SPOOFED_SOURCE)
            if inner.dst not in self.my_ips:
                return self._drop(tag, NOT_FOR_US)
        slot.replay.update(pn)
        if slot is not ring.current:
            self.table.opened(peer.peer_id, ring, slot, now)
        if endpoint is not None and peer.endpoints.get(ip.version) != endpoint:
            peer.endpoints[ip.version] = endpoint
            self.counters["endpoint_changes"] += 1
        if inner is None:
            self.counters["keepalives_received"] += 1
            return Verdict(tag, None, KEEPALIVE)
        out = self._clamp(out, inner)
        peer.packets_in += 1
        peer.bytes_in += len(out)
        self.counters["opened"] += 1
        return Verdict(tag, out)

    # ----------------------------------------------------------------- holding

    def _hold(self, key: tuple, direction: int, held: HeldPacket, now: float, released: bool) -> Verdict | None:
        if released:
            return self._drop(held.tag, NO_KEY)  # released once already: never held again
        if direction == TX and self.unknown_until.get(key, 0.0) > now:
            return self._drop(held.tag, NO_KEY)
        left = self.holds.hold(key, direction, held, now)
        if left is None:
            self.counters["held"] += 1
            return None
        reason, out = left
        if out is held:  # refused (its key is still asked unless the table is full)
            return self._drop(held.tag, reason)
        self.counters["held"] += 1
        self._late.append(self._drop(out.tag, reason))  # an older packet pushed out
        return None

    @property
    def held_packets(self) -> int:
        """Packets held now, waiting for a key."""
        return sum(self.holds.held_count)

    def take_late_verdicts(self) -> list[Verdict]:
        """Drop verdicts of held packets pushed out by newer ones.  Call after each batch."""
        late, self._late = self._late, []
        return late

    def take_packets_to_send(self) -> list[bytes]:
        """Whole IP packets to send through a raw socket (nat keepalives).
        Call after each tick."""
        out, self._to_send = self._to_send, []
        return out

    def take_key_requests(self, now: float) -> list[tuple]:
        """(BY_IP, ip) and (BY_ID, peer_id) to ask the key server about now
        (first requests and backed-off retries), at most ``key_requests_per_s``;
        the rest stay due for a later call."""
        due = self.holds.take_requests(now)
        self.counters["key_requests"] += len(due)
        return due

    # ------------------------------------------------------------------ timers

    def on_timer(self, now: float) -> list[Verdict]:
        """Age held packets (drop verdicts for them) and key versions, move the
        packet counter to the clock, queue due keepalives.  Call every tick
        (at most ``replay_floor.CLOCK_TICK_S`` apart)."""
        self.table.follow_clock(now)
        out = [self._drop(held.tag, HOLD_EXPIRED) for held in self.holds.expire(now)]
        for key in [k for k, t in self.unknown_until.items() if t <= now]:
            del self.unknown_until[key]
        self.table.on_timer(now)
        if self.mode == l3_wire.MODE_NAT and self.settings.nat_keepalive_s > 0:
            self._keepalives(now)
        return out

    def _keepalives(self, now: float) -> None:
        for peer in self.peers.values():
            for path in peer.paths.values():
                if now - path.sent_at < self.settings.nat_keepalive_s:
                    continue
                pn = self.table.take_pn()
                if pn is None:
                    continue
                slot = peer.keys.current
                header = l3_wire.encode_l3_header(self.mode, slot.pw_id, pn, self.my_id)
                tag = slot.send_aead.encrypt(aead.nonce(pn), b"", header)
                self._to_send.append(l3_wire.encode_udp_packet(
                    path.src, path.dst, self.settings.udp_port, path.port, header + tag))
                path.sent_at = now
                self.counters["keepalives_sent"] += 1

    def next_deadline(self) -> float | None:
        """When ``take_key_requests``/``on_timer`` next have work (held packets,
        key versions, nat keepalives), in engine time; None: nothing waits."""
        deadlines = [d for d in (self.holds.next_deadline(), self.table.next_deadline()) if d is not None]
        if self.mode == l3_wire.MODE_NAT and self.settings.nat_keepalive_s > 0:
            deadlines += [path.sent_at + self.settings.nat_keepalive_s
                          for peer in self.peers.values() for path in peer.paths.values()]
        return min(deadlines) if deadlines else None

    # --------------------------------------------------------------- installing

    def install_key(self, peer_id: str, key: bytes, pw_id: int, peer_ips, now: float) -> list[Verdict]:
        """Install a version of a peer's pair key; returns verdicts for released packets.

        A version not newer than every version held is ignored (a repeated
        answer never resets a packet counter under a live key); the peer's
        bound IPs are refreshed either way.  Released packets are tried once:
        one that still finds no key is dropped (``no_key``).
        """
        self.counters["key_answers"] += 1
        if peer_id in self.revoked or peer_id == self.my_id:
            return []
        ips = frozenset(peer_ips) - self.my_ips
        floor = self.floors.floor(peer_id.encode()) if self.floors is not None else 0
        slot = KeySlot.from_direction_keys(
            self.cipher, aead.l3_direction_key(key, pw_id, self.my_id, peer_id, self.cipher),
            aead.l3_direction_key(key, pw_id, peer_id, self.my_id, self.cipher),
            pw_id, self.settings.replay_window_frames, now, floor)
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = L3Peer(peer_id, ips, KeyRing(slot))
        else:
            if self.table.offer(peer_id, peer.keys, slot, now):
                self.counters["rekeys"] += 1
            for ip in peer.ips - ips:
                if self.ip_owner.get(ip) == peer_id:
                    del self.ip_owner[ip]
            peer.ips = ips
        for ip in ips:
            self.ip_owner[ip] = peer_id
        out: list[Verdict] = []
        for hold_key in [(BY_ID, peer_id)] + [(BY_IP, ip) for ip in ips]:
            self.unknown_until.pop(hold_key, None)
            for direction, held, _ in self.holds.take(hold_key):
                self.counters["hold_flushed"] += 1
                retry = self.outbound if direction == TX else self.inbound
                verdict = retry(held.tag, held.packet, now, released=True)
                if verdict is not None:
                    out.append(verdict)
        return out

    def mark_unknown(self, key: tuple, now: float) -> list[Verdict]:
        """The key server knows no host for that IP or ID: drop what is held, stop asking."""
        self.unknown_until[key] = now + self.settings.unknown_cache_s
        return [self._drop(h.tag, NO_KEY if d == TX else UNKNOWN_SENDER) for d, h, _ in self.holds.take(key)]

    def revoke_peer(self, peer_id: str) -> list[Verdict]:
        """The server revoked the host: drop its keys and refuse its packets."""
        self.revoked.add(peer_id)
        peer = self.table.forget(peer_id)
        out = []
        keys = [(BY_ID, peer_id)]
        if peer is not None:
            for ip in peer.ips:
                if self.ip_owner.get(ip) == peer_id:
                    del self.ip_owner[ip]
                keys.append((BY_IP, ip))
        for key in keys:
            out += [self._drop(h.tag, REVOKED_SENDER) for _, h, _ in self.holds.take(key)]
        return out

    def forget_keys(self) -> None:
        """Drop every peer's keys (a cipher change); their replay floors stay."""
        self.table.forget_all()
        self.ip_owner.clear()

    def drain_all(self) -> list[Verdict]:
        """Drop verdicts for every held packet (the agent is stopping)."""
        out = []
        for key in list(self.holds.pending):
            out += [self._drop(h.tag, NO_KEY) for _, h, _ in self.holds.take(key)]
        return out + self.take_late_verdicts()

    # ------------------------------------------------------------ replay floors

    def highest_verified(self) -> list[tuple[bytes, int]]:
        """(sender, highest packet number verified) for every window held, for
        ``FloorBook.save`` (nothing is tracked per packet)."""
        return self.table.highest()


def use_cipher(engine: L3Engine, cipher: str) -> bool:
    """Switch to the key server's cipher; keys derived for another one are dropped."""
    aead.check_cipher(cipher)
    if cipher == engine.cipher:
        return False
    engine.cipher = cipher
    engine.forget_keys()
    return True
