"""The tunnel's links over several paths: which path a frame takes, and putting the stream back together.

Sans-I/O, on top of ``tunnel`` (which seals and opens one datagram on one
path with that path's keys).  Per link (peer gateway):

1. Every frame gets the link's next *sequence number* (u64, sealed in front
   of the frame: a ``DATA`` message).  It starts at the packet clock's start
   (``pn_start``), so it is higher after a restart than anything sent before.
2. Sending: a link with one path sends every frame on it.  A link with
   several asks its ``PathScheduler`` (``path_scheduler``): ``split`` puts a
   flow on one path (or sprays single frames with ``spray``), ``redundant``
   sends on the two best paths, ``fec`` adds a ``PARITY`` message for every
   ``fec_k`` frames (``fec_parity``) on the best path.
3. Receiving: after the path's key opened the datagram, the sequence number
   goes through the link's *duplicate window* (a ``ReplayWindow`` over
   sequence numbers): the second copy of a redundant frame, or a frame
   already rebuilt from parity, is dropped (``tunnel_duplicate``).  Sprayed
   frames are put back in order (``reorder_buffer``).
4. Probes: each path of a multi-path link carries a ``PROBE`` every
   ``probe_interval_s`` (sealed with the path's key like any message); the
   peer answers with an ``ECHO`` on the same path (``probe_wire``).  They
   give each path's RTT, loss and delivered rate, from which the scheduler
   takes paths out and in and sets the weights.  Key updates never travel
   here: only on the key servers' TLS peering.

``send``, ``receive`` and ``on_timer`` never raise; drops are counted in
``drops`` under a reason name.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from l2crypt.core.replay import ReplayWindow

from . import tunnel_wire as W
from .fec_parity import ParityDecoder, ParityEncoder
from .path_scheduler import PathScheduler, SchedulerSettings, flow_of
from .reorder_buffer import ReorderBuffer
from .tunnel import Tunnel

SEQ_LEN = W.DATA_SEQ_LEN
#: Drop reasons.
SHORT_MESSAGE = "tunnel_short_message"
DUPLICATE = "tunnel_duplicate"
NO_PATH = "tunnel_no_path"
BAD_PROBE = "tunnel_bad_probe"
#: Sequence numbers a frame may lag behind the newest and still be taken.
DUPLICATE_WINDOW = 1 << 15


@dataclass(frozen=True)
class MultipathSettings(SchedulerSettings):
    """``tunnel_mode`` and friends (``gateway.config``): the scheduler's, parity and reordering."""

    fec_k: int = 4
    reorder_ms: float = 30.0


@dataclass(eq=False)
class LinkState:
    """One peer's paths, sequence counter and receive state.  Owned by ``Multipath``."""

    peer: str
    paths: tuple[int, ...]
    next_seq: int
    scheduler: PathScheduler | None
    dup: ReplayWindow = field(default_factory=lambda: ReplayWindow(DUPLICATE_WINDOW))
    reorder: ReorderBuffer | None = None
    encoder: ParityEncoder | None = None
    decoder: ParityDecoder | None = None


class Multipath:
    """The links of one gateway, over their paths (see the module docstring)."""

    def __init__(self, tunnel: Tunnel, paths: dict[str, tuple[int, ...]], seq_start: int,
                 settings: MultipathSettings = MultipathSettings(),
                 weights: dict[tuple[str, int], float] | None = None):
        self.tunnel = tunnel
        self.settings = settings
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self.links: dict[str, LinkState] = {}
        s = settings
        for peer, ids in paths.items():
            multi = len(ids) > 1
            sched = None
            if multi:
                sched = PathScheduler(tuple(ids), dataclasses.replace(
                    s, weights={p: (weights or {}).get((peer, p), 1.0) for p in ids}))
            self.links[peer] = LinkState(
                peer, tuple(ids), seq_start, sched,
                reorder=ReorderBuffer(max_wait_s=s.reorder_ms / 1000.0) if multi and s.spray and s.mode == "split"
                else None,
                encoder=ParityEncoder(s.fec_k) if multi and s.mode == "fec" else None,
                decoder=ParityDecoder() if multi else None)

    # ----------------------------------------------------------- sending

    def send(self, peer: str, frame: bytes, now: float) -> list[tuple[str, int, bytes]]:
        """The datagrams that carry ``frame`` to ``peer``: (peer, path, datagram) each."""
        link = self.links.get(peer)
        if link is None:
            self.drops[NO_PATH] += 1
            return []
        seq = link.next_seq
        link.next_seq = seq + 1
        message = seq.to_bytes(SEQ_LEN, "big") + frame
        sched = link.scheduler
        paths = link.paths if sched is None else sched.pick(flow_of(frame), now)
        out = []
        seal = self.tunnel.seal
        for path in paths:
            datagram = seal(peer, message, now, path)
            if datagram is not None:
                out.append((peer, path, datagram))
                if sched is not None:
                    sched.on_sent(path, len(datagram))
        if link.encoder is not None:
            parity = link.encoder.add(seq, frame)
            if parity is not None:
                path = sched.parity_path()
                datagram = seal(peer, parity, now, path, W.KIND_PARITY)
                if datagram is not None:
                    out.append((peer, path, datagram))
                    sched.on_sent(path, len(datagram))
                    self.counters["tunnel_parity_sent"] += 1
        return out

    # --------------------------------------------------------- receiving

    def receive(self, peer: str, path: int, datagram: bytes, now: float
                ) -> tuple[list[bytes], list[tuple[str, int, bytes]]]:
        """(frames to deliver, datagrams to send back) for a datagram that came by ``path`` from ``peer``."""
        message = self.tunnel.open(peer, datagram, now, path)
        if message is None:
            return [], []
        link = self.links[peer]
        kind = datagram[1] & 15
        sched = link.scheduler
        if kind == W.KIND_DATA:
            if len(message) < SEQ_LEN + W.MIN_INNER_FRAME:
                self.drops[SHORT_MESSAGE] += 1
                return [], []
            if sched is not None:
                sched.on_received(path, len(datagram))
            seq = int.from_bytes(message[:SEQ_LEN], "big")
            frame = message[SEQ_LEN:]
            if not self._first(link, seq):
                return [], []
            frames = [(seq, frame)]
            if link.decoder is not None:
                frames += self._rebuilt(link, link.decoder.on_frame(seq, frame))
            return self._in_order(link, frames, now), []
        if sched is None:
            self.drops[BAD_PROBE] += 1  # probes and parity only on multi-path links
            return [], []
        if kind == W.KIND_PROBE:
            echo = sched.on_probe(path, message, now)
            if echo is None:
                self.drops[BAD_PROBE] += 1
                return [], []
            reply = self.tunnel.seal(peer, echo, now, path, W.KIND_ECHO)
            return [], [(peer, path, reply)] if reply is not None else []
        if kind == W.KIND_ECHO:
            if not sched.on_echo(path, message, now):
                self.drops[BAD_PROBE] += 1
            return [], []
        # PARITY
        sched.on_received(path, len(datagram))
        return self._in_order(link, self._rebuilt(link, link.decoder.on_parity(message)), now), []

    def _first(self, link: LinkState, seq: int) -> bool:
        """Move the duplicate window; False (counted) if ``seq`` was delivered already."""
        if not link.dup.check(seq):
            self.drops[DUPLICATE] += 1
            return False
        link.dup.update(seq)
        return True

    def _rebuilt(self, link: LinkState, recovered) -> list[tuple[int, bytes]]:
        out = []
        for seq, frame in recovered:
            if link.dup.check(seq):
                link.dup.update(seq)
                out.append((seq, frame))
                self.counters["tunnel_fec_recovered"] += 1
        return out

    def _in_order(self, link: LinkState, frames: list[tuple[int, bytes]], now: float) -> list[bytes]:
        if link.reorder is None:
            return [frame for _, frame in frames]
        out = []
        for seq, frame in frames:
            out += link.reorder.push(seq, frame, now)
        return out

    # ------------------------------------------------------------ timers

    def on_timer(self, now: float) -> tuple[list[tuple[str, bytes]], list[tuple[str, int, bytes]]]:
        """((peer, frame) the reorder buffers let go, probes to send)."""
        frames, out = [], []
        seal = self.tunnel.seal
        for link in self.links.values():
            if link.reorder is not None:
                frames += [(link.peer, frame) for frame in link.reorder.due(now)]
            if link.scheduler is None:
                continue
            link.scheduler.on_timer(now)
            keyed = lambda path, peer=link.peer: self.tunnel.pw_id_of(peer, path) is not None  # noqa: E731
            for path, probe in link.scheduler.probes_due(now, keyed):
                datagram = seal(link.peer, probe, now, path, W.KIND_PROBE)
                if datagram is not None:
                    out.append((link.peer, path, datagram))
        return frames, out

    def next_deadline(self) -> float | None:
        deadlines = []
        for link in self.links.values():
            for part in (link.scheduler, link.reorder):
                d = part.next_deadline() if part is not None else None
                if d is not None:
                    deadlines.append(d)
        return min(deadlines, default=None)

    # ------------------------------------------------------------ status

    def snapshot(self) -> list[dict]:
        """One entry per path of a multi-path link (state, RTT, loss, weight, bytes, PW_ID)."""
        out = []
        for link in self.links.values():
            if link.scheduler is None:
                continue
            for entry in link.scheduler.snapshot():
                out.append({"peer": link.peer, **entry, "pw_id": self.tunnel.pw_id_of(link.peer, entry["id"])})
        return out
