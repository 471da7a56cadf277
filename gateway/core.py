"""The sans-I/O core of the gateway: frames and ``now`` in, frames per port out.

Ports: the *encrypted* port (on the encrypted segment), the optional *plain*
port (the full-decrypt uplink, virtual client ID_X86) and the optional
*tunnel* peers (the inter-subnet port, virtual client NETID; each peer is a
gateway of another segment, reached over UDP and named by its enrolled ID).
One enrolled identity (role ``gateway``) stands for both virtual clients.

Learning (a learning bridge with the key server as referee):

1. A unicast source MAC seen on the plain port, or inside a tunnel datagram
   from peer P, is *learned* on side ``plain`` or ``tunnel:P``.  The gateway
   asks the key server to map it to its own identity (``map_req``) and holds
   that MAC's frames until the server answers.
2. Mapped: the gateway speaks for the MAC on the encrypted segment through a
   *virtual engine* (a ``FrameEngine`` whose own MAC is that MAC).  Encrypted
   hosts that ask the key server for the MAC get KEY(host, gateway); the
   gateway asks for the same key by the host's MAC, like any agent.
3. Refused (the MAC is bound to an enrolled host, or another gateway holds
   it): the MAC is never learned, its frames are dropped as
   ``spoofed_source`` and the answer is believed ``refused_cache_s``.
   Refused MACs are kept apart from the learned ones (at most
   ``MAX_REFUSED_MACS``, the least recently refused forgotten first), so they
   never use up ``max_learned_macs``.
4. Ageing: a learned MAC not heard from on its side, and not sent a verified
   frame from the other sides, for ``mac_ageing_s`` is forgotten, as a
   bridge forgets it: its virtual engine is dropped and the key server is
   told to release the mapping (``map_release``), so a flood of made-up
   source MACs fills the table for at most that long.  A forgotten MAC that
   encrypted hosts had talked to is learned again at once when one of them
   sends it a frame (that frame is dropped; the next ones pass), or when it
   speaks again.
5. Unmapped (an enrolled host later said hello with a mapped MAC; the key
   server pushes ``unmapped``): the gateway stops speaking for it and treats
   it as an encrypted host from then on.

The spoofing rule: the gateway never learns a MAC that the key server has
bound to an enrolled host, nor one it has seen verified on the encrypted side
(a frame sealed by that host, or a pair key for it); frames from such a MAC on
the plain or tunnel side are dropped and counted.  A frame on the encrypted
segment is decrypted only when it is addressed to a mapped MAC (so frames
between two encrypted hosts never leave through the plain port), and a
learned MAC never moves between sides (``mac_moved``).

Group frames (broadcast, multicast) cross between the sides under
``group_crossing``: ``basic`` (default: ARP, DHCPv4, DHCPv6 and IPv6
neighbour discovery), ``all`` or ``none``.  A group frame from a tunnel is
never sent into another tunnel (split horizon).  Unknown unicast is not
flooded: a destination that is not a learned MAC is an encrypted host.

Every drop is counted in ``drops`` under a reason name; nothing here raises
on a frame.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from l2crypt.core import frame_wire
from l2crypt.core.constants import DEFAULT_ETHERTYPE, KEY_ID_MULTICAST, KEY_ID_PAIR
from l2crypt.core.engine import Delivered, EngineSettings, FrameEngine, use_cipher
from l2crypt.core.replay_floor import FloorBook

from .group_policy import group_frame_allowed
from .multipath import Multipath, MultipathSettings
from .tunnel import Tunnel

ENC = "encrypted"
PLAIN = "plain"
TUNNEL = "tunnel:"
PENDING, MAPPED, REFUSED = "pending", "mapped", "refused"

# Drop reasons of the core (the engines and the tunnel add theirs).
RUNT = "runt"
GROUP_SOURCE = "group_source"
SPOOFED_SOURCE = "spoofed_source"
MAC_MOVED = "mac_moved"
TABLE_FULL = "table_full"
LEARN_HOLD_OVERFLOW = "learn_hold_overflow"
LEARN_HOLD_EXPIRED = "learn_hold_expired"
UNKNOWN_PEER = "tunnel_unknown_peer"
TUNNEL_TRANSIT = "tunnel_transit"
DST_NOT_MAPPED = "dst_not_mapped"
DST_AGED_OUT = "dst_aged_out"
OWN_SOURCE = "own_source"
TOO_BIG = "too_big"  # sealed, larger than the encrypted port's MTU (counted by the daemon)

MAX_ENC_SEEN = 65536
#: Most refused MACs remembered (least recently refused forgotten first).  Tuning.
MAX_REFUSED_MACS = 4096
#: Counters of the engines (the gateway's own and the virtual ones) summed in ``snapshot``.
ENGINE_COUNTERS = ("sealed", "opened", "bytes_sealed", "bytes_opened", "key_requests", "key_answers", "rekeys")


@dataclass(frozen=True)
class GatewaySettings:
    """Tuning of the gateway core.  Units are in the names."""
    group_crossing: str = "basic"
    max_learned_macs: int = 4096
    learn_hold_frames: int = 16
    learn_hold_age_s: float = 2.0
    refused_cache_s: float = 30.0
    map_retry_s: float = 1.0
    mac_ageing_s: float = 300.0


@dataclass
class Output:
    """Frames to send: sealed frames for the encrypted port, clear frames for
    the plain port, (peer name, datagram) for the tunnel."""

    to_enc: list = field(default_factory=list)
    to_plain: list = field(default_factory=list)
    to_tunnel: list = field(default_factory=list)


@dataclass(eq=False)
class Learned:
    """One MAC the gateway speaks for (or asked to), on one side.  Owned by ``GatewayCore.table``."""

    mac: bytes
    side: str
    state: str          # PENDING or MAPPED
    since: float
    last_seen: float    # heard from on its side, or sent a verified frame (ageing)
    asked_at: float = 0.0
    established: bool = False  # an encrypted host's frame to it verified
    held: list = field(default_factory=list)  # (frame, from side, arrived at)


class GatewayCore:
    """``gw_id`` is the gateway's enrolled ID (it names the gateway in tunnel
    datagrams); ``floors`` the replay floors of every frame engine (a sender
    has one counter for all of them: a dropped virtual engine's windows are
    noted there, so a MAC learned again does not reopen frames recorded
    before); ``tunnel_floors`` those of the tunnel (see ``tunnel``)."""

    def __init__(self, gw_mac: bytes, pn_source: Callable[[], int], tunnel_peers: tuple[str, ...] = (),
                 has_plain: bool = True, settings: GatewaySettings = GatewaySettings(),
                 engine_settings: EngineSettings = EngineSettings(), gw_id: str = "gateway",
                 floors: FloorBook | None = None, tunnel_floors: FloorBook | None = None,
                 now: float | None = None, tunnel_paths: dict[str, tuple[int, ...]] | None = None,
                 multipath: MultipathSettings = MultipathSettings(),
                 path_weights: dict[tuple[str, int], float] | None = None):
        self.gw_mac = bytes(gw_mac)
        self.pn_source = pn_source
        #: Replay floors of every engine (a sender has one counter for all of them).
        self.floors = floors
        self.settings = settings
        self.engine_settings = engine_settings
        self.ethertype = engine_settings.ethertype or DEFAULT_ETHERTYPE
        self.has_plain = has_plain
        self.peers = tuple(tunnel_peers)
        self.main = FrameEngine(self.gw_mac, engine_settings, pn_source(), floors=floors, now0=now)
        self.virtual: dict[bytes, FrameEngine] = {}
        #: Learned MACs, least recently seen first (ageing walks from the front).
        self.table: OrderedDict[bytes, Learned] = OrderedDict()
        #: Refused MACs -> (side, refused until), least recently refused first.
        self.refused: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        #: Aged-out MACs that encrypted hosts had talked to -> their side (learned
        #: again when a host sends to one), oldest first, at most ``max_learned_macs``.
        self.aged: OrderedDict[bytes, str] = OrderedDict()
        self.enc_seen: OrderedDict = OrderedDict()
        self.host_keys: dict[bytes, tuple[str, bytes, int]] = {}
        self.multicast: tuple[bytes, int] | None = None
        self.map_requests: dict[bytes, str] = {}  # mac -> side, to send (one per MAC)
        self.map_releases: dict[bytes, str] = {}  # mac -> side, to send
        paths = {peer: (tunnel_paths or {}).get(peer) or (0,) for peer in self.peers}
        self.tunnel = Tunnel(gw_id, self.peers, pn_start=pn_source(),
                             window_frames=engine_settings.replay_window_frames,
                             switch_after_s=engine_settings.switch_after_s,
                             retire_after_s=engine_settings.retire_after_s, floors=tunnel_floors, paths=paths)
        self.multipath = Multipath(self.tunnel, paths, pn_source(), multipath, path_weights)
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    # ------------------------------------------------------------ helpers

    def engines(self):
        yield self.main
        yield from self.virtual.values()

    def _note_host(self, mac: bytes) -> None:
        """``mac`` belongs to an encrypted host: never learn it on another side."""
        self.enc_seen[mac] = True
        self.enc_seen.move_to_end(mac)
        if len(self.enc_seen) > MAX_ENC_SEEN:
            self.enc_seen.popitem(last=False)

    def _to_side(self, side: str, frame: bytes, now: float, out: Output) -> None:
        if side == PLAIN:
            out.to_plain.append(frame)
            self.counters["to_plain"] += 1
            self.counters["to_plain_bytes"] += len(frame)
        elif side.startswith(TUNNEL):
            out.to_tunnel += self.multipath.send(side[len(TUNNEL):], frame, now)

    def _touch(self, mac: bytes, now: float, talked_to: bool = False) -> None:
        """``mac`` spoke on its side, or (``talked_to``) a frame from another side went to it: in use."""
        entry = self.table.get(mac)
        if entry is not None:
            entry.last_seen = now
            entry.established |= talked_to
            self.table.move_to_end(mac)

    def _relearn(self, mac: bytes, now: float) -> bool:
        """A frame for ``mac``, which aged out after hosts talked to it: learn it
        again on its side (the frame itself is dropped).  True if it had aged out."""
        side = self.aged.pop(mac, None)
        if side is None:
            return False
        self.drops[DST_AGED_OUT] += 1
        if self._learn(mac, side, now) is not None:
            self.counters["macs_relearned"] += 1
        return True

    def _deliver(self, mac: bytes, delivered: Delivered, now: float, out: Output) -> None:
        """Frames a virtual engine released: sealed ones to the segment, opened ones to its side."""
        out.to_enc.extend(delivered.to_wire)
        if delivered.to_tap:
            entry = self.table.get(mac)
            for frame in delivered.to_tap:
                self._note_host(frame[6:12])
                if entry is not None and entry.state == MAPPED:
                    self._touch(mac, now, talked_to=True)
                    self._to_side(entry.side, frame, now, out)

    def _settle(self, mac: bytes, engine: FrameEngine, now: float, out: Output) -> None:
        """Answer a virtual engine's key misses from the keys the gateway already holds."""
        for host in [m for m in engine.holds.pending if m in self.host_keys and m not in engine.peers]:
            host_id, key, pw_id = self.host_keys[host]
            self._deliver(mac, engine.install_pair_key(host, host_id, key, pw_id, now), now, out)

    def _seal_as(self, frame: bytes, now: float, out: Output) -> None:
        src = frame[6:12]
        engine = self.virtual.get(src)
        if engine is None:
            self.drops[DST_NOT_MAPPED] += 1
            return
        sealed = engine.seal_from_tap(frame, now)
        if sealed is not None:
            out.to_enc.append(sealed)
        elif engine.holds.pending:
            self._settle(src, engine, now, out)

    # ------------------------------------------------------- encrypted side

    def from_encrypted(self, frame: bytes, now: float) -> Output:
        out = Output()
        header = frame_wire.decode_header(frame, self.ethertype)
        if isinstance(header, str):
            self.drops[header] += 1
            return out
        dst, src, key_id = header.dst_mac, header.src_mac, header.key_id
        mine = self.table.get(src)
        if mine is not None and mine.state == MAPPED:
            self.drops[OWN_SOURCE] += 1
            return out
        if key_id == KEY_ID_MULTICAST:
            plain = self.main.open_from_wire(frame, now)
            if plain is not None:
                self._note_host(src)
                self._flood_group(plain, ENC, now, out)
            return out
        if key_id != KEY_ID_PAIR:
            self.drops["unknown_key_id"] += 1
            return out
        engine = self.virtual.get(dst)
        if engine is None:
            if not self._relearn(dst, now):
                self.counters["not_for_gateway"] += 1  # between two encrypted hosts
            return out
        plain = engine.open_from_wire(frame, now)
        if plain is not None:
            self._note_host(src)
            self._touch(dst, now, talked_to=True)
            self._to_side(self.table[dst].side, plain, now, out)
        elif engine.holds.pending:
            self._settle(dst, engine, now, out)
        return out

    # ---------------------------------------------------- plain and tunnel

    def from_plain(self, frame: bytes, now: float) -> Output:
        out = Output()
        self.counters["from_plain"] += 1
        self.counters["from_plain_bytes"] += len(frame)
        self._from_side(frame, PLAIN, now, out)
        return out

    def from_tunnel(self, peer: str, datagram: bytes, now: float, path: int = 0) -> Output:
        """A datagram that came by ``path`` from configured peer ``peer`` (its addresses)."""
        out = Output()
        if peer not in self.peers:
            self.drops[UNKNOWN_PEER] += 1
            return out
        frames, out.to_tunnel = self.multipath.receive(peer, path, datagram, now)
        for inner in frames:
            self._from_side(inner, TUNNEL + peer, now, out)
        return out

    def _from_side(self, frame: bytes, side: str, now: float, out: Output) -> None:
        if len(frame) < 14:
            self.drops[RUNT] += 1
            return
        src = frame[6:12]
        if src[0] & 1:
            self.drops[GROUP_SOURCE] += 1
            return
        if src == self.gw_mac:
            self.drops[OWN_SOURCE] += 1
            return
        entry = self._learn(src, side, now)
        if entry is None:
            return
        if entry.state == PENDING:
            if len(entry.held) >= self.settings.learn_hold_frames:
                self.drops[LEARN_HOLD_OVERFLOW] += 1
                return
            entry.held.append((frame, side, now))
            return
        self._forward(frame, side, now, out)

    def _learn(self, mac: bytes, side: str, now: float) -> Learned | None:
        entry = self.table.get(mac)
        if entry is None:
            if mac in self.enc_seen:
                self.drops[SPOOFED_SOURCE] += 1
                return None
            refused = self.refused.get(mac)
            if refused is not None:
                if refused[1] > now:
                    self.drops[SPOOFED_SOURCE] += 1
                    return None
                del self.refused[mac]
            if len(self.table) >= self.settings.max_learned_macs:
                self.drops[TABLE_FULL] += 1
                return None
            entry = self.table[mac] = Learned(mac, side, PENDING, now, now, asked_at=now)
            self.aged.pop(mac, None)
            self.map_releases.pop(mac, None)
            self.map_requests[mac] = side
            self.counters["macs_learned"] += 1
            return entry
        if entry.side != side:
            self.drops[MAC_MOVED] += 1
            return None
        self._touch(mac, now)
        return entry

    def _forget(self, mac: bytes) -> Learned | None:
        """Stop speaking for ``mac``: its table entry, map request and virtual
        engine go (the engine's replay windows are noted in ``floors``)."""
        entry = self.table.pop(mac, None)
        self.map_requests.pop(mac, None)
        engine = self.virtual.pop(mac, None)
        if engine is not None:
            self._keep_counts(engine)
        if engine is not None and self.floors is not None:
            for sender, highest in engine.replay_highest():
                if highest >= 0:
                    self.floors.note(sender, highest)
        return entry

    def _keep_counts(self, engine: FrameEngine) -> None:
        """Keep a dropped virtual engine's counts: totals never go back."""
        for k in ENGINE_COUNTERS:
            self.counters[k] += engine.counters.get(k, 0)
        self.drops.update({reason: n for reason, n in engine.drops.items() if n})

    def _release(self, mac: bytes, side: str) -> None:
        """Queue a ``map_release`` (at most ``max_learned_macs`` wait; a lost one is
        released after the next ``map_list`` restores and ages it)."""
        self.map_releases[mac] = side
        if len(self.map_releases) > self.settings.max_learned_macs:
            self.map_releases.pop(next(iter(self.map_releases)))

    def _age_out(self, now: float) -> None:
        """Forget the MACs idle for ``mac_ageing_s`` (see the module docstring, 4)."""
        limit = now - self.settings.mac_ageing_s
        while self.table:
            mac, entry = next(iter(self.table.items()))
            if entry.last_seen > limit:
                break
            self._forget(mac)
            if entry.held:
                self.drops[LEARN_HOLD_EXPIRED] += len(entry.held)
            self._release(mac, entry.side)  # a pending MAC may be mapped already
            self.counters["macs_aged_out"] += 1
            if entry.established and entry.state == MAPPED:
                self.aged[mac] = entry.side
                self.aged.move_to_end(mac)
                if len(self.aged) > self.settings.max_learned_macs:
                    self.aged.popitem(last=False)

    def _forward(self, frame: bytes, side: str, now: float, out: Output) -> None:
        dst = frame[0:6]
        if dst[0] & 1:
            self._flood_group(frame, side, now, out)
            return
        entry = self.table.get(dst)
        if entry is None and self._relearn(dst, now):
            return
        if entry is None or dst in self.enc_seen:
            self._seal_as(frame, now, out)  # an encrypted host (or nobody: the key server says)
            return
        if entry.state != MAPPED:
            self.drops[DST_NOT_MAPPED] += 1
        elif entry.side == side:
            self.counters["same_side"] += 1
        elif side != PLAIN and entry.side != PLAIN:
            self.drops[TUNNEL_TRANSIT] += 1
        else:
            self._touch(dst, now, talked_to=True)
            self._to_side(entry.side, frame, now, out)

    def _flood_group(self, frame: bytes, side: str, now: float, out: Output) -> None:
        if not group_frame_allowed(frame, self.settings.group_crossing):
            self.counters["group_filtered"] += 1
            return
        if side != ENC:
            self._seal_as(frame, now, out)
        if self.has_plain and side != PLAIN:
            self._to_side(PLAIN, frame, now, out)
        if not side.startswith(TUNNEL):
            for peer in self.peers:
                self._to_side(TUNNEL + peer, frame, now, out)

    # ---------------------------------------------------------- key server

    def take_map_requests(self) -> list[tuple[bytes, str]]:
        requests, self.map_requests = list(self.map_requests.items()), {}
        self.counters["map_requests"] += len(requests)
        return requests

    def take_map_releases(self) -> list[bytes]:
        """MACs aged out: the key server is to release their mapping (``map_release``)."""
        releases, self.map_releases = list(self.map_releases), {}
        self.counters["map_releases"] += len(releases)
        return releases

    def on_mapped(self, mac: bytes, side: str, now: float) -> Output:
        """The key server mapped ``mac`` to this gateway (an answer, or a restore after a restart)."""
        out = Output()
        entry = self.table.get(mac)
        if entry is None:
            known = side == PLAIN and self.has_plain or side[len(TUNNEL):] in self.peers
            if (mac in self.enc_seen or mac in self.refused or not known
                    or len(self.table) >= self.settings.max_learned_macs):
                self._release(mac, side)  # the key server must not keep what we do not speak for
                return out
            entry = self.table[mac] = Learned(mac, side, PENDING, now, now)
            self.map_releases.pop(mac, None)
            self.counters["macs_restored"] += 1
        if entry.side != side:
            return out
        entry.state = MAPPED
        if mac not in self.virtual:
            engine = FrameEngine(mac, self.engine_settings, self.pn_source(), floors=self.floors, now0=now)
            use_cipher(engine, self.main.cipher)
            if self.multicast is not None:
                engine.install_multicast_key(self.multicast[0], self.multicast[1], now)
            self.virtual[mac] = engine
        held, entry.held = entry.held, []
        for frame, from_side, arrived in held:
            if now - arrived <= self.settings.learn_hold_age_s:
                self._forward(frame, from_side, now, out)
            else:
                self.drops[LEARN_HOLD_EXPIRED] += 1
        return out

    def on_map_refused(self, mac: bytes, now: float) -> None:
        entry = self._forget(mac)
        if entry is None:
            return
        self.drops[SPOOFED_SOURCE] += len(entry.held)
        self.refused[mac] = (entry.side, now + self.settings.refused_cache_s)
        self.refused.move_to_end(mac)
        if len(self.refused) > MAX_REFUSED_MACS:
            self.refused.popitem(last=False)
        self.counters["maps_refused"] += 1

    def on_unmapped(self, mac: bytes) -> None:
        """The key server gave ``mac`` to an enrolled host: stop speaking for it, never learn it again."""
        entry = self._forget(mac)
        if entry is not None:
            self.drops[SPOOFED_SOURCE] += len(entry.held)
            self.counters["macs_unmapped"] += 1
        self._note_host(mac)

    def learned(self) -> list[tuple[bytes, str]]:
        """Every MAC learned (pending or mapped), to announce again after a reconnect."""
        return [(e.mac, e.side) for e in self.table.values()]

    def take_key_requests(self, now: float) -> list[bytes]:
        """Host MACs (or ``engine.GROUP_MAC``) to ask the key server about."""
        macs: dict[bytes, None] = {}
        for engine in self.engines():
            for mac in engine.take_key_requests(now):
                macs[mac] = None
        return list(macs)

    def take_notices(self) -> list[tuple[str, bytes, int]]:
        seen: dict[tuple[str, bytes], int] = {}
        for engine in self.engines():
            for kind, mac, pw_id in engine.take_notices():
                seen[(kind, mac)] = max(pw_id, seen.get((kind, mac), 0))
        return [(kind, mac, pw_id) for (kind, mac), pw_id in seen.items()]

    def install_pair_key(self, host_mac: bytes, host_id: str, key: bytes, pw_id: int, now: float,
                         age_s: float = 0.0, older=()) -> Output:
        out = Output()
        entry = self.table.get(host_mac)
        if entry is not None:
            if entry.state == MAPPED:
                return out  # never a host key under a MAC we speak for
            self._forget(host_mac)  # a host after all: never learn it
        self._note_host(host_mac)
        held = self.host_keys.get(host_mac)
        if held is None or pw_id > held[2]:
            self.host_keys[host_mac] = (host_id, key, pw_id)
        for mac, engine in self.virtual.items():
            if host_mac in engine.peers or host_mac in engine.holds.pending:
                self._deliver(mac, engine.install_pair_key(host_mac, host_id, key, pw_id, now, age_s, older),
                              now, out)
        self.main.holds.take(host_mac)
        return out

    def install_multicast_key(self, key: bytes, pw_id: int, now: float) -> Output:
        out = Output()
        if self.multicast is None or pw_id > self.multicast[1]:
            self.multicast = (key, pw_id)
        for plain in self.main.install_multicast_key(key, pw_id, now).to_tap:
            self._flood_group(plain, ENC, now, out)
        for mac, engine in self.virtual.items():
            self._deliver(mac, engine.install_multicast_key(key, pw_id, now), now, out)
        return out

    def use_cipher(self, cipher: str) -> bool:
        changed = False
        for engine in self.engines():
            changed |= use_cipher(engine, cipher)
        if changed:
            self.host_keys.clear()
            self.multicast = None
        return changed

    def install_tunnel_keys(self, peer: str, pw_id: int, send_key: bytes, recv_key: bytes, now: float,
                            path: int = 0) -> bool:
        """One NETKEY version of a path of the link to ``peer`` (see ``tunnel``); True if new."""
        return self.tunnel.install(peer, pw_id, send_key, recv_key, now, path)

    def mark_unknown(self, mac: bytes, now: float) -> None:
        for engine in self.engines():
            if mac in engine.holds.pending or engine is self.main:
                engine.mark_unknown(mac, now)

    def revoke_peer(self, mac: bytes) -> None:
        self.host_keys.pop(mac, None)
        for engine in self.engines():
            engine.revoke_peer(mac)

    def on_timer(self, now: float) -> Output:
        """Every tick; returns the tunnel's probes and the frames its reorder buffers let go."""
        out = Output()
        for engine in self.engines():
            engine.on_timer(now)
        self.tunnel.on_timer(now)
        frames, out.to_tunnel = self.multipath.on_timer(now)
        for peer, inner in frames:
            self._from_side(inner, TUNNEL + peer, now, out)
        self._age_out(now)
        for entry in self.table.values():
            if entry.state != PENDING:
                continue
            if entry.held and now - entry.held[0][2] > self.settings.learn_hold_age_s:
                keep = [h for h in entry.held if now - h[2] <= self.settings.learn_hold_age_s]
                self.drops[LEARN_HOLD_EXPIRED] += len(entry.held) - len(keep)
                entry.held = keep
            if now - entry.asked_at >= self.settings.map_retry_s:
                entry.asked_at = now
                self.map_requests[entry.mac] = entry.side
        return out

    def next_deadline(self) -> float | None:
        """When ``on_timer`` (or ``take_key_requests``) next has work, in
        engine time: the engines' and the tunnel's timers, the oldest learned
        MAC's ageing, a pending MAC's map retry and its held frames' age."""
        deadlines = [d for d in (e.next_deadline() for e in self.engines()) if d is not None]
        deadlines += [d for d in (self.tunnel.next_deadline(), self.multipath.next_deadline()) if d is not None]
        if self.table:
            deadlines.append(next(iter(self.table.values())).last_seen + self.settings.mac_ageing_s)
        for entry in self.table.values():
            if entry.state == PENDING:
                deadlines.append(entry.asked_at + self.settings.map_retry_s)
                if entry.held:
                    deadlines.append(entry.held[0][2] + self.settings.learn_hold_age_s)
        return min(deadlines, default=None)

    # ------------------------------------------------------------- status

    def all_drops(self) -> Counter:
        total = Counter(self.drops)
        total.update(self.tunnel.drops)
        total.update(self.multipath.drops)
        for engine in self.engines():
            total.update(engine.drops)
        return total

    def snapshot(self, now: float) -> dict:
        counters = Counter(self.counters)
        counters.update(self.tunnel.counters)
        counters.update(self.multipath.counters)
        for engine in self.engines():
            for k in ENGINE_COUNTERS:
                counters[k] += engine.counters.get(k, 0)
        learned = [{"mac": frame_wire.format_mac(e.mac), "side": e.side, "state": e.state,
                    "idle_s": round(now - e.last_seen, 1)} for e in self.table.values()]
        learned += [{"mac": frame_wire.format_mac(mac), "side": side, "state": REFUSED}
                    for mac, (side, until) in self.refused.items() if until > now]
        hosts = [{"mac": frame_wire.format_mac(m), "id": v[0], "pw_id": v[2]} for m, v in self.host_keys.items()]
        doc = {
            "cipher": self.main.cipher,
            "multicast_pw_id": self.multicast[1] if self.multicast else None,
            "learned": learned,
            "hosts": hosts,
            "tunnel_peers": list(self.peers),
            "drops": dict(self.all_drops()),
            "counters": dict(counters),
        }
        doc.update(self.tunnel.snapshot())
        doc["tunnel_paths"] = self.multipath.snapshot()
        return doc
