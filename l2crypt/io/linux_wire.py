"""The wire side of the agent: an AF_PACKET socket on the physical port.

The socket is bound to the l2crypt EtherType, so the kernel hands it only
l2crypt frames; frames this host sends are not looped back to it
(PACKET_IGNORE_OUTGOING).

A read that finds nothing waiting (EAGAIN, EWOULDBLOCK, EINTR) ends the
batch quietly.  Any other error (ENETDOWN when the port goes down, ...) ends
it too, is counted in ``read_errors`` (status: ``wire_read_errors``) and
logged as ``wire_read_error``, at most once per ``READ_ERROR_LOG_S``.  A
refused write returns False; the caller counts it as a drop (``tx_error``).
"""

from __future__ import annotations

import errno
import logging
import socket
import time

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

log = logging.getLogger("l2crypt.wire")

SOL_PACKET = 263            # linux/socket.h
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h, Linux >= 4.20
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
MAX_FRAME = 65536
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
#: A read error is logged at most this often (seconds), with the count so far.
READ_ERROR_LOG_S = 10.0


def open_packet_socket(port: str, ethertype: int, before_bind=None) -> socket.socket:
    """A packet socket bound to ``ethertype`` on ``port``, with large buffers
    and without our own frames looped back.  Raises LocalError.

    ``before_bind(sock)``, if given, runs on the socket while it receives
    nothing yet (protocol 0); an OSError from it closes the socket and goes
    to the caller."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                             0 if before_bind else socket.htons(ethertype))
    except OSError as exc:
        raise LocalError(f"cannot open a packet socket (are you root?): {exc}") from None
    if before_bind is not None:
        try:
            before_bind(sock)
        except OSError:
            sock.close()
            raise
    try:
        sock.bind((port, ethertype))
    except OSError as exc:
        sock.close()
        raise LocalError(f"cannot bind to port {port!r}: {exc}") from None
    for opt, value in (
        (socket.SO_RCVBUF, SOCKET_BUFFER_BYTES),
        (socket.SO_SNDBUF, SOCKET_BUFFER_BYTES),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, value)
        except OSError:
            pass
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernels: our own frames come back and are dropped as own_frame
    return sock


class LinuxWire:
    """Raw l2crypt frames on one interface, non-blocking.  Implements WirePort."""

    #: Reads that failed with an error other than "nothing waiting" (see the module docstring).
    read_errors = 0
    #: Bytes asked of each ``recv``.
    read_size = MAX_FRAME
    _next_error_log = 0.0

    def __init__(self, port: str, ethertype: int):
        self.name = port
        sock = open_packet_socket(port, ethertype)
        sock.setblocking(False)
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_frames(self, limit: int) -> list[bytes]:
        frames = []
        recv, size = self._sock.recv, self.read_size
        for _ in range(limit):
            try:
                frames.append(recv(size))
            except OSError as exc:
                if exc.errno not in _AGAIN:
                    self._read_failed(exc)
                break
        return frames

    def _read_failed(self, exc: OSError) -> None:
        self.read_errors += 1
        now = time.monotonic()
        if now >= self._next_error_log:
            self._next_error_log = now + READ_ERROR_LOG_S
            log.warning("wire_read_error", extra=fields(
                port=self.name, reason=errno.errorcode.get(exc.errno, str(exc)), read_errors=self.read_errors))

    def write_frame(self, frame: bytes) -> bool:
        try:
            self._sock.send(frame)
            return True
        except OSError:
            return False

    def write_frames(self, frames) -> int:
        """One ``send`` per frame; how many the kernel took (see ``WirePort``)."""
        return sum(map(self.write_frame, frames))

    def close(self) -> None:
        self._sock.close()
