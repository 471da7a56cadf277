"""The agent's connection to the key server (asyncio, TLS 1.3, mutual auth).

1. Connect to the first configured server that answers; say ``hello`` with
   our MAC and wait for ``welcome`` (cipher and multicast key).
2. Forward ``key_req`` for MACs the engine asks about, ``mcast_req``, and the
   engine's notices (``rekey_req``, ``key_report``); match answers by rid.
3. Hand answers and server pushes (``key``, ``multicast``, ``peer_revoked``)
   to the agent.
4. Probe with ``ping``; on a lost connection reconnect on its own, with
   backoff, going through the servers again in order.

The data path never waits for this: keys already installed keep working
while the client is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Protocol

from . import ks_messages
from .config import parse_hostport
from .errors import RemoteProtocolError
from .logs import fields
from .tls_files import SERVER_NAME

log = logging.getLogger("l2crypt.keyclient")

CONNECT_TIMEOUT_S = 5.0
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 5.0
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0


class KeyEvents(Protocol):
    """What the agent does with the server's answers.  Called on the loop thread."""

    def on_welcome(self, msg: dict) -> None: ...
    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int) -> None: ...
    def on_unknown(self, peer_mac: bytes) -> None: ...
    def on_key_refused(self, peer_mac: bytes, code: str, text: str) -> None: ...
    def on_multicast(self, key: bytes, pw_id: int) -> None: ...
    def on_peer_revoked(self, peer_mac: bytes) -> None: ...
    def on_disconnect(self) -> None: ...


class KeyClient:
    def __init__(self, servers: tuple[str, ...], ssl_ctx: ssl.SSLContext, my_mac: bytes, events: KeyEvents):
        self.servers = servers
        self.ssl_ctx = ssl_ctx
        self.my_mac = my_mac
        self.events = events
        self.server: str | None = None      # the server in use, when connected
        self.connected = False
        self.connects = 0
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
        return self._send({"t": "key_req", "rid": rid, "peer_mac": peer_mac})

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
        delay = RECONNECT_MIN_S
        while not stop.is_set():
            for server in self.servers:
                if stop.is_set():
                    return
                try:
                    await self._session(server, stop)
                    delay = RECONNECT_MIN_S
                except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError) as exc:
                    log.warning("keyserver_unreachable", extra=fields(server=server, reason=str(exc) or type(exc).__name__))
                finally:
                    if self.connected:
                        self.connected = False
                        self.events.on_disconnect()
                    self._writer = None
                    self._key_rids.clear()
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self, server: str, stop: asyncio.Event) -> None:
        host, port = parse_hostport(server)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.ssl_ctx, server_hostname=SERVER_NAME),
            CONNECT_TIMEOUT_S,
        )
        self._writer = writer
        messages = self._messages(reader)
        try:
            welcome = await self._handshake(writer, messages)
            self.server = server
            self.connected = True
            self.connects += 1
            log.info("keyserver_connected", extra=fields(server=server, id=welcome["id"]))
            self.events.on_welcome(welcome)
            pinger = asyncio.ensure_future(self._probe(writer))
            try:
                async for msg in messages:
                    self._dispatch(msg)
                    if stop.is_set():
                        break
            finally:
                pinger.cancel()
        finally:
            writer.close()

    async def _handshake(self, writer: asyncio.StreamWriter, messages) -> dict:
        """Say hello and return the welcome; RemoteProtocolError if refused.
        (The layer-3 client, ``l3_keyclient``, says its own hello.)"""
        writer.write(ks_messages.encode_message({"t": "hello", "rid": self._next_rid(), "mac": self.my_mac}))
        welcome = await asyncio.wait_for(anext(messages), CONNECT_TIMEOUT_S)
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
        """Ping the server; close the connection if it stops answering."""
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            self._pong.clear()
            writer.write(ks_messages.encode_message({"t": "ping", "rid": self._next_rid()}))
            try:
                await asyncio.wait_for(self._pong.wait(), PING_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("keyserver_probe_failed", extra=fields(server=self.server))
                writer.transport.abort()
                return

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t == "key":
            self._key_rids.pop(msg["rid"], None)
            self.events.on_key(msg["peer_mac"], msg["peer_id"], msg["key"], msg["pw_id"])
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
                if msg["code"] in ("revoked", "unauthenticated"):
                    raise RemoteProtocolError(msg["msg"], msg["code"])
        else:
            log.debug("ignored_message", extra=fields(type=t))

