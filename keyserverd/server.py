"""The TLS 1.3 front of the key server: sockets in, ``KeyService`` calls out.

1. ``client_port.make_server_ssl_context(ca)`` builds a TLS 1.3-only server context that
   presents ``server.crt`` and asks for (but does not require) a client
   certificate signed by our CA.
2. ``KeyServer.start()`` listens; each accepted connection is a ``TlsLink``
   (``tls_link``: the handshake and the bytes, driven by loop callbacks, no
   task per connection).  A refused handshake (a certificate of another CA,
   an expired one, no TLS at all, too slow) is logged with its reason (once
   per peer address and reason every ``CLOSE_LOG_S``).  Each connection then
   gets a ``Session`` (identity = CN of the verified client certificate, or
   None) and a ``FrameReader`` (``on_handshake``).
3. Every whole message goes to ``KeyService.handle``; its actions are a reply
   on this connection, a push to every live connection of a host, or a close.
   A connection is not read while its messages wait for their group.
   Group commit: the messages read in one turn of the event loop (or while
   another worker had the store's turn, ``store.take_turn``), from every
   connection, are handled together inside one ``store.group()``, so their
   writes (new pair keys, rotations, bindings) are committed with one fsync;
   only then are their actions carried out.  No answer leaves before the
   write it reports is durable.  If the commit fails, each of those
   connections is told ``store_unavailable`` and closed (its client
   reconnects and asks again).  ``KeyService.begin_group``/``end_group``
   bracket a group (``host_cache`` reads the event log once per group).
4. ``run_events`` polls the store's event log (rotations and revocations made
   by this server, another one on the same store, or the CLI) and sends the
   pushes ``KeyService.on_event`` asks for; worker 0 also runs the service's
   timers.  It starts after the last event it pushed (``event_cursor``), so
   what was written while keyserverd was down is pushed when it starts.  A pair
   event of two hosts not connected here is only counted (its pushes are theirs).
5. A malformed or oversized message, an unauthenticated client without a whole
   message within ``unauth_idle_s`` (silent or trickling), a client that does
   not read (``MAX_WRITE_BUFFER_BYTES`` unsent, or ``DRAIN_ABOVE_BYTES`` for
   ``DRAIN_TIMEOUT_S``), or any error closes that connection only, with a
   logged reason.
6. Caps (``ConnectionLimits``): at most ``max_connections`` open at once
   (handshakes included; checked at accept), ``max_unauthenticated_connections``
   without a client certificate and ``max_connections_per_host`` per
   certificate ID (checked after the handshake; the host is told
   ``too_many_connections``).  A connection without a certificate is closed
   ``unauth_deadline_s`` after it opened, however much it sends.  Refusals
   are counted in ``connections_refused`` and logged like closes.  TCP
   keepalive finds dead peers within ``client_port.KEEPALIVE_IDLE_S`` + a minute.
7. A second hello (or l3_hello) for a host ID takes over: the older session
   of the same kind is told ``session_replaced`` and closed (logged), so a
   host that reconnects after a network cut is never locked out by its own
   half-dead connection; two machines sharing one identity show up as
   ``session_taken_over`` lines in turn.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import Counter

from keyserverd.store.protocol import StoreUnavailable
from l2crypt.core.errors import LocalError, RemoteProtocolError
from l2crypt.core.ks_messages import FrameReader, encode_message
from l2crypt.ops.logs import RateLimiter, fields

from .client_port import ConnectionLimits, identity_of, set_keepalive
from .event_cursor import EventCursor
from .service import KeyService, Session
from .tls_link import TlsLink, listen_sockets

log = logging.getLogger("keyserverd")

#: Connections taken from the listening socket per wakeup (then the loop runs the others).
ACCEPTS_PER_WAKEUP = 64
#: A connection whose unsent output grows past this is closed (it is not reading).
MAX_WRITE_BUFFER_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0
#: How soon a worker asks again for its turn to write (``store.take_turn``).
TURN_RETRY_S = 0.0005
#: A client that leaves our replies unread this long (once over DRAIN_ABOVE_BYTES) is dropped.
DRAIN_TIMEOUT_S, DRAIN_ABOVE_BYTES = 30.0, 64 * 1024
#: How often the event log is read (often: a poll's pushes hold up requests).
EVENT_POLL_S = 0.02
#: Events pushed before requests waiting meanwhile are served.
EVENTS_PER_TURN = 16
#: The event cursor is saved at most this often (an fsync, in a thread; after a
#: crash the events since are pushed once more, and pushes are idempotent).
CURSOR_SAVE_S = 0.5
#: A closed-connection warning is logged once per (client, reason) this often.
CLOSE_LOG_S = 10.0
#: Peer lookups (``peer_resolve``, ``peer_check``) running at once; more wait.
PEER_LOOKUPS_AT_ONCE = 16


class _Conn:
    """One client connection after its handshake.  Owned by ``KeyServer``."""

    __slots__ = ("session", "link", "reader", "took_over", "counted_as", "busy", "timer", "drain_timer",
                 "unauth_idle_until", "unauth_end")

    def __init__(self, session: Session, link: TlsLink):
        self.session = session
        self.link = link
        self.reader = FrameReader()
        #: Older sessions of this host were closed (``KeyServer._take_over``), after its hello.
        self.took_over = False
        #: The identity this connection is counted under in ``_by_host`` (None: unauthenticated).
        self.counted_as = session.identity
        #: Batches of its messages waiting for a store group (reading pauses at a second one).
        self.busy = 0
        #: The unauthenticated deadlines' timer, and the wait for the client to read what waits.
        self.timer = self.drain_timer = None
        self.unauth_idle_until = self.unauth_end = 0.0

    def send(self, msg: dict) -> bool:
        """Queue one message; False (and the connection is closed) if it cannot be sent."""
        if self.link.closing:
            return False
        if self.link.buffered > MAX_WRITE_BUFFER_BYTES:
            log.warning("connection_closed", extra=fields(host=self.session.who, reason="does not read"))
            self.close("client does not read")
            return False
        self.link.write(encode_message(msg))
        return True

    def close(self, reason: str) -> None:
        """Close it; ``reason`` is what ``on_lost`` logs (the link keeps the first one given)."""
        self.link.close(reason)


class KeyServer:
    """Accepts TLS connections and runs the key service for them."""

    def __init__(self, service: KeyService, ssl_context: ssl.SSLContext, host: str, port: int,
                 unauth_idle_s: float = 10.0, limits: ConnectionLimits = ConnectionLimits(),
                 event_cursor: EventCursor | None = None, reuse_port: bool = False):
        self.service = service
        self._ssl = ssl_context
        self._host, self._port = host, port
        #: Listen with SO_REUSEPORT (``workers``: several processes on one port).
        self._reuse_port = reuse_port
        self.unauth_idle_s = unauth_idle_s
        self.limits = limits
        #: Connections refused by a cap, by reason (status and metrics).
        self.connections_refused: Counter = Counter()
        self._peer_lookups = asyncio.Semaphore(PEER_LOOKUPS_AT_ONCE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        #: Accepted links not yet lost (handshaking ones included); owned by ``_on_acceptable``/``on_lost``.
        self._links: set[TlsLink] = set()
        self._conns: set[_Conn] = set()
        #: host ID -> its live connections, for pushes.  Owned by ``on_handshake``/``_forget``.
        self._by_host: dict[str, set[_Conn]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._close_log = RateLimiter(CLOSE_LOG_S)
        self.connections_total = 0
        #: The last key event pushed (``run_events``), saved in ``event_cursor``.
        self.event_seq = 0
        self._cursor = event_cursor or EventCursor(None)
        self.started_at = time.time()
        #: Seconds each request took in ``KeyService.handle`` (set by the metrics module).
        self.observe_request = None
        #: ``peering.Peering`` when key servers are peered (set by the CLI), else None.
        self.peering = None
        #: Messages waiting for the next store group: (connection, messages).
        self._queued: list[tuple[_Conn, list[dict]]] = []
        #: Store groups committed and failed, and the requests they held (status, metrics).
        self.group_commits = 0
        #: TLS handshakes that resumed a session (a client's ticket: no certificate exchange).
        self.tls_resumed = 0
        self.group_commits_failed = 0
        self.grouped_requests = 0
        #: Pair events none of whose hosts is connected to this worker (nothing to push here).
        self.events_skipped = 0
        #: ``workers``: ``relay(host_id, msg)`` sends a request's push to the other
        #: workers; ``siblings()`` their connection reports (worker 0).  Set by ``Workers.attach``.
        self.relay = None
        self.siblings = None
        #: This worker runs ``service.periodic`` (one does: the others push its rotations from the log).
        self.runs_timers = True

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound (host, port) (useful with port 0)."""
        self.event_seq = self._cursor.start(self.service.store)
        self._loop = asyncio.get_running_loop()
        try:
            self._listeners = listen_sockets(self._host, self._port, self._reuse_port)
        except OSError as exc:
            raise LocalError(f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}") from None
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        sockname = self._listeners[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners = []
        for conn in list(self._conns):
            conn.close("server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        deadline = time.monotonic() + 2.0
        while self._links and time.monotonic() < deadline:  # their close_notify, and the clients' answers
            await asyncio.sleep(0.02)
        for link in list(self._links):
            link.abort("server shutting down")

    # --- accepting and the handshake -------------------------------------------
    def _on_acceptable(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the next wakeup tries again
                self._log_limited(logging.WARNING, "accept_failed", ("accept", exc.errno), reason=str(exc))
                return
            if len(self._links) >= self.limits.max_connections:
                self._refuse_tcp(sock, address)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link = TlsLink(self._loop, sock, self._ssl, self, HANDSHAKE_TIMEOUT_S)
            except OSError:
                sock.close()
                continue
            self._links.add(link)
            link.start()

    def _refuse_tcp(self, sock: socket.socket, address) -> None:
        """A connection over ``max_connections``: closed before its handshake, counted and logged."""
        reason, limit = "max_connections", self.limits.max_connections
        self.connections_refused[reason] += 1
        self._log_limited(logging.WARNING, "connection_refused", ("cap", address[0], reason),
                          peer=f"{address[0]}:{address[1]}", host="unauthenticated", reason=reason, limit=limit)
        sock.close()

    def on_handshake(self, link: TlsLink, error: BaseException | None) -> None:
        """``TlsLink`` hook: the handshake ended; a refused one is logged (the link closes itself)."""
        if error is not None:
            reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
            reason = f"{type(error).__name__}: {reason or 'connection closed'}"
            key = ("tls", link.peer_host, reason)
            if self._close_log.allow(key):
                log.warning("tls_handshake_refused", extra=fields(
                    peer=link.peer, reason=reason, suppressed=self._close_log.take_suppressed(key)))
            return
        if link.resumed:
            self.tls_resumed += 1
        set_keepalive(link.sock)
        identity = identity_of(link.peercert)
        over = self._over_cap(identity)
        if over is not None:
            self._refuse_connection(link, identity, *over)
            return
        conn = link.conn = _Conn(Session(identity=identity, peer=link.peer), link)
        self._conns.add(conn)
        if identity is not None:
            self._by_host.setdefault(identity, set()).add(conn)
        else:  # it must complete a message within unauth_idle_s, and is gone after unauth_deadline_s
            now = self._loop.time()
            conn.unauth_idle_until, conn.unauth_end = now + self.unauth_idle_s, now + self.limits.unauth_deadline_s
            self._arm_unauth(conn)
        self.connections_total += 1
        log.debug("connection_opened", extra=fields(peer=link.peer, host=identity or "unauthenticated"))
        link.resume_reading()

    def _over_cap(self, identity: str | None) -> tuple[str, int] | None:
        """(reason, limit) if a connection of ``identity`` (None: no certificate) is one too many."""
        if identity is None:
            unauth = sum(1 for c in self._conns if c.session.identity is None)
            if unauth >= self.limits.max_unauthenticated_connections:
                return "max_unauthenticated_connections", self.limits.max_unauthenticated_connections
        elif len(self._by_host.get(identity, ())) >= self.limits.max_connections_per_host:
            return "too_many_connections", self.limits.max_connections_per_host
        return None

    def _refuse_connection(self, link: TlsLink, identity: str | None, reason: str, limit: int) -> None:
        """Close a connection over a cap: counted, logged once per (client, reason) every ``CLOSE_LOG_S``."""
        self.connections_refused[reason] += 1
        self._log_limited(logging.WARNING, "connection_refused", ("cap", identity or link.peer_host, reason),
                          peer=link.peer, host=identity or "unauthenticated", reason=reason, limit=limit)
        if identity is not None:  # a host is told why, so its operator sees it too
            link.write(encode_message({"t": "error", "rid": 0, "code": reason,
                                       "msg": f"more than {limit} connections of host {identity!r}"}))
            link.close(reason)
        else:
            link.abort(reason)

    # --- reading, and the store group ------------------------------------------
    def on_data(self, link: TlsLink, data: bytes) -> None:
        """``TlsLink`` hook: bytes from a client; whole messages go to the next store group."""
        conn = link.conn
        try:
            msgs = conn.reader.feed(data)
        except RemoteProtocolError as exc:
            reason = f"{exc.code}: {exc}"
            self._log_close(logging.WARNING, conn, exc.code, reason)
            conn.close(reason)
            return
        if not msgs:
            return
        if conn.counted_as is None:
            conn.unauth_idle_until = self._loop.time() + self.unauth_idle_s
        conn.busy += 1
        if conn.busy > 1:  # a client that does not wait for its answers: it waits for the group
            link.pause_reading()
        if not self._queued:
            self._loop.call_soon(self._run_group)
        self._queued.append((conn, msgs))

    def _arm_unauth(self, conn: _Conn) -> None:
        conn.timer = self._loop.call_at(min(conn.unauth_idle_until, conn.unauth_end), self._unauth_due, conn)

    def _unauth_due(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.counted_as is not None or conn.link.closing:
            return
        now = self._loop.time()
        if now >= conn.unauth_end:
            reason = f"unauthenticated and open for {self.limits.unauth_deadline_s:g} s"
            self._log_close(logging.INFO, conn, "deadline", reason)
        elif now >= conn.unauth_idle_until:
            reason = f"unauthenticated and no whole message within {self.unauth_idle_s:g} s"
            self._log_close(logging.INFO, conn, "idle", reason)
        else:
            self._arm_unauth(conn)
            return
        conn.close(reason)

    def _requests_done(self, conn: _Conn, keep_open: bool) -> None:
        """A group answered ``conn``'s messages: read on, wait for it to read, or close it."""
        conn.busy -= 1
        if conn.link.closing:
            return
        if conn.counted_as is None and conn.session.identity is not None:
            keep_open = keep_open and self._promote(conn)
        if not keep_open:
            conn.close("closed by server")
        elif conn.link.buffered > DRAIN_ABOVE_BYTES:  # read on once the client has read (on_drained)
            conn.link.pause_reading()
            if conn.drain_timer is None:
                conn.drain_timer = self._loop.call_later(DRAIN_TIMEOUT_S, self._does_not_read, conn)
        elif not conn.busy and conn.drain_timer is None:
            conn.link.resume_reading()

    def on_drained(self, link: TlsLink) -> None:
        """``TlsLink`` hook: the client took everything written to it."""
        conn = link.conn
        if conn is not None and conn.drain_timer is not None:
            conn.drain_timer.cancel()
            conn.drain_timer = None
        if conn is not None and not conn.busy:
            link.resume_reading()

    def _does_not_read(self, conn: _Conn) -> None:
        conn.drain_timer = None
        self._log_close(logging.WARNING, conn, "no_read", "client does not read")
        conn.close("client does not read")

    def on_lost(self, link: TlsLink, reason: str) -> None:
        """``TlsLink`` hook: the connection is closed."""
        self._links.discard(link)
        conn = link.conn
        if conn is None:
            return
        for timer in (conn.timer, conn.drain_timer):
            if timer is not None:
                timer.cancel()
        conn.timer = conn.drain_timer = None
        link.conn = None  # no reference cycle: both are freed now, not at the next full collection
        self._forget(conn)
        log.debug("connection_ended", extra=fields(host=conn.session.who, reason=reason))

    def _promote(self, conn: _Conn) -> bool:
        """``conn`` answered a challenge: count it as its host's (False: over the per-host cap, closed)."""
        identity = conn.counted_as = conn.session.identity
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        over = self._over_cap(identity)
        if over is not None:
            self._refuse_connection(conn.link, identity, *over)
            return False
        self._by_host.setdefault(identity, set()).add(conn)
        return True

    def _run_group(self) -> None:
        """Handle every queued message in one store group, then act (see the module docstring, 3)."""
        if not self.service.store.take_turn():  # another worker is writing: read on, try again
            asyncio.get_running_loop().call_later(TURN_RETRY_S, self._run_group)
            return
        queued, self._queued = self._queued, []
        handled, closing = [], set()
        try:
            with self.service.store.group():
                self.service.begin_group()
                for conn, msgs in queued:
                    answers = self._handle(conn, msgs) if conn not in closing else []
                    if any(target == "close" for actions in answers for target, _ in actions):
                        closing.add(conn)  # its later messages are not handled
                    handled.append((conn, answers))
        except StoreUnavailable as exc:
            self.group_commits_failed += 1
            for conn, msgs in queued:
                for msg in msgs:
                    conn.send({"t": "error", "rid": msg.get("rid", 0), "code": exc.code, "msg": str(exc)})
                self._requests_done(conn, False)
            return
        finally:
            self.service.end_group()
        self.group_commits += 1
        self.grouped_requests += sum(len(msgs) for _, msgs in queued)
        for conn, answers in handled:
            self._requests_done(conn, all(self._act(conn, actions) for actions in answers))

    def _handle(self, conn: _Conn, msgs: list[dict]) -> list[list]:
        """The service's actions for each message, up to the first that closes the connection."""
        answers = []
        for msg in msgs:
            started = time.perf_counter()
            try:
                actions = self.service.handle(conn.session, msg, now=time.time())
            except StoreUnavailable:
                raise  # the group cannot commit
            except Exception:
                log.exception("request_internal_error", extra=fields(type=msg.get("t"), host=conn.session.who))
                actions = [("reply", {"t": "error", "rid": msg.get("rid", 0), "code": "internal",
                                      "msg": "internal error; see the key server log"})]
            if self.observe_request is not None:
                self.observe_request(msg.get("t"), time.perf_counter() - started)
            answers.append(actions)
            if any(target == "close" for target, _ in actions):
                break
        return answers

    def _log_close(self, level: int, conn: _Conn, code: str, reason: str) -> None:
        """A closed connection, logged once per (client, code) every ``CLOSE_LOG_S``."""
        who = conn.session.identity or conn.session.peer.rsplit(":", 1)[0]
        self._log_limited(level, "connection_closed", (who, code), host=conn.session.who, reason=reason)

    def _log_limited(self, level: int, event: str, key: tuple, **kv) -> None:
        """Log ``event`` once per ``key`` every ``CLOSE_LOG_S``, with ``suppressed=N`` for the lines skipped."""
        if self._close_log.allow(key):
            suppressed = self._close_log.take_suppressed(key)
            if suppressed:
                kv["suppressed"] = suppressed
            log.log(level, event, extra=fields(**kv))

    def local_hosts(self) -> dict[str, int]:
        """Host ID -> number of live authenticated connections in this process."""
        return {host: len(conns) for host, conns in self._by_host.items()}

    @property
    def local_connections(self) -> int:
        return len(self._conns)

    def connected_hosts(self) -> dict[str, int]:
        """Host ID -> number of live authenticated connections (of every worker, as last reported)."""
        hosts = Counter(self.local_hosts())
        for report in self.siblings() if self.siblings is not None else ():
            hosts.update(report["hosts"])
        return dict(hosts)

    @property
    def connections(self) -> int:
        return self.local_connections + sum(r["connections"] for r in (self.siblings() if self.siblings else ()))

    def counters(self) -> dict[str, int]:
        """Group commits, resumed handshakes and connections opened, of every worker (as last reported)."""
        total = Counter(self.local_counters())
        for report in self.siblings() if self.siblings is not None else ():
            total.update(report.get("counters", {}))
        return dict(total)

    def local_counters(self) -> dict[str, int]:
        return {"group_commits": self.group_commits, "group_commits_failed": self.group_commits_failed,
                "grouped_requests": self.grouped_requests, "tls_resumed": self.tls_resumed,
                "connections_total": self.connections_total}

    def deliver(self, host_id: str, msg: dict) -> None:
        """A push relayed by another worker: send it on this process's connections of ``host_id``."""
        for other in list(self._by_host.get(host_id, ())):
            other.send(msg)

    def _act(self, conn: _Conn | None, actions: list) -> bool:
        """Carry out service actions; False when ``conn`` must close."""
        keep_open = True
        if conn is not None and conn.session.said_hello and not conn.took_over:
            conn.took_over = True
            self._take_over(conn)
        for target, out in actions:
            if target == "reply" and conn is not None:
                conn.send(out)
            elif target == "close":
                keep_open = False
            elif isinstance(target, tuple) and target[0] == "push":
                self.deliver(target[1], out)
                if conn is not None and self.relay is not None:  # events reach the other workers themselves
                    self.relay(target[1], out)
            elif isinstance(target, tuple) and target[0] == "broadcast":
                for other in list(self._conns):
                    if other.session.said_hello:
                        other.send(out)
            elif isinstance(target, tuple) and target[0] == "peer_resolve" and conn is not None:
                self._peer_resolve(conn, out)
            elif isinstance(target, tuple) and target[0] == "peer_check" and conn is not None:
                self._peer_lookup(conn, out["mac"], lambda found, req=out, kind=target[1]: self.service.after_peer_check(
                    conn.session, kind, req, found, time.time()))
            elif isinstance(target, tuple) and target[0] == "disconnect":
                for other in list(self._by_host.get(target[1], ())):
                    log.info("revoked_host_disconnected", extra=fields(host=target[1]))
                    other.close("host revoked")
        return keep_open

    def _peer_resolve(self, conn: _Conn, req: dict) -> None:
        """Ask the peers about ``req["peer_mac"]`` without holding up this connection."""
        self._peer_lookup(conn, req["peer_mac"], lambda found: self.service.answer_from_peer(
            conn.session, req["rid"], req["peer_mac"], found, time.time()))

    def _take_over(self, conn: _Conn) -> None:
        """``conn`` said hello (or l3_hello): close the host's older sessions of the same kind."""
        for other in list(self._by_host.get(conn.session.identity, ())):
            if other is conn or not other.session.said_hello or other.session.l3 != conn.session.l3:
                continue
            self._log_limited(logging.WARNING, "session_taken_over", (conn.session.identity, "session_replaced"),
                              host=conn.session.identity, old_peer=other.session.peer,
                              new_peer=conn.session.peer, kind="l3" if conn.session.l3 else "l2")
            other.send({"t": "error", "rid": 0, "code": "session_replaced",
                        "msg": f"another connection ({conn.session.peer}) said hello as "
                               f"{conn.session.identity!r}; this one is closed"})
            other.close("session replaced")
            self._forget(other)

    def _peer_lookup(self, conn: _Conn, mac: bytes, finish) -> None:
        """Ask the peers who holds ``mac`` (at most ``PEER_LOOKUPS_AT_ONCE`` at a time), then
        carry out ``finish(found)``'s actions on ``conn``."""
        async def run() -> None:
            found = None
            try:
                async with self._peer_lookups:
                    if self.peering is not None:
                        found = await self.peering.resolve(mac, conn.session.identity)
            except Exception:
                log.exception("peer lookup failed")
            self._act(conn, finish(found))

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run_events(self) -> None:
        """Push what the event log announces; run the rotation timers.  Runs until cancelled."""
        store = self.service.store
        seq = saved = self.event_seq
        last_periodic = saved_at = 0.0
        while True:
            await asyncio.sleep(EVENT_POLL_S)
            try:
                now = time.time()
                if self.runs_timers and now - last_periodic >= self.service.periodic_every_s:
                    last_periodic = now
                    self.service.periodic(now)
                events = store.events_since(seq)
                for index, event in enumerate(events):
                    if index and index % EVENTS_PER_TURN == 0:
                        await asyncio.sleep(0)  # the requests waiting meanwhile are served
                    seq = self.event_seq = event.seq
                    if event.kind == "pair" and event.id1 not in self._by_host and event.id2 not in self._by_host:
                        self.service.events["pair"] += 1
                        self.events_skipped += 1
                        continue  # its pushes go to the pair's two hosts only, and none is connected here
                    self._act(None, self.service.on_event(event))
                if seq != saved and now - saved_at >= CURSOR_SAVE_S:
                    self._cursor.save_in_background(seq, asyncio.get_running_loop())
                    saved, saved_at = seq, now
            except StoreUnavailable:  # the store logs when it is lost and back; the next poll catches up
                pass
            except Exception:  # a store hiccup must not stop the pushes for good
                log.exception("event_processing_failed")

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn.session.identity is not None:
            conns = self._by_host.get(conn.session.identity)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._by_host[conn.session.identity]
