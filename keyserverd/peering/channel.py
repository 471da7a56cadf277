"""Peering between key servers (cascaded switches, patent CN101783792A fig. 5).

A reusable channel: mutual TLS 1.3 between keyserverd instances that each run
their own CA, request/answer messages from ``peer_messages``, and handlers
that the key service (ID-MAC / ID-ID-KEY lookups, revocations) or the
multicast agreement register.

1. Each peer is configured as ``IDS=sha256:<CA fingerprint>@HOST:PORT``
   (``peer_spec.PeerSpec``: its address, its CA and its host-ID namespace).
   ``Peering.start()`` listens on ``listen`` and, in the background, fetches
   every peer's CA certificate with an unauthenticated ``ca`` request and pins
   it only if its SHA-256 matches the configured fingerprint.  Until then that
   peer is neither asked nor accepted.
2. We present ``peer-client.crt`` (CN = the key-server name, EKU clientAuth,
   issued by our own CA, created on first use).  Asking a peer, we verify its
   server certificate against *that peer's* CA only (one client context per
   peer), so no other peer can answer in its name.  The listener accepts only
   client certificates that chain to a pinned peer CA and carry the
   key-server name (our own hosts and the peers' hosts are refused), and it
   knows the asking peer by the pinned CA that issued the certificate, never
   by the CN (every key server shares it).
3. ``ask(spec, msg)`` sends one request to one peer and returns the answer;
   ``resolve(mac, from_id)`` asks every pinned peer at once who holds ``mac``
   and believes a ``resolved`` answer only for an ID in that peer's namespace;
   two peers answering for one MAC is a conflict and nobody wins.
4. Incoming requests go to the handler registered for their type
   (``register("resolve", fn)``, ``register_ext("multicast", fn)``); a handler
   gets the message and the asking ``PeerSpec`` and returns the answer dict
   (``rid`` is filled in).  A request whose ``origin`` holds our name or whose
   ``hops`` exceed ``MAX_HOPS`` is refused with code ``loop``; nothing is ever
   forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l2crypt.agent.config import parse_hostport
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.errors import LocalError, RemoteProtocolError
from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.logs import RateLimiter, fields

from . import messages as pm
from keyserverd.ca import CertificateAuthority, fingerprint_of, key_pem, new_key, write_private
from .spec import PeerSpec, check_specs  # noqa: F401  (PeerSpec re-exported)
from keyserverd.client_port import identity_of
from l2crypt.io.aio_timeout import wait_for

log = logging.getLogger("keyserverd.peering")

PEER_CERT_FILE, PEER_KEY_FILE = "peer-client.crt", "peer-client.key"
REQUEST_TIMEOUT_S = 3.0
PIN_RETRY_S = 1.0
IDLE_TIMEOUT_S = 30.0
#: A refused peer request is logged once per (peer, code) this often.
REFUSAL_LOG_S = 10.0
#: What asking a peer may raise (the peer is down, slow, or sends garbage).
ASK_ERRORS = (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError)

#: ``handler(msg, peer) -> answer``; ``peer`` is the asking ``PeerSpec``.
Handler = Callable[[dict, PeerSpec], dict]


def peer_client_files(ca: CertificateAuthority, days: int = 825):
    """(cert, key) paths of our peering client certificate; issued on first use."""
    cert_path, key_path = ca.state_dir / PEER_CERT_FILE, ca.state_dir / PEER_KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        key = new_key()
        write_private(key_path, key_pem(key), 0o600)
        cert = ca._issue(key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KEYSERVER_TLS_NAME)]),
                         days=days, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _tls13(purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class Peering:
    """The peering channel of one keyserverd (see the module docstring)."""

    def __init__(self, ca: CertificateAuthority, peers: tuple[PeerSpec, ...], listen: str | None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.ca = ca
        self.name = ca.ca_fingerprint()  # our name in ``origin``
        try:
            self.peers = check_specs(tuple(peers))
        except ValueError as exc:
            raise LocalError(f"peers: {exc}") from None
        if any(p.ca_fingerprint == self.name for p in self.peers):
            raise LocalError(f"peers: {self.name} is this key server's own CA, not a peer's")
        self.listen = listen
        self.request_timeout_s = request_timeout_s
        self.pinned: dict[str, bytes] = {}  # fingerprint -> CA PEM; owned by _pin_loop
        self._peer_cas: dict[str, x509.Certificate] = {}  # fingerprint -> CA; owned by _pin_loop
        self.counters = {"requests_in": 0, "requests_out": 0, "refused": 0, "failed": 0,
                         "foreign_answers": 0, "conflicts": 0}
        self._handlers: dict[str, Handler] = {"ping": lambda msg, peer: {"t": "pong"}}
        self._ext: dict[str, Handler] = {}
        self._cert_files = peer_client_files(ca)
        #: fingerprint -> a client context that trusts that peer's CA only; owned by _pin_loop.
        self._client_ctx: dict[str, ssl.SSLContext] = {}
        self._server_ctx = _tls13(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.verify_mode = ssl.CERT_OPTIONAL
        self._server_ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        self._log_limit = RateLimiter(REFUSAL_LOG_S)

    # --- handlers ------------------------------------------------------------------
    def register(self, msg_type: str, handler: Handler) -> None:
        """Answer requests of ``msg_type`` (``resolve``) with ``handler(msg, peer) -> answer``."""
        self._handlers[msg_type] = handler

    def register_ext(self, kind: str, handler: Handler) -> None:
        """Answer ``ext`` requests of ``kind``; ``handler(msg, peer)`` returns ``{"t": "ext_ok", "body": ...}``."""
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
        anon = _tls13(ssl.PROTOCOL_TLS_CLIENT)
        anon.check_hostname, anon.verify_mode = False, ssl.CERT_NONE  # the fingerprint check below
        try:
            answer = await self._exchange(spec, {"t": "ca", "rid": 1}, anon)
            if answer.get("t") != "ca_cert" or fingerprint_of(answer["cert"]) != spec.ca_fingerprint:
                raise ValueError(f"it presents a CA other than {spec.ca_fingerprint}")
            pem = answer["cert"]
            ca_cert = x509.load_pem_x509_certificate(pem)
            client = _tls13(ssl.PROTOCOL_TLS_CLIENT)
            client.load_cert_chain(*self._cert_files)
            client.load_verify_locations(cadata=pem.decode())
        except ASK_ERRORS as exc:
            log.debug("peer %s not reachable yet: %s", spec.address, exc)
            return
        except ValueError as exc:  # not our peer, or not a certificate at all
            if self._log_limit.allow(("pin", spec.address)):
                log.warning("peer_not_trusted", extra=fields(peer=spec.address, reason=str(exc)))
            return
        self._server_ctx.load_verify_locations(cadata=pem.decode())
        self._client_ctx[spec.ca_fingerprint] = client
        self._peer_cas[spec.ca_fingerprint] = ca_cert
        self.pinned[spec.ca_fingerprint] = pem
        log.info("peer %s pinned (%s)", spec.address, spec.ca_fingerprint)

    # --- 3. asking -----------------------------------------------------------------
    async def ask(self, spec: PeerSpec, msg: dict) -> dict:
        """One request to one pinned peer; raises one of ``ASK_ERRORS``."""
        ctx = self._client_ctx.get(spec.ca_fingerprint)
        if ctx is None:
            raise ConnectionError(f"peer {spec.address} is not pinned yet")
        self.counters["requests_out"] += 1
        return await self._exchange(spec, msg, ctx)

    async def _exchange(self, spec: PeerSpec, msg: dict, ctx: ssl.SSLContext) -> dict:
        host, port = parse_hostport(spec.address)
        reader, writer = await wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME),
            self.request_timeout_s)
        try:
            writer.write(pm.encode_message(msg))
            frames = pm.FrameReader()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.request_timeout_s
            while True:
                data = await wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
                if not data:
                    raise EOFError(f"peer {spec.address} closed the connection")
                for answer in frames.feed(data):
                    if answer.get("rid") == msg["rid"]:
                        return answer
        finally:
            writer.transport.abort()

    async def _ask_or_none(self, spec: PeerSpec, msg: dict) -> dict | None:
        try:
            return await self.ask(spec, msg)
        except ASK_ERRORS as exc:
            self.counters["failed"] += 1
            log.warning("peer %s: %s failed: %s", spec.address, msg["t"], exc or type(exc).__name__)
            return None

    async def resolve(self, mac: bytes, from_id: str) -> tuple[PeerSpec, dict] | None:
        """Ask every pinned peer at once who holds ``mac``: (peer, its ``resolved``
        answer) when exactly one peer answers for an ID in its own namespace, else None."""
        specs = [s for s in self.peers if s.ca_fingerprint in self._client_ctx]
        msg = {"t": "resolve", "rid": 1, "mac": mac, "from_id": from_id, "hops": 0, "origin": [self.name]}
        answers = await asyncio.gather(*(self._ask_or_none(s, msg) for s in specs))
        found = []
        for spec, answer in zip(specs, answers):
            if answer is None or answer["t"] != "resolved" or answer["mac"] != mac:
                continue
            if not spec.owns(answer["id"]):
                self.counters["foreign_answers"] += 1
                self._warn("peer_answer_refused", spec, answer["id"], peer=spec.address, id=answer["id"],
                           mac=format_mac(mac), reason="not one of the peer's host IDs")
                continue
            found.append((spec, answer))
        if len(found) > 1:
            self.counters["conflicts"] += 1
            self._warn("peer_answers_conflict", None, format_mac(mac), mac=format_mac(mac),
                       answers=",".join(f"{s.address}:{a['id']}" for s, a in found))
            return None
        return found[0] if found else None

    def _warn(self, event: str, spec: PeerSpec | None, what: str, **kv) -> None:
        key = (event, spec.address if spec else "", what)
        if self._log_limit.allow(key):
            log.warning(event, extra=fields(**kv, suppressed=self._log_limit.take_suppressed(key)))

    # --- 4. answering -----------------------------------------------------------------
    def peer_of(self, der: bytes | None, peercert: dict | None) -> PeerSpec | None:
        """The configured peer whose pinned CA issued this verified client
        certificate, if it is a key server's (CN); else None."""
        if not der or identity_of(peercert) != KEYSERVER_TLS_NAME:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        for spec in self.peers:
            ca = self._peer_cas.get(spec.ca_fingerprint)
            if ca is None:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return spec
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = self.peer_of(der, writer.get_extra_info("peercert"))
        frames = pm.FrameReader()
        loop = asyncio.get_running_loop()
        end = loop.time() + (IDLE_TIMEOUT_S if peer is None else float("inf"))
        try:
            while True:  # without a peer certificate (``ca`` only): IDLE_TIMEOUT_S in all
                data = await wait_for(reader.read(65536), min(IDLE_TIMEOUT_S, max(0.0, end - loop.time())))
                if not data:
                    return
                for msg in frames.feed(data):
                    writer.write(pm.encode_message(self._answer(peer, msg)))
                await wait_for(writer.drain(), IDLE_TIMEOUT_S)
        except RemoteProtocolError as exc:  # one clear refusal, then the connection closes
            writer.write(pm.encode_message(self._refuse(
                0, exc.code, f"from {peer.address if peer else 'an unknown client'}: {exc}")))
            try:
                await wait_for(writer.drain(), 2.0)
            except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
                pass
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("peer connection ended: %s", exc)
        except Exception:  # a bug must not take the server down
            log.exception("peer connection failed")
        finally:
            writer.transport.abort()

    def _answer(self, peer: PeerSpec | None, msg: dict) -> dict:
        rid = msg["rid"]
        if msg["t"] == "ca":
            return {"t": "ca_cert", "rid": rid, "cert": self.ca.ca_cert_pem}
        if peer is None:
            return self._refuse(rid, "unauthenticated", f"{msg['t']} needs a peer key-server certificate")
        if msg.get("hops", 0) > pm.MAX_HOPS or self.name in msg.get("origin", ()):
            return self._refuse(rid, "loop", "request already passed this server")
        handler = self._ext.get(msg["kind"]) if msg["t"] == "ext" else self._handlers.get(msg["t"])
        if handler is None:
            return self._refuse(rid, "bad_request", f"{msg['t']} is not answered here")
        self.counters["requests_in"] += 1
        try:
            answer = dict(handler(msg, peer))
        except Exception:
            log.exception("peer handler for %s failed", msg["t"])
            return self._refuse(rid, "internal", "internal error")
        answer["rid"] = rid
        return answer

    def _refuse(self, rid: int, code: str, text: str) -> dict:
        self.counters["refused"] += 1
        key = ("refused", code)
        if self._log_limit.allow(key):
            log.warning("peer_request_refused", extra=fields(code=code, reason=text,
                                                             suppressed=self._log_limit.take_suppressed(key)))
        return {"t": "error", "rid": rid, "code": code, "msg": text[:1000]}
