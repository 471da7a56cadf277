"""The sans-I/O frame engine of one agent.

It takes frames and a clock value and returns frames; it never touches a
socket, a file or the clock itself, and it never raises on a frame.

Sending (a plain frame read from the TAP):
1. ``seal_from_tap``: drop runts and frames not from our own MAC;
2. a group destination (I/G bit set) is sealed with the multicast key;
3. a unicast destination is sealed with the peer's current pair key;
4. with no key the frame is held (bounded) and one key request is queued;
   at most ``max_pending_keys`` MACs wait for a key at once (MACs first seen
   as a source on the wire get half of them, so forged senders cannot crowd
   out our own destinations), beyond that the frame is dropped
   (``pending_full``); key requests leave at ``key_requests_per_s`` at most.

Receiving (a frame read from the wire port):
1. ``open_from_wire``: parse the header (``frame_wire.decode_header``);
2. drop frames for another host, and our own frames coming back;
3. find the key by *source* MAC and PW_ID (pair) or by PW_ID (multicast);
   with no key, hold the frame and queue a key request;
4. check the replay window, open the AEAD, and only then move the window.

Key versions (PW_ID, make before break; see ``key_ring``):
* a newer version offered by the server is held as ``next``; receiving accepts
  every version held; sending moves to ``next`` once the peer is seen using it,
  or ``switch_after_s`` later; the old version is dropped ``retire_after_s``
  after that;
* a frame under a newer version we lack is held and the key requested (the
  patent's race a); a frame under an older version than ours, once the peer
  should have switched, is reported to the server, which pushes the newest
  version to both ends again (race b);
* after ``rekey_after_frames`` frames under one pair key the sender asks the
  server for a new version, long before the packet number could wrap.

Control (called by the agent's key client):
* ``take_key_requests(now)`` -> MACs to ask the key server about (new and
  retries); ``GROUP_MAC`` means "the current multicast key";
* ``take_notices()`` -> (kind, MAC, PW_ID) to tell the server: ``"rekey"``
  (data volume reached) and ``"report"`` (the peer lags behind);
* ``install_pair_key(...)`` / ``install_multicast_key(...)`` -> held frames,
  now sealed for the wire or opened for the TAP;
* ``mark_unknown(mac, now)`` when the server says no host holds that MAC;
* ``on_timer(now)`` ages held frames; ``next_deadline()`` says when to call it.

Every drop is counted in ``drops`` under a reason name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from . import aead, frame_wire
from .constants import (
    DEFAULT_ETHERTYPE,
    DEFAULT_HOLD_AGE_S,
    DEFAULT_HOLD_FRAMES,
    DEFAULT_KEY_REQUESTS_PER_S,
    DEFAULT_KEY_RETRY_MAX_S,
    DEFAULT_KEY_RETRY_S,
    DEFAULT_MAX_PENDING_KEYS,
    DEFAULT_REPLAY_WINDOW_FRAMES,
    DEFAULT_REKEY_AFTER_FRAMES,
    DEFAULT_RETIRE_AFTER_S,
    DEFAULT_SWITCH_AFTER_S,
    DEFAULT_UNKNOWN_CACHE_S,
    KEY_ID_MULTICAST,
    KEY_ID_PAIR,
    MAC_HEADER_LEN,
    MAX_PACKET_NUMBER,
    MIN_PLAIN_FRAME,
)
from .frame_wire import AAD_LEN, HEADER
from .hold_queue import RX, TX, HoldTable
from .key_ring import KeyRing
from .peer_keys import GroupKey, KeySlot, PeerState

_decode_fields = frame_wire.decode_fields
_nonce = aead.nonce

# Drop reasons (the names users see in status and metrics).
RUNT = "runt"
FOREIGN_SOURCE = "foreign_source"
NO_KEY = "no_key"
NOT_FOR_US = "not_for_us"
OWN_FRAME = "own_frame"
UNKNOWN_SENDER = "unknown_sender"
UNKNOWN_KEY_ID = "unknown_key_id"
STALE_KEY = "stale_key"
REPLAYED = "replayed"
BAD_TAG = "bad_tag"
HOLD_OVERFLOW = "hold_overflow"
HOLD_EXPIRED = "hold_expired"
PN_EXHAUSTED = "pn_exhausted"
REVOKED_SENDER = "revoked_sender"
PENDING_FULL = "pending_full"

#: Pseudo-MAC of the multicast key in the hold table and in key requests.
GROUP_MAC = b"\xff" * 6
REKEY = "rekey"
REPORT = "report"


@dataclass(frozen=True)
class EngineSettings:
    """Tuning of one engine.  Units are in the names."""

    cipher: str = aead.AES_256_GCM
    ethertype: int = DEFAULT_ETHERTYPE
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
    max_pending_keys: int = DEFAULT_MAX_PENDING_KEYS
    key_requests_per_s: float = DEFAULT_KEY_REQUESTS_PER_S


@dataclass
class Delivered:
    """Frames released by a key install: to send on the wire, to write to the TAP."""

    to_wire: list
    to_tap: list


class FrameEngine:
    def __init__(self, my_mac: bytes, settings: EngineSettings = EngineSettings(), pn_start: int = 1):
        self.my_mac = bytes(my_mac)
        #: The next packet number.  One counter for every key this host sends
        #: with, so (sender, packet number) never repeats; the agent seeds it
        #: from ``aead.initial_packet_number`` (safe across restarts).
        self.send_pn = pn_start
        self.settings = settings
        self.cipher = settings.cipher
        self.ethertype = settings.ethertype
        self.peers: dict[bytes, PeerState] = {}
        self.group: KeyRing[GroupKey] = KeyRing()
        self.revoked: set[bytes] = set()
        self.notices: list[tuple[str, bytes, int]] = []
        self._draining: dict[bytes, KeyRing] = {}  # rings with a next or previous version
        self.holds = HoldTable(
            settings.hold_frames, settings.hold_age_s, settings.key_retry_s, settings.key_retry_max_s
        )
        self.unknown_until: dict[bytes, float] = {}
        #: Key-request token bucket (at most ``key_requests_per_s``, burst as many).
        self._request_tokens = float(max(1.0, settings.key_requests_per_s))
        self._request_refill_at: float | None = None
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self._header = HEADER
        self._window = settings.replay_window_frames

    # ------------------------------------------------------------------ sending

    def seal_from_tap(self, frame: bytes, now: float) -> bytes | None:
        """Seal one plain frame from the TAP; None means dropped or held."""
        if len(frame) < MIN_PLAIN_FRAME:
            self.drops[RUNT] += 1
            return None
        if frame[6:12] != self.my_mac:
            self.drops[FOREIGN_SOURCE] += 1
            return None
        dst = frame[0:6]
        if dst[0] & 1:
            ring = self.group
            if ring.next is not None and ring.due_switch(now, self.settings.switch_after_s):
                ring.promote(now, self.settings.retire_after_s)
            group = ring.current
            if group is None:  # not welcomed yet: hold it until the multicast key arrives
                self._hold(GROUP_MAC, TX, frame, now)
                return None
            pn = self.send_pn
            if pn > MAX_PACKET_NUMBER:
                self.drops[PN_EXHAUSTED] += 1
                return None
            self.send_pn = pn + 1
            group.frames_sealed += 1
            aad = frame[:MAC_HEADER_LEN] + self._header.pack(
                self.ethertype, 1, KEY_ID_MULTICAST, group.pw_id, pn
            )
            self.counters["sealed"] += 1
            self.counters["bytes_sealed"] += len(frame)
            return aad + group.send_aead.encrypt(_nonce(pn), frame[MAC_HEADER_LEN:], aad)
        peer = self.peers.get(dst)
        if peer is None:
            self._hold(dst, TX, frame, now)
            return None
        return self._seal_pair(peer, frame, now)

    def _seal_pair(self, peer: PeerState, frame: bytes, now: float) -> bytes | None:
        ring = peer.keys
        if ring.next is not None and ring.due_switch(now, self.settings.switch_after_s):
            ring.promote(now, self.settings.retire_after_s)
        slot = ring.current
        pn = self.send_pn
        if pn > MAX_PACKET_NUMBER:
            self.drops[PN_EXHAUSTED] += 1
            return None
        self.send_pn = pn + 1
        slot.frames_sealed += 1
        if slot.frames_sealed >= self.settings.rekey_after_frames and not slot.rekey_asked:
            slot.rekey_asked = True
            self.notices.append((REKEY, peer.mac, slot.pw_id))
        aad = frame[:MAC_HEADER_LEN] + self._header.pack(self.ethertype, 1, KEY_ID_PAIR, slot.pw_id, pn)
        peer.frames_out += 1
        peer.bytes_out += len(frame)
        self.counters["sealed"] += 1
        self.counters["bytes_sealed"] += len(frame)
        return aad + slot.send_aead.encrypt(_nonce(pn), frame[MAC_HEADER_LEN:], aad)

    # ---------------------------------------------------------------- receiving

    def open_from_wire(self, frame: bytes, now: float) -> bytes | None:
        """Open one sealed frame from the wire; None means dropped or held."""
        header = _decode_fields(frame, self.ethertype)
        if header.__class__ is str:
            self.drops[header] += 1
            return None
        dst, src, key_id, pw_id, pn = header
        if src == self.my_mac:
            self.drops[OWN_FRAME] += 1
            return None
        if src in self.revoked:
            self.drops[REVOKED_SENDER] += 1
            return None
        if key_id == KEY_ID_PAIR:
            if dst != self.my_mac:
                self.drops[NOT_FOR_US] += 1
                return None
            return self._open_pair(frame, src, pw_id, pn, now)
        if key_id == KEY_ID_MULTICAST and dst[0] & 1:
            return self._open_group(frame, src, pw_id, pn, now)
        self.drops[UNKNOWN_KEY_ID] += 1
        return None

    def _open_pair(self, frame: bytes, src: bytes, pw_id: int, pn: int, now: float) -> bytes | None:
        peer = self.peers.get(src)
        if peer is None:
            if self.unknown_until.get(src, 0.0) > now:
                self.drops[UNKNOWN_SENDER] += 1
                return None
            self._hold(src, RX, frame, now)
            return None
        ring = peer.keys
        slot = ring.lookup(pw_id)
        if slot is None:
            if pw_id > ring.newest_pw_id():
                # The peer already holds a newer version: ask for it (race a).
                self._hold(src, RX, frame, now)
            else:
                self.drops[STALE_KEY] += 1
                self._report_lag(peer, now)
            return None
        if not slot.replay.check(pn):
            self.drops[REPLAYED] += 1
            return None
        try:
            plain = slot.recv_aead.decrypt(_nonce(pn), frame[AAD_LEN:], frame[:AAD_LEN])
        except InvalidTag:
            self.drops[BAD_TAG] += 1
            return None
        slot.replay.update(pn)
        if slot is not ring.current:
            if slot is ring.next:
                ring.peer_used(pw_id, now, self.settings.retire_after_s)
                self._draining[src] = ring
            elif now - ring.current.created_at >= self.settings.switch_after_s:
                self._report_lag(peer, now)  # the peer still sends with an old version (race b)
        peer.frames_in += 1
        peer.bytes_in += len(plain) + MAC_HEADER_LEN
        self.counters["opened"] += 1
        self.counters["bytes_opened"] += len(plain) + MAC_HEADER_LEN
        return frame[:MAC_HEADER_LEN] + plain

    def _report_lag(self, peer: PeerState, now: float) -> None:
        if now - peer.reported_at >= self.settings.report_interval_s:
            peer.reported_at = now
            self.notices.append((REPORT, peer.mac, peer.keys.newest_pw_id()))

    def _open_group(self, frame: bytes, src: bytes, pw_id: int, pn: int, now: float) -> bytes | None:
        group = self.group.lookup(pw_id)
        if group is None:
            if pw_id > self.group.newest_pw_id():
                self._hold(GROUP_MAC, RX, frame, now)  # a newer multicast key exists: ask for it
            else:
                self.drops[NO_KEY] += 1
            return None
        sender = group.sender(src)
        if not sender.replay.check(pn):
            self.drops[REPLAYED] += 1
            return None
        try:
            plain = sender.recv_aead.decrypt(_nonce(pn), frame[AAD_LEN:], frame[:AAD_LEN])
        except InvalidTag:
            self.drops[BAD_TAG] += 1
            return None
        sender.replay.update(pn)
        group.keep(src, sender)
        self.counters["opened"] += 1
        self.counters["bytes_opened"] += len(plain) + MAC_HEADER_LEN
        return frame[:MAC_HEADER_LEN] + plain

    # ----------------------------------------------------------------- holding

    def _hold(self, mac: bytes, direction: int, frame: bytes, now: float) -> None:
        if direction == TX and (mac in self.revoked or self.unknown_until.get(mac, 0.0) > now):
            self.drops[NO_KEY] += 1
            return
        if mac not in self.holds.pending and mac != GROUP_MAC:
            limit = self.settings.max_pending_keys
            if direction == RX:
                limit //= 2
            if len(self.holds.pending) >= limit:
                self.drops[PENDING_FULL] += 1
                return
        new, pushed_out = self.holds.hold(mac, direction, frame, now)
        self.counters["held"] += 1
        if pushed_out:
            self.drops[HOLD_OVERFLOW] += pushed_out

    def take_key_requests(self, now: float) -> list[bytes]:
        """MACs to request a key for now (first requests and backed-off retries),
        at most ``key_requests_per_s``; the rest stay due for a later call."""
        rate = self.settings.key_requests_per_s
        if self._request_refill_at is not None:
            elapsed = max(0.0, now - self._request_refill_at)
            self._request_tokens = min(max(1.0, rate), self._request_tokens + elapsed * rate)
        self._request_refill_at = now
        due = self.holds.due_requests(now, int(self._request_tokens), first=GROUP_MAC)
        self._request_tokens -= len(due)
        self.counters["key_requests"] += len(due)
        return due

    def on_timer(self, now: float) -> None:
        """Age out held frames and stale negative answers.  Call at ``next_deadline()``."""
        expired = self.holds.expire(now)
        if expired:
            self.drops[HOLD_EXPIRED] += expired
        if self.unknown_until:
            for mac in [m for m, t in self.unknown_until.items() if t <= now]:
                del self.unknown_until[mac]
        if self._draining:
            switch_after_s, retire_after_s = self.settings.switch_after_s, self.settings.retire_after_s
            for mac, ring in list(self._draining.items()):
                if ring.next is not None and ring.due_switch(now, switch_after_s):
                    ring.promote(now, retire_after_s)
                ring.expire(now)
                if ring.next is None and ring.previous is None:
                    del self._draining[mac]

    def take_notices(self) -> list[tuple[str, bytes, int]]:
        """Rekey requests and lag reports for the key server, oldest first."""
        notices, self.notices = self.notices, []
        for kind, _, _ in notices:
            self.counters["rekey_requests" if kind == REKEY else "lag_reports"] += 1
        return notices

    def next_deadline(self) -> float | None:
        """When ``take_key_requests``/``on_timer`` next have work, in engine time."""
        deadlines = [d for d in (self.holds.next_deadline(),) if d is not None]
        for ring in self._draining.values():
            if ring.next is not None:
                deadlines.append(ring.next_since + self.settings.switch_after_s)
            if ring.previous is not None:
                deadlines.append(ring.previous_until)
        return min(deadlines) if deadlines else None

    # --------------------------------------------------------------- installing

    def install_pair_key(
        self, peer_mac: bytes, peer_id: str, pair_key: bytes, pw_id: int, now: float
    ) -> Delivered:
        """Install a version of a peer's pair key; returns the released held frames.

        A version not newer than every version held is ignored, so a repeated
        answer never resets a packet number under a live key.
        """
        self.counters["key_answers"] += 1
        self.unknown_until.pop(peer_mac, None)
        if peer_mac in self.revoked:
            return Delivered([], [])
        peer = self.peers.get(peer_mac)
        slot = KeySlot.from_pair_key(
            self.cipher, pair_key, pw_id, self.my_mac, peer_mac, self._window, now
        )
        if peer is None:
            self.peers[peer_mac] = PeerState(peer_mac, peer_id, KeyRing(slot))
        elif peer.keys.offer(slot, now, self.settings.retire_after_s):
            peer.peer_id = peer_id
            self._draining[peer_mac] = peer.keys
            self.counters["rekeys"] += 1
        return self._release(peer_mac, now)

    def install_multicast_key(self, key: bytes, pw_id: int, now: float) -> Delivered:
        """Install a multicast key version (not newer than held: ignored); releases held frames."""
        group = GroupKey.create(self.cipher, key, pw_id, self.my_mac, self._window, now)
        if self.group.offer(group, now, self.settings.retire_after_s) and self.group.next is not None:
            self._draining[GROUP_MAC] = self.group
            self.counters["rekeys"] += 1
        return self._release(GROUP_MAC, now)

    def mark_unknown(self, mac: bytes, now: float) -> None:
        """The key server says no host holds ``mac``: drop its held frames, stop asking."""
        held = self.holds.take(mac)
        if held:
            self.drops[NO_KEY] += sum(1 for d, _, _ in held if d == TX)
            self.drops[UNKNOWN_SENDER] += sum(1 for d, _, _ in held if d == RX)
        self.unknown_until[mac] = now + self.settings.unknown_cache_s

    def revoke_peer(self, mac: bytes) -> None:
        """The server revoked the host at ``mac``: drop its keys and refuse its frames."""
        self.peers.pop(mac, None)
        self._draining.pop(mac, None)
        self.holds.take(mac)
        self.revoked.add(mac)

    def _release(self, mac: bytes, now: float) -> Delivered:
        out = Delivered([], [])
        for direction, frame, _ in self.holds.take(mac):
            self.counters["hold_flushed"] += 1
            if direction == TX:
                sealed = self.seal_from_tap(frame, now)
                if sealed is not None:
                    out.to_wire.append(sealed)
            else:
                plain = self.open_from_wire(frame, now)
                if plain is not None:
                    out.to_tap.append(plain)
        return out

    # ------------------------------------------------------------------ status

    def snapshot(self, now: float) -> dict:
        """Counters and per-peer state for ``l2crypt status`` (no key material)."""
        peers = []
        for peer in self.peers.values():
            ring = peer.keys
            peers.append({
                "mac": frame_wire.format_mac(peer.mac),
                "id": peer.peer_id,
                "pw_id": ring.current.pw_id,
                "pw_ids_held": sorted(s.pw_id for s in (ring.previous, ring.current, ring.next) if s),
                "key_age_s": round(now - ring.current.created_at, 1),
                "frames_in": peer.frames_in,
                "frames_out": peer.frames_out,
                "bytes_in": peer.bytes_in,
                "bytes_out": peer.bytes_out,
            })
        return {
            "cipher": self.cipher,
            "multicast_pw_id": self.group.current.pw_id if self.group.current else None,
            "revoked_peers": [frame_wire.format_mac(m) for m in self.revoked],
            "peers": peers,
            "pending_keys": [frame_wire.format_mac(m) for m in self.holds.pending],
            "drops": dict(self.drops),
            "counters": {
                k: self.counters.get(k, 0)
                for k in ("sealed", "opened", "bytes_sealed", "bytes_opened", "key_requests", "key_answers",
                          "held", "hold_flushed", "rekeys", "rekey_requests", "lag_reports")
            },
        }


def use_cipher(engine: FrameEngine, cipher: str) -> bool:
    """Switch ``engine`` to the segment's cipher (told by the key server).

    Keys derived for another cipher are dropped, since they would not open
    anything.  Returns True if the cipher changed.
    """
    aead.check_cipher(cipher)
    if cipher == engine.cipher:
        return False
    engine.cipher = cipher
    engine.peers.clear()
    engine._draining.clear()
    engine.group = KeyRing()
    return True
