"""The host side of the agent: a Linux TAP device (python-pytun).

The host's IP stack sends plain frames into the TAP; the agent reads them,
and writes opened frames back for the stack to receive.
"""

from __future__ import annotations

import errno
import os

import pytun

from .errors import LocalError

_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
MAX_FRAME = 65536


class LinuxTap:
    """A TAP device opened with IFF_TAP | IFF_NO_PI, non-blocking.  Implements FramePort."""

    def __init__(self, name: str, mtu: int, mac: bytes | None = None):
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI)
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
                    self.write_errors += 0  # reading errors are transient for a TAP
                break
        return frames

    def write_frame(self, frame: bytes) -> bool:
        try:
            os.write(self._fd, frame)
            return True
        except OSError:
            self.write_errors += 1
            return False

    def close(self) -> None:
        if self._fd >= 0:
            self._dev.close()
            self._fd = -1
