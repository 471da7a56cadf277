"""The sans-I/O frame engine of one agent.

It takes frames and a clock value and returns frames; it never touches a
socket, a file or the clock itself, and it never raises on a frame.

Sending (a plain frame read from the TAP):
1. ``seal_from_tap``: drop runts and frames not from our own MAC;
2. a group destination (I/G bit set) is sealed with the multicast key;
3. a unicast destination is sealed with the peer's current pair key;
4. with no key the frame is held (bounded) and one key request is queued;
   a frame whose L4 checksum the caller left partial (``csum_partial``) is
   sealed as version 2 with the flag (``frame_wire``), or completed first
   when it is held (a held frame carries no flag);
   at most ``max_pending_keys`` MACs wait for a key at once (MACs first seen
   as a source on the wire get half of them, so forged senders cannot crowd
   out our own destinations), beyond that the frame is dropped
   (``pending_full``); key requests leave at ``key_requests_per_s`` at most.

Receiving (a frame read from the wire port):
0. while the replay floors are not saved (``floors_unsaved``, see below)
   every frame is refused;
1. ``open_from_wire``: parse the header (``frame_wire.decode_header``);
2. drop frames for another host, and our own frames coming back;
3. find the key by *source* MAC and PW_ID (pair) or by PW_ID (multicast);
   with no key, hold the frame and queue a key request;
4. check the replay window, open the AEAD, and only then move the window;
5. a frame flagged ``csum_partial`` (``frame_wire.csum_partial_of``) has its
   inner checksum completed (``gso.complete_l4_checksum``) unless the
   settings say ``complete_checksums=False``: then the caller hands it to a
   host that takes partial checksums (a TAP with ``IFF_VNET_HDR``).  Frames
   released from the hold queue are always completed (``Delivered`` has no
   flag); one whose checksum cannot be found is dropped (``csum_unresolved``).

Replay floors and packet numbers (``replay_floor``; the agent saves the book
every ``SAVE_INTERVAL_S`` and restores it at start):
* every new replay window of a sender starts at ``floors.floor(sender)``, and
  every window dropped hands its highest number to ``floors.note``, so a key
  that comes back never opens a frame accepted before, across restarts too;
* ``replay_highest()`` is what the agent saves; frames are refused once the
  last save is ``max_unsaved_s`` old (``floors.stale``: one float compare
  per frame, against a deadline ``on_timer`` refreshes);
* ``on_timer`` raises ``send_pn`` to the packet clock (``raise_to_clock``);
  sealing never uses a number above ``pn_limit``, what the agent's packet
  clock has reserved on disk (``pn_unreserved``).

Key versions (PW_ID, make before break; see ``key_ring``; the per-peer step
is ``peer_table``'s, shared with the layer-3 engine and the gateway tunnel):
* a newer version offered by the server is held as ``next``; receiving accepts
  every version held; sending moves to ``next`` once the peer is seen using it,
  or ``switch_after_s`` later; the old version is dropped ``retire_after_s``
  after that;
* a key answer (and a push) carries the newest version and the older ones
  still live, each with its age; ``KeyRing.merge`` places them as the peer
  holds them, so a restarted agent loses no frame sealed under an older one;
* a frame under a newer version we lack, or under one between two we hold,
  is held and the key requested (the patent's race a, and missed rotations);
  a frame under an older version than ours, once the peer should have
  switched, is reported to the server, which pushes the newest version to
  both ends again (race b);
* a frame released from the hold queue that still finds no key is dropped
  (``no_key``), never held again: a forged PW_ID costs one key request;
* a version older than ``key_max_age_s`` (made that long ago at the key
  server) is dropped on the next tick; the next frame asks for a fresh key,
  and an answer with nothing younger is refused (``key_expired``) and the
  server asked to rotate;
* a key for a known MAC under another peer ID replaces the old peer;
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
* ``on_timer(now)`` ages held frames, follows the packet clock, expires old
  keys and checks the floors; call it every tick (``next_deadline()`` says
  when it has work at the latest).

Every drop is counted in ``drops`` under a reason name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from . import aead, frame_wire
from .gso import complete_l4_checksum
from .constants import (
    DEFAULT_ETHERTYPE,
    DEFAULT_KEY_MAX_AGE_S,
    FRAME_VERSION,
    FRAME_VERSION_FLAGS,
    KEY_FLAG_CSUM_PARTIAL,
    KEY_ID_MULTICAST,
    KEY_ID_PAIR,
    MAC_HEADER_LEN,
    MIN_PLAIN_FRAME,
)
from .frame_wire import AAD_LEN, HEADER
from .engine_keys import (
    GROUP_MAC,
    KEY_EXPIRED,
    NO_KEY,
    REKEY,
    REPORT,
    UNKNOWN_SENDER,
    Delivered,
    EngineKeys,
    use_cipher,
)
from .hold_queue import HOLD_OVERFLOW, PENDING_FULL, RX, TX, HoldTable
from .key_ring import KeyRing
from .peer_keys import GroupKey, PeerState
# (REKEY, REPORT, Delivered, use_cipher, PN_EXHAUSTED, PN_UNRESERVED: engine's names for its callers too)
from .peer_table import PN_EXHAUSTED, PN_UNRESERVED, PeerSettings, PeerTable, TableOwner
from .replay_floor import FloorBook

_decode_fields = frame_wire.decode_fields
_nonce = aead.nonce

# Drop reasons (the names users see in status and metrics).
RUNT = "runt"
FOREIGN_SOURCE = "foreign_source"
NOT_FOR_US = "not_for_us"
OWN_FRAME = "own_frame"
UNKNOWN_KEY_ID = "unknown_key_id"
STALE_KEY = "stale_key"
REPLAYED = "replayed"
BAD_TAG = "bad_tag"
HOLD_EXPIRED = "hold_expired"
REVOKED_SENDER = "revoked_sender"
FLOORS_UNSAVED = "floors_unsaved"
CSUM_UNRESOLVED = "csum_unresolved"


@dataclass(frozen=True)
class EngineSettings(PeerSettings):
    """Tuning of one engine (the shared fields are ``PeerSettings``').  Units are in the names."""

    ethertype: int = DEFAULT_ETHERTYPE
    key_max_age_s: float = DEFAULT_KEY_MAX_AGE_S
    #: Complete a checksum a sender left partial before returning the frame
    #: (False: the caller's host takes partial checksums, see step 5).
    complete_checksums: bool = True


class FrameEngine(EngineKeys, TableOwner):
    """The sans-I/O frame engine of one host: seals frames from the TAP, opens frames from the
    wire, holds frames while their key is asked (see the module docstring)."""

    def __init__(self, my_mac: bytes, settings: EngineSettings = EngineSettings(), pn_start: int = 1,
                 floors: FloorBook | None = None, now0: float | None = None):
        self.my_mac = bytes(my_mac)
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        #: The peers by MAC, their key rings, the packet counter (``send_pn``:
        #: one counter for every key this host sends with, seeded by the agent
        #: from its packet clock, ``pn_start`` at engine time ``now0``, None:
        #: the first ``on_timer``; ``pn_limit``: what the clock reserved on
        #: disk, ``pn_unreserved`` above it) and the notices.
        self.table: PeerTable[bytes, PeerState] = PeerTable(settings, pn_start, now0, floors,
                                                            counters=self.counters)
        self.peers = self.table.peers
        #: Replay floors, shared by every engine of one daemon (None: windows start empty).
        self.floors = floors
        #: Frames are opened only up to this engine time: the floors' last save
        #: plus ``max_unsaved_s`` (refreshed by ``on_timer``; no book: always).
        self._accept_until = float("inf") if floors is None else self._floors_deadline()
        self.settings = settings
        self.cipher = settings.cipher
        self.ethertype = settings.ethertype
        #: Maximum age of a key version (the agent may lower it to the key server's).
        self.key_max_age_s = settings.key_max_age_s
        self._expiry_due = float("inf")  # the earliest time a held version passes key_max_age_s
        self.group: KeyRing[GroupKey] = KeyRing()
        self.revoked: set[bytes] = set()
        self.holds = HoldTable(
            settings.hold_frames, settings.hold_age_s, settings.key_retry_s, settings.key_retry_max_s,
            max_pending=settings.max_pending_keys, requests_per_s=settings.key_requests_per_s, first=GROUP_MAC,
        )
        self.unknown_until: dict[bytes, float] = {}
        self.expired_until: dict[bytes, float] = {}  # MACs whose key server offered only expired keys
        self._releasing = False  # inside _release: a frame that still finds no key is dropped
        self._header = HEADER
        self._window = settings.replay_window_frames

    # ------------------------------------------------------------------ sending

    def seal_from_tap(self, frame: bytes, now: float, csum_partial: bool = False) -> bytes | None:
        """Seal one plain frame from the TAP; None means dropped or held.
        ``csum_partial``: its TCP/UDP checksum field holds only the
        pseudo-header sum (``gso.segment(..., csum=False)``)."""
        if len(frame) < MIN_PLAIN_FRAME:
            self.drops[RUNT] += 1
            return None
        if frame[6:12] != self.my_mac:
            self.drops[FOREIGN_SOURCE] += 1
            return None
        dst = frame[0:6]
        if dst[0] & 1:
            step = self.table.send(GROUP_MAC, self.group, now, rekey=False)
            if step.__class__ is str:
                if step == NO_KEY:  # not welcomed yet: hold it until the multicast key arrives
                    self._hold_plain(GROUP_MAC, frame, csum_partial, now)
                else:
                    self.drops[step] += 1
                return None
            group, pn = step
            aad = frame[:MAC_HEADER_LEN] + self._header.pack(
                self.ethertype, FRAME_VERSION_FLAGS if csum_partial else FRAME_VERSION,
                KEY_ID_MULTICAST | KEY_FLAG_CSUM_PARTIAL if csum_partial else KEY_ID_MULTICAST, group.pw_id, pn
            )
            self.counters["sealed"] += 1
            self.counters["bytes_sealed"] += len(frame)
            return aad + group.send_aead.encrypt(_nonce(pn), frame[MAC_HEADER_LEN:], aad)
        peer = self.peers.get(dst)
        if peer is None:
            self._hold_plain(dst, frame, csum_partial, now)
            return None
        return self._seal_pair(peer, frame, now, csum_partial)

    def _hold_plain(self, mac: bytes, frame: bytes, csum_partial: bool, now: float) -> None:
        """Hold a frame from the TAP, its checksum completed first (step 4)."""
        if csum_partial:
            frame = complete_l4_checksum(frame)
            if frame.__class__ is str:
                self.drops[CSUM_UNRESOLVED] += 1
                return
        self._hold(mac, TX, frame, now)

    def _seal_pair(self, peer: PeerState, frame: bytes, now: float, csum_partial: bool = False) -> bytes | None:
        step = self.table.send(peer.mac, peer.keys, now)
        if step.__class__ is str:
            self.drops[step] += 1
            return None
        slot, pn = step
        if csum_partial:
            aad = frame[:MAC_HEADER_LEN] + self._header.pack(
                self.ethertype, FRAME_VERSION_FLAGS, KEY_ID_PAIR | KEY_FLAG_CSUM_PARTIAL, slot.pw_id, pn)
        else:
            aad = frame[:MAC_HEADER_LEN] + self._header.pack(self.ethertype, FRAME_VERSION, KEY_ID_PAIR, slot.pw_id, pn)
        peer.frames_out += 1
        peer.bytes_out += len(frame)
        self.counters["sealed"] += 1
        self.counters["bytes_sealed"] += len(frame)
        return aad + slot.send_aead.encrypt(_nonce(pn), frame[MAC_HEADER_LEN:], aad)

    # ---------------------------------------------------------------- receiving

    def open_from_wire(self, frame: bytes, now: float) -> bytes | None:
        """Open one sealed frame from the wire; None means dropped or held."""
        if now > self._accept_until:
            self.drops[FLOORS_UNSAVED] += 1
            return None
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
            oldest = (ring.previous or ring.current).pw_id
            if pw_id > ring.newest_pw_id() or pw_id > oldest:
                # The peer holds a version we lack, newer or between two of ours
                # (missed rotations): ask; the answer carries every live version.
                self._hold(src, RX, frame, now)
            else:
                self.drops[STALE_KEY] += 1
                self.table.report_lag(src, ring, now)
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
            self.table.opened(src, ring, slot, now)
        peer.frames_in += 1
        peer.bytes_in += len(plain) + MAC_HEADER_LEN
        self.counters["opened"] += 1
        self.counters["bytes_opened"] += len(plain) + MAC_HEADER_LEN
        if frame[14] == FRAME_VERSION_FLAGS and frame[15] & KEY_FLAG_CSUM_PARTIAL:
            return self._finish_partial(frame[:MAC_HEADER_LEN] + plain)
        return frame[:MAC_HEADER_LEN] + plain

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
        if frame[14] == FRAME_VERSION_FLAGS and frame[15] & KEY_FLAG_CSUM_PARTIAL:
            return self._finish_partial(frame[:MAC_HEADER_LEN] + plain)
        return frame[:MAC_HEADER_LEN] + plain

    def _finish_partial(self, plain: bytes) -> bytes | None:
        """Receiving step 5: complete a partial checksum unless the caller takes it."""
        if self.settings.complete_checksums or self._releasing:
            plain = complete_l4_checksum(plain)
            if plain.__class__ is str:
                self.drops[CSUM_UNRESOLVED] += 1
                return None
        return plain

    # ----------------------------------------------------------------- holding

    def _hold(self, mac: bytes, direction: int, frame: bytes, now: float) -> None:
        if self._releasing:
            self.drops[NO_KEY] += 1  # released once already: its key did not come
            return
        if self.expired_until and self.expired_until.get(mac, 0.0) > now:
            self.drops[KEY_EXPIRED] += 1
            return
        if direction == TX and (mac in self.revoked or self.unknown_until.get(mac, 0.0) > now):
            self.drops[NO_KEY] += 1
            return
        left = self.holds.hold(mac, direction, frame, now)
        if left is None:
            self.counters["held"] += 1
        elif left[0] == PENDING_FULL:
            self.drops[PENDING_FULL] += 1
        else:
            self.counters["held"] += 1
            self.drops[HOLD_OVERFLOW] += 1

    def take_key_requests(self, now: float) -> list[bytes]:
        """MACs to request a key for now (first requests and backed-off retries),
        at most ``key_requests_per_s``; the rest stay due for a later call."""
        due = self.holds.take_requests(now)
        self.counters["key_requests"] += len(due)
        return due

    def on_timer(self, now: float) -> None:
        """Age out held frames and stale negative answers, follow the packet
        clock, expire old keys, switch and retire versions, check the floors.
        Call every tick."""
        self.table.follow_clock(now)
        if self.floors is not None:
            self._accept_until = self._floors_deadline()
        expired = self.holds.expire(now)
        if expired:
            self.drops[HOLD_EXPIRED] += len(expired)
        for cache in (self.unknown_until, self.expired_until):
            if cache:
                for mac in [m for m, t in cache.items() if t <= now]:
                    del cache[mac]
        if now >= self._expiry_due:
            self._expire_keys(now)
        self.table.on_timer(now)

    def _floors_deadline(self) -> float:
        """The last engine time a frame may be opened at without a newer save."""
        saved_at = self.floors.saved_at
        return float("-inf") if saved_at is None else saved_at + self.floors.max_unsaved_s

    def next_deadline(self) -> float | None:
        """When ``take_key_requests``/``on_timer`` next have work, in engine time."""
        deadlines = [d for d in (self.holds.next_deadline(), self.table.next_deadline()) if d is not None]
        if self._expiry_due != float("inf"):
            deadlines.append(self._expiry_due)
        return min(deadlines) if deadlines else None

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
                "pw_ids_held": sorted(s.pw_id for s in ring.slots()),
                "key_age_s": round(now - ring.current.created_at, 1),
                "frames_in": peer.frames_in,
                "frames_out": peer.frames_out,
                "bytes_in": peer.bytes_in,
                "bytes_out": peer.bytes_out,
            })
        return {
            "cipher": self.cipher,
            "multicast_pw_id": self.group.current.pw_id if self.group.current else None,
            "multicast_key_age_s": round(now - self.group.current.created_at, 1) if self.group.current else None,
            "revoked_peers": [frame_wire.format_mac(m) for m in self.revoked],
            "peers": peers,
            "pending_keys": [frame_wire.format_mac(m) for m in self.holds.pending],
            "drops": dict(self.drops),
            "counters": {
                k: self.counters.get(k, 0)
                for k in ("sealed", "opened", "bytes_sealed", "bytes_opened", "key_requests", "key_answers",
                          "held", "hold_flushed", "rekeys", "rekey_requests", "lag_reports",
                          "keys_expired", "expired_keys_refused", "peers_replaced")
            },
        }
