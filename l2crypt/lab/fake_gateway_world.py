"""The fake world with a gateway: segment A of the gateway lab in one process, without root.

It implements ``worlds.GatewayWorld`` as ``fake_world.FakeWorld`` implements
``World``, with the real gateway daemon beside the real agents::

    keyserverd (as in fake_world): h1, h2 (role host), gA (role gateway)
    h1 Agent        h2 Agent        gA Gateway (``l2crypt-gateway run``'s daemon, on its DaemonShell)
    ChannelPort     ChannelPort     eth0 ChannelPort   plain0 ChannelPort
       +--------------+---FakeSwitch----+                   |
       +---- the intruder                               eth0 ChannelPort of p1, the plain host

1. ``up``: the key server and the agents of ``FakeWorld.up``, then gA:
   ``host add gA --role gateway`` and enrolled as ``l2crypt-gateway enroll``
   does; its ``Gateway`` is made from its config (``plain_port = "plain0"``,
   no tunnel) and gets what ``Gateway.run`` would open: the encrypted port
   (MAC 02:4c:47:00:00:a1 as in the gateway lab, MTU 1500) on the switch
   and the plain port cabled to p1's port; then ``start`` and its key client
   as a task.  ``up`` returns once gA is connected and holds the multicast key.
2. Each ``step`` also serves gA's ports, carries the plain cable (what p1
   sent to ``plain0``, what gA wrote there to p1) and ticks gA's shell.
3. There is no nftables here: both port guards read "missing", and a plain
   frame the kernel's guard would refuse (``inbound_refused``) reaches the
   gateway, which drops it itself (``not_l2crypt``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.daemon import ETH_HEADER_BYTES, Gateway
from l2crypt.core.frame_wire import parse_mac
from l2crypt.io.fakes import ChannelPort
from l2crypt.ops.daemon_shell import DaemonShell

from .fake_world import UP_TIMEOUT_S, FakeWorld
from .gateway import GATEWAYS, P1_MAC

GATEWAY = "gA"
PLAIN_HOST = "p1"
WIRE_MTU = 1500


class FakeGatewayWorld(FakeWorld):
    """``worlds.GatewayWorld`` over in-memory ports: FakeWorld's segment plus the real
    gateway daemon and its plain host (module docstring)."""

    gateway = GATEWAY
    plain_host = PLAIN_HOST

    def __init__(self, state_dir: Path, hosts: tuple[str, ...] = ("h1", "h2")):
        super().__init__(state_dir, hosts)
        self.gw: Gateway | None = None
        self.gw_shell: DaemonShell | None = None
        self.gw_task: asyncio.Task | None = None
        #: p1's port: ``outbox`` is what its stack sent (to gA's plain port).
        self.p1_port = ChannelPort("eth0")
        #: Every frame gA wrote to its plain port (what p1's stack got), in order.
        self.p1_got: list[bytes] = []

    def up(self) -> "FakeGatewayWorld":
        super().up()
        try:
            self.wait(f"{GATEWAY} to connect and get the multicast key",
                      lambda: self.gw.client.connected and self.gw.core.multicast is not None, UP_TIMEOUT_S)
        except BaseException:
            self.down()
            raise
        return self

    async def _up(self) -> None:
        await super()._up()
        state = self.state_dir / "gateways" / GATEWAY
        await self.enroll(GATEWAY, "gateway", state)
        gw = Gateway(GatewayConfig(encrypted_port="eth0", plain_port="plain0", servers=(self.address,),
                                   state_dir=str(state), metrics_listen=""))
        gw._loop = self.clock
        gw.guard_readings = lambda: {name: guard.reading(None) for name, guard in gw.guards.items()}  # no nftables
        gw.enc, gw.plain = ChannelPort("eth0"), ChannelPort("plain0")
        gw.enc_max_frame = ETH_HEADER_BYTES + WIRE_MTU
        self.switch.attach(gw.enc)
        gw.start(parse_mac(GATEWAYS[GATEWAY][1]), self.clock.time())
        self.gw, self.gw_shell = gw, DaemonShell(gw, gw.config.socket_path, "")
        self.gw_task = self.loop.create_task(gw.client.run(self.gw_shell.stop))

    def stop_daemons(self) -> list[asyncio.Task]:
        tasks = super().stop_daemons()
        if self.gw_task is not None:
            self.gw_shell.stop.set()
            self.gw_task.cancel()
            tasks.append(self.gw_task)
        return tasks

    # ------------------------------------------------------------------- the loop

    def shells(self) -> list[DaemonShell]:
        return super().shells() + ([self.gw_shell] if self.gw_shell is not None else [])

    def carry(self) -> None:
        super().carry()
        if self.gw is not None:
            self.gw.plain.inbox.extend(self.p1_port.outbox)
            self.p1_port.outbox.clear()
            self.p1_got.extend(self.gw.plain.outbox)
            self.gw.plain.outbox.clear()

    # ------------------------------------------------------ the GatewayWorld calls

    def mac(self, host: str) -> bytes:
        if host == PLAIN_HOST:
            return parse_mac(P1_MAC)
        if host == GATEWAY:
            return self.gw.core.gw_mac
        return super().mac(host)

    def send(self, host: str, frames: list[bytes]) -> None:
        if host != PLAIN_HOST:
            return super().send(host, frames)
        self.p1_port.outbox.extend(frames)
        self.step()

    def stack_got(self, host: str) -> list[bytes]:
        return self.p1_got if host == PLAIN_HOST else super().stack_got(host)

    def status(self, host: str) -> dict:
        """An agent's status, or for gA ``l2crypt-gateway status --json``."""
        if host == GATEWAY:
            return json.loads(json.dumps(self.gw.snapshot()))
        return super().status(host)
