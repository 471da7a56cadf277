"""Key versions of the frame engine: installing, expiring, forgetting, and
the replay floors of the windows that go with them.

``EngineKeys`` is a part of ``engine.FrameEngine`` (a mixin: the frame path
is in ``engine``, what changes which keys it holds is here).  It is called
by the agent's key client, and by the engine's own timer.

1. ``install_pair_key`` / ``install_multicast_key``: versions from the key
   server, each with its age; versions past ``key_max_age_s`` are refused
   (``_refuse_expired``: what waits for them is dropped as ``key_expired``,
   the server is asked to rotate).  The rest go through ``KeyRing.merge``,
   every new window starting at the sender's floor; a key for a held MAC
   under another peer ID replaces that peer.  Then held frames are released
   (``_release``): a frame that still finds no key is dropped, never held
   again.
2. ``_expire_keys`` (from ``on_timer`` at ``_expiry_due``): versions made
   ``key_max_age_s`` ago are dropped; a peer left without a current version
   is forgotten, so its next frame asks for a fresh key.
3. ``mark_unknown``, ``revoke_peer``, ``use_cipher``: the server's other
   answers.
4. Every window dropped on the way hands its highest packet number to the
   floor book (``peer_table.PeerTable.note``); ``replay_highest`` is what
   the agent saves.

Sans-I/O, like the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import aead
from .hold_queue import RX, TX
from .key_ring import KeyRing
from .peer_keys import GroupKey, KeySlot, PeerState
from .peer_table import NO_KEY, REKEY, REPORT

__all__ = ["GROUP_MAC", "KEY_EXPIRED", "NO_KEY", "REKEY", "REPORT", "UNKNOWN_SENDER", "Delivered", "EngineKeys",
           "use_cipher"]

#: Pseudo-MAC of the multicast key in the hold table, the peer table and key requests.
GROUP_MAC = b"\xff" * 6

# Drop reasons of key events (the engine has the others).
UNKNOWN_SENDER = "unknown_sender"
KEY_EXPIRED = "key_expired"


@dataclass
class Delivered:
    """Frames released by a key install: to send on the wire, to write to the TAP."""

    to_wire: list
    to_tap: list


class EngineKeys:
    """The key-changing half of ``FrameEngine`` (see the module docstring);
    every attribute it uses is the engine's."""

    # ------------------------------------------------------------ replay floors

    def replay_highest(self):
        """(sender MAC, highest verified packet number) of every replay window,
        for ``FloorBook.save`` (several windows of one sender may appear)."""
        yield from self.table.highest()
        for group in self.group.slots():
            yield from group.highest()

    # --------------------------------------------------------------- installing

    def install_pair_key(
        self, peer_mac: bytes, peer_id: str, pair_key: bytes, pw_id: int, now: float,
        age_s: float = 0.0, older=(),
    ) -> Delivered:
        """Install versions of a peer's pair key; returns the released held frames.

        ``age_s`` is how long ago the key server made the version; ``older`` is
        (pw_id, key, age_s) of older versions still live.  Versions held already
        are never replaced, so a repeated answer never resets a replay window;
        the others are placed by ``KeyRing.merge``.  A key under another peer ID
        than the one held replaces the peer.
        """
        self.counters["key_answers"] += 1
        self.unknown_until.pop(peer_mac, None)
        if peer_mac in self.revoked:
            return Delivered([], [])
        peer = self.peers.get(peer_mac)
        if peer is not None and peer.peer_id != peer_id:
            self._forget_peer(peer_mac)  # the MAC moved to another host: its old key must go
            self.counters["peers_replaced"] += 1
            peer = None
        ring = peer.keys if peer is not None else KeyRing()
        versions = [(pw_id, pair_key, age_s), *older]
        live = [v for v in versions if v[2] < self.key_max_age_s]
        if not live:  # every version offered is past the agent's key lifetime
            if peer is None:
                return self._refuse_expired(peer_mac, pw_id, now)
            return self._release(peer_mac, now)  # a late answer: the versions held stay
        floor = self.floors.floor(peer_mac) if self.floors is not None else 0
        offered = []
        for version, key, age in live:
            if ring.lookup(version) is None:
                made = now - age
                slot = KeySlot.from_pair_key(self.cipher, key, version, self.my_mac, peer_mac,
                                             self._window, made, floor)
                offered.append((slot, made))
        newest = ring.newest_pw_id()
        taken = self.table.merge(peer_mac, ring, offered, now)
        if peer is None:
            self.peers[peer_mac] = PeerState(peer_mac, peer_id, ring)
        elif ring.newest_pw_id() > newest:
            self.counters["rekeys"] += 1
        if taken:
            self._expiry_due = min(self._expiry_due, min(s.created_at for s in ring.slots()) + self.key_max_age_s)
        return self._release(peer_mac, now)

    def install_multicast_key(self, key: bytes, pw_id: int, now: float, age_s: float = 0.0) -> Delivered:
        """Install a multicast key version (held already: ignored); releases held frames."""
        if age_s >= self.key_max_age_s:
            if self.group.current is None:
                return self._refuse_expired(GROUP_MAC, pw_id, now)
            return self._release(GROUP_MAC, now)
        if self.group.lookup(pw_id) is None:
            made = now - age_s
            group = GroupKey.create(self.cipher, key, pw_id, self.my_mac, self._window, made, floors=self.floors)
            newest = self.group.newest_pw_id()
            if self.table.merge(GROUP_MAC, self.group, [(group, made)], now):
                if newest and self.group.newest_pw_id() > newest:
                    self.counters["rekeys"] += 1
                self._expiry_due = min(self._expiry_due, made + self.key_max_age_s)
        return self._release(GROUP_MAC, now)

    def set_key_max_age(self, seconds: float) -> None:
        """A new maximum key age (the key server's, in its welcome); the next
        ``on_timer`` drops what is older."""
        self.key_max_age_s = float(seconds)
        self._expiry_due = float("-inf")

    def _refuse_expired(self, mac: bytes, pw_id: int, now: float) -> Delivered:
        """The server offered only versions past ``key_max_age_s`` for a MAC we
        hold no key of: drop what waits for them, stop asking for a while, and
        ask the server to rotate the pair."""
        held = self.holds.take(mac)
        self.drops[KEY_EXPIRED] += len(held)
        self.counters["expired_keys_refused"] += 1
        self.expired_until[mac] = now + self.settings.unknown_cache_s
        if mac != GROUP_MAC:
            self.table.notices.append((REKEY, mac, pw_id))
        return Delivered([], [])

    def _expire_keys(self, now: float) -> None:
        """Drop every version made ``key_max_age_s`` ago (see the module docstring)."""
        made_by = now - self.key_max_age_s
        due = float("inf")
        for mac, ring in [(m, p.keys) for m, p in self.peers.items()] + [(GROUP_MAC, self.group)]:
            dropped = ring.drop_made_by(made_by)
            if dropped:
                self.table.note(mac, dropped)
                self.counters["keys_expired"] += len(dropped)
                if ring.current is None and mac != GROUP_MAC:
                    self._forget_peer(mac)
            for slot in ring.slots():
                due = min(due, slot.created_at + self.key_max_age_s)
        self._expiry_due = due

    def mark_unknown(self, mac: bytes, now: float) -> None:
        """The key server says no host holds ``mac``: drop its held frames, stop asking."""
        held = self.holds.take(mac)
        if held:
            self.drops[NO_KEY] += sum(1 for d, _, _ in held if d == TX)
            self.drops[UNKNOWN_SENDER] += sum(1 for d, _, _ in held if d == RX)
        self.unknown_until[mac] = now + self.settings.unknown_cache_s

    def revoke_peer(self, mac: bytes) -> None:
        """The server revoked the host at ``mac``: drop its keys and refuse its frames."""
        self._forget_peer(mac)
        self.holds.take(mac)
        self.revoked.add(mac)

    def _forget_peer(self, mac: bytes) -> None:
        self.table.forget(mac)

    def _release(self, mac: bytes, now: float) -> Delivered:
        out = Delivered([], [])
        self._releasing = True
        try:
            for direction, frame, arrived in self.holds.take(mac):
                self.counters["hold_flushed"] += 1
                if direction == TX:
                    sealed = self.seal_from_tap(frame, now)
                    if sealed is not None:
                        out.to_wire.append(sealed)
                else:
                    plain = self.open_from_wire(frame, now)
                    if plain is not None:
                        out.to_tap.append(plain)
                        if self.floors is not None and now > arrived:
                            self.floors.late(frame[6:12], now - arrived)
        finally:
            self._releasing = False
        return out


def use_cipher(engine, cipher: str) -> bool:
    """Switch ``engine`` to the segment's cipher (told by the key server).

    Keys derived for another cipher are dropped, since they would not open
    anything (their windows leave their floors).  Returns True if the cipher changed.
    """
    aead.check_cipher(cipher)
    if cipher == engine.cipher:
        return False
    engine.cipher = cipher
    engine.table.forget_all()
    engine.table.note(GROUP_MAC, engine.group.slots())
    engine.group = KeyRing()
    return True
