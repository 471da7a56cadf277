"""One accepted client connection of keyserverd: TLS 1.3 on a non-blocking
``ssl.SSLSocket``, driven by the event loop's reader and writer callbacks.

asyncio's TLS transport runs every record through a memory BIO in Python
(several calls per message each way) and wakes a task per read; here
``SSLSocket.recv_into``/``send`` move a message in one C call, and there is no
task per connection.

1. ``listen_sockets(host, port, reuse_port)``: the listening sockets (one per
   address ``host`` resolves to), non-blocking; the server accepts from them.
2. ``TlsLink(loop, sock, ctx, owner, handshake_timeout_s)`` wraps an accepted
   TCP socket server-side; ``start()`` runs the handshake, which must end
   within ``handshake_timeout_s``; its end is ``owner.on_handshake(link,
   error)`` (error: None, or the exception that refused it; the link then
   closes itself).
3. ``resume_reading()``/``pause_reading()``: while reading, the plaintext of
   each readiness goes to ``owner.on_data(link, data)``.  The client's EOF
   (FIN or close_notify) ends the link once the bytes before it went to
   ``on_data``: their requests are still handled, but their answers are not
   sent (the client has gone).  While reading is paused, no EOF is seen.
4. ``write(data)`` hands data to OpenSSL at once; what the socket cannot take
   waits (``buffered`` bytes, write interest) and leaves when it can;
   ``owner.on_drained(link)`` is called when that backlog is gone.
5. ``close(reason)``: stop reading, send what waits (for at most
   ``CLOSE_FLUSH_S``), then the TLS close_notify; the socket closes when the
   client closes too, or ``LINGER_S`` later.  ``abort(reason)`` closes at once.
   Input left unread is dropped first, so the close is a FIN, not a reset.
   Whatever the cause (these, EOF, an error), ``owner.on_lost(link, reason)``
   is called exactly once, from the loop, never from inside ``write``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Protocol

#: Pending connections the kernel holds per listening socket (asyncio's default is
#: 100: a storm of reconnecting hosts overflowed it and waited for SYN retries).
LISTEN_BACKLOG = 1024
#: How long a closing link may take to send what waits for the client.
CLOSE_FLUSH_S = 5.0
#: How long a closed link waits for the client's own close after our close_notify
#: (closing a socket with unread input would reset it, and lose our last message).
LINGER_S = 2.0
#: One read buffer for every link (one thread; the data is copied out of it).
_READ_BUFFER = bytearray(32 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)
_HANDSHAKE, _OPEN, _LINGER, _CLOSED = "handshake", "open", "linger", "closed"
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class LinkOwner(Protocol):
    """What a ``TlsLink`` reports to (keyserverd's ``KeyServer``)."""

    def on_handshake(self, link: "TlsLink", error: BaseException | None) -> None:
        """The handshake ended: ``error`` None (``peercert``/``resumed`` are set) or why it failed."""

    def on_data(self, link: "TlsLink", data: bytes) -> None:
        """Plaintext from the client (only while reading)."""

    def on_drained(self, link: "TlsLink") -> None:
        """Everything written has been handed to the kernel."""

    def on_lost(self, link: "TlsLink", reason: str) -> None:
        """The link is closed (called once)."""


def listen_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host``
    (raises OSError)."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class TlsLink:
    """One client connection (see the module docstring)."""

    __slots__ = ("peer", "peer_host", "sock", "peercert", "resumed", "closing", "conn", "_loop", "_owner",
                 "_fd", "_state", "_out", "_reading", "_eof", "_read_wants_write", "_watching", "_timer",
                 "_reason")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ctx: ssl.SSLContext,
                 owner: LinkOwner, handshake_timeout_s: float):
        try:
            address = sock.getpeername()
        except OSError:
            address = ("?", 0)
        #: "host:port" of the client, and its host alone.
        self.peer, self.peer_host = f"{address[0]}:{address[1]}", str(address[0])
        sock.setblocking(False)
        self.sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        #: After the handshake: the verified client certificate (or None), and whether a ticket resumed it.
        self.peercert: dict | None = None
        self.resumed = False
        #: close() or abort() was called (nothing more is written).
        self.closing = False
        #: The owner's record of this connection (set and read by the owner only).
        self.conn = None
        self._loop, self._owner = loop, owner
        self._fd = self.sock.fileno()
        self._state = _HANDSHAKE
        self._out = bytearray()
        self._reading = self._eof = self._read_wants_write = False
        self._watching = (False, False)
        self._timer = loop.call_later(handshake_timeout_s, self._handshake_timeout, handshake_timeout_s)
        self._reason = ""

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return len(self._out)

    # --- handshake -------------------------------------------------------------
    def start(self) -> None:
        self._handshake()

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(True, False)
            return
        except ssl.SSLWantWriteError:
            self._watch(False, True)
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._handshake_failed(exc)
            return
        self._timer.cancel()
        self._timer = None
        self._state = _OPEN
        self.peercert = self.sock.getpeercert()
        self.resumed = self.sock.session_reused
        self._watch(False, False)
        self._owner.on_handshake(self, None)

    def _handshake_timeout(self, timeout_s: float) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._handshake_failed(TimeoutError(f"no TLS handshake within {timeout_s:g} s"))

    def _handshake_failed(self, exc: BaseException) -> None:
        self._state = _CLOSED  # (on_handshake must not write or read)
        self._owner.on_handshake(self, exc)
        self._finish("TLS handshake failed")

    # --- reading ---------------------------------------------------------------
    def resume_reading(self) -> None:
        if self._state != _OPEN or self.closing or self._reading:
            return
        self._reading = True
        if self._eof:
            self._loop.call_soon(self._finish, "closed by client")
            return
        self._watch(True, bool(self._out) or self._read_wants_write)
        if self.sock.pending():  # plaintext OpenSSL already holds: the socket will not say so
            self._loop.call_soon(self._on_readable)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._watch(False, bool(self._out) or self._read_wants_write)

    def _on_readable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
        elif self._state == _LINGER:
            self._discard_input()
        elif self._state == _OPEN and self._reading:
            self._read()

    def _read(self) -> None:
        chunks = []
        sock = self.sock
        try:
            while True:
                size = sock.recv_into(_READ_BUFFER)
                if not size:
                    self._eof = True
                    break
                chunks.append(bytes(_READ_VIEW[:size]))
                if not sock.pending():
                    break  # the next record, if any, is still in the socket, which says so
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:
            self._read_wants_write = True
            self._watch(True, True)
        except ssl.SSLZeroReturnError:
            self._eof = True
        except (ssl.SSLError, OSError) as exc:
            self._finish(f"{type(exc).__name__}: {exc}")
            return
        if chunks:
            self._owner.on_data(self, b"".join(chunks) if len(chunks) > 1 else chunks[0])
        if self._eof and self._reading and self._state == _OPEN:
            self._finish("closed by client")
        elif self._eof:
            self._watch(False, bool(self._out))

    # --- writing ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closing or self._state != _OPEN:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except _AGAIN:
            sent = 0
        except (ssl.SSLError, OSError) as exc:
            self._fail_later(exc)
            return
        if sent < len(data):  # OpenSSL wants the same bytes again first: they lead the backlog
            self._out += data[sent:] if sent else data
            self._watch(self._reading and not self._eof, True)

    def _on_writable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
            return
        if self._state != _OPEN:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            if self._reading:
                self._read()
                if self._state != _OPEN:
                    return
        out = self._out
        while out:
            try:
                sent = self.sock.send(out)
            except _AGAIN:
                return
            except (ssl.SSLError, OSError) as exc:
                self._finish(f"{type(exc).__name__}: {exc}")
                return
            del out[:sent]
        self._watch(self._reading and not self._eof, False)
        if self.closing:
            self._shutdown()
        else:
            self._owner.on_drained(self)

    def _fail_later(self, exc: BaseException) -> None:
        self.closing = True
        self._loop.call_soon(self._finish, f"{type(exc).__name__}: {exc}")

    # --- closing ---------------------------------------------------------------
    def close(self, reason: str = "closed by server") -> None:
        if self.closing or self._state == _CLOSED:
            return
        self.closing, self._reason = True, reason
        if self._state == _HANDSHAKE:
            self._finish(reason)
            return
        self._reading = False
        if not self._out:
            self._shutdown()
            return
        self._watch(False, True)
        self._timer = self._loop.call_later(CLOSE_FLUSH_S, self._finish, f"{reason} (output unsent)")

    def abort(self, reason: str = "aborted") -> None:
        if self._state != _CLOSED:
            self.closing = True
            self._finish(reason)

    def _shutdown(self) -> None:
        """Send close_notify, then wait (``LINGER_S``) for the client to close."""
        try:
            self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # sent, or the connection is gone anyway
        if self._timer is not None:
            self._timer.cancel()
        self._state = _LINGER
        self._watch(True, False)
        self._timer = self._loop.call_later(LINGER_S, self._finish, self._reason)

    def _discard_input(self) -> None:
        if self._drain_raw():
            self._finish(self._reason)

    def _drain_raw(self) -> bool:
        """Drop what the client sent that was not read (closing a socket with
        unread input resets it, and the client loses our last words); True at its EOF."""
        for _ in range(16):
            try:
                data = os.read(self._fd, len(_READ_BUFFER))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if not data:
                return True
        return False

    def _finish(self, reason: str) -> None:
        if self._state == _CLOSED and self._fd < 0:
            return
        self._watch(False, False)
        self._drain_raw()
        self._state, self.closing, self._reading = _CLOSED, True, False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fd = -1
        try:
            self.sock.close()
        except OSError:
            pass
        self._owner.on_lost(self, self._reason or reason)

    def _watch(self, read: bool, write: bool) -> None:
        """Reader and writer interest on the socket, as (read, write)."""
        was_read, was_write = self._watching
        if self._fd < 0:
            return
        if read != was_read:
            if read:
                self._loop.add_reader(self._fd, self._on_readable)
            else:
                self._loop.remove_reader(self._fd)
        if write != was_write:
            if write:
                self._loop.add_writer(self._fd, self._on_writable)
            else:
                self._loop.remove_writer(self._fd)
        self._watching = (read, write)
