"""The fake world: one encrypted segment in one process, without root, in seconds.

The same scenarios run here and in the namespace lab (``netns_world``); this
world implements ``worlds.World`` with the real objects wherever there is no
kernel in the way::

    keyserverd KeyServer + KeyService + SqliteStore on 127.0.0.1:<port> (TLS 1.3)
       |  the agents' real KeyClients (after a real ``l2crypt enroll``)
    h1 Agent        h2 Agent        h3 Agent       (real Agent objects and DaemonShells)
    ChannelTap      ChannelTap      ChannelTap     (the hosts' stacks: ``send``, ``watching``)
    ChannelPort     ChannelPort     ChannelPort    (the wire ports)
       +---------------FakeSwitch------------------+---- the intruder (``inject``)

1. ``FakeWorld.up``: a key server in a state directory (CA, SQLite store),
   listening on loopback; each host is added (``host add``, no MAC: the
   first hello binds it) and enrolled with ``l2crypt.agent.enroll``; its
   ``Agent`` starts on in-memory ports with a MAC of its own, its key client
   runs as a task, and the world waits until every agent has its welcome.
2. ``step``: one turn of each daemon's loop, as the shell runs it: every
   port it reads (``readers``) is served once, the switch carries what the
   wire ports wrote, every shell ``tick``s, then the event loop runs for
   ``STEP_S`` (TLS messages, the key server's event pushes).
3. The daemons' clock is the loop's plus ``skew``: ``pause(s)`` moves it
   ``s`` ahead at once (timers fire as if ``s`` had passed), so waits on the
   engines' delays (the switch to a new key version) cost no real time.
4. ``down`` stops the key clients and the server and closes the store.

``fake_gateway_world.FakeGatewayWorld`` adds a gateway through the hooks
``enroll`` (any role), ``shells`` (the daemons a step serves and ticks),
``carry`` (the cables a step moves frames on), ``stack_got`` and
``stop_daemons``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable

from keyserverd.ca import CertificateAuthority
from keyserverd.client_port import make_server_ssl_context
from keyserverd.server import KeyServer
from keyserverd.service import KeyService
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token, new_token
from l2crypt.agent.agent import Agent
from l2crypt.agent.config import AgentConfig
from l2crypt.agent.enroll import enroll
from l2crypt.io.fakes import ChannelPort, ChannelTap, FakeSwitch
from l2crypt.ops.daemon_shell import DaemonShell

from .worlds import HOSTS, Seen, wait_until

#: Real time the event loop runs per step, seconds.
STEP_S = 0.002
#: How long ``up`` waits for every agent's welcome, seconds.
UP_TIMEOUT_S = 20.0


def host_mac(host: str) -> bytes:
    """The TAP MAC the fake world gives a host: h1 -> 02:4c:32:00:00:11."""
    return bytes.fromhex(f"024c320000{0x10 + int(host.lstrip('h')):02x}")


class DaemonClock:
    """The daemons' clock (what their ``_loop.time()`` reads): the event loop's time plus a skew."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.skew = 0.0

    def time(self) -> float:
        return self.loop.time() + self.skew


class FakeHost:
    """One host of the fake world: its agent, the shell that ticks it, its ports, its key client task."""

    def __init__(self, agent: Agent, tap: ChannelTap, wire: ChannelPort, loop: asyncio.AbstractEventLoop):
        self.agent = agent
        self.shell = DaemonShell(agent, agent.config.socket_path, "")
        self.tap = tap
        self.wire = wire
        self.client_task = loop.create_task(agent.client.run(self.shell.stop))
        #: Every frame the agent wrote to its TAP (what the host's stack got), in order.
        self.tap_got: list[bytes] = []


class FakeWorld:
    """``worlds.World`` over in-memory ports with the real agents and key server (module docstring)."""

    name = "fakes"

    def __init__(self, state_dir: Path, hosts: tuple[str, ...] = HOSTS):
        self.state_dir = Path(state_dir)
        self.hosts = tuple(hosts)
        self.loop = asyncio.new_event_loop()
        self.clock = DaemonClock(self.loop)
        self.switch = FakeSwitch()
        self.intruder = ChannelPort("intruder")
        self.switch.attach(self.intruder)
        self.members: dict[str, FakeHost] = {}
        self.events_task: asyncio.Task | None = None
        self.store: SqliteStore | None = None
        self.server: KeyServer | None = None
        self.ca: CertificateAuthority | None = None
        self.address = ""  # the key server's host:port, once up

    # ------------------------------------------------------------------ up and down

    def up(self) -> "FakeWorld":
        try:
            self.loop.run_until_complete(self._up())
            self.wait("every agent to get its welcome",
                      lambda: all(h.agent.engine.group.current is not None for h in self.members.values()),
                      UP_TIMEOUT_S)
        except BaseException:
            self.down()
            raise
        return self

    async def _up(self) -> None:
        ks_dir = self.state_dir / "keyserver"
        self.ca = ca = CertificateAuthority.open(ks_dir, ())
        self.store = SqliteStore.open(ks_dir / "keyserver.db", time.time())
        self.server = KeyServer(KeyService(self.store, "aes-256-gcm", "ks-fake", ca),
                                make_server_ssl_context(ca), "127.0.0.1", 0)
        _, port = await self.server.start()
        self.events_task = asyncio.ensure_future(self.server.run_events())
        self.address = f"127.0.0.1:{port}"
        for host in self.hosts:
            await self.enroll(host, "host", self.state_dir / "hosts" / host)
            self.start_agent(host, self.address)

    async def enroll(self, ident: str, role: str, state: Path) -> None:
        """``keyserverd host add ident --role role`` and its ``enroll`` into ``state``."""
        token = new_token()
        self.store.add_host(ident, None, role, hash_token(token), time.time() + 3600, time.time())
        await asyncio.get_running_loop().run_in_executor(
            None, enroll, self.address, ident, token, self.ca.ca_fingerprint(), str(state))

    def start_agent(self, host: str, address: str) -> None:
        """The agent of ``host`` on its state directory, new ports, its key client as a task."""
        agent = Agent(AgentConfig(port="eth0", servers=(address,), state_dir=str(self.state_dir / "hosts" / host),
                                  wire_mtu=1500, metrics_listen=""))
        agent._loop = self.clock
        agent.guard_reading = lambda: agent.guard.reading(None)  # no nftables here: "missing"
        tap, wire = ChannelTap("l2c0", host_mac(host)), ChannelPort("eth0")
        self.switch.attach(wire)
        agent.start(tap, lambda: (wire, "fake"), self.clock.time())
        self.members[host] = FakeHost(agent, tap, wire, self.loop)

    def stop_agent(self, host: str) -> asyncio.Task:
        """Stop the key client of ``host`` and take its wire port off the switch; returns the client's task."""
        member = self.members.pop(host)
        member.shell.stop.set()
        member.client_task.cancel()
        self.switch.ports.remove(member.wire)
        return member.client_task

    def stop_daemons(self) -> list[asyncio.Task]:
        """Stop every daemon's key client (a subclass adds its own); their tasks."""
        return [self.stop_agent(h) for h in list(self.members)]

    def down(self) -> None:
        async def close() -> None:
            tasks = self.stop_daemons()
            if self.events_task is not None:
                self.events_task.cancel()
                tasks.append(self.events_task)
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.server is not None:
                await self.server.close()

        try:
            self.loop.run_until_complete(close())
        finally:
            if self.store is not None:
                self.store.close()
            self.loop.close()

    # ------------------------------------------------------------------- the loop

    def step(self) -> None:
        """One turn of every daemon's loop (module docstring, 2)."""
        self.loop.run_until_complete(self._step())

    def shells(self) -> list[DaemonShell]:
        """The shell of every running daemon (a subclass adds its own)."""
        return [member.shell for member in self.members.values()]

    def carry(self) -> None:
        """Move what the daemons wrote: the switch, and the hosts' TAPs to their stacks."""
        self.switch.carry()
        for member in self.members.values():
            member.tap_got.extend(member.tap.outbox)
            member.tap.outbox.clear()

    async def _step(self) -> None:
        now = self.clock.time()
        shells = self.shells()
        for shell in shells:
            for _fd, on_readable in shell.daemon.readers():
                on_readable()
        self.carry()
        for shell in shells:
            shell.tick(now)
        await asyncio.sleep(STEP_S)

    def wait(self, what: str, probe: Callable[[], object], timeout_s: float = 10.0):
        """Step until ``probe()`` is truthy and return it; AssertionError after ``timeout_s`` (real time)."""
        return wait_until(what, probe, timeout_s, between=self.step)

    def pause(self, seconds: float) -> None:
        """Let ``seconds`` pass for the daemons (module docstring, 3)."""
        self.clock.skew += seconds
        self.step()

    # ------------------------------------------------------------- the World calls

    def mac(self, host: str) -> bytes:
        return self.members[host].tap.mac

    def send(self, host: str, frames: list[bytes]) -> None:
        self.members[host].tap.inbox.extend(frames)
        self.step()

    def inject(self, frames: list[bytes]) -> None:
        self.intruder.outbox.extend(frames)
        self.step()

    def stack_got(self, host: str) -> list[bytes]:
        """Every frame the stack of ``host`` got (its agent wrote to its TAP), in order."""
        return self.members[host].tap_got

    def watching(self, *hosts: str) -> "FakeSeen":
        return FakeSeen(self, hosts)

    def status(self, host: str) -> dict:
        """The agent's status document as ``l2crypt status --json`` prints it."""
        return json.loads(json.dumps(self.members[host].agent.snapshot()))

    def restart(self, host: str) -> None:
        """Stop the agent of ``host`` and start a new one on its state directory (a new, empty key table)."""
        address = self.members[host].agent.config.servers[0]
        task = self.stop_agent(host)
        self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        self.start_agent(host, address)
        self.wait(f"{host} to get its welcome", lambda: self.members[host].agent.engine.group.current is not None)

    def rekey_pair(self, a: str, b: str) -> int:
        """``keyserverd rekey --pair A B``: the store rotates, the running server pushes."""
        pw_id = self.store.rotate_pair_key(a, b, time.time())
        assert pw_id is not None, f"{a} and {b} have no pair key to rotate"
        return pw_id

    def rekey_multicast(self) -> int:
        return self.store.rotate_multicast_key(time.time())


class FakeSeen(Seen):
    """What the switch and the watched hosts' TAPs carried while the ``with`` block ran."""

    def __init__(self, world: FakeWorld, hosts: tuple[str, ...]):
        self.world = world
        self.hosts = hosts
        self.switch_start = len(world.switch.capture)
        self.tap_start = {h: len(world.stack_got(h)) for h in hosts}

    def switch(self) -> list[bytes]:
        return self.world.switch.capture[self.switch_start:]

    def tap(self, host: str) -> list[bytes]:
        return self.world.stack_got(host)[self.tap_start[host]:]

    def __exit__(self, *exc) -> None:
        self.world.step()
