"""The agent's connection to the key server (asyncio, TLS 1.3, mutual auth).

1. Connect to the best server ``failover.FailoverSelector`` names (the list
   is in priority order).  A host whose key is on a token (``token_auth``)
   first answers the server's challenge (``auth_begin``, ``challenge``,
   ``auth``, ``authenticated``; see ``l2crypt.core.challenge_auth``); a token
   that cannot sign ends the attempt with ``host_key_unavailable`` (logged at
   ERROR, once a minute at most): no session, fail closed.  Then say
   ``hello`` with our MAC and wait for ``welcome`` (cipher and multicast key).
2. Forward ``key_req`` for MACs the engine asks about, ``mcast_req``, and the
   engine's notices (``rekey_req``, ``key_report``); match answers by rid.
3. Hand answers and server pushes (``key``, ``multicast``, ``peer_revoked``)
   to the agent.
4. Ping the server in use every ``probe_interval_s``; after
   ``probe_failures`` missed pongs, or at once when the connection drops, fail
   over to the next server by priority.  Servers of higher priority are pinged
   in the background on their own connections; one that has answered for
   ``failback_holddown_s`` gets the agent back.  On every new connection the
   agent asks again for the keys it is waiting for.
5. The key server keeps one session per identity: when another connection
   says hello with ours it closes this one with ``session_replaced``; the
   client logs it as an error and waits ``REPLACED_WAIT_S`` before it
   connects again.
6. Reconnects are cheap and spread out: after a session ends the client
   waits a random time up to ``reconnect_jitter_s`` before it connects
   again, and backs off with jitter while no server takes it
   (``failover.ReconnectSchedule``).  It keeps the TLS session of each server
   (its TLS 1.3 ticket) and offers it on the next connection there, so a
   reconnect skips the certificate exchange and signatures when the server
   still knows the ticket (``TlsSessions``; ``resumed`` counts them).

The data path never waits for this: keys already installed keep working
while the client is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Protocol

from l2crypt.core import ks_messages
from l2crypt.core.challenge_auth import answer_challenge
from l2crypt.core.errors import LocalError, RemoteProtocolError
from l2crypt.core.failover import RECONNECT_JITTER_S, RECONNECT_MAX_S, FailoverSelector, ReconnectSchedule
from l2crypt.ops.logs import RateLimiter, fields
from l2crypt.ops.metrics import LatencyHistogram

from .config import parse_hostport
from .tls_files import SERVER_NAME
from l2crypt.io.aio_timeout import wait_for

log = logging.getLogger("l2crypt.keyclient")

CONNECT_TIMEOUT_S = 5.0
#: Error codes (pushed with rid 0) after which the session is over.
SESSION_ENDING_CODES = ("revoked", "unauthenticated", "session_replaced")
#: Another connection said hello with our identity (a clone, or a state
#: directory copied to another machine): wait this long before taking it back,
#: so two agents of one identity alternate slowly instead of in a hot loop.
REPLACED_WAIT_S = 10.0
#: A host key that cannot sign is logged once per reason this often.
HOST_KEY_LOG_S = 60.0


class KeyEvents(Protocol):
    """What the agent does with the server's answers.  Called on the loop thread."""

    def on_welcome(self, msg: dict) -> None: ...
    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int,
               age_s: int = 0, older: list = ()) -> None:
        """A pair key version (``age_s`` since the server made it) and the older
        ones still live, (pw_id, key, age_s) newest first."""
    def on_unknown(self, peer_mac: bytes) -> None: ...
    def on_key_refused(self, peer_mac: bytes, code: str, text: str) -> None: ...
    def on_multicast(self, key: bytes, pw_id: int) -> None: ...
    def on_peer_revoked(self, peer_mac: bytes) -> None: ...
    def on_disconnect(self) -> None: ...


class TlsSessions:
    """The TLS session last made with each key server, offered again on the
    next connection to it (TLS 1.3 resumption).  asyncio has no way to pass a
    session to ``open_connection``, so ``install`` wraps the context's
    ``wrap_bio``: the session set by ``offer`` goes to the next TLS object
    made from the context, and only to that one."""

    def __init__(self):
        self._by_server: dict[str, ssl.SSLSession] = {}
        self._offered: ssl.SSLSession | None = None

    def install(self, ctx: ssl.SSLContext | None) -> None:
        if ctx is None or getattr(ctx.wrap_bio, "__self__", None) is self:
            return
        plain = ctx.wrap_bio

        def wrap_bio(incoming, outgoing, server_side=False, server_hostname=None, session=None):
            offered, self._offered = self._offered, None
            return plain(incoming, outgoing, server_side, server_hostname, session=session or offered)

        wrap_bio.__self__ = self
        ctx.wrap_bio = wrap_bio

    def offer(self, server: str) -> None:
        """The next connection made from the context resumes ``server``'s session, if any."""
        self._offered = self._by_server.get(server)

    def keep(self, server: str, writer: asyncio.StreamWriter) -> bool:
        """Remember the session of an established connection; True if it was resumed."""
        self._offered = None
        tls = writer.get_extra_info("ssl_object")
        if tls is None:
            return False
        if tls.session is not None:
            self._by_server[server] = tls.session
        return bool(tls.session_reused)


class KeyClient:
    """The agent's TLS session to its key servers: hello, key requests and pushes, probes and
    failover in priority order (``FailoverSelector``)."""

    def __init__(self, servers: tuple[str, ...], ssl_ctx: ssl.SSLContext, my_mac: bytes, events: KeyEvents,
                 probe_interval_s: float = 5.0, probe_failures: int = 3, failback_holddown_s: float = 30.0,
                 token_auth=None, reconnect_jitter_s: float = RECONNECT_JITTER_S,
                 reconnect_max_s: float = RECONNECT_MAX_S):
        """``token_auth``: ``host_key.TokenAuth`` when the host key is on a token, else None (mutual TLS).
        ``reconnect_jitter_s``, ``reconnect_max_s``: see ``failover.ReconnectSchedule``."""
        self.servers = servers
        self.token_auth = token_auth
        self._host_key_log = RateLimiter(HOST_KEY_LOG_S)
        self.selector = FailoverSelector(servers, probe_failures, failback_holddown_s)
        self.schedule = ReconnectSchedule(reconnect_jitter_s, max_s=max(reconnect_max_s, 0.2))
        self.tls_sessions = TlsSessions()
        self.tls_sessions.install(ssl_ctx)
        #: Sessions that resumed a TLS session (no certificate exchange).
        self.resumed = 0
        self.probe_interval_s = probe_interval_s
        self.ssl_ctx = ssl_ctx
        self.my_mac = my_mac
        self.events = events
        self.server: str | None = None      # the server in use, when connected
        self.connected = False
        self.connects = 0
        #: Sessions established with another server than the previous one (issue 5 refines this).
        #: Request -> answer times of key requests; read by the metrics collector.
        self.latency = LatencyHistogram("l2crypt_key_request_duration_seconds",
                                        "Time from a key request to its answer.")
        self._sent_at: dict[int, float] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._rid = 0
        self._key_rids: dict[int, bytes] = {}
        self._pong = asyncio.Event()

    def _next_rid(self) -> int:
        self._rid = self._rid % 0xFFFFFFFE + 1
        return self._rid

    def request_key(self, peer_mac: bytes) -> bool:
        """Send a key request now if connected; False if it could not be sent."""
        if not self.connected:
            return False
        rid = self._next_rid()
        self._key_rids[rid] = peer_mac
        self._sent_at[rid] = asyncio.get_running_loop().time()
        return self._send({"t": "key_req", "rid": rid, "peer_mac": peer_mac})

    def _answered(self, rid: int) -> None:
        sent = self._sent_at.pop(rid, None)
        if sent is not None:
            self.latency.observe(asyncio.get_running_loop().time() - sent)

    def request_multicast(self) -> bool:
        """Ask for the current multicast key (a frame under a newer one arrived)."""
        return self._send({"t": "mcast_req", "rid": self._next_rid()})

    def send_notice(self, kind: str, peer_mac: bytes, pw_id: int) -> bool:
        """``rekey`` (data volume reached) or ``report`` (the peer lags) for a pair."""
        msg_type = {"rekey": "rekey_req", "report": "key_report"}[kind]
        rid = self._next_rid()
        self._key_rids[rid] = peer_mac
        return self._send({"t": msg_type, "rid": rid, "peer_mac": peer_mac, "pw_id": pw_id})

    def _send(self, msg: dict) -> bool:
        if not self.connected or self._writer is None:
            return False
        self._writer.write(ks_messages.encode_message(msg))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            had_session = replaced = False
            for index in self.selector.order():
                if stop.is_set():
                    return
                server = self.selector.servers[index].address
                try:
                    await self._session(index, stop)
                except LocalError as exc:  # the token cannot sign: no session (fail closed)
                    self._log_host_key(server, exc)
                except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError) as exc:
                    replaced = getattr(exc, "code", None) == "session_replaced"
                    if replaced:
                        log.error("session_replaced", extra=fields(
                            server=server, reason=str(exc), retry_in_s=REPLACED_WAIT_S,
                            hint="another agent uses this identity (a cloned machine or a copied state directory?)"))
                    else:
                        log.warning("keyserver_unreachable" if not self.connected else "keyserver_lost",
                                    extra=fields(server=server, reason=str(exc) or type(exc).__name__))
                finally:
                    if self.connected:
                        had_session = True
                        self.connected = False
                        self.selector.lost(loop.time())
                        self.events.on_disconnect()
                    else:
                        self.selector.connect_failed(index, loop.time())
                    self._writer = None
                    self._key_rids.clear()
                    self._sent_at.clear()
                if had_session:
                    break  # choose again from the top: fail over, or fail back
            if replaced:
                delay = self.schedule.fixed(REPLACED_WAIT_S)
            elif had_session:
                delay = self.schedule.after_session()
            else:
                delay = self.schedule.after_failure()
            try:
                await wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _open(self, server: str):
        host, port = parse_hostport(server)
        return await wait_for(
            asyncio.open_connection(host, port, ssl=self.ssl_ctx, server_hostname=SERVER_NAME),
            CONNECT_TIMEOUT_S,
        )

    def _log_host_key(self, server: str, exc: LocalError) -> None:
        key = str(exc)
        if self._host_key_log.allow(key):
            kv = {"suppressed": self._host_key_log.take_suppressed(key)}
            log.error("host_key_unavailable", extra=fields(
                server=server, reason=key, **{k: v for k, v in kv.items() if v},
                hint="no key-server session until the host key can sign again (fail closed)"))

    async def _session(self, index: int, stop: asyncio.Event) -> None:
        server = self.selector.servers[index].address
        self.tls_sessions.offer(server)
        reader, writer = await self._open(server)
        self._writer = writer
        messages = self._messages(reader)
        try:
            await self._authenticate(writer, messages)
            welcome = await self._handshake(writer, messages)
            self.server = server
            self.connected = True
            self.connects += 1
            self.resumed += self.tls_sessions.keep(server, writer)
            self.selector.connected(index, asyncio.get_running_loop().time())
            log.info("keyserver_connected", extra=fields(server=server, id=welcome["id"], priority=index + 1))
            self.events.on_welcome(welcome)
            pinger = asyncio.ensure_future(self._probe(writer))
            watcher = asyncio.ensure_future(self._watch_higher(writer))
            try:
                async for msg in messages:
                    self._dispatch(msg)
                    if stop.is_set():
                        break
            finally:
                pinger.cancel()
                watcher.cancel()
        finally:
            writer.close()

    async def _authenticate(self, writer: asyncio.StreamWriter, messages) -> None:
        """With a key on a token: answer the server's challenge, for the server
        certificate this connection verified.  Nothing to do with a key file."""
        auth = self.token_auth
        if auth is None:
            return
        writer.write(ks_messages.encode_message({"t": "auth_begin", "rid": self._next_rid()}))
        challenge = _expect(await wait_for(anext(messages), CONNECT_TIMEOUT_S), "challenge", "auth_begin")
        server_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        answer = await asyncio.get_running_loop().run_in_executor(
            None, answer_challenge, challenge["challenge"], server_der, auth.host_id, auth.cert_pem, auth.signer)
        writer.write(ks_messages.encode_message({**answer, "rid": self._next_rid()}))
        _expect(await wait_for(anext(messages), CONNECT_TIMEOUT_S), "authenticated", "auth")

    async def _handshake(self, writer: asyncio.StreamWriter, messages) -> dict:
        """Say hello and return the welcome; RemoteProtocolError if refused.
        (The layer-3 client, ``l3_keyclient``, says its own hello.)"""
        writer.write(ks_messages.encode_message({"t": "hello", "rid": self._next_rid(), "mac": self.my_mac}))
        welcome = await wait_for(anext(messages), CONNECT_TIMEOUT_S)
        if welcome["t"] == "error":
            raise RemoteProtocolError(f"hello refused: {welcome['msg']} ({welcome['code']})", welcome["code"])
        if welcome["t"] != "welcome":
            raise RemoteProtocolError(f"expected welcome, got {welcome['t']}")
        return welcome

    @staticmethod
    async def _messages(reader: asyncio.StreamReader):
        """Whole, validated messages from one connection, in order."""
        frames = ks_messages.FrameReader()
        while True:
            data = await reader.read(65536)
            if not data:
                raise EOFError("connection closed by the key server")
            for msg in frames.feed(data):
                yield msg

    async def _probe(self, writer: asyncio.StreamWriter) -> None:
        """Ping the server in use; abort the connection after too many missed pongs."""
        loop = asyncio.get_running_loop()
        while True:
            self._pong.clear()
            writer.write(ks_messages.encode_message({"t": "ping", "rid": self._next_rid()}))
            try:
                await wait_for(self._pong.wait(), self.probe_interval_s)
                self.selector.pong(loop.time())
                await asyncio.sleep(self.probe_interval_s)
            except asyncio.TimeoutError:
                log.warning("keyserver_probe_missed", extra=fields(server=self.server))
                if self.selector.probe_missed(loop.time()):
                    log.warning("keyserver_probe_failed", extra=fields(server=self.server,
                                                                       missed=self.selector.probe_failures))
                    writer.transport.abort()
                    return

    async def _watch_higher(self, writer: asyncio.StreamWriter) -> None:
        """Ping servers of higher priority on their own connections; fail back
        to the best one once it has answered for the hold-down."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.probe_interval_s)
            for index in self.selector.background_targets():
                ok = await self._ping_once(self.selector.servers[index].address)
                self.selector.background_result(index, ok, loop.time())
            target = self.selector.failback_due(loop.time())
            if target is not None:
                log.info("keyserver_failback", extra=fields(
                    server=self.selector.servers[target].address, leaving=self.server))
                self.selector.release()
                writer.transport.abort()
                return

    async def _ping_once(self, server: str) -> bool:
        """One TLS connection, one ping, one pong: True if the server answered."""
        writer = None
        try:
            reader, writer = await self._open(server)
            messages = self._messages(reader)
            await self._authenticate(writer, messages)
            writer.write(ks_messages.encode_message({"t": "ping", "rid": 1}))
            deadline = asyncio.get_running_loop().time() + min(self.probe_interval_s, CONNECT_TIMEOUT_S)
            while True:
                left = deadline - asyncio.get_running_loop().time()
                msg = await wait_for(anext(messages), max(left, 0.01))
                if msg["t"] == "pong":
                    return True
        except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError, LocalError):
            return False
        finally:
            if writer is not None:
                writer.transport.abort()

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t in ("key", "unknown", "error"):
            self._answered(msg["rid"])
        if t == "key":
            self._key_rids.pop(msg["rid"], None)
            self.events.on_key(msg["peer_mac"], msg["peer_id"], msg["key"], msg["pw_id"],
                               age_s=msg.get("age_s", 0), older=[tuple(v) for v in msg.get("older", ())])
        elif t == "unknown":
            self._key_rids.pop(msg["rid"], None)
            self.events.on_unknown(msg["peer_mac"])
        elif t == "multicast":
            self.events.on_multicast(msg["key"], msg["pw_id"])
        elif t == "peer_revoked":
            self.events.on_peer_revoked(msg["peer_mac"])
        elif t == "pong":
            self._pong.set()
        elif t == "error":
            mac = self._key_rids.pop(msg["rid"], None)
            if mac is not None:
                self.events.on_key_refused(mac, msg["code"], msg["msg"])
            else:
                log.warning("keyserver_error", extra=fields(code=msg["code"], text=msg["msg"]))
                if msg["code"] in SESSION_ENDING_CODES:
                    raise RemoteProtocolError(msg["msg"], msg["code"])
        else:
            log.debug("ignored_message", extra=fields(type=t))


def _expect(msg: dict, want: str, request: str) -> dict:
    """``msg`` if it is a ``want``; RemoteProtocolError (with the server's code if it refused) otherwise."""
    if msg["t"] == "error":
        raise RemoteProtocolError(f"{request} refused: {msg['msg']} ({msg['code']})", msg["code"])
    if msg["t"] != want:
        raise RemoteProtocolError(f"expected {want}, got {msg['t']}")
    return msg
