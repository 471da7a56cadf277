"""One scenario, two worlds: what an end-to-end scenario may do with a segment.

The scenarios (tests/scenarios.py) are written once against ``World``; they
run over two implementations:

* ``fake_world.FakeWorld``: the real agents and key server on in-memory
  ports, in one process, without root;
* ``NetnsWorld``: the namespace lab (``segment.Lab``: h1-h3 with their agents,
  the switch, the key server, the intruder), one lab for a whole module.

The gateway scenarios (tests/gateway_scenarios.py) are written against
``GatewayWorld``, a segment (h1, h2) that also has gateway gA, whose plain
port is cabled to the plain host p1:

* ``fake_gateway_world.FakeGatewayWorld``: FakeWorld plus the real gateway
  daemon (``l2crypt-gateway run``'s) on in-memory ports;
* ``NetnsGatewayWorld``: segment A of the gateway lab (``gateway.GatewayLab``:
  h1, h2, gA and p1; segment B, gB and the WAN are there but unused).

Frames are whole Ethernet frames.  A host "sends" a frame as its stack would
(written to its TAP: the agent reads it), a host "gets" what its agent wrote
to its TAP, the switch carries the sealed frames, the intruder puts frames on
the switch.  ``status`` is the agent's status document (``l2crypt status
--json``).  Waits are bounded; nothing in a scenario depends on how long a
world takes.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Protocol

from l2crypt.core.frame_wire import parse_mac

from .gateway import GATEWAYS, P1_MAC, GatewayLab
from .segment import BRIDGE, HOSTS, TAP_IFNAME, WIRE_IFNAME, Lab
from .support import read_pcap

__all__ = ["HOSTS", "GatewayWorld", "NetnsGatewayWorld", "NetnsWorld", "Seen", "World", "wait_until"]


class Seen:
    """What the switch and the watched hosts' TAPs carried during a ``with world.watching(...)`` block.

    Readable during the block (for waits) and after it (complete)."""

    def __enter__(self) -> "Seen":
        return self

    def __exit__(self, *exc) -> None:
        """Stop watching (the captures are complete after this)."""

    def switch(self) -> list[bytes]:
        """Every frame the switch carried, from any port."""
        raise NotImplementedError

    def tap(self, host: str) -> list[bytes]:
        """Every frame the agent of ``host`` wrote to its TAP."""
        raise NotImplementedError


class World(Protocol):
    """A segment of hosts h1-h3 with agents, a switch, a key server and an intruder."""

    #: "fakes" or "netns".
    name: str
    hosts: tuple[str, ...]

    def mac(self, host: str) -> bytes:
        """The MAC of the host's TAP (the one its agent seals with)."""

    def send(self, host: str, frames: list[bytes]) -> None:
        """The host's stack sends ``frames`` (plain Ethernet frames, source = its MAC) through its TAP."""

    def inject(self, frames: list[bytes]) -> None:
        """The intruder puts ``frames`` on the switch as they are."""

    def watching(self, *hosts: str) -> Seen:
        """Watch the switch and these hosts' TAPs until the ``with`` block ends."""

    def wait(self, what: str, probe: Callable[[], object], timeout_s: float = 10.0):
        """Until ``probe()`` is truthy (returned); AssertionError naming ``what`` after ``timeout_s``."""

    def pause(self, seconds: float) -> None:
        """Let ``seconds`` pass for the agents."""

    def status(self, host: str) -> dict:
        """The agent's status document (``l2crypt status --json``)."""

    def restart(self, host: str) -> None:
        """Restart the agent of ``host`` (its key table starts empty) and wait until it is connected."""

    def rekey_pair(self, a: str, b: str) -> int:
        """Rotate the pair key of hosts ``a`` and ``b`` at the key server (``keyserverd rekey --pair``); the new PW_ID."""

    def rekey_multicast(self) -> int:
        """Rotate the multicast key (``keyserverd rekey --multicast``); the new PW_ID."""


class GatewayWorld(World, Protocol):
    """A ``World`` (hosts h1, h2) whose segment also has the gateway ``gateway``
    (gA), with its plain port cabled to the plain host ``plain_host`` (p1).

    ``mac``, ``send`` and ``watching`` take p1 as they take a host: its stack
    sends plain frames out of its port, and what it "gets" is what gA wrote
    to its plain port.  ``status(gateway)`` is ``l2crypt-gateway status --json``."""

    gateway: str
    plain_host: str


def wait_until(what: str, probe: Callable[[], object], timeout_s: float = 10.0,
               between: Callable[[], None] = lambda: time.sleep(0.1)):
    """Call ``probe`` until it returns something truthy (returned), ``between`` after
    each miss; AssertionError after ``timeout_s`` (real time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {got!r})")
        between()


#: tcpdump's snapshot length on ports of MTU 1500 (the switch, p1's port): every frame
#: fits, and tcpdump's 2 MiB ring holds hundreds of them (with its default of 256 KiB,
#: eight: a burst of frames was "dropped by kernel").
WIRE_SNAPLEN = 4096


class NetnsSeen(Seen):
    """tcpdump on the switch (``br0``) and on each watched host's TAP (what its agent writes: ``-Q in``)."""

    def __init__(self, lab: Lab, ports: dict[str, str]):
        """``ports``: host -> the port its stack gets frames from (its TAP, or p1's ``eth0``)."""
        self.lab = lab
        self.captures = {None: lab.capture(BRIDGE, snaplen=WIRE_SNAPLEN)}
        for host, ifname in ports.items():
            self.captures[host] = lab.capture(ifname, role=host, direction="in",
                                              snaplen=WIRE_SNAPLEN if ifname == WIRE_IFNAME else None)
        self.frames: dict[str | None, list[bytes]] | None = None

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # the last frames reach the pcap files (tcpdump -U)
        self.frames = {key: read_pcap(cap.stop(settle_s=0)) for key, cap in self.captures.items()}

    def _frames(self, key: str | None) -> list[bytes]:
        return self.frames[key] if self.frames is not None else self.captures[key].frames()

    def switch(self) -> list[bytes]:
        return self._frames(None)

    def tap(self, host: str) -> list[bytes]:
        return self._frames(host)


class NetnsWorld:
    """``World`` over a running ``segment.Lab`` with the intruder (module docstring)."""

    name = "netns"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.hosts = lab.hosts

    def mac(self, host: str) -> bytes:
        return parse_mac(self.lab.tap_mac_of(host))

    def send(self, host: str, frames: list[bytes]) -> None:
        assert self.lab.inject(frames, role=host, ifname=TAP_IFNAME) == len(frames)

    def inject(self, frames: list[bytes]) -> None:
        assert self.lab.inject(frames) == len(frames)

    def watching(self, *hosts: str) -> NetnsSeen:
        return NetnsSeen(self.lab, {host: TAP_IFNAME for host in hosts})

    def wait(self, what: str, probe: Callable[[], object], timeout_s: float = 10.0):
        return wait_until(what, probe, timeout_s)

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def status(self, host: str) -> dict:
        return self.lab.status(host)

    def restart(self, host: str) -> None:
        self.lab.restart_agent(host)

    def _rekey(self, *args: str, pattern: str) -> int:
        res = self.lab.keyserverd("rekey", *args)
        assert res.returncode == 0, f"keyserverd rekey {' '.join(args)}: {res.stdout}{res.stderr}"
        return int(re.search(pattern, res.stdout).group(1))

    def rekey_pair(self, a: str, b: str) -> int:
        return self._rekey("--pair", a, b, pattern=r"rotated to pw_id (\d+)")

    def rekey_multicast(self) -> int:
        return self._rekey("--multicast", pattern=r"multicast key rotated to pw_id (\d+)")


class NetnsGatewayWorld(NetnsWorld):
    """``GatewayWorld`` over segment A of a running ``GatewayLab``: h1, h2, gA, p1 and
    an intruder on A's switch (module docstring)."""

    gateway = "gA"
    plain_host = "p1"

    def __init__(self, glab: GatewayLab):
        super().__init__(glab.a)
        self.glab = glab
        glab.a.add_intruder()

    def mac(self, host: str) -> bytes:
        if host == self.plain_host:
            return parse_mac(P1_MAC)
        if host == self.gateway:
            return parse_mac(GATEWAYS[self.gateway][1])
        return super().mac(host)

    def send(self, host: str, frames: list[bytes]) -> None:
        if host != self.plain_host:
            return super().send(host, frames)
        assert self.lab.inject(frames, role=host, ifname=WIRE_IFNAME) == len(frames)

    def watching(self, *hosts: str) -> NetnsSeen:
        """tcpdump on the switch, each host's TAP and p1's port (what reaches p1: ``-Q in``)."""
        return NetnsSeen(self.lab, {h: WIRE_IFNAME if h == self.plain_host else TAP_IFNAME for h in hosts})

    def status(self, host: str) -> dict:
        return self.glab.gateway_status(host) if host == self.gateway else super().status(host)
