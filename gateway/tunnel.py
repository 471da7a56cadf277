"""The sans-I/O tunnel of the inter-subnet port: frames in, NETKEY-sealed datagrams out.

* NETKEY versions (PW_ID) live in a ``KeyRing`` (make before break): the key
  server pushes a new version to every gateway of both segments at once;
  receiving accepts every version held; sending moves to the new version once
  a peer gateway is seen using it, or ``switch_after_s`` after it arrived; the
  old version is dropped ``retire_after_s`` after the switch.
* Each (sender gateway, PW_ID) has its own receive key and replay window
  (``replay.ReplayWindow``, checked before and moved only after the tag verified).
  A sender's state is kept only once one of its datagrams verified, for at
  most ``MAX_SENDERS`` senders; a verified datagram of one more sender is
  dropped (``tunnel_too_many_senders``), never accepted without replay state.
* ``seal`` never raises; ``open`` never raises and counts every drop in
  ``drops`` under a reason name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from l2crypt import aead
from l2crypt.constants import MAX_PACKET_NUMBER
from l2crypt.key_ring import KeyRing
from l2crypt.replay import ReplayWindow

from . import tunnel_wire

_TUNNEL_INFO = b"l2crypt v1 tunnel"
MAX_SENDERS = 256

# Drop reasons (tunnel_wire adds the format ones).
NO_NETKEY = "tunnel_no_netkey"
STALE_NETKEY = "tunnel_stale_netkey"
REPLAYED = "tunnel_replayed"
BAD_TAG = "tunnel_bad_tag"
OWN_DATAGRAM = "tunnel_own_datagram"
PN_EXHAUSTED = "tunnel_pn_exhausted"
TOO_MANY_SENDERS = "tunnel_too_many_senders"


def tunnel_sender_key(netkey: bytes, pw_id: int, sender: bytes) -> bytes:
    """The key one gateway seals tunnel datagrams with under one NETKEY version."""
    info = _TUNNEL_INFO + sender + pw_id.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=aead.KEY_LEN, salt=None, info=info).derive(netkey)


@dataclass(eq=False)
class NetKey:
    """One NETKEY version as one gateway holds it."""

    cipher: str
    key: bytes
    pw_id: int
    send_aead: object
    created_at: float
    window_frames: int
    receivers: dict = field(default_factory=dict)  # sender -> (aead, ReplayWindow)

    def receiver(self, sender: bytes):
        """(aead, replay window) for ``sender``; a new sender's state is not kept
        until ``remember`` (after its tag verified): forged sender tags use up nothing."""
        state = self.receivers.get(sender)
        if state is None:
            state = (aead.make_aead(self.cipher, tunnel_sender_key(self.key, self.pw_id, sender)),
                     ReplayWindow(self.window_frames))
        return state

    def remember(self, sender: bytes, state) -> bool:
        """Keep a verified sender's state; False when ``MAX_SENDERS`` are kept already."""
        if sender in self.receivers:
            return True
        if len(self.receivers) >= MAX_SENDERS:
            return False
        self.receivers[sender] = state
        return True


class Tunnel:
    """NETKEY state of one gateway; shared by all of its inter-subnet peers."""

    def __init__(self, my_tag: bytes, cipher: str = aead.AES_256_GCM, pn_start: int = 1,
                 window_frames: int = 2048, switch_after_s: float = 2.0, retire_after_s: float = 30.0):
        self.my_tag = bytes(my_tag)
        self.cipher = cipher
        self.send_pn = pn_start
        self.window_frames = window_frames
        self.switch_after_s = switch_after_s
        self.retire_after_s = retire_after_s
        self.ring: KeyRing[NetKey] = KeyRing()
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self.wants_key = False  # a datagram under a newer NETKEY arrived

    def install(self, key: bytes, pw_id: int, now: float) -> bool:
        """Offer a NETKEY version; True if it was new."""
        slot = NetKey(self.cipher, key, pw_id,
                      aead.make_aead(self.cipher, tunnel_sender_key(key, pw_id, self.my_tag)),
                      now, self.window_frames)
        had_key = self.ring.newest_pw_id() > 0
        new = self.ring.offer(slot, now)
        if new:
            self.counters["netkey_installs"] += 1
            self.counters["netkey_rekeys"] += had_key
        return new

    def use_cipher(self, cipher: str) -> None:
        if cipher != self.cipher:
            self.cipher = cipher
            self.ring = KeyRing()

    def seal(self, frame: bytes, now: float) -> bytes | None:
        ring = self.ring
        if ring.due_switch(now, self.switch_after_s):
            ring.promote(now, self.retire_after_s)
        slot = ring.current
        if slot is None:
            self.drops[NO_NETKEY] += 1
            return None
        pn = self.send_pn
        if pn > MAX_PACKET_NUMBER:
            self.drops[PN_EXHAUSTED] += 1
            return None
        self.send_pn = pn + 1
        aad = tunnel_wire.encode_header(self.my_tag, slot.pw_id, pn)
        self.counters["tunnel_sealed"] += 1
        self.counters["tunnel_bytes_sealed"] += len(frame)
        return aad + slot.send_aead.encrypt(aead.nonce(pn), frame, aad)

    def open(self, datagram: bytes, now: float) -> tuple[bytes, bytes] | None:
        """(sender tag, inner frame), or None (dropped and counted)."""
        header = tunnel_wire.decode_header(datagram)
        if isinstance(header, str):
            self.drops[header] += 1
            return None
        sender, pw_id, pn = header
        if sender == self.my_tag:
            self.drops[OWN_DATAGRAM] += 1
            return None
        slot = self.ring.lookup(pw_id)
        if slot is None:
            if pw_id > self.ring.newest_pw_id():
                self.drops[NO_NETKEY] += 1
                self.wants_key = True
            else:
                self.drops[STALE_NETKEY] += 1
            return None
        state = slot.receiver(sender)
        recv, window = state
        if not window.check(pn):
            self.drops[REPLAYED] += 1
            return None
        try:
            inner = recv.decrypt(aead.nonce(pn), tunnel_wire.body_of(datagram), tunnel_wire.aad_of(datagram))
        except InvalidTag:
            self.drops[BAD_TAG] += 1
            return None
        if not slot.remember(sender, state):  # without kept replay state it could be replayed
            self.drops[TOO_MANY_SENDERS] += 1
            return None
        window.update(pn)
        if slot is self.ring.next:
            self.ring.peer_used(pw_id, now, self.retire_after_s)
        self.counters["tunnel_opened"] += 1
        self.counters["tunnel_bytes_opened"] += len(inner)
        return sender, inner

    def on_timer(self, now: float) -> None:
        if self.ring.due_switch(now, self.switch_after_s):
            self.ring.promote(now, self.retire_after_s)
        self.ring.expire(now)

    def snapshot(self) -> dict:
        ring = self.ring
        return {
            "netkey_pw_id": ring.current.pw_id if ring.current else None,
            "netkey_pw_ids_held": sorted(s.pw_id for s in (ring.previous, ring.current, ring.next) if s),
        }
