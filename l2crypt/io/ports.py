"""The narrow interfaces between the agent's loop and the outside world.

The agent's frame pump and the gateway only need these; the Linux
implementations live in ``linux_tap``, ``linux_wire`` and ``wire_ring`` (and
the gateway's ``ports.PlainPort``), the in-memory ones in ``fakes``.  Both are
``runtime_checkable``: tests/test_ports.py checks every implementation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class FramePort(Protocol):
    """A place Ethernet frames come from and go to (a TAP, a wire port)."""

    name: str

    def fileno(self) -> int:
        """A file descriptor that polls readable when ``read_frames`` has work."""

    def read_frames(self, limit: int) -> list[bytes]:
        """Up to ``limit`` whole frames, without blocking; [] when none is waiting.

        Never raises for a transient error (EAGAIN, EINTR); returns what it has.
        """

    def write_frame(self, frame: bytes) -> bool:
        """Send one whole frame without blocking.  False if the kernel refused
        it (queue full, link down); never raises for that."""

    def close(self) -> None:
        """Release the descriptor.  Idempotent."""


@runtime_checkable
class WirePort(FramePort, Protocol):
    """The wire side: a FramePort that also takes a batch of frames."""

    def write_frames(self, frames) -> int:
        """Send the frames, in order, without blocking; the number the kernel
        took.  The others are dropped (and counted by the port); never raises
        for that.  ``RingWire`` needs one system call per batch."""
