"""Key state you can see in the types (compare wireguard-go's keypair.go).

* ``KeySlot``: one version (PW_ID) of a pair key (or of a tunnel link's
  keys) as one host holds it: the
  sending AEAD (me -> peer) and the receiving AEAD (peer -> me) with its
  replay window.  Packet numbers come from the engine's one counter.
* ``PeerState``: one peer MAC: its ID, a ``KeyRing`` of slots (current, next,
  previous; see ``key_ring``), and the per-peer traffic counters.
* ``GroupKey``: one version of the multicast key: my own sending AEAD, and a
  bounded cache of per-sender receiving AEADs and windows.

Every new replay window starts at the sender's floor (``replay_floor``), so
a key that comes back (after a restart, or a version taken back in the same
run) never opens a frame that was accepted before.  ``created_at`` is when
the key server made the version (engine time: install time minus the age
the server gave), the clock of the agent's maximum key lifetime.

Everything here is owned by the ``FrameEngine`` of one agent; nothing in it is
shared between threads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import aead
from .key_ring import KeyRing
from .replay import ReplayWindow

if TYPE_CHECKING:
    from .replay_floor import FloorBook


@dataclass(slots=True, eq=False)
class KeySlot:
    """One version (PW_ID) of a pair key: its two direction AEADs, replay window, creation time
    and send count."""
    pw_id: int
    send_aead: object
    recv_aead: object
    replay: ReplayWindow
    created_at: float     # engine clock (monotonic) when the key server made this version
    frames_sealed: int = 0
    rekey_asked: bool = False  # the data-volume rekey request went out

    @classmethod
    def from_pair_key(
        cls, cipher: str, pair_key: bytes, pw_id: int, my_mac: bytes, peer_mac: bytes,
        window_frames: int, now: float, floor: int = 0,
    ) -> "KeySlot":
        """A slot for one version; its window refuses ``floor`` and below; ``now``
        is when the version was made (install time minus its age)."""
        send = aead.make_aead(cipher, aead.pair_direction_key(pair_key, pw_id, my_mac, peer_mac, cipher))
        recv = aead.make_aead(cipher, aead.pair_direction_key(pair_key, pw_id, peer_mac, my_mac, cipher))
        return cls(pw_id, send, recv, ReplayWindow(window_frames, floor), now)

    @classmethod
    def from_direction_keys(cls, cipher: str, send_key: bytes, recv_key: bytes, pw_id: int,
                            window_frames: int, now: float, floor: int = 0) -> "KeySlot":
        """A slot from the two direction keys themselves (the tunnel's link keys,
        the layer-3 keys)."""
        return cls(pw_id, aead.make_aead(cipher, send_key), aead.make_aead(cipher, recv_key),
                   ReplayWindow(window_frames, floor), now)

    def windows(self, sender: bytes) -> list[tuple[bytes, int]]:
        """(sender, highest verified) of this version's one window (``peer_table.note``)."""
        return [(sender, self.replay.highest)]


@dataclass(slots=True, eq=False)
class PeerState:
    """One peer host (by MAC): its key ring and traffic counters."""
    mac: bytes
    peer_id: str
    keys: KeyRing
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(slots=True, eq=False)
class SenderWindow:
    """One multicast sender's receive AEAD and replay window under a group key."""
    recv_aead: object
    replay: ReplayWindow


@dataclass(slots=True, eq=False)
class GroupKey:
    """One version of the multicast key: our send AEAD and a window per sender MAC."""
    cipher: str
    key: bytes
    pw_id: int
    send_aead: object
    created_at: float
    window_frames: int
    max_senders: int
    floors: "FloorBook | None" = None  # the engine's (shared); None: windows start empty
    senders: "OrderedDict[bytes, SenderWindow]" = field(default_factory=OrderedDict)
    frames_sealed: int = 0

    @classmethod
    def create(
        cls, cipher: str, key: bytes, pw_id: int, my_mac: bytes,
        window_frames: int, now: float, max_senders: int = 4096, floors: "FloorBook | None" = None,
    ) -> "GroupKey":
        send = aead.make_aead(cipher, aead.group_sender_key(key, pw_id, my_mac, cipher))
        return cls(cipher, key, pw_id, send, now, window_frames, max_senders, floors)

    def sender(self, sender_mac: bytes) -> SenderWindow:
        """The receiving state for one sender; a new one is not cached until ``keep``."""
        state = self.senders.get(sender_mac)
        if state is None:
            derived = aead.group_sender_key(self.key, self.pw_id, sender_mac, self.cipher)
            floor = self.floors.floor(sender_mac) if self.floors is not None else 0
            state = SenderWindow(aead.make_aead(self.cipher, derived), ReplayWindow(self.window_frames, floor))
        return state

    def keep(self, sender_mac: bytes, state: SenderWindow) -> None:
        """Cache a sender's state once one of its frames verified (bounded, LRU;
        the window pushed out leaves its floor in the book)."""
        if sender_mac in self.senders:
            self.senders.move_to_end(sender_mac)
            return
        self.senders[sender_mac] = state
        if len(self.senders) > self.max_senders:
            mac, gone = self.senders.popitem(last=False)
            if self.floors is not None:
                self.floors.note(mac, gone.replay.highest)

    def highest(self):
        """(sender MAC, highest verified packet number) of every cached window."""
        return [(mac, w.replay.highest) for mac, w in self.senders.items()]

    def windows(self, _name: bytes) -> list[tuple[bytes, int]]:
        """Every sender's window (``peer_table.note``; the ring's name is not a sender)."""
        return self.highest()
