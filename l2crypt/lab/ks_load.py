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
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from pathlib import Path

from l2crypt.agent.keyclient import TlsSessions
from l2crypt.core.failover import ReconnectSchedule

from .ks_hosts import KsConnection, client_context, mac_of

CONNECTS_AT_ONCE = 64
ANSWER_GRACE_S = 5.0
#: A storm host that is not served again within this is counted as failed.
STORM_DEADLINE_S = 120.0
REQUEST_TIMEOUT_S = 30.0
SERVER = "keyserverd"


def existing_peers(n: int, hosts: int, per_host: int) -> list[int]:
    """The peers host ``n`` has a pair key with before the run (``bench_keyserver.make_pairs``)."""
    return [(n + k) % hosts for k in range(1, per_host + 1)] + [(n - k) % hosts for k in range(1, per_host + 1)]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadProcess:
    """The hosts ``mine`` of ``hosts``, their connections and what was measured."""

    def __init__(self, state: Path, port: int, mine: list[int], hosts: int, pairs_per_host: int, seed: int):
        self.state, self.port, self.mine, self.hosts = state, port, mine, hosts
        self.pairs_per_host = pairs_per_host
        self.rng = random.Random(seed)
        self.contexts = {n: client_context(state, n) for n in mine}
        self.sessions = {n: TlsSessions() for n in mine}
        for n in mine:
            self.sessions[n].install(self.contexts[n])
        self.conns: dict[int, KsConnection] = {}
        #: (me, peer) -> the newest PW_ID this process saw for the pair.
        self.pw: dict[tuple[int, int], int] = {}

    async def _connect(self, n: int, resume: bool) -> bool:
        """Open host ``n``'s connection and say hello; True if the handshake resumed a session."""
        sessions = self.sessions[n]
        if resume:
            sessions.offer(SERVER)
        conn = await KsConnection.open(self.port, self.contexts[n], timeout=REQUEST_TIMEOUT_S)
        answer = await conn.call({"t": "hello", "mac": mac_of(n)}, REQUEST_TIMEOUT_S)
        resumed = sessions.keep(SERVER, conn.writer)  # after an answer: the TLS 1.3 ticket came before it
        if answer["t"] != "welcome":
            conn.close()
            raise ConnectionError(f"hello refused: {answer}")
        self.conns[n] = conn
        return resumed

    async def connect(self) -> dict:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

        async def one(n: int) -> None:
            async with gate:
                await self._connect(n, resume=False)

        results = await asyncio.gather(*(one(n) for n in self.mine), return_exceptions=True)
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"connected": len(self.conns), "failed": len(failed), "first_error": failed[0] if failed else None}

    # --- open loop -------------------------------------------------------------
    def _request(self, n: int, mix: tuple[float, float, float]) -> tuple[str, dict]:
        roll = self.rng.random() * sum(mix)
        if roll < mix[0] or roll >= mix[0] + mix[1]:
            peer = self.rng.choice(existing_peers(n, self.hosts, self.pairs_per_host))
            if roll >= mix[0] + mix[1]:
                return "rotate", {"t": "rekey_req", "peer_mac": mac_of(peer), "pw_id": self.pw.get((n, peer), 1)}
            return "existing", {"t": "key_req", "peer_mac": mac_of(peer)}
        peer = self.rng.randrange(self.hosts - 1)
        peer += peer >= n
        return "new", {"t": "key_req", "peer_mac": mac_of(peer)}

    async def run(self, start: float, seconds: float, rate: float, mix: tuple[float, float, float]) -> dict:
        latencies: list[float] = []
        kinds = {"existing": 0, "new": 0, "rotate": 0}
        errors: dict[str, int] = {}
        pending: set[asyncio.Future] = set()
        hosts = list(self.conns)
        interval = 1.0 / rate if rate > 0 else float("inf")
        total = int(seconds * rate)
        behind = 0.0

        def answered(fut: asyncio.Future, scheduled: float, n: int, peer_mac: bytes) -> None:
            pending.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                errors["lost"] = errors.get("lost", 0) + 1
                latencies.append(float("inf"))
                return
            latencies.append(time.monotonic() - scheduled)
            msg = fut.result()
            if msg["t"] == "key":
                self.pw[(n, int.from_bytes(peer_mac[3:], "big"))] = msg["pw_id"]
            elif msg["t"] != "unknown":
                errors[msg.get("code", msg["t"])] = errors.get(msg.get("code", msg["t"]), 0) + 1

        cpu0 = cpu_s()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        for k in range(total):
            scheduled = start + k * interval
            now = time.monotonic()
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
            else:
                behind = max(behind, now - scheduled)
                if k % 64 == 0:
                    await asyncio.sleep(0)  # let answers in even when behind
            n = self.rng.choice(hosts)
            conn = self.conns[n]
            if conn.closed:
                errors["closed"] = errors.get("closed", 0) + 1
                latencies.append(float("inf"))
                continue
            kind, msg = self._request(n, mix)
            kinds[kind] += 1
            fut = conn.send(msg)
            pending.add(fut)
            fut.add_done_callback(lambda f, s=scheduled, n=n, mac=msg["peer_mac"]: answered(f, s, n, mac))
        end = time.monotonic()
        if pending:
            await asyncio.wait(set(pending), timeout=ANSWER_GRACE_S)
        for fut in list(pending):
            fut.cancel()
        return {"latencies": latencies, "kinds": kinds, "errors": errors, "cpu_s": cpu_s() - cpu0,
                "sent_s": end - start, "max_behind_s": behind}

    # --- storm -----------------------------------------------------------------
    async def storm(self, at: float, jitter_s: float, resume: bool) -> dict:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu0 = cpu_s()
        for conn in self.conns.values():
            conn.writer.transport.abort()
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        latencies: list[float] = []
        served_after: list[float] = []
        resumed = failed = 0

        async def timed(conn: KsConnection, peer: int) -> dict:
            sent = time.monotonic()
            answer = await conn.call({"t": "key_req", "peer_mac": mac_of(peer)}, REQUEST_TIMEOUT_S)
            latencies.append(time.monotonic() - sent)
            return answer

        async def host(n: int) -> None:
            nonlocal resumed, failed
            schedule = ReconnectSchedule(jitter_s, rand=self.rng.random)
            await asyncio.sleep(schedule.after_session())
            while time.monotonic() - at < STORM_DEADLINE_S:
                sent = time.monotonic()
                try:
                    was_resumed = await self._connect(n, resume)  # (not "resumed += await": lost updates)
                    resumed += was_resumed
                    latencies.append(time.monotonic() - sent)  # TLS handshake and hello
                    conn = self.conns[n]
                    peers = existing_peers(n, self.hosts, self.pairs_per_host)
                    answers = await asyncio.gather(*(timed(conn, p) for p in peers))
                    if all(a["t"] == "key" for a in answers):
                        served_after.append(time.monotonic() - at)
                        return
                except (OSError, EOFError, asyncio.TimeoutError, ConnectionError):
                    pass
                old = self.conns.pop(n, None)
                if old is not None:
                    old.close()
                await asyncio.sleep(schedule.after_failure())
            failed += 1

        await asyncio.gather(*(host(n) for n in self.mine))
        return {"latencies": latencies, "served_after": served_after, "resumed": resumed, "failed": failed,
                "cpu_s": cpu_s() - cpu0}

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def serve_commands(pipe, state: Path, port: int, mine: list[int], hosts: int, pairs_per_host: int,
                   seed: int) -> None:
    """The body of one generator process: obey the parent's commands until ``stop``."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

    async def main() -> None:
        load = LoadProcess(state, port, mine, hosts, pairs_per_host, seed)
        loop = asyncio.get_running_loop()
        try:
            while True:
                command, args = await loop.run_in_executor(None, pipe.recv)
                if command == "stop":
                    return
                try:
                    pipe.send(await getattr(load, command)(**args))
                except Exception as exc:  # the parent reports it; the process goes on
                    pipe.send({"error": repr(exc)})
        finally:
            load.close()

    asyncio.run(main())
