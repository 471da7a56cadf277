"""One simulated host's TLS connection to keyserverd, for the load generator
(``ks_load``): a non-blocking socket wrapped by ``ssl`` itself, driven by a
``selectors`` loop, no asyncio.

The generator must cost far less than the server it measures, and both run
on the same cores.  asyncio's TLS runs every record through a memory BIO in
Python (several calls per message each way); ``SSLSocket.send``/``recv``
encrypt and move a message in one C call.  Requests are packed with msgpack
and answers unpacked without the schema check: keyserverd is what is under
test, and a malformed answer still shows (it has no ``t`` the generator
knows, and is counted under its type).

1. ``HostLink.start(...)``: a TCP connection to 127.0.0.1 and a TLS client
   handshake offering ``session`` (resumption), registered in the selector
   with the link as its data.
2. ``on_ready(now)`` on each selector event: it moves the handshake on, then
   reads every whole message; each answer is handed to ``on_answer(link, rid,
   msg, now)``; pushes (rid 0) are skipped.  Returns False once the link
   is closed (an error, or keyserverd closed it).
3. ``request(msg)`` sends a request with a fresh rid and returns the rid;
   output the socket cannot take at once waits in ``outbox`` (write interest).
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import struct
from typing import Callable

import msgpack

from l2crypt.core.constants import KEYSERVER_TLS_NAME

LENGTH = struct.Struct("!I")
READ_CHUNK = 65536
CONNECTING, HANDSHAKE, OPEN, CLOSED = "connecting", "handshake", "open", "closed"


class HostLink:
    """Host ``n``'s connection (see the module docstring)."""

    __slots__ = ("n", "sel", "sock", "state", "inbuf", "outbox", "rid", "on_answer", "error",
                 "resumed", "session", "_events", "deadline", "waiting")

    def __init__(self, n: int, sel: selectors.BaseSelector, on_answer: Callable):
        self.n, self.sel, self.on_answer = n, sel, on_answer
        self.sock: ssl.SSLSocket | None = None
        self.state = CLOSED
        self.inbuf = bytearray()
        self.outbox = bytearray()
        self.rid = 0
        self.error = ""
        self.resumed = False
        self.session: ssl.SSLSession | None = None
        self._events = 0
        self.deadline = 0.0
        #: rid -> what the owner keeps about that request until its answer.
        self.waiting: dict[int, tuple] = {}

    def start(self, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None, deadline: float) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=KEYSERVER_TLS_NAME, do_handshake_on_connect=False,
                                    session=session)
        self.state, self.deadline, self.error = CONNECTING, deadline, ""
        self.inbuf.clear()
        self.outbox.clear()
        code = self.sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            self.close(f"connect: {errno.errorcode.get(code, code)}")
            return
        self._watch(selectors.EVENT_WRITE)

    def _watch(self, events: int) -> None:
        if events == self._events:
            return
        if self._events == 0:
            self.sel.register(self.sock, events, self)
        else:
            self.sel.modify(self.sock, events, self)
        self._events = events

    def close(self, error: str = "") -> None:
        if self.sock is not None:
            if self._events:
                self.sel.unregister(self.sock)
            self.sock.close()
        self.sock, self.state, self._events = None, CLOSED, 0
        self.error = self.error or error

    def on_ready(self, now: float) -> bool:
        try:
            if self.state == CONNECTING:
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self.close(f"connect: {errno.errorcode.get(code, code)}")
                    return False
                self.state = HANDSHAKE
            if self.state == HANDSHAKE:
                try:
                    self.sock.do_handshake()
                except ssl.SSLWantReadError:
                    self._watch(selectors.EVENT_READ)
                    return True
                except ssl.SSLWantWriteError:
                    self._watch(selectors.EVENT_WRITE)
                    return True
                self.state = OPEN
                self.resumed = self.sock.session_reused
            self._flush()
            self._read(now)
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            self.close(repr(exc))
        return self.state == OPEN

    def _read(self, now: float) -> None:
        sock, buf = self.sock, self.inbuf
        while sock is not None:
            try:
                data = sock.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE)
                break
            if not data:
                self.close("keyserverd closed the connection")
                return
            buf += data
            if not sock.pending():
                break  # the next record, if any, is still in the socket: the selector says so (no failed read)
        start = 0
        while len(buf) - start >= 4:
            (size,) = LENGTH.unpack_from(buf, start)
            if len(buf) - start - 4 < size:
                break
            msg = msgpack.unpackb(bytes(buf[start + 4:start + 4 + size]))
            start += 4 + size
            rid = msg.get("rid", 0) if isinstance(msg, dict) else 0
            if rid:  # a push (rid 0) answers nothing the generator sent
                self.on_answer(self, rid, msg, now)
        if start:
            del buf[:start]

    def request(self, msg: dict) -> int:
        """Send ``msg`` with a fresh rid (which is returned); 0 if the link closed instead."""
        self.rid += 1
        msg["rid"] = self.rid
        body = msgpack.packb(msg)
        self.outbox += LENGTH.pack(len(body)) + body
        try:
            self._flush()
        except OSError as exc:
            self.close(repr(exc))
            return 0
        return self.rid

    def _flush(self) -> None:
        while self.outbox and self.sock is not None:
            try:
                sent = self.sock.send(self.outbox)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            del self.outbox[:sent]
        if self.sock is not None:
            self._watch(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0))

    def keep_session(self) -> None:
        """Remember the TLS session to resume next time (call after an answer: the
        TLS 1.3 ticket came before it)."""
        if self.sock is not None and self.sock.session is not None:
            self.session = self.sock.session
