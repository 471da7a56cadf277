"""The layer-3 agent's connection to the key server.

The same connection handling as ``keyclient.KeyClient`` (TLS 1.3, failover
through the listed servers, ping probes, reconnect with backoff), with the
layer-3 messages of ``ks_messages``:

1. handshake: ``l3_hello``, then one ``ip_bind`` per address of this host;
   a refused bind (``ip_conflict``) ends the session with an error;
2. requests: ``ip_key_req`` (a packet to an address), ``id_key_req`` (a
   packet from a sender ID), ``l3_rekey_req`` and ``l3_key_report``;
3. answers and pushes go to the agent: ``l3_key``, ``l3_unknown``,
   ``l3_peer_revoked``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Protocol

from l2crypt.agent.keyclient import CONNECT_TIMEOUT_S, SESSION_ENDING_CODES, KeyClient
from l2crypt.core import ks_messages
from l2crypt.core.errors import RemoteProtocolError
from l2crypt.core.l3_engine import BY_ID, BY_IP
from l2crypt.core.l3_wire import format_ip
from l2crypt.ops.logs import fields
from l2crypt.io.aio_timeout import wait_for

log = logging.getLogger("l2crypt.keyclient")


class L3KeyEvents(Protocol):
    """What the layer-3 agent does with the server's answers (on the loop thread)."""

    def on_welcome(self, msg: dict) -> None: ...
    def on_l3_key(self, peer_id: str, key: bytes, pw_id: int, peer_ips: list[bytes]) -> None: ...
    def on_l3_unknown(self, lookup: tuple) -> None: ...
    def on_l3_peer_revoked(self, peer_id: str) -> None: ...
    def on_disconnect(self) -> None: ...


class L3KeyClient(KeyClient):
    """The layer-3 agent's key-server session: a ``KeyClient`` that names its IP addresses
    instead of a MAC and looks peers up by IP or ID."""

    def __init__(self, servers: tuple[str, ...], ssl_ctx: ssl.SSLContext, my_ips: list[bytes],
                 events: L3KeyEvents, **probe):
        """``probe``: ``probe_interval_s``, ``probe_failures``, ``failback_holddown_s`` of ``KeyClient``."""
        super().__init__(servers, ssl_ctx, b"\0" * 6, events, **probe)
        self.my_ips = list(my_ips)
        self._lookups: dict[int, tuple] = {}  # rid -> (BY_IP, ip) / (BY_ID, id)

    async def _handshake(self, writer: asyncio.StreamWriter, messages) -> dict:
        self._lookups.clear()
        writer.write(ks_messages.encode_message({"t": "l3_hello", "rid": self._next_rid()}))
        welcome = await wait_for(anext(messages), CONNECT_TIMEOUT_S)
        if welcome["t"] == "error":
            raise RemoteProtocolError(f"l3_hello refused: {welcome['msg']} ({welcome['code']})", welcome["code"])
        if welcome["t"] != "l3_welcome":
            raise RemoteProtocolError(f"expected l3_welcome, got {welcome['t']}")
        for ip in self.my_ips:
            writer.write(ks_messages.encode_message({"t": "ip_bind", "rid": self._next_rid(), "ip": ip}))
            answer = await wait_for(anext(messages), CONNECT_TIMEOUT_S)
            if answer["t"] == "error":
                raise RemoteProtocolError(f"binding {format_ip(ip)} refused: {answer['msg']} ({answer['code']})",
                                          answer["code"])
            if answer["t"] != "ip_bound":
                raise RemoteProtocolError(f"expected ip_bound, got {answer['t']}")
        return welcome

    def request(self, lookup: tuple) -> bool:
        """Ask for the pair key of (BY_IP, ip) or (BY_ID, peer_id); False if not sent."""
        if not self.connected:
            return False
        rid = self._next_rid()
        self._lookups[rid] = lookup
        kind, value = lookup
        if kind == BY_IP:
            return self._send({"t": "ip_key_req", "rid": rid, "peer_ip": value})
        return self._send({"t": "id_key_req", "rid": rid, "peer_id": value})

    def send_l3_notice(self, kind: str, peer_id: str, pw_id: int) -> bool:
        """``rekey`` (data volume reached) or ``report`` (the peer lags)."""
        msg_type = {"rekey": "l3_rekey_req", "report": "l3_key_report"}[kind]
        return self._send({"t": msg_type, "rid": self._next_rid(), "peer_id": peer_id, "pw_id": pw_id})

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t == "l3_key":
            self._lookups.pop(msg["rid"], None)
            self.events.on_l3_key(msg["peer_id"], msg["key"], msg["pw_id"], ks_messages.unpack_peer_ips(msg))
        elif t == "l3_unknown":
            lookup = self._lookups.pop(msg["rid"], None)
            if lookup is not None:
                self.events.on_l3_unknown(lookup)
        elif t == "l3_peer_revoked":
            self.events.on_l3_peer_revoked(msg["peer_id"])
        elif t == "pong":
            self._pong.set()
        elif t == "error":
            lookup = self._lookups.pop(msg["rid"], None)
            log.warning("keyserver_error", extra=fields(code=msg["code"], text=msg["msg"]))
            if lookup is not None:
                self.events.on_l3_unknown(lookup)
            elif msg["code"] in SESSION_ENDING_CODES:
                raise RemoteProtocolError(msg["msg"], msg["code"])
        else:
            log.debug("ignored_message", extra=fields(type=t))
