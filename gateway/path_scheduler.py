"""Which of a link's paths a frame takes, from what the probes measure; sans-I/O.

The paths of one tunnel link (``multipath``), each with a *base weight*
(``weight=`` in ``tunnel_paths``, default 1).

1. Probes (``probes_due``, ``on_probe``, ``on_echo``; ``probe_wire``): a
   probe leaves on each path every ``probe_interval_s`` (only on paths that
   have keys), with this end's count of frames sent on it; the echo brings
   back the peer's count of frames received.  The echo gives the RTT
   (smoothed), and between two echoes the path's loss (``1 - received /
   sent``, exact because a probe queues behind the frames sent before it)
   and delivered rate.  Fewer than ``MIN_FRAMES_FOR_LOSS`` frames in an interval:
   the loss is the share of probes not answered.
2. States: a path is ``up`` until ``probe_misses`` probe intervals pass with
   a probe out and no echo (``down``: its flows move at once).  A ``down``
   path that answers again is ``holddown`` for ``holddown_s`` before it is
   ``up`` again.  A path that never had a probe out (no keys yet) stays as
   it is.
3. Weights (every ``weight_interval_s``): quality = base weight x
   ``exp(-LOSS_PENALTY x (loss - LOSS_ALLOWED))`` x ``sqrt(best RTT / RTT)``
   (RTTs plus ``RTT_FLOOR_S``), as shares of the ``up`` paths (others weigh
   0).  The first ``LOSS_ALLOWED`` of loss is not held against a path: a
   path that TCP fills drops a little (its queue is full), and moving flows
   for that would make the paths take turns.  5 % loss divides a path's
   quality by 6; a path whose share fell by half or more loses its flows to
   the others, and a path holding ``OVERLOAD`` times its share of the flows
   and a whole flow more (another path came back, or got better) gives the
   excess away, so a path back from ``down`` gets its share of long-lived
   flows.  RTT weighs little: queueing under load lengthens it.
4. ``pick(flow, now)``: ``split``/``fec`` keep a flow on one path (a new
   flow goes to the ``up`` path with the fewest active flows per weight;
   flows idle for ``flow_idle_s`` are forgotten), or with ``spray`` take the
   next path of a smooth weighted round robin; ``redundant`` gives the two
   best ``up`` paths.  With no path ``up`` it uses those not ``down``, else
   all: the tunnel never stops because probes are late.

``flow_of(frame)`` hashes a frame's flow (the IPv4/IPv6 TCP/UDP 5-tuple,
else the MAC pair and EtherType).  Nothing here raises on a bad message.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from . import probe_wire

UP, DOWN, HOLDDOWN = "up", "down", "holddown"
LOSS_PENALTY = 60.0
LOSS_ALLOWED = 0.02
RTT_FLOOR_S = 0.02
MIN_FRAMES_FOR_LOSS = 50
RTT_GAIN = 0.2
#: A path holding this many times its share of the flows (and a whole flow more) gives the excess away.
OVERLOAD = 1.25
#: Weight intervals whose weights a path's status shows.
HISTORY = 10
#: Probes remembered for their send time and count (older echoes only count as "alive").
PROBES_KEPT = 64


@dataclass(frozen=True)
class SchedulerSettings:
    """``tunnel_mode`` and the probe keys (``gateway.config``)."""

    mode: str = "split"
    spray: bool = False
    probe_interval_s: float = 0.05
    probe_misses: int = 6
    weight_interval_s: float = 1.0
    holddown_s: float = 3.0
    weights: dict = field(default_factory=dict)  # path -> base weight
    max_flows: int = 4096
    flow_idle_s: float = 2.0


@dataclass(eq=False)
class PathState:
    """One path's measurements.  Owned by its ``PathScheduler``."""

    id: int
    base: float
    state: str = UP
    weight: float = 0.0
    rtt_s: float | None = None
    loss: float = 0.0
    rate_bps: float = 0.0
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    flows: int = 0
    next_probe_at: float = 0.0
    probe_no: int = 0
    waiting_since: float | None = None  # the oldest probe out unanswered
    answered_since: float | None = None  # holddown: answering since
    sent: dict = field(default_factory=dict)  # probe number -> (sent at, tx frames then)
    last_echo: tuple | None = None  # (our tx frames at that probe, their rx frames, their rx bytes)
    got_frames: int = 0  # this interval, from echoes: received by the peer ...
    sent_frames: int = 0  # ... of what we had sent
    got_bytes: int = 0
    probes_out: int = 0
    echoes: int = 0
    swrr: float = 0.0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (interval, weight) of the last ones


class PathScheduler:
    """The paths of one link (see the module docstring)."""

    def __init__(self, path_ids: tuple[int, ...], settings: SchedulerSettings = SchedulerSettings(),
                 now: float = 0.0):
        self.settings = settings
        self.paths = {p: PathState(p, float(settings.weights.get(p, 1.0)), next_probe_at=now) for p in path_ids}
        self.flows: dict[int, list] = {}  # flow -> [path, last seen]
        self.next_weights_at = now + settings.weight_interval_s
        self.moved_flows = 0
        self.intervals = 0  # weight computations so far
        self._share()

    # ------------------------------------------------------------ probes

    def probes_due(self, now: float, sendable=lambda path: True) -> list[tuple[int, bytes]]:
        """(path, PROBE plaintext) of each path whose probe is due and ``sendable(path)``."""
        out = []
        for p in self.paths.values():
            if now < p.next_probe_at:
                continue
            p.next_probe_at = now + self.settings.probe_interval_s  # unsendable: ask again then
            if not sendable(p.id):
                continue
            p.probe_no = (p.probe_no + 1) & 0xFFFFFFFF
            p.sent[p.probe_no] = (now, p.tx_frames)
            if len(p.sent) > PROBES_KEPT:
                del p.sent[next(iter(p.sent))]
            if p.waiting_since is None:
                p.waiting_since = now
            p.probes_out += 1
            out.append((p.id, probe_wire.encode_probe(p.probe_no, now, p.tx_frames, p.tx_bytes)))
        return out

    def on_probe(self, path: int, message: bytes, now: float) -> bytes | None:
        """The ECHO of a peer's probe on ``path`` (this end's receive counts), or None."""
        p, probe = self.paths.get(path), probe_wire.decode_probe(message)
        if p is None or probe is None:
            return None
        return probe_wire.encode_echo(probe.number, probe.sent_at, p.rx_frames, p.rx_bytes)

    def on_echo(self, path: int, message: bytes, now: float) -> bool:
        """Take an echo of our probe on ``path``; False if it is malformed."""
        p, echo = self.paths.get(path), probe_wire.decode_echo(message)
        if p is None or echo is None:
            return False
        p.echoes += 1
        p.waiting_since = None
        if p.state == DOWN:
            p.state, p.answered_since = HOLDDOWN, now
        sent = p.sent.pop(echo.number, None)
        if sent is None:
            return True  # too old to measure: the path is alive, that is all
        sent_at, tx_then = sent
        for number in [n for n in p.sent if 0 < (echo.number - n) & 0xFFFFFFFF < 1 << 31]:
            del p.sent[number]  # older probes: their echoes are lost
        sample = max(now - sent_at, 0.0)
        p.rtt_s = sample if p.rtt_s is None else p.rtt_s + RTT_GAIN * (sample - p.rtt_s)
        if p.last_echo is not None:
            tx0, rx0, bytes0 = p.last_echo
            if tx_then >= tx0 and echo.frames >= rx0:
                p.sent_frames += tx_then - tx0
                p.got_frames += echo.frames - rx0
                p.got_bytes += echo.bytes - bytes0
        p.last_echo = (tx_then, echo.frames, echo.bytes)
        return True

    # ------------------------------------------------------------ traffic

    def on_sent(self, path: int, nbytes: int) -> None:
        p = self.paths[path]
        p.tx_frames += 1
        p.tx_bytes += nbytes

    def on_received(self, path: int, nbytes: int) -> None:
        p = self.paths.get(path)
        if p is not None:
            p.rx_frames += 1
            p.rx_bytes += nbytes

    # ------------------------------------------------------------ timers

    def on_timer(self, now: float) -> None:
        s = self.settings
        limit = s.probe_misses * s.probe_interval_s
        changed = False
        for p in self.paths.values():
            if p.state != DOWN and p.waiting_since is not None and now - p.waiting_since > limit:
                p.state, p.answered_since = DOWN, None
                changed = True
            elif p.state == HOLDDOWN and now - p.answered_since >= s.holddown_s:
                p.state = UP
                changed = True
        measured = now >= self.next_weights_at
        if measured:
            self._measure(now)
            self._forget_idle(now, s.flow_idle_s)
        if changed or measured:
            self._share()
        if measured:
            for p in self.paths.values():
                p.history.append((self.intervals, round(p.weight, 4)))

    def next_deadline(self) -> float | None:
        s = self.settings
        deadlines = [self.next_weights_at]
        for p in self.paths.values():
            deadlines.append(p.next_probe_at)
            if p.waiting_since is not None and p.state != DOWN:
                deadlines.append(p.waiting_since + s.probe_misses * s.probe_interval_s + 1e-3)
            if p.state == HOLDDOWN:
                deadlines.append(p.answered_since + s.holddown_s)
        return min(deadlines)

    def _measure(self, now: float) -> None:
        interval = self.settings.weight_interval_s + max(0.0, now - self.next_weights_at)
        self.next_weights_at = now + self.settings.weight_interval_s
        self.intervals += 1
        for p in self.paths.values():
            if p.sent_frames >= MIN_FRAMES_FOR_LOSS:
                p.loss = min(1.0, max(0.0, 1.0 - p.got_frames / p.sent_frames))
            elif p.probes_out >= 3:
                p.loss = min(1.0, max(0.0, 1.0 - p.echoes / p.probes_out))
            else:
                p.loss *= 0.5
            p.rate_bps = 8.0 * p.got_bytes / interval
            p.sent_frames = p.got_frames = p.got_bytes = p.probes_out = p.echoes = 0

    def _share(self) -> None:
        """Weights as shares of the ``up`` paths; flows leave paths that lost half their share."""
        live = [p for p in self.paths.values() if p.state == UP]
        rtts = [p.rtt_s for p in live if p.rtt_s is not None]
        best = min(rtts, default=0.0) + RTT_FLOOR_S
        quality = {p.id: p.base * math.exp(-LOSS_PENALTY * max(0.0, p.loss - LOSS_ALLOWED))
                   * math.sqrt(best / ((p.rtt_s if p.rtt_s is not None else best) + RTT_FLOOR_S)) for p in live}
        total = sum(quality.values())
        flows = len(self.flows)
        for p in self.paths.values():
            old = p.weight
            p.weight = quality[p.id] / total if total > 0 and p.id in quality else 0.0
            excess = int(p.flows - flows * p.weight)
            if p.flows and p.weight <= old / 2:
                self._move_flows(p.id, p.flows)
            elif excess >= 1 and p.flows >= OVERLOAD * flows * p.weight:
                self._move_flows(p.id, excess)  # a path came back or got better: share out

    def _move_flows(self, path: int, count: int) -> None:
        """Forget ``count`` of the path's flows (the newest): their next frame picks a path again."""
        on_path = [f for f, entry in self.flows.items() if entry[0] == path]
        for flow in on_path[len(on_path) - count:]:
            del self.flows[flow]
            self.moved_flows += 1
        self.paths[path].flows -= min(count, len(on_path))

    # -------------------------------------------------------------- picking

    def _live(self) -> list[PathState]:
        live = [p for p in self.paths.values() if p.state == UP]
        return live or [p for p in self.paths.values() if p.state != DOWN] or list(self.paths.values())

    def pick(self, flow: int, now: float) -> tuple[int, ...]:
        s = self.settings
        if s.mode == "redundant":
            live = sorted(self._live(), key=lambda p: (-p.weight, p.id))
            return tuple(p.id for p in live[:2])
        if s.spray:
            live = self._live()
            weights = [p.weight for p in live] if any(p.weight > 0 for p in live) else [1.0] * len(live)
            total = sum(weights)
            for p, w in zip(live, weights):
                p.swrr += w
            chosen = max(live, key=lambda p: p.swrr)
            chosen.swrr -= total
            return (chosen.id,)
        entry = self.flows.get(flow)
        if entry is not None:
            p = self.paths[entry[0]]
            if p.state == UP or not any(q.state == UP for q in self.paths.values()):
                entry[1] = now
                return (p.id,)
            p.flows -= 1
            self.moved_flows += 1
        if len(self.flows) >= s.max_flows:
            self._forget_idle(now, 0.0)
        chosen = min(self._live(), key=lambda p: ((p.flows + 1) / max(p.weight, 1e-6), p.id))
        chosen.flows += 1
        self.flows[flow] = [chosen.id, now]
        return (chosen.id,)

    def _forget_idle(self, now: float, idle_s: float) -> None:
        for flow, (path, seen) in list(self.flows.items()):
            if now - seen >= idle_s:
                del self.flows[flow]
                self.paths[path].flows -= 1
        if len(self.flows) >= self.settings.max_flows:  # all busy: forget the oldest half
            for flow in list(self.flows)[: len(self.flows) // 2]:
                self.paths[self.flows.pop(flow)[0]].flows -= 1

    def parity_path(self) -> int:
        return max(self._live(), key=lambda p: (p.weight, -p.id)).id

    # ------------------------------------------------------------ status

    def snapshot(self) -> list[dict]:
        return [{"id": p.id, "state": p.state, "rtt_ms": round(p.rtt_s * 1e3, 3) if p.rtt_s is not None else None,
                 "loss": round(p.loss, 4), "weight": round(p.weight, 4), "base_weight": p.base,
                 "tx_frames": p.tx_frames, "tx_bytes": p.tx_bytes, "rx_frames": p.rx_frames,
                 "rx_bytes": p.rx_bytes, "delivered_bps": round(p.rate_bps), "flows": p.flows,
                 "intervals": self.intervals, "weights": [list(h) for h in p.history]}
                for p in self.paths.values()]


def flow_of(frame: bytes) -> int:
    """A hash of the frame's flow: the IP 5-tuple of TCP/UDP, the IP pair of other IP,
    else the MAC pair and EtherType.  Never raises."""
    off = 12
    ethertype = frame[off:off + 2]
    if ethertype == b"\x81\x00":
        off += 4
        ethertype = frame[off:off + 2]
    ip = off + 2
    if ethertype == b"\x08\x00" and len(frame) >= ip + 20:
        proto = frame[ip + 9]
        ports = ip + (frame[ip] & 15) * 4
        fragment = frame[ip + 6] & 0x3F or frame[ip + 7]
        if proto in (6, 17) and not fragment and len(frame) >= ports + 4:
            return hash((frame[ip + 12:ip + 20], proto, frame[ports:ports + 4]))
        return hash((frame[ip + 12:ip + 20], proto))
    if ethertype == b"\x86\xdd" and len(frame) >= ip + 40:
        proto = frame[ip + 6]
        ports = ip + 40
        if proto in (6, 17) and len(frame) >= ports + 4:
            return hash((frame[ip + 8:ip + 40], proto, frame[ports:ports + 4]))
        return hash((frame[ip + 8:ip + 40], proto))
    return hash(frame[:14])
