"""In-memory stand-ins for the kernel, shipped with the package for tests.

* ``ChannelPort``: a FramePort backed by two deques (what was written, what
  is waiting to be read) — a TAP or a wire port without a kernel.
* ``ChannelTap``: a ChannelPort with what the agent reads of its TAP (MAC,
  MTU, no virtio-net header).
* ``VnetChannelPort``: a ChannelPort for a TAP opened with ``IFF_VNET_HDR``:
  what is written carries a virtio-net header (``write_vnet``).
* ``SocketPort``: a FramePort over a socketpair: it polls like a kernel
  port, for tests that fork the datapath process.
* ``FakeSwitch``: a hub joining the wire sides of several agents; it records
  every frame it carries, like a capture on the bridge.

The real daemons run on them without root: ``l2crypt.lab.fake_world`` builds
a segment of real agents and a real key server on these ports
(``l2crypt.lab.fake_gateway_world`` adds the real gateway daemon and a plain
host), and the end-to-end scenarios (tests/scenarios.py,
tests/gateway_scenarios.py) run there as in the namespace labs.
"""

from __future__ import annotations

import socket
from collections import deque


class ChannelPort:
    """A FramePort over deques.  ``inbox`` is read by the agent, ``outbox`` is what it wrote."""

    def __init__(self, name: str):
        self.name = name
        self.inbox: deque = deque()
        self.outbox: deque = deque()

    def fileno(self) -> int:
        """-1: nothing polls a fake; its reader callback is called directly (``fake_world.step``)."""
        return -1

    def read_frames(self, limit: int) -> list[bytes]:
        out = []
        while self.inbox and len(out) < limit:
            out.append(self.inbox.popleft())
        return out

    def write_frame(self, frame: bytes) -> bool:
        self.outbox.append(bytes(frame))
        return True

    def write_frames(self, frames) -> int:
        return sum(map(self.write_frame, frames))

    def close(self) -> None:
        pass


class ChannelTap(ChannelPort):
    """A TAP without a kernel: a ChannelPort with a MAC and an MTU (``LinuxTap``'s attributes)."""

    vnet_hdr_len = 0

    def __init__(self, name: str, mac: bytes, mtu: int = 1468):
        super().__init__(name)
        self.mac = bytes(mac)
        self.mtu = mtu

    def live_mtu(self) -> int:
        return self.mtu


class VnetChannelPort(ChannelPort):
    """A TAP with offloads: ``inbox`` holds header + frame buffers (as the
    kernel hands them out), ``outbox`` gets header + frame for every write."""

    vnet_hdr_len = 10

    def write_frame(self, frame: bytes) -> bool:
        self.outbox.append(bytes(10) + bytes(frame))
        return True

    def write_vnet(self, vnet_hdr: bytes, frame) -> bool:
        self.outbox.append(bytes(vnet_hdr) + bytes(frame))
        return True


class SocketPort:
    """A FramePort (and a TAP: MAC, MTU) over one end of an ``AF_UNIX``
    ``SOCK_SEQPACKET`` socketpair, one frame per packet; ``peer`` is the
    other end, the test's (blocking, 5 s timeout)."""

    vnet_hdr_len = 0

    def __init__(self, name: str, mac: bytes = bytes(6), mtu: int = 1468):
        self.name, self.mac, self.mtu = name, bytes(mac), mtu
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.peer.settimeout(5.0)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_frames(self, limit: int) -> list[bytes]:
        out = []
        while len(out) < limit:
            try:
                out.append(self.sock.recv(65536))
            except OSError:
                break
        return out

    def write_frame(self, frame: bytes) -> bool:
        try:
            self.sock.send(frame)
        except OSError:
            return False
        return True

    def write_frames(self, frames) -> int:
        return sum(map(self.write_frame, frames))

    def live_mtu(self) -> int:
        return self.mtu

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class FakeSwitch:
    """Floods every frame to every other attached port and keeps a capture."""

    def __init__(self):
        self.ports: list[ChannelPort] = []
        self.capture: list[bytes] = []

    def attach(self, port: ChannelPort) -> None:
        self.ports.append(port)

    def carry(self) -> int:
        """Move every frame written by any port to all the others.  Returns frames moved."""
        moved = 0
        for src in self.ports:
            while src.outbox:
                frame = src.outbox.popleft()
                self.capture.append(frame)
                for dst in self.ports:
                    if dst is not src:
                        dst.inbox.append(frame)
                moved += 1
        return moved
