"""The TLS 1.3 front of the key server: sockets in, ``KeyService`` calls out.

1. ``make_server_ssl_context(ca)`` builds a TLS 1.3-only server context that
   presents ``server.crt`` and asks for (but does not require) a client
   certificate signed by our CA.
2. ``KeyServer.start()`` listens on plain TCP; each connection first does the
   TLS handshake (``start_tls``), so a refused handshake (a certificate of
   another CA, an expired one, no TLS at all, too slow) is logged with its
   reason (once per peer address and reason every ``CLOSE_LOG_S``).  Each
   connection then gets a ``Session`` (identity = CN of the verified client
   certificate, or None) and a ``FrameReader``.
3. Every whole message goes to ``KeyService.handle``; its actions are a reply
   on this connection, a push to every live connection of a host, or a close.
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
   not read, or any error closes that connection only, with a logged reason.
6. Caps (``ConnectionLimits``): at most ``max_connections`` open at once
   (handshakes included; checked at accept), ``max_unauthenticated_connections``
   without a client certificate and ``max_connections_per_host`` per
   certificate ID (checked after the handshake; the host is told
   ``too_many_connections``).  A connection without a certificate is closed
   ``unauth_deadline_s`` after it opened, however much it sends.  Refusals
   are counted in ``connections_refused`` and logged like closes.  TCP
   keepalive finds dead peers within ``KEEPALIVE_IDLE_S`` + a minute.
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
from dataclasses import dataclass

from keyserverd.store.protocol import StoreUnavailable
from l2crypt.core.errors import LocalError, RemoteProtocolError
from l2crypt.core.ks_messages import FrameReader, encode_message
from l2crypt.io.aio_timeout import wait_for
from l2crypt.ops.logs import RateLimiter, fields

from .ca import CertificateAuthority
from .event_cursor import EventCursor
from .service import KeyService, Session

log = logging.getLogger("keyserverd")

READ_CHUNK = 65536
#: The read buffer of each TLS connection.  asyncio's default (256 KiB, made
#: and zeroed per connection) was most of a connection's memory; a TLS record
#: holds at most 16 KiB, so this costs no extra reads for our small messages.
TLS_READ_BUFFER_BYTES = 32 * 1024
#: A connection whose unsent output grows past this is closed (it is not reading).
MAX_WRITE_BUFFER_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0
#: How soon a worker asks again for its turn to write (``store.take_turn``).
TURN_RETRY_S = 0.0005
#: A client that leaves our replies unread this long (once over DRAIN_ABOVE_BYTES) is dropped.
DRAIN_TIMEOUT_S, DRAIN_ABOVE_BYTES = 30.0, 64 * 1024
#: How often the event log is read, and the rotation timers run.
EVENT_POLL_S = 0.2
PERIODIC_S = 5.0
#: A closed-connection warning is logged once per (client, reason) this often.
CLOSE_LOG_S = 10.0
#: TCP keepalive: first probe after this much silence, then every
#: ``KEEPALIVE_INTERVAL_S``; ``KEEPALIVE_PROBES`` unanswered ones end the connection.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 6
#: Peer lookups (``peer_resolve``, ``peer_check``) running at once; more wait.
PEER_LOOKUPS_AT_ONCE = 16


@dataclass(frozen=True)
class ConnectionLimits:
    """Caps on client connections (see the module docstring, 6)."""

    #: Connections open at once, TLS handshakes included.
    max_connections: int = 4096
    #: Connections one certificate ID may hold at once.
    max_connections_per_host: int = 8
    #: Connections without a client certificate open at once (after the handshake).
    max_unauthenticated_connections: int = 256
    #: Seconds a connection without a client certificate may stay open in all.
    unauth_deadline_s: float = 30.0


def shrink_tls_buffers(size: int = TLS_READ_BUFFER_BYTES) -> None:
    """Make every TLS connection of this process read through a ``size`` buffer
    (``asyncio.sslproto.SSLProtocol.max_size``; keyserverd calls it at start)."""
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", 0) > size:
        sslproto.SSLProtocol.max_size = size


def set_keepalive(sock) -> None:
    """Turn on TCP keepalive with the short timers above (best effort)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (OSError, AttributeError):
        pass


def make_server_ssl_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    ctx.load_verify_locations(cafile=str(ca.ca_cert_path))
    return ctx


def identity_of(peercert: dict | None) -> str | None:
    """The CN of a verified peer certificate (``SSLSocket.getpeercert()``), or None."""
    for rdn in (peercert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


class _Conn:
    """One client connection.  Owned by its ``KeyServer._serve`` task."""

    def __init__(self, session: Session, writer: asyncio.StreamWriter):
        self.session = session
        self.writer = writer
        self.reader = FrameReader()
        #: Older sessions of this host were closed (``KeyServer._take_over``), after its hello.
        self.took_over = False

    def send(self, msg: dict) -> bool:
        """Queue one message; False (and the connection is closed) if it cannot be sent."""
        if self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            log.warning("connection_closed", extra=fields(host=self.session.who, reason="does not read"))
            self.writer.close()
            return False
        self.writer.write(encode_message(msg))
        return True


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
        #: Accepted connections not yet closed (handshaking ones included); owned by ``_accept``.
        self._open = 0
        #: Connections refused by a cap, by reason (status and metrics).
        self.connections_refused: Counter = Counter()
        self._peer_lookups = asyncio.Semaphore(PEER_LOOKUPS_AT_ONCE)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        #: host ID -> its live connections, for pushes.  Owned by ``_serve``.
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
        #: Messages waiting for the next store group: (connection, messages, future).
        self._queued: list[tuple[_Conn, list[dict], asyncio.Future]] = []
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
        try:
            self._server = await asyncio.start_server(
                self._accept, self._host, self._port, reuse_address=True,
                reuse_port=self._reuse_port or None,
            )
        except OSError as exc:
            raise LocalError(f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}") from None
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.limits.max_connections:
            self._refuse_connection(writer, None, "max_connections", self.limits.max_connections)
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        self._open += 1
        try:
            if await self._handshake(writer):
                await self._serve(reader, writer)
        finally:
            self._open -= 1
            self._tasks.discard(task)

    def _over_cap(self, identity: str | None) -> tuple[str, int] | None:
        """(reason, limit) if a connection of ``identity`` (None: no certificate) is one too many."""
        if identity is None:
            unauth = sum(1 for c in self._conns if c.session.identity is None)
            if unauth >= self.limits.max_unauthenticated_connections:
                return "max_unauthenticated_connections", self.limits.max_unauthenticated_connections
        elif len(self._by_host.get(identity, ())) >= self.limits.max_connections_per_host:
            return "too_many_connections", self.limits.max_connections_per_host
        return None

    def _refuse_connection(self, writer: asyncio.StreamWriter, identity: str | None, reason: str,
                           limit: int) -> None:
        """Close a connection over a cap: counted, logged once per (client, reason) every ``CLOSE_LOG_S``."""
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.connections_refused[reason] += 1
        self._log_limited(logging.WARNING, "connection_refused",
                          ("cap", identity or (peername[0] if peername else "?"), reason),
                          peer=peer, host=identity or "unauthenticated", reason=reason, limit=limit)
        if identity is not None:  # a host is told why, so its operator sees it too
            writer.write(encode_message({"t": "error", "rid": 0, "code": reason,
                                         "msg": f"more than {limit} connections of host {identity!r}"}))
            writer.close()
        else:
            writer.transport.abort()

    async def _handshake(self, writer: asyncio.StreamWriter) -> bool:
        """TLS on the accepted TCP connection; False (logged, closed) if it fails."""
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            await writer.start_tls(self._ssl, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            tls = writer.get_extra_info("ssl_object")
            if tls is not None and tls.session_reused:
                self.tls_resumed += 1
            return True
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError, EOFError) as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
            reason = f"{type(exc).__name__}: {reason or 'connection closed'}"
            key = ("tls", peername[0] if peername else "?", reason)
            if self._close_log.allow(key):
                log.warning("tls_handshake_refused", extra=fields(
                    peer=peer, reason=reason, suppressed=self._close_log.take_suppressed(key)))
            writer.transport.abort()
            return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        set_keepalive(writer.get_extra_info("socket"))
        identity = identity_of(writer.get_extra_info("peercert"))
        over = self._over_cap(identity)
        if over is not None:
            self._refuse_connection(writer, identity, *over)
            return
        conn = _Conn(Session(identity=identity, peer=peer), writer)
        self._conns.add(conn)
        if identity is not None:
            self._by_host.setdefault(identity, set()).add(conn)
        self.connections_total += 1
        log.debug("connection_opened", extra=fields(peer=peer, host=identity or "unauthenticated"))
        reason = "closed by client"
        loop = asyncio.get_running_loop()
        # An unauthenticated client must complete a message within unauth_idle_s
        # (trickling bytes does not keep it alive), and is gone after unauth_deadline_s.
        unauth_deadline = loop.time() + self.unauth_idle_s
        unauth_end = loop.time() + self.limits.unauth_deadline_s
        try:
            while True:
                timeout = max(0.0, min(unauth_deadline, unauth_end) - loop.time()) if identity is None else None
                try:
                    data = await wait_for(reader.read(READ_CHUNK), timeout)
                except asyncio.TimeoutError:
                    if loop.time() >= unauth_end:
                        reason = f"unauthenticated and open for {self.limits.unauth_deadline_s:g} s"
                        self._log_close(logging.INFO, conn, "deadline", reason)
                    else:
                        reason = f"unauthenticated and no whole message within {self.unauth_idle_s:g} s"
                        self._log_close(logging.INFO, conn, "idle", reason)
                    break
                if not data:
                    break
                try:
                    msgs = conn.reader.feed(data)
                except RemoteProtocolError as exc:
                    reason = f"{exc.code}: {exc}"
                    self._log_close(logging.WARNING, conn, exc.code, reason)
                    break
                if msgs:
                    unauth_deadline = loop.time() + self.unauth_idle_s
                keep_open = await self._submit(conn, msgs) if msgs else True
                if identity is None and conn.session.identity is not None:
                    identity = conn.session.identity
                    keep_open = keep_open and self._promote(conn)
                if writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:  # (a drain costs a timer)
                    await wait_for(writer.drain(), DRAIN_TIMEOUT_S)
                if not keep_open:
                    reason = "closed by server"
                    break
        except asyncio.CancelledError:
            reason = "server shutting down"
        except asyncio.TimeoutError:
            reason = "client does not read"
            self._log_close(logging.WARNING, conn, "no_read", reason)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception:  # a bug must not take the server down
            log.exception("connection_internal_error", extra=fields(host=conn.session.who))
            reason = "internal error"
        finally:
            self._forget(conn)
            writer.close()
            try:
                await wait_for(writer.wait_closed(), 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError, ssl.SSLError, OSError):
                pass
            log.debug("connection_ended", extra=fields(host=conn.session.who, reason=reason))

    def _promote(self, conn: _Conn) -> bool:
        """``conn`` answered a challenge: count it as its host's (False: over the per-host cap, closed)."""
        identity = conn.session.identity
        over = self._over_cap(identity)
        if over is not None:
            self._refuse_connection(conn.writer, identity, *over)
            return False
        self._by_host.setdefault(identity, set()).add(conn)
        return True

    def _submit(self, conn: _Conn, msgs: list[dict]) -> asyncio.Future:
        """Queue ``msgs`` for the next group (``_run_group``); the future is
        False when the connection must close."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._queued:
            loop.call_soon(self._run_group)
        self._queued.append((conn, msgs, done))
        return done

    def _run_group(self) -> None:
        """Handle every queued message in one store group, then act (see the module docstring, 3)."""
        if not self.service.store.take_turn():  # another worker is writing: read on, try again
            asyncio.get_running_loop().call_later(TURN_RETRY_S, self._run_group)
            return
        queued, self._queued = self._queued, []
        handled = []
        try:
            with self.service.store.group():
                self.service.begin_group()
                for conn, msgs, done in queued:
                    handled.append((conn, self._handle(conn, msgs), done))
        except StoreUnavailable as exc:
            self.group_commits_failed += 1
            for conn, msgs, done in queued:
                for msg in msgs:
                    conn.send({"t": "error", "rid": msg.get("rid", 0), "code": exc.code, "msg": str(exc)})
                if not done.done():
                    done.set_result(False)
            return
        finally:
            self.service.end_group()
        self.group_commits += 1
        self.grouped_requests += sum(len(msgs) for _, msgs, _ in queued)
        for conn, answers, done in handled:
            keep_open = all(self._act(conn, actions) for actions in answers)
            if not done.done():
                done.set_result(keep_open)

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
                    other.writer.close()
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
            other.writer.close()
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
        seq = self.event_seq
        last_periodic = 0.0
        while True:
            await asyncio.sleep(EVENT_POLL_S)
            try:
                now = time.time()
                if self.runs_timers and now - last_periodic >= PERIODIC_S:
                    last_periodic = now
                    self.service.periodic(now)
                events = store.events_since(seq)
                for event in events:
                    seq = self.event_seq = event.seq
                    if event.kind == "pair" and event.id1 not in self._by_host and event.id2 not in self._by_host:
                        self.service.events["pair"] += 1
                        self.events_skipped += 1
                        continue  # its pushes go to the pair's two hosts only, and none is connected here
                    self._act(None, self.service.on_event(event))
                if events:
                    self._cursor.save(seq)
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
