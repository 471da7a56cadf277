"""Peering between key servers (cascaded switches, patent CN101783792A fig. 5).

A reusable channel: mutual TLS 1.3 between keyserverd instances that each run
their own CA, request/answer messages from ``peer_messages``, and handlers
that the key service (ID-MAC / ID-ID-KEY lookups) or the gateway (NETKEY,
through ``ext``) register.

1. Each peer is configured as ``sha256:<CA fingerprint>@HOST:PORT``
   (``PeerSpec.parse``).  ``Peering.start()`` listens on ``listen`` and, in the
   background, fetches every peer's CA certificate with an unauthenticated
   ``ca`` request and pins it only if its SHA-256 matches the configured
   fingerprint.  Until then that peer is neither asked nor accepted.
2. We present ``peer-client.crt`` (CN = the key-server name, EKU clientAuth,
   issued by our own CA, created on first use) and verify a peer's server
   certificate against its pinned CA.  The listener accepts only client
   certificates that chain to a pinned peer CA and carry the key-server name:
   our own hosts and the peers' hosts are refused.
3. ``ask(spec, msg)`` sends one request to one peer and returns the answer;
   ``resolve(mac, from_id)`` asks every pinned peer in order for the holder of
   ``mac`` (the ``resolve`` message; first ``resolved`` wins).
4. Incoming requests go to the handler registered for their type
   (``register("resolve", fn)``, ``register_ext("netkey", fn)``); a handler
   gets the message and returns the answer dict (``rid`` is filled in).  A
   request whose ``origin`` holds our name or whose ``hops`` exceed
   ``MAX_HOPS`` is refused with code ``loop``; nothing is ever forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l2crypt.config import parse_hostport
from l2crypt.constants import KEYSERVER_TLS_NAME
from l2crypt.errors import RemoteProtocolError
from l2crypt.tls_files import normalize_fingerprint

from . import peer_messages as pm
from .ca import CertificateAuthority, _key_pem, _new_key, _write_private, fingerprint_of
from .server import identity_of

log = logging.getLogger("keyserverd.peering")

PEER_CERT_FILE, PEER_KEY_FILE = "peer-client.crt", "peer-client.key"
REQUEST_TIMEOUT_S = 3.0
PIN_RETRY_S = 1.0
IDLE_TIMEOUT_S = 30.0

Handler = Callable[[dict], dict]


@dataclass(frozen=True)
class PeerSpec:
    """One configured peer: where it listens for peering and its CA's fingerprint."""

    address: str
    ca_fingerprint: str

    @classmethod
    def parse(cls, text: str) -> "PeerSpec":
        """``sha256:HEX@HOST:PORT``; ValueError with the reason."""
        if not isinstance(text, str) or "@" not in text:
            raise ValueError(f"want sha256:FINGERPRINT@HOST:PORT, got {text!r}")
        fp, address = text.rsplit("@", 1)
        parse_hostport(address)
        return cls(address, normalize_fingerprint(fp))


def peer_client_files(ca: CertificateAuthority, days: int = 825):
    """(cert, key) paths of our peering client certificate; issued on first use."""
    cert_path, key_path = ca.state_dir / PEER_CERT_FILE, ca.state_dir / PEER_KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        key = _new_key()
        _write_private(key_path, _key_pem(key), 0o600)
        cert = ca._issue(key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KEYSERVER_TLS_NAME)]),
                         days=days, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


class Peering:
    """The peering channel of one keyserverd (see the module docstring)."""

    def __init__(self, ca: CertificateAuthority, peers: tuple[PeerSpec, ...], listen: str | None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.ca = ca
        self.name = ca.ca_fingerprint()  # our name in ``origin``
        self.peers = tuple(peers)
        self.listen = listen
        self.request_timeout_s = request_timeout_s
        self.pinned: dict[str, bytes] = {}  # fingerprint -> CA PEM; owned by _pin_loop
        self.counters = {"requests_in": 0, "requests_out": 0, "refused": 0, "failed": 0}
        self._handlers: dict[str, Handler] = {"ping": lambda msg: {"t": "pong"}}
        self._ext: dict[str, Handler] = {}
        cert, key = peer_client_files(ca)
        self._client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self._client_ctx.load_cert_chain(cert, key)
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self._server_ctx.verify_mode = ssl.CERT_OPTIONAL
        self._server_ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
        self._server = None
        self._tasks: set[asyncio.Task] = set()

    # --- handlers ------------------------------------------------------------------
    def register(self, msg_type: str, handler: Handler) -> None:
        """Answer requests of ``msg_type`` (``resolve``) with ``handler(msg) -> answer``."""
        self._handlers[msg_type] = handler

    def register_ext(self, kind: str, handler: Handler) -> None:
        """Answer ``ext`` requests of ``kind``; ``handler(msg)`` returns ``{"t": "ext_ok", "body": ...}``."""
        self._ext[kind] = handler

    # --- 1. lifecycle ---------------------------------------------------------------
    async def start(self) -> tuple[str, int] | None:
        """Listen (if ``listen`` is set) and start pinning the peers' CAs."""
        bound = None
        if self.listen:
            host, port = parse_hostport(self.listen)
            self._server = await asyncio.start_server(self._serve, host, port, ssl=self._server_ctx,
                                                      ssl_handshake_timeout=10.0, reuse_address=True)
            bound = self._server.sockets[0].getsockname()[:2]
        self._spawn(self._pin_loop())
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pin_loop(self) -> None:
        while any(p.ca_fingerprint not in self.pinned for p in self.peers):
            for spec in self.peers:
                if spec.ca_fingerprint not in self.pinned:
                    await self._pin(spec)
            await asyncio.sleep(PIN_RETRY_S)

    async def _pin(self, spec: PeerSpec) -> None:
        anon = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anon.minimum_version = ssl.TLSVersion.TLSv1_3
        anon.check_hostname, anon.verify_mode = False, ssl.CERT_NONE  # the fingerprint check below
        try:
            answer = await self._exchange(spec, {"t": "ca", "rid": 1}, anon)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError) as exc:
            log.debug("peer %s not reachable yet: %s", spec.address, exc)
            return
        if answer.get("t") != "ca_cert" or fingerprint_of(answer["cert"]) != spec.ca_fingerprint:
            log.warning("peer %s presents a CA other than %s; not trusted", spec.address, spec.ca_fingerprint)
            return
        pem = answer["cert"].decode()
        self._client_ctx.load_verify_locations(cadata=pem)
        self._server_ctx.load_verify_locations(cadata=pem)
        self.pinned[spec.ca_fingerprint] = answer["cert"]
        log.info("peer %s pinned (%s)", spec.address, spec.ca_fingerprint)

    # --- 3. asking -----------------------------------------------------------------
    async def ask(self, spec: PeerSpec, msg: dict) -> dict:
        """One request to one pinned peer; raises OSError/TimeoutError/RemoteProtocolError."""
        if spec.ca_fingerprint not in self.pinned:
            raise ConnectionError(f"peer {spec.address} is not pinned yet")
        self.counters["requests_out"] += 1
        return await self._exchange(spec, msg, self._client_ctx)

    async def _exchange(self, spec: PeerSpec, msg: dict, ctx: ssl.SSLContext) -> dict:
        host, port = parse_hostport(spec.address)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME),
            self.request_timeout_s)
        try:
            writer.write(pm.encode_message(msg))
            frames = pm.FrameReader()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.request_timeout_s
            while True:
                data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
                if not data:
                    raise EOFError(f"peer {spec.address} closed the connection")
                for answer in frames.feed(data):
                    if answer.get("rid") == msg["rid"]:
                        return answer
        finally:
            writer.transport.abort()

    async def resolve(self, mac: bytes, from_id: str) -> dict | None:
        """Ask the peers in order who holds ``mac``; the first ``resolved`` answer, or None."""
        for spec in self.peers:
            msg = {"t": "resolve", "rid": 1, "mac": mac, "from_id": from_id, "hops": 0, "origin": [self.name]}
            try:
                answer = await self.ask(spec, msg)
            except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError) as exc:
                self.counters["failed"] += 1
                log.warning("peer %s: resolve failed: %s", spec.address, exc)
                continue
            if answer["t"] == "resolved" and answer["mac"] == mac:
                return answer
        return None

    # --- 4. answering -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        identity = identity_of(writer.get_extra_info("peercert"))
        frames = pm.FrameReader()
        loop = asyncio.get_running_loop()
        end = loop.time() + (IDLE_TIMEOUT_S if identity != KEYSERVER_TLS_NAME else float("inf"))
        try:
            while True:  # without a peer certificate (``ca`` only): IDLE_TIMEOUT_S in all
                data = await asyncio.wait_for(reader.read(65536), min(IDLE_TIMEOUT_S, max(0.0, end - loop.time())))
                if not data:
                    return
                for msg in frames.feed(data):
                    writer.write(pm.encode_message(self._answer(identity, msg)))
                await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError, RemoteProtocolError) as exc:
            log.debug("peer connection ended: %s", exc)
        except Exception:  # a bug must not take the server down
            log.exception("peer connection failed")
        finally:
            writer.transport.abort()

    def _answer(self, identity: str | None, msg: dict) -> dict:
        rid = msg["rid"]
        if msg["t"] == "ca":
            return {"t": "ca_cert", "rid": rid, "cert": self.ca.ca_cert_pem}
        if identity != KEYSERVER_TLS_NAME:
            return self._refuse(rid, "unauthenticated", f"{msg['t']} needs a peer key-server certificate")
        if msg.get("hops", 0) > pm.MAX_HOPS or self.name in msg.get("origin", ()):
            return self._refuse(rid, "loop", "request already passed this server")
        handler = self._ext.get(msg["kind"]) if msg["t"] == "ext" else self._handlers.get(msg["t"])
        if handler is None:
            return self._refuse(rid, "bad_request", f"{msg['t']} is not answered here")
        self.counters["requests_in"] += 1
        try:
            answer = dict(handler(msg))
        except Exception:
            log.exception("peer handler for %s failed", msg["t"])
            return self._refuse(rid, "internal", "internal error")
        answer["rid"] = rid
        return answer

    def _refuse(self, rid: int, code: str, text: str) -> dict:
        self.counters["refused"] += 1
        log.warning("refused peer request: %s: %s", code, text)
        return {"t": "error", "rid": rid, "code": code, "msg": text}
