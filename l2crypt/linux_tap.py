"""The host side of the agent: a Linux TAP device (python-pytun).

The host's IP stack sends plain frames into the TAP; the agent reads them,
and writes opened frames back for the stack to receive.

With ``gro=True`` the TAP is opened with IFF_VNET_HDR: every read and write
carries a virtio-net header (``l2crypt.gro``), and ``write_frames`` hands the
stack runs of one TCP flow as one large segment.  The TAP announces no
offloads, so what the agent reads is plain frames as before.
"""

from __future__ import annotations

import errno
import os

import pytun

from . import gro as gro_mod
from .errors import LocalError

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
MAX_FRAME = 65536


class LinuxTap:
    """A TAP device opened with IFF_TAP | IFF_NO_PI, non-blocking.  Implements FramePort."""

    def __init__(self, name: str, mtu: int, mac: bytes | None = None, gro: bool = False):
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if gro else 0)
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=flags)
        except (pytun.Error, OSError) as exc:
            raise LocalError(f"cannot create TAP device {name!r}: {exc}") from None
        self.name = self._dev.name
        try:
            if mac is not None:
                self._dev.hwaddr = mac
            self._dev.mtu = mtu
            self._dev.up()
        except (pytun.Error, OSError) as exc:
            self._dev.close()
            raise LocalError(f"cannot set up TAP device {name!r} (MTU {mtu}): {exc}") from None
        self.mac = bytes(self._dev.hwaddr)
        self.mtu = mtu
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)
        self.write_errors = 0
        self.read_errors = 0
        self.gro = gro
        self.coalesced = 0  # frames that went to the stack inside a larger one

    def fileno(self) -> int:
        return self._fd

    def read_frames(self, limit: int) -> list[bytes]:
        frames = []
        read = os.read
        fd = self._fd
        for _ in range(limit):
            try:
                frames.append(read(fd, MAX_FRAME))
            except OSError as exc:
                if exc.errno not in _AGAIN:
                    self.read_errors += 1  # reading errors are transient for a TAP
                break
        if self.gro:
            return [self._strip(f) for f in frames]
        return frames

    def _strip(self, data: bytes) -> bytes:
        """The frame behind a virtio header; a partial checksum is completed."""
        if data[0] & gro_mod.F_NEEDS_CSUM:
            _, _, _, _, start, offset = gro_mod.VNET_HDR.unpack_from(data)
            return gro_mod.tcp_checksum(data[gro_mod.VNET_HDR_LEN:], start, offset)
        return data[gro_mod.VNET_HDR_LEN:]

    def write_frame(self, frame: bytes) -> bool:
        try:
            if self.gro:
                os.writev(self._fd, (gro_mod.VNET_NONE, frame))
            else:
                os.write(self._fd, frame)
            return True
        except OSError:
            self.write_errors += 1
            return False

    def write_frames(self, frames: list[bytes]) -> int:
        """Write ``frames`` in order (coalesced when ``gro``); returns how many failed."""
        if not self.gro or len(frames) < 2:
            return sum(1 for f in frames if not self.write_frame(f))
        failed = 0
        writev, fd = os.writev, self._fd
        for vec in gro_mod.coalesce(frames):
            try:
                writev(fd, vec)
            except OSError:
                failed += len(vec) - 2 if len(vec) > 2 else 1
                self.write_errors += 1
                continue
            if len(vec) > 2:
                self.coalesced += len(vec) - 2
        return failed

    def close(self) -> None:
        if self._fd >= 0:
            self._dev.close()
            self._fd = -1
