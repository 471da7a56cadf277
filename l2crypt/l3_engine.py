"""The sans-I/O layer-3 engine of one ``l2crypt l3-agent``.

It takes IPv4 packets (as netfilter queued them), an opaque ``tag`` for each
(the caller's handle, e.g. a netfilterqueue packet) and a clock value, and
returns ``Verdict``s: the tag with the bytes to let through, or with None to
drop it.  A packet with no key yet is held, and its verdict comes later from
``install_key``, ``mark_unknown`` or ``on_timer``: every tag taken gets
exactly one verdict.  It never touches a socket or the clock, never raises on
a packet, and counts every drop under a reason name.

Sending (``outbound``: a packet to a policy prefix, caught in OUTPUT):
1. parse the IPv4 header; the destination IP names the peer (``ip_owner``,
   filled from the key server's ``l3_key`` answers);
2. no key yet: hold the packet, queue a key request by IP;
3. seal with the peer's current pair-key version (``l3_wire`` formats):
   routed keeps the IP header and sets protocol 253; nat seals the whole
   packet into UDP toward the peer's endpoint (learned from its packets, or
   its own address and the configured port).

Receiving (``inbound``: protocol 253 or the nat UDP port, caught in PREROUTING):
1. parse the outer headers and the L3 header; the *sender ID* in it names the
   peer, never an address a NAT may have rewritten;
2. no key yet: hold, queue a key request by ID;
3. check the replay window, open the AEAD, check that the plain packet's
   source is an address bound to that sender (and its destination is ours),
   move the window, learn the sender's endpoint (nat mode).

Key versions follow ``key_ring`` (make before break), as in ``engine``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from . import aead, l3_wire
from .constants import (
    DEFAULT_HOLD_AGE_S,
    DEFAULT_HOLD_FRAMES,
    DEFAULT_KEY_RETRY_MAX_S,
    DEFAULT_KEY_RETRY_S,
    DEFAULT_REKEY_AFTER_FRAMES,
    DEFAULT_REPLAY_WINDOW_FRAMES,
    DEFAULT_RETIRE_AFTER_S,
    DEFAULT_SWITCH_AFTER_S,
    DEFAULT_UNKNOWN_CACHE_S,
    MAX_PACKET_NUMBER,
)
from .hold_queue import RX, TX, HoldTable
from .key_ring import KeyRing
from .ks_messages import valid_host_id
from .peer_keys import KeySlot
from .replay import ReplayWindow

# Drop reasons (besides those of l3_wire).
NO_KEY = "no_key"
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
HOLD_OVERFLOW = "hold_overflow"
HOLD_EXPIRED = "hold_expired"
PN_EXHAUSTED = "pn_exhausted"

REKEY = "rekey"
REPORT = "report"

#: Key-request keys: ("ip", 4 bytes) for a destination, ("id", host ID) for a sender.
BY_IP = "ip"
BY_ID = "id"


@dataclass(frozen=True)
class L3Settings:
    """Tuning of one L3 engine.  Units are in the names."""

    mode: str = "routed"           # "routed" or "nat"
    udp_port: int = 7789           # nat mode: our UDP port, and the peers' by default
    cipher: str = aead.AES_256_GCM
    replay_window_frames: int = DEFAULT_REPLAY_WINDOW_FRAMES
    hold_frames: int = DEFAULT_HOLD_FRAMES
    hold_age_s: float = DEFAULT_HOLD_AGE_S
    key_retry_s: float = DEFAULT_KEY_RETRY_S
    key_retry_max_s: float = DEFAULT_KEY_RETRY_MAX_S
    unknown_cache_s: float = DEFAULT_UNKNOWN_CACHE_S
    switch_after_s: float = DEFAULT_SWITCH_AFTER_S
    retire_after_s: float = DEFAULT_RETIRE_AFTER_S
    rekey_after_frames: int = DEFAULT_REKEY_AFTER_FRAMES
    report_interval_s: float = 1.0


@dataclass(slots=True)
class Verdict:
    """What to do with one queued packet: let ``payload`` through, or drop (None)."""

    tag: object
    payload: bytes | None
    reason: str = ""


@dataclass(slots=True, eq=False)
class L3Peer:
    """One peer host, by ID: its bound IPs, its key ring, where it sends from."""

    peer_id: str
    ips: frozenset
    keys: KeyRing
    endpoint: tuple[bytes, int] | None = None  # nat mode: learned from verified packets
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reported_at: float = -1e18


@dataclass(slots=True)
class _Held:
    tag: object
    packet: bytes
    extra: object = None


class L3Engine:
    def __init__(self, my_id: str, my_ips, settings: L3Settings = L3Settings(), pn_start: int = 1):
        if settings.mode not in l3_wire.MODES:
            raise ValueError(f"mode must be one of {', '.join(l3_wire.MODES)}")
        self.my_id = my_id
        self.my_ips = frozenset(my_ips)
        self.settings = settings
        self.mode = l3_wire.MODES[settings.mode]
        self.cipher = settings.cipher
        #: One counter for every key this host sends with (see ``aead``).
        self.send_pn = pn_start
        self.peers: dict[str, L3Peer] = {}
        self.ip_owner: dict[bytes, str] = {}
        self.revoked: set[str] = set()
        self.unknown_until: dict[tuple, float] = {}
        self.holds = HoldTable(settings.hold_frames, settings.hold_age_s,
                               settings.key_retry_s, settings.key_retry_max_s)
        self.notices: list[tuple[str, str, int]] = []
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self._draining: dict[str, KeyRing] = {}
        #: Drop verdicts of held packets pushed out by newer ones (``take_late_verdicts``).
        self._late: list[Verdict] = []
        self._header_len = l3_wire.L3_FIXED_LEN + len(my_id.encode())

    def _drop(self, tag, reason: str) -> Verdict:
        self.drops[reason] += 1
        return Verdict(tag, None, reason)

    # ------------------------------------------------------------------ sending

    def outbound(self, tag, packet: bytes, now: float) -> Verdict | None:
        """Seal one plain packet to a policy prefix; None means held."""
        ip = l3_wire.parse_ipv4(packet)
        if isinstance(ip, str):
            return self._drop(tag, ip)
        owner = self.ip_owner.get(ip.dst)
        peer = self.peers.get(owner) if owner is not None else None
        if peer is None:
            return self._hold((BY_IP, ip.dst), TX, _Held(tag, packet), now)
        return self._seal(tag, peer, packet, ip, now)

    def _seal(self, tag, peer: L3Peer, packet: bytes, ip: l3_wire.Ipv4, now: float) -> Verdict:
        ring = peer.keys
        if ring.next is not None and ring.due_switch(now, self.settings.switch_after_s):
            ring.promote(now, self.settings.retire_after_s)
        slot = ring.current
        pn = self.send_pn
        if pn > MAX_PACKET_NUMBER:
            return self._drop(tag, PN_EXHAUSTED)
        if self.mode == l3_wire.MODE_ROUTED:
            sealed_len = len(packet) + self._header_len + 1 + l3_wire.TAG_LEN
        else:
            sealed_len = len(packet) + self._header_len + l3_wire.TAG_LEN + l3_wire.IPV4_MIN_HEADER + l3_wire.UDP_LEN
        if sealed_len > l3_wire.IPV4_MAX:
            return self._drop(tag, TOO_BIG)
        self.send_pn = pn + 1
        slot.frames_sealed += 1
        if slot.frames_sealed >= self.settings.rekey_after_frames and not slot.rekey_asked:
            slot.rekey_asked = True
            self.notices.append((REKEY, peer.peer_id, slot.pw_id))
        header = l3_wire.encode_l3_header(self.mode, slot.pw_id, pn, self.my_id)
        nonce = aead.nonce(pn)
        if self.mode == l3_wire.MODE_ROUTED:
            aad = ip.src + ip.dst + header
            body = slot.send_aead.encrypt(nonce, bytes([ip.protocol]) + packet[ip.header_len:], aad)
            out = l3_wire.rebuild_ipv4(packet[:ip.header_len], l3_wire.L3_IP_PROTOCOL, sealed_len) + header + body
        else:
            body = slot.send_aead.encrypt(nonce, packet, header)
            ep_ip, ep_port = peer.endpoint or (ip.dst, self.settings.udp_port)
            ident = int.from_bytes(packet[4:6], "big")
            out = l3_wire.encode_udp_packet(ip.src, ep_ip, self.settings.udp_port, ep_port, header + body, ident)
        peer.packets_out += 1
        peer.bytes_out += len(packet)
        self.counters["sealed"] += 1
        return Verdict(tag, out)

    # ---------------------------------------------------------------- receiving

    def inbound(self, tag, packet: bytes, now: float) -> Verdict | None:
        """Open one sealed packet; None means held."""
        ip = l3_wire.parse_ipv4(packet)
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
            return self._hold((BY_ID, sender), RX, _Held(tag, packet), now)
        return self._open(tag, peer, packet, ip, offset, header, endpoint, now)

    def _open(self, tag, peer: L3Peer, packet: bytes, ip: l3_wire.Ipv4, offset: int,
              header: l3_wire.L3Header, endpoint, now: float) -> Verdict | None:
        ring = peer.keys
        pw_id, pn = header.pw_id, header.packet_number
        slot = ring.lookup(pw_id)
        if slot is None:
            if pw_id > ring.newest_pw_id():
                return self._hold((BY_ID, peer.peer_id), RX, _Held(tag, packet), now)  # race a
            self._report_lag(peer, now)
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
            src, dst = ip.src, ip.dst
            out = l3_wire.rebuild_ipv4(packet[:ip.header_len], plain[0], ip.header_len + len(plain) - 1) + plain[1:]
        else:
            inner = l3_wire.parse_ipv4(plain)
            if isinstance(inner, str):
                return self._drop(tag, l3_wire.MALFORMED)
            src, dst, out = inner.src, inner.dst, plain
        if src not in peer.ips:
            return self._drop(tag, SPOOFED_SOURCE)
        if dst not in self.my_ips:
            return self._drop(tag, NOT_FOR_US)
        slot.replay.update(pn)
        if slot is not ring.current:
            if slot is ring.next:
                ring.peer_used(pw_id, now, self.settings.retire_after_s)
                self._draining[peer.peer_id] = ring
            elif now - ring.current.created_at >= self.settings.switch_after_s:
                self._report_lag(peer, now)  # race b
        if endpoint is not None and peer.endpoint != endpoint:
            peer.endpoint = endpoint
            self.counters["endpoint_changes"] += 1
        peer.packets_in += 1
        peer.bytes_in += len(out)
        self.counters["opened"] += 1
        return Verdict(tag, out)

    def _report_lag(self, peer: L3Peer, now: float) -> None:
        if now - peer.reported_at >= self.settings.report_interval_s:
            peer.reported_at = now
            self.notices.append((REPORT, peer.peer_id, peer.keys.newest_pw_id()))

    # ----------------------------------------------------------------- holding

    def _hold(self, key: tuple, direction: int, held: _Held, now: float) -> Verdict | None:
        if direction == TX and self.unknown_until.get(key, 0.0) > now:
            return self._drop(held.tag, NO_KEY)
        entry = self.holds.pending.get(key)
        pushed = None
        if entry is not None and len(entry.held) >= self.holds.max_frames:
            pushed = entry.held.popleft()[1]
        self.holds.hold(key, direction, held, now)
        self.counters["held"] += 1
        if pushed is not None:
            self.drops[HOLD_OVERFLOW] += 1
            self._late.append(Verdict(pushed.tag, None, HOLD_OVERFLOW))
        if self.holds.max_frames <= 0:  # nothing is held, but the key is still requested
            return self._drop(held.tag, HOLD_OVERFLOW)
        return None

    def take_late_verdicts(self) -> list[Verdict]:
        """Drop verdicts of held packets pushed out by newer ones.  Call after each batch."""
        late, self._late = self._late, []
        return late

    def take_key_requests(self, now: float) -> list[tuple]:
        """(BY_IP, ip) and (BY_ID, peer_id) to ask the key server about now."""
        due = self.holds.due_requests(now)
        self.counters["key_requests"] += len(due)
        return due

    def take_notices(self) -> list[tuple[str, str, int]]:
        """(``rekey`` or ``report``, peer ID, PW_ID) for the key server."""
        notices, self.notices = self.notices, []
        for kind, _, _ in notices:
            self.counters["rekey_requests" if kind == REKEY else "lag_reports"] += 1
        return notices

    def on_timer(self, now: float) -> list[Verdict]:
        """Age held packets (drop verdicts for them) and key versions."""
        out: list[Verdict] = []
        limit = now - self.settings.hold_age_s
        for entry in self.holds.pending.values():
            while entry.held and entry.held[0][2] <= limit:
                out.append(self._drop(entry.held.popleft()[1].tag, HOLD_EXPIRED))
        self.holds.expire(now)
        for key in [k for k, t in self.unknown_until.items() if t <= now]:
            del self.unknown_until[key]
        for pid, ring in list(self._draining.items()):
            if ring.next is not None and ring.due_switch(now, self.settings.switch_after_s):
                ring.promote(now, self.settings.retire_after_s)
            ring.expire(now)
            if ring.next is None and ring.previous is None:
                del self._draining[pid]
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.holds.next_deadline(),) if d is not None]
        for ring in self._draining.values():
            if ring.next is not None:
                deadlines.append(ring.next_since + self.settings.switch_after_s)
            if ring.previous is not None:
                deadlines.append(ring.previous_until)
        return min(deadlines) if deadlines else None

    # --------------------------------------------------------------- installing

    def install_key(self, peer_id: str, key: bytes, pw_id: int, peer_ips, now: float) -> list[Verdict]:
        """Install a version of a peer's pair key; returns verdicts for released packets.

        A version not newer than every version held is ignored (a repeated
        answer never resets a packet counter under a live key); the peer's
        bound IPs are refreshed either way.
        """
        self.counters["key_answers"] += 1
        if peer_id in self.revoked or peer_id == self.my_id:
            return []
        ips = frozenset(peer_ips) - self.my_ips
        send = aead.make_aead(self.cipher, aead.l3_direction_key(key, pw_id, self.my_id, peer_id, self.cipher))
        recv = aead.make_aead(self.cipher, aead.l3_direction_key(key, pw_id, peer_id, self.my_id, self.cipher))
        slot = KeySlot(pw_id, send, recv, ReplayWindow(self.settings.replay_window_frames), now)
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = L3Peer(peer_id, ips, KeyRing(slot))
        else:
            if peer.keys.offer(slot, now):
                self._draining[peer_id] = peer.keys
                self.counters["rekeys"] += 1
            for ip in peer.ips - ips:
                if self.ip_owner.get(ip) == peer_id:
                    del self.ip_owner[ip]
            peer.ips = ips
        for ip in ips:
            self.ip_owner[ip] = peer_id
        self.unknown_until.pop((BY_ID, peer_id), None)
        out: list[Verdict] = []
        for hold_key in [(BY_ID, peer_id)] + [(BY_IP, ip) for ip in ips]:
            self.unknown_until.pop(hold_key, None)
            for direction, held, _ in self.holds.take(hold_key):
                self.counters["hold_flushed"] += 1
                verdict = (self.outbound if direction == TX else self.inbound)(held.tag, held.packet, now)
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
        peer = self.peers.pop(peer_id, None)
        self._draining.pop(peer_id, None)
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

    def drain_all(self) -> list[Verdict]:
        """Drop verdicts for every held packet (the agent is stopping)."""
        out = []
        for key in list(self.holds.pending):
            out += [self._drop(h.tag, NO_KEY) for _, h, _ in self.holds.take(key)]
        return out + self.take_late_verdicts()

    # ------------------------------------------------------------------ status

    def snapshot(self, now: float) -> dict:
        """Counters and per-peer state (no key material)."""
        peers = []
        for peer in self.peers.values():
            ring = peer.keys
            peers.append({
                "id": peer.peer_id,
                "ips": sorted(l3_wire.format_ip(ip) for ip in peer.ips),
                "endpoint": (f"{l3_wire.format_ip(peer.endpoint[0])}:{peer.endpoint[1]}"
                             if peer.endpoint else None),
                "pw_id": ring.current.pw_id,
                "pw_ids_held": sorted(s.pw_id for s in (ring.previous, ring.current, ring.next) if s),
                "key_age_s": round(now - ring.current.created_at, 1),
                "packets_in": peer.packets_in,
                "packets_out": peer.packets_out,
                "bytes_in": peer.bytes_in,
                "bytes_out": peer.bytes_out,
            })
        return {
            "mode": self.settings.mode,
            "cipher": self.cipher,
            "peers": peers,
            "revoked_peers": sorted(self.revoked),
            "pending_keys": [f"{k}:{l3_wire.format_ip(v) if k == BY_IP else v}" for k, v in self.holds.pending],
            "drops": dict(self.drops),
            "counters": {
                k: self.counters.get(k, 0)
                for k in ("sealed", "opened", "key_requests", "key_answers", "held", "hold_flushed",
                          "rekeys", "rekey_requests", "lag_reports", "endpoint_changes")
            },
        }


def use_cipher(engine: L3Engine, cipher: str) -> bool:
    """Switch to the key server's cipher; keys derived for another one are dropped."""
    aead.check_cipher(cipher)
    if cipher == engine.cipher:
        return False
    engine.cipher = cipher
    engine.peers.clear()
    engine.ip_owner.clear()
    engine._draining.clear()
    return True
