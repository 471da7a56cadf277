"""One process of the key-server load generator (``bench_keyserver``): a
slice of the simulated hosts, each with one TLS connection, driven by
commands from the parent over a pipe.

1. ``connect``: open every host's connection (``CONNECTS_AT_ONCE`` at a
   time) and say hello; answer how many are up.
2. ``run``: open loop.  From the given start time, requests are scheduled
   at ``rate`` per second, evenly spaced, whatever the answers do; each goes
   to a random host of the slice, as the mix says: ``key_req`` for a pair
   made beforehand (existing), ``key_req`` for a random peer (new pair) or
   ``rekey_req`` for an existing pair (rotation).  A request's latency runs
   from its scheduled time, so a server (or a generator) that falls behind
   shows in the figures; one unanswered ``ANSWER_GRACE_S`` after the end
   counts as lost (and as infinitely slow).  The process reports its own CPU.
3. ``storm``: at the given time every connection is dropped at once; each
   host comes back after a random wait up to ``jitter_s`` (as the agent
   does), resuming its TLS session if asked, says hello and fetches the
   keys of its existing pairs again.  Reported: when each host was served
   again, the latency of each request, how many handshakes resumed.
Times are ``time.monotonic()``, one clock for every process of the machine.

The connections are ``ks_link.HostLink``s on one ``selectors`` loop, so the
generator spends a small part of what keyserverd does on each request (it
reports its CPU; see ``ks_link`` for why not asyncio).  Requests due
together (the loop wakes at most every millisecond) leave together, each
counted from its own scheduled time.
"""

from __future__ import annotations

import heapq
import random
import resource
import selectors
import time
from pathlib import Path

from l2crypt.core.failover import ReconnectSchedule

from .ks_hosts import client_context, mac_of
from .ks_link import OPEN, HostLink

CONNECTS_AT_ONCE = 64
ANSWER_GRACE_S = 5.0
#: A storm host that is not served again within this is counted as failed.
STORM_DEADLINE_S = 120.0
REQUEST_TIMEOUT_S = 30.0
#: Requests sent before the loop reads answers again, at most.
SEND_BATCH = 256
#: How often links are checked for a handshake or answer past its deadline, seconds.
DEADLINE_CHECK_S = 0.25
INF = float("inf")


def existing_peers(n: int, hosts: int, per_host: int) -> list[int]:
    """The peers host ``n`` has a pair key with before the run (``bench_keyserver.make_pairs``)."""
    return [(n + k) % hosts for k in range(1, per_host + 1)] + [(n - k) % hosts for k in range(1, per_host + 1)]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadProcess:
    """The hosts ``mine`` of ``hosts``, their links and what was measured.

    Every phase sets ``on_answer(link, info, msg, now)`` (``info``: what
    ``link.waiting`` kept for the request) and ``on_lost(link, now)`` (the
    link closed, or a deadline passed); ``_pump`` drives the selector."""

    def __init__(self, state: Path, port: int, mine: list[int], hosts: int, pairs_per_host: int, seed: int):
        self.port, self.mine, self.hosts = port, mine, hosts
        self.rng = random.Random(seed)
        self.contexts = {n: client_context(state, n) for n in mine}
        self.peers = {n: existing_peers(n, hosts, pairs_per_host) for n in mine}
        self.sel = selectors.DefaultSelector()
        self.links = {n: HostLink(n, self.sel, self._answer) for n in mine}
        #: (me, peer) -> the newest PW_ID this process saw for the pair.
        self.pw: dict[tuple[int, int], int] = {}
        self.on_answer = self.on_lost = None
        #: Hosts whose handshake or hello is under way (their deadline is checked).
        self.opening: set[int] = set()
        self._checked = 0.0

    # --- the loop ------------------------------------------------------------
    def _answer(self, link: HostLink, rid: int, msg: dict, now: float) -> None:
        info = link.waiting.pop(rid, None)
        if info is not None:
            self.on_answer(link, info, msg, now)

    def _pump(self, timeout: float) -> None:
        events = self.sel.select(timeout)
        now = time.monotonic()
        for key, _ in events:
            link: HostLink = key.data
            if link.sock is None:
                continue  # closed earlier in this round
            was_open = link.state == OPEN
            if not link.on_ready(now):
                if link.state != OPEN:
                    self.on_lost(link, now)
                continue
            if not was_open and link.state == OPEN and link.n in self.opening:
                self._hello(link, now)
        if now - self._checked >= DEADLINE_CHECK_S:
            self._checked = now
            for n in [n for n in self.opening if self.links[n].deadline < now]:
                self.links[n].close("no answer in time")
                self.on_lost(self.links[n], now)

    def _open(self, n: int, resume: bool, now: float) -> None:
        """Start host ``n``'s connection; ``_hello`` follows when TLS is up."""
        link = self.links[n]
        link.close()
        link.waiting.clear()
        link.start(self.port, self.contexts[n], link.session if resume else None, now + REQUEST_TIMEOUT_S)
        self.opening.add(n)
        if link.sock is None:
            self.on_lost(link, now)

    def _hello(self, link: HostLink, now: float) -> None:
        rid = link.request({"t": "hello", "mac": mac_of(link.n)})
        if rid:
            link.waiting[rid] = ("hello", link.deadline - REQUEST_TIMEOUT_S, None)
        else:
            self.on_lost(link, now)

    def _welcomed(self, link: HostLink, msg: dict) -> bool:
        """After the answer to hello: True if it is a welcome (the link then leaves ``opening``)."""
        self.opening.discard(link.n)
        if msg.get("t") != "welcome":
            link.close(f"hello refused: {msg}")
            return False
        link.keep_session()
        return True

    # --- 1: connect ------------------------------------------------------------
    def connect(self) -> dict:
        waiting = list(reversed(self.mine))
        failed: list[str] = []

        def on_answer(link: HostLink, info: tuple, msg: dict, now: float) -> None:
            if not self._welcomed(link, msg):
                failed.append(link.error)

        def on_lost(link: HostLink, now: float) -> None:
            if link.n in self.opening:
                self.opening.discard(link.n)
                failed.append(link.error or "closed")

        self.on_answer, self.on_lost = on_answer, on_lost
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + len(self.mine) / CONNECTS_AT_ONCE * REQUEST_TIMEOUT_S
        while (waiting or self.opening) and time.monotonic() < deadline:
            while waiting and len(self.opening) < CONNECTS_AT_ONCE:
                self._open(waiting.pop(), False, time.monotonic())
            self._pump(0.05)
        connected = sum(1 for link in self.links.values() if link.state == OPEN and not link.waiting)
        return {"connected": connected, "failed": len(self.mine) - connected,
                "first_error": failed[0] if failed else None}

    # --- 2: open loop ------------------------------------------------------------
    def _request(self, n: int, mix: tuple[float, float, float]) -> tuple[str, dict, int]:
        roll = self.rng.random() * sum(mix)
        if roll < mix[0] or roll >= mix[0] + mix[1]:
            peer = self.rng.choice(self.peers[n])
            if roll >= mix[0] + mix[1]:
                return "rotate", {"t": "rekey_req", "peer_mac": mac_of(peer), "pw_id": self.pw.get((n, peer), 1)}, peer
            return "existing", {"t": "key_req", "peer_mac": mac_of(peer)}, peer
        peer = self.rng.randrange(self.hosts - 1)
        peer += peer >= n
        return "new", {"t": "key_req", "peer_mac": mac_of(peer)}, peer

    def run(self, start: float, seconds: float, rate: float, mix: tuple[float, float, float]) -> dict:
        latencies: list[float] = []
        kinds = {"existing": 0, "new": 0, "rotate": 0}
        errors: dict[str, int] = {}
        outstanding = 0

        def count(code: str, n: int = 1) -> None:
            errors[code] = errors.get(code, 0) + n

        def on_answer(link: HostLink, info: tuple, msg: dict, now: float) -> None:
            nonlocal outstanding
            outstanding -= 1
            latencies.append(now - info[1])
            t = msg.get("t")
            if t == "key":
                self.pw[(link.n, info[2])] = msg.get("pw_id")
            elif t != "unknown":
                count(str(msg.get("code", t)))

        def on_lost(link: HostLink, now: float) -> None:
            nonlocal outstanding
            outstanding -= len(link.waiting)
            count("lost", len(link.waiting))
            latencies.extend([INF] * len(link.waiting))
            link.waiting.clear()

        self.on_answer, self.on_lost = on_answer, on_lost
        links = self.links
        hosts = [n for n in self.mine if links[n].state == OPEN]
        interval = 1.0 / rate if rate > 0 else INF
        total = int(seconds * rate)
        behind = 0.0
        k = 0
        cpu0 = cpu_s()
        time.sleep(max(0.0, start - time.monotonic()))
        while k < total:
            now = time.monotonic()
            due = min(total, k + SEND_BATCH, int((now - start) / interval) + 1)
            if k < due:
                behind = max(behind, now - (start + k * interval))
            while k < due:
                scheduled = start + k * interval
                k += 1
                n = self.rng.choice(hosts)
                link = links[n]
                if link.state != OPEN:
                    count("closed")
                    latencies.append(INF)
                    continue
                kind, msg, peer = self._request(n, mix)
                kinds[kind] += 1
                rid = link.request(msg)
                if rid:
                    link.waiting[rid] = (kind, scheduled, peer)
                    outstanding += 1
                else:
                    count("closed")
                    latencies.append(INF)
                    on_lost(link, now)
            if k < total:
                self._pump(max(0.0, start + k * interval - time.monotonic()))
        end = time.monotonic()
        while outstanding > 0 and time.monotonic() < end + ANSWER_GRACE_S:
            self._pump(0.05)
        for link in links.values():
            if link.waiting:
                on_lost(link, end)
        return {"latencies": latencies, "kinds": kinds, "errors": errors, "cpu_s": cpu_s() - cpu0,
                "sent_s": end - start, "max_behind_s": behind}

    # --- 3: storm --------------------------------------------------------------
    def storm(self, at: float, jitter_s: float, resume: bool) -> dict:
        time.sleep(max(0.0, at - time.monotonic()))
        cpu0 = cpu_s()
        for link in self.links.values():
            link.close()
            link.waiting.clear()
        latencies: list[float] = []
        served_after: list[float] = []
        resumed = failed = 0
        schedules = {n: ReconnectSchedule(jitter_s, rand=self.rng.random) for n in self.mine}
        due = [(at + schedules[n].after_session(), n) for n in self.mine]
        heapq.heapify(due)
        keys_left: dict[int, int] = {}
        left = len(self.mine)
        attempting: set[int] = set()  # a failed attempt is retried once, however many ways it failed

        def retry(link: HostLink, now: float) -> None:
            nonlocal failed, left
            if link.n not in attempting:
                return
            attempting.discard(link.n)
            self.opening.discard(link.n)
            keys_left.pop(link.n, None)
            link.close()
            link.waiting.clear()
            if now - at >= STORM_DEADLINE_S:
                failed += 1
                left -= 1
            else:
                heapq.heappush(due, (now + schedules[link.n].after_failure(), link.n))

        def on_answer(link: HostLink, info: tuple, msg: dict, now: float) -> None:
            nonlocal resumed, left
            latencies.append(now - info[1])  # hello: from the start of the TCP connection
            if info[0] == "hello":
                if not self._welcomed(link, msg):
                    retry(link, now)
                    return
                resumed += link.resumed
                keys_left[link.n] = len(self.peers[link.n])
                self.opening.add(link.n)  # its deadline is watched until the keys came
                link.deadline = now + REQUEST_TIMEOUT_S
                for peer in self.peers[link.n]:
                    rid = link.request({"t": "key_req", "peer_mac": mac_of(peer)})
                    if not rid:
                        retry(link, now)
                        return
                    link.waiting[rid] = ("key", now, peer)
            elif msg.get("t") != "key":
                retry(link, now)
            else:
                keys_left[link.n] -= 1
                if keys_left[link.n] == 0:
                    del keys_left[link.n]
                    self.opening.discard(link.n)
                    attempting.discard(link.n)
                    served_after.append(now - at)
                    left -= 1

        self.on_answer, self.on_lost = on_answer, retry
        while left > 0 and time.monotonic() - at < STORM_DEADLINE_S + REQUEST_TIMEOUT_S:
            now = time.monotonic()
            while due and due[0][0] <= now:
                n = heapq.heappop(due)[1]
                attempting.add(n)
                self._open(n, resume, now)
            self._pump(max(0.0, min(due[0][0] - now, 0.05)) if due else 0.05)
        failed += left  # neither served nor given up on when the time ran out
        return {"latencies": latencies, "served_after": served_after, "resumed": resumed, "failed": failed,
                "cpu_s": cpu_s() - cpu0}

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.sel.close()


def serve_commands(pipe, state: Path, port: int, mine: list[int], hosts: int, pairs_per_host: int,
                   seed: int) -> None:
    """The body of one generator process: obey the parent's commands until ``stop``."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    load = LoadProcess(state, port, mine, hosts, pairs_per_host, seed)
    try:
        while True:
            command, args = pipe.recv()
            if command == "stop":
                return
            try:
                pipe.send(getattr(load, command)(**args))
            except Exception as exc:  # the parent reports it; the process goes on
                pipe.send({"error": repr(exc)})
    finally:
        load.close()
