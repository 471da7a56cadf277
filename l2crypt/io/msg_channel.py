"""One end of the agent's control <-> datapath socketpair (``AF_UNIX``, ``SOCK_SEQPACKET``).

Each ``send`` is one message (``core.datapath_msgs``) and each ``recv`` gives
one back whole, so nothing is framed here.  Neither side may block on the
other: the socket is non-blocking, a message the kernel cannot take now
waits in ``outbox`` (``flush`` retries it when the socket polls writable),
and ``receive`` returns what is waiting.  A closed peer (EOF, ECONNRESET)
sets ``closed``.
"""

from __future__ import annotations

import socket
from collections import deque

from l2crypt.core.datapath_msgs import MAX_MESSAGE_BYTES

#: Socket buffer of each end, bytes (room for a few Stats and many key messages).
BUFFER_BYTES = 4 * MAX_MESSAGE_BYTES


def channel_pair() -> tuple["MessageChannel", "MessageChannel"]:
    """Two connected ends: (the control process's, the datapath process's)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return MessageChannel(a), MessageChannel(b)


class MessageChannel:
    """A non-blocking message socket with an outbox (see the module docstring)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
            except OSError:
                pass
        self.outbox: deque[bytes] = deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        """Queue one message and send what the socket takes now; never blocks or raises."""
        self.outbox.append(data)
        self.flush()

    def flush(self) -> bool:
        """Send queued messages until the socket is full; True when the outbox is empty."""
        while self.outbox and not self.closed:
            try:
                self.sock.send(self.outbox[0])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.closed = True
                return False
            self.outbox.popleft()
        return not self.outbox

    def receive(self, limit: int = 64) -> list[bytes]:
        """Up to ``limit`` whole messages waiting now; sets ``closed`` on EOF."""
        out = []
        while len(out) < limit and not self.closed:
            try:
                data = self.sock.recv(MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            out.append(data)
        return out

    def close(self) -> None:
        self.closed = True
        self.sock.close()
