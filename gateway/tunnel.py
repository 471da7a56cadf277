"""The sans-I/O tunnel of the inter-subnet port: messages in, sealed datagrams out.

One *link* per configured peer gateway (named by its enrolled ID), over one
or more *paths* (IDs 0-15, ``multipath`` chooses between them).  The key
server hands the gateway, for every NETKEY version (PW_ID), the key of each
direction of each path of each link (``l2crypt.core.tunnel_keys``); NETKEY
itself never reaches a gateway, and one path's keys open only that path's
datagrams.

1. ``install(peer, pw_id, send_key, recv_key, now, path)``: a link path's versions live
   in a ``KeyRing`` (make before break) in the engine's ``PeerTable``
   (``l2crypt.core.peer_table``), keyed by the link's sender tag (and the
   path ID after it, for paths other than 0): receiving
   accepts every version held; sending moves to a new version once the peer
   is seen using it, or ``switch_after_s`` after it arrived; the old one is
   dropped ``retire_after_s`` after the switch (every version dropped leaves
   its replay window's top in the floors first).  No rekey notices and no
   lag reports: NETKEY rotates at the key servers.
2. ``seal(peer, message, now, path, kind)``: the path's current version, the next packet
   number.  One counter for all links; ``on_timer`` raises it to the clock
   (``replay_floor.raise_to_clock``), so a receiver can bound it after a
   restart.
3. ``open(peer, datagram, now, path)``, where ``peer`` and ``path`` are
   the configured peer and path whose addresses the datagram came by: parse
   the header (``tunnel_wire``); the sender tag must be a configured peer's
   (``tunnel_unknown_tag``: dropped before any state is looked up), that
   peer must be ``peer`` (``tunnel_tag_address``) and the header's path
   ``path`` (``tunnel_path_address``; a path the link does not have:
   ``tunnel_unknown_path``); find the version; check the replay window,
   open, and only then move the window.  The state per (peer, version) is
   made when the key arrives: forged tags use up nothing.
4. Replay floors (``floors``, a ``replay_floor.FloorBook`` the daemon
   restores from and saves to ``tunnel_replay_floors`` in the state
   directory): every new replay window of a peer starts at that peer's
   floor, so datagrams recorded before a restart of this gateway are refused
   when the same NETKEY versions come back.  While the floors are not saved
   (``stale``), nothing is accepted (``tunnel_floors_unsaved``).

``seal`` and ``open`` never raise; every drop is counted in ``drops`` under a
reason name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from l2crypt.core import aead, peer_table
from l2crypt.core.key_ring import KeyRing
from l2crypt.core.peer_keys import KeySlot
from l2crypt.core.peer_table import PeerSettings, PeerTable, TableOwner
from l2crypt.core.replay_floor import FloorBook
from l2crypt.core.tunnel_keys import TUNNEL_CIPHER, sender_tag

from . import tunnel_wire

# Drop reasons (tunnel_wire adds the format ones).
NO_NETKEY = "tunnel_no_netkey"
STALE_NETKEY = "tunnel_stale_netkey"
REPLAYED = "tunnel_replayed"
BAD_TAG = "tunnel_bad_tag"
PN_EXHAUSTED = "tunnel_pn_exhausted"
PN_UNRESERVED = "tunnel_pn_unreserved"
UNKNOWN_TAG = "tunnel_unknown_tag"
TAG_ADDRESS = "tunnel_tag_address"
UNKNOWN_PATH = "tunnel_unknown_path"
PATH_ADDRESS = "tunnel_path_address"
FLOORS_UNSAVED = "tunnel_floors_unsaved"

#: A datagram under a newer NETKEY version asks the key server again at most this often (seconds).
KEY_RETRY_S = 1.0


#: One NETKEY version of one link, as this gateway holds it (its replay
#: window is of the peer's datagrams under that version).
LinkKey = KeySlot


@dataclass(slots=True, eq=False)
class LinkPath:
    """One path of one link: its key versions.  Owned by its ``Link``."""

    name: str  # the link's (the peer gateway's ID)
    path: int
    key: bytes  # in the peer table and the floors: the sender tag, then the path ID unless 0
    keys: KeyRing


@dataclass(slots=True, eq=False)
class Link:
    """One configured peer gateway and its paths.  Owned by its ``Tunnel``."""

    name: str
    tag: bytes
    paths: dict[int, LinkPath]

    @property
    def keys(self) -> KeyRing:
        """The ring of the link's first path (the one path of a one-path link)."""
        return next(iter(self.paths.values())).keys


def path_key(tag: bytes, path: int) -> bytes:
    """A link path's name in the peer table and the replay floors."""
    return tag if path == 0 else tag + bytes((path,))


class Tunnel(TableOwner):
    """The links of one gateway to its inter-subnet peers."""

    def __init__(self, my_id: str, peers: tuple[str, ...] = (), pn_start: int = 1, window_frames: int = 2048,
                 switch_after_s: float = 2.0, retire_after_s: float = 30.0, floors: FloorBook | None = None,
                 paths: dict[str, tuple[int, ...]] | None = None):
        """``paths``: the path IDs of each peer (default: path 0 only)."""
        self.my_tag = sender_tag(my_id)
        self.cipher = TUNNEL_CIPHER
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        settings = PeerSettings(cipher=TUNNEL_CIPHER, replay_window_frames=window_frames,
                                switch_after_s=switch_after_s, retire_after_s=retire_after_s,
                                report_interval_s=float("inf"))
        #: The links by sender tag, their key rings and the packet counter
        #: (``send_pn``; ``pn_limit``: what the packet clock has reserved on
        #: disk, set by the daemon, ``tunnel_pn_unreserved`` above it).
        self.table: PeerTable[bytes, Link] = PeerTable(settings, pn_start, None, floors, counters=self.counters)
        self.links = {}
        for name in peers:
            tag = sender_tag(name)
            ids = (paths or {}).get(name) or (0,)
            self.links[name] = Link(name, tag, {p: LinkPath(name, p, path_key(tag, p), KeyRing()) for p in ids})
        self.by_tag = {link.tag: link for link in self.links.values()}
        if len(self.by_tag) != len(peers):
            raise ValueError("two tunnel peers have the same sender tag; rename one")
        self.by_key = self.table.peers
        self.by_key.update((lp.key, lp) for link in self.links.values() for lp in link.paths.values())
        self.window_frames = window_frames
        self.switch_after_s = switch_after_s
        self.retire_after_s = retire_after_s
        self.floors = floors
        self.newest_pw_id = 0
        self.wants_key = False  # a datagram under a newer NETKEY arrived: ask the key server
        self._asked_at = float("-inf")

    # ------------------------------------------------------------- keys

    def install(self, peer: str, pw_id: int, send_key: bytes, recv_key: bytes, now: float, path: int = 0) -> bool:
        """Offer one version of a path of the link to ``peer``; True if it was new."""
        link = self.links.get(peer)
        lp = link.paths.get(path) if link is not None else None
        if lp is None or lp.keys.lookup(pw_id) is not None:
            return False  # never a fresh window under a version held
        floor = self.floors.floor(lp.key) if self.floors is not None else 0
        slot = KeySlot.from_direction_keys(self.cipher, send_key, recv_key, pw_id, self.window_frames, now, floor)
        if not self.table.offer(lp.key, lp.keys, slot, now):
            return False
        if pw_id > self.newest_pw_id:
            self.counters["netkey_installs"] += 1
            self.counters["netkey_rekeys"] += self.newest_pw_id > 0
            self.newest_pw_id = pw_id
        return True

    # ----------------------------------------------------------- sending

    def seal(self, peer: str, message: bytes, now: float, path: int = 0,
             kind: int = tunnel_wire.KIND_DATA) -> bytes | None:
        """A datagram carrying ``message`` on ``path`` of the link to ``peer``, or None (counted)."""
        link = self.links.get(peer)
        lp = link.paths.get(path) if link is not None else None
        step = self.table.send(lp.key, lp.keys, now, rekey=False) if lp is not None else peer_table.NO_KEY
        if step.__class__ is str:
            self.drops[NO_NETKEY if step == peer_table.NO_KEY
                       else PN_EXHAUSTED if step == peer_table.PN_EXHAUSTED else PN_UNRESERVED] += 1
            return None
        slot, pn = step
        aad = tunnel_wire.encode_header(self.my_tag, slot.pw_id, pn, path, kind)
        if kind == tunnel_wire.KIND_DATA:
            self.counters["tunnel_sealed"] += 1
            self.counters["tunnel_bytes_sealed"] += len(message) - tunnel_wire.DATA_SEQ_LEN
        return aad + slot.send_aead.encrypt(aead.nonce(pn), message, aad)

    # --------------------------------------------------------- receiving

    def open(self, peer: str, datagram: bytes, now: float, path: int = 0) -> bytes | None:
        """The message of a datagram that came by ``path`` from ``peer``, or None (dropped and
        counted); its kind is ``tunnel_wire.decode_header(datagram).kind``."""
        header = tunnel_wire.decode_header(datagram)
        if isinstance(header, str):
            self.drops[header] += 1
            return None
        sender, pw_id, pn, sent_path, kind = header
        link = self.by_tag.get(sender)
        if link is None:
            self.drops[UNKNOWN_TAG] += 1
            return None
        if link.name != peer:
            self.drops[TAG_ADDRESS] += 1
            return None
        lp = link.paths.get(sent_path)
        if lp is None or sent_path != path:
            self.drops[UNKNOWN_PATH if lp is None else PATH_ADDRESS] += 1
            return None
        slot = lp.keys.lookup(pw_id)
        if slot is None:
            if pw_id > lp.keys.newest_pw_id():
                self.drops[NO_NETKEY] += 1
                if now - self._asked_at >= KEY_RETRY_S:  # forged versions cost one request a second
                    self.wants_key, self._asked_at = True, now
            else:
                self.drops[STALE_NETKEY] += 1
            return None
        if self.floors is not None and self.floors.stale(now):
            self.drops[FLOORS_UNSAVED] += 1
            return None
        if not slot.replay.check(pn):
            self.drops[REPLAYED] += 1
            return None
        try:
            inner = slot.recv_aead.decrypt(aead.nonce(pn), tunnel_wire.body_of(datagram),
                                           tunnel_wire.aad_of(datagram))
        except InvalidTag:
            self.drops[BAD_TAG] += 1
            return None
        slot.replay.update(pn)
        if slot is not lp.keys.current:
            self.table.opened(lp.key, lp.keys, slot, now)
        if kind == tunnel_wire.KIND_DATA:
            self.counters["tunnel_opened"] += 1
            self.counters["tunnel_bytes_opened"] += len(inner) - tunnel_wire.DATA_SEQ_LEN
        return inner

    # ------------------------------------------------------------ timers

    def on_timer(self, now: float) -> None:
        """Call every tick: switches and retires versions, keeps the counter on the clock."""
        self.table.follow_clock(now)
        self.table.on_timer(now)

    def next_deadline(self) -> float | None:
        """When ``on_timer`` next has a version to switch or retire (engine
        time); None: nothing waits."""
        deadlines = []
        for lp in self.by_key.values():
            ring = lp.keys
            if ring.next is not None:
                deadlines.append(ring.next_since + self.switch_after_s)
            if ring.previous is not None:
                deadlines.append(ring.previous_until)
        return min(deadlines, default=None)

    def highest(self) -> list[tuple[bytes, int]]:
        """(peer tag, highest packet number verified) of every window: for ``FloorBook.save``."""
        return self.table.highest()

    # ------------------------------------------------------------ status

    def current(self) -> LinkKey | None:
        """The newest version sent with on any link (for the NETKEY age and PW_ID)."""
        slots = [lp.keys.current for lp in self.by_key.values() if lp.keys.current is not None]
        return max(slots, key=lambda s: s.pw_id) if slots else None

    def pw_id_of(self, peer: str, path: int) -> int | None:
        """The version a path sends with now (None: no key yet)."""
        lp = self.links[peer].paths.get(path) if peer in self.links else None
        return lp.keys.current.pw_id if lp is not None and lp.keys.current is not None else None

    def snapshot(self) -> dict:
        held = {s.pw_id for lp in self.by_key.values() for s in lp.keys.slots()}
        current = self.current()
        return {
            "netkey_pw_id": current.pw_id if current else None,
            "netkey_pw_ids_held": sorted(held),
            "tunnel_links": [{"peer": link.name, "tag": link.tag.hex(),
                              "pw_id": self.pw_id_of(link.name, next(iter(link.paths))),
                              "paths": {str(p): self.pw_id_of(link.name, p) for p in link.paths}}
                             for link in self.links.values()],
        }
