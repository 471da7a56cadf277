"""NETKEY: the key the gateways of two segments seal tunnel datagrams with.

Two key servers (one per segment) peer over mutual TLS 1.3 and agree on it.
Each is configured with the peer's peering address and the SHA-256
fingerprint of the peer's CA, and trusts nothing else there:

1. Both listen on ``netkey_listen``.  The listener presents the server
   certificate and verifies client certificates against the *peer's* CA only
   (never its own: its hosts cannot connect), and the certificate must carry
   OU ``keyserver-peer`` (host certificates carry OU host or gateway).
2. Without a client certificate the listener answers only ``ca`` (its CA
   certificate).  Each side fetches the peer's CA that way, checks it against
   the configured fingerprint, and only then loads it as the trust anchor.
3. The side with the smaller CA fingerprint is the *leader*: it creates NETKEY
   versions (PW_ID 1, 2, ...) and rotates every ``netkey_rekey_after_s``.  The
   follower connects (its client certificate: CN ``netkey-peer``, OU
   ``keyserver-peer``, issued by its own CA), says ``sync`` with its newest
   PW_ID, and the leader sends every live version and then each new one.  A
   leader that finds the follower ahead (it lost its state) creates a version
   above the follower's.
4. Both keep the versions (newest ``KEEP_VERSIONS``) in ``state_dir/netkey.json``
   (mode 0600), each key sealed under the key server's KEK (``kek``, AAD
   ``netkey_aad(pw_id)``), and call ``on_new(pw_id, key)`` for each new one;
   keyserverd pushes it to its gateways, which switch make-before-break.  A
   file of clear keys (before sealing) is sealed when it is read; one sealed
   under another KEK is ignored (the peers agree on a new version).

Peering messages: a 4-byte length and a msgpack map, at most 4 KiB:
``ca`` / ``ca_cert cert``, ``sync pw_id``, ``netkey pw_id key created_at``.

Every wait on the network is bounded: a connection without a peer
certificate is closed ``TIMEOUT_S`` after it opened, whatever it sends; a
peer must send each message and read each answer within ``TIMEOUT_S``; a
synced follower and its leader wait for each other without a timer (NETKEY
versions come every ``netkey_rekey_after_s``), under TCP keepalive, which
ends the connection to a peer that went away.

``check_message`` checks every field of every message from the peer (types,
``pw_id`` in 0..``PW_ID_MAX`` for ``sync`` and 1..``PW_ID_MAX`` for
``netkey``, 32-byte keys, finite times); a bad one is refused with a logged
reason and the connection closes.  So a peer cannot push a PW_ID past 32
bits (the tunnel format and the gateways' messages hold 32 bits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import ssl
import struct
import time
from pathlib import Path
from typing import Callable

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyserverd.client_port import set_keepalive
from keyserverd.store.kek import Kek, KekError, netkey_aad, shown_kek_id
from l2crypt.agent.tls_files import fingerprint_of_pem
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.ops.logs import fields
from l2crypt.io.aio_timeout import wait_for

log = logging.getLogger("keyserverd.netkey")

KEEP_VERSIONS = 3
NETKEY_FILE = "netkey.json"
PEER_OU = "keyserver-peer"
PEER_CN = "netkey-peer"
MAX_MESSAGE = 4096
LENGTH = struct.Struct("!I")
RETRY_S = 1.0
TIMEOUT_S = 10.0
#: The newest PW_ID a peer may name: one more version still fits in 32 bits.
PW_ID_MAX = 2**32 - 2
KEY_BYTES = 32
MAX_CERT_BYTES = 3072
#: message type -> its fields besides ``t``
FIELDS = {"ca": set(), "ca_cert": {"cert"}, "sync": {"pw_id"}, "netkey": {"pw_id", "key", "created_at"}}


def _valid_pw_id(value, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= PW_ID_MAX


def check_message(msg: dict) -> dict:
    """``msg`` if every field is well-formed (see the module docstring), else ValueError."""
    t = msg["t"]
    if t not in FIELDS:
        raise ValueError(f"unknown peering message {t[:32]!r}")
    if set(msg) - {"t"} != FIELDS[t]:
        raise ValueError(f"{t}: want the fields {sorted(FIELDS[t])}")
    if t == "ca_cert" and not (isinstance(msg["cert"], bytes) and 0 < len(msg["cert"]) <= MAX_CERT_BYTES):
        raise ValueError(f"ca_cert: cert is not bytes of at most {MAX_CERT_BYTES}")
    if t == "sync" and not _valid_pw_id(msg["pw_id"], 0):
        raise ValueError(f"sync: pw_id is not an integer in 0..{PW_ID_MAX}")
    if t == "netkey":
        created = msg["created_at"]
        if not _valid_pw_id(msg["pw_id"], 1):
            raise ValueError(f"netkey: pw_id is not an integer in 1..{PW_ID_MAX}")
        if not (isinstance(msg["key"], bytes) and len(msg["key"]) == KEY_BYTES):
            raise ValueError(f"netkey: key is not {KEY_BYTES} bytes")
        if not (isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created)):
            raise ValueError("netkey: created_at is not a finite number")
    return msg


class NetkeyBook:
    """The NETKEY versions this key server holds, persisted (sealed under ``kek``) in one file:
    ``{"kek_id": ..., "versions": [{"pw_id", "sealed" (hex), "created_at"}, ...]}``."""

    def __init__(self, path: Path, kek: Kek):
        self.path = Path(path)
        self.kek = kek
        self._versions: list[tuple[int, bytes, float]] = []
        try:
            doc = json.loads(self.path.read_text())
            if isinstance(doc, list):  # written before sealing: clear keys, sealed now
                for item in doc:
                    pw_id, key = int(item["pw_id"]), bytes.fromhex(item["key"])
                    if not _valid_pw_id(pw_id, 1) or len(key) != KEY_BYTES:
                        raise ValueError(f"version {pw_id} out of range or with a bad key")
                    self._versions.append((pw_id, key, float(item["created_at"])))
                self._save()
                log.info("netkey file %s sealed (%d versions)", self.path, len(self._versions))
            elif doc["kek_id"] != kek.kek_id:
                log.warning("ignoring %s: sealed under KEK id %s, not this key server's %s", self.path,
                            shown_kek_id(str(doc["kek_id"])), kek.shown_id)
            else:
                for item in doc["versions"]:
                    pw_id = int(item["pw_id"])
                    if not _valid_pw_id(pw_id, 1):
                        raise ValueError(f"version {pw_id} out of range")
                    key = kek.open(netkey_aad(pw_id), bytes.fromhex(item["sealed"]), f"NETKEY pw_id {pw_id}")
                    if len(key) != KEY_BYTES:
                        raise ValueError(f"version {pw_id} with a bad key")
                    self._versions.append((pw_id, key, float(item["created_at"])))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, KekError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            self._versions = []
        self._versions.sort()

    def versions(self) -> list[tuple[int, bytes]]:
        return [(pw_id, key) for pw_id, key, _ in self._versions]

    def newest(self) -> tuple[int, bytes, float] | None:
        return self._versions[-1] if self._versions else None

    def newest_pw_id(self) -> int:
        return self._versions[-1][0] if self._versions else 0

    def add(self, pw_id: int, key: bytes, created_at: float) -> bool:
        """Keep a version newer than every one held; True if it was new."""
        if pw_id <= self.newest_pw_id() or not _valid_pw_id(pw_id, 1) or len(key) != KEY_BYTES:
            return False
        self._versions = (self._versions + [(pw_id, key, created_at)])[-KEEP_VERSIONS:]
        self._save()
        return True

    def create(self, now: float, above: int = 0) -> tuple[int, bytes]:
        """A new version above every one held and ``above``; the newest held
        (logged) when that would leave 32 bits."""
        pw_id = max(self.newest_pw_id(), above) + 1
        if pw_id > PW_ID_MAX:
            log.error("netkey_pw_id_exhausted", extra=fields(newest=self.newest_pw_id(), above=above))
            newest = self.newest()
            if newest is None:
                raise ValueError("no NETKEY version can be created")
            return newest[0], newest[1]
        key = secrets.token_bytes(KEY_BYTES)
        self.add(pw_id, key, now)
        return pw_id, key

    def reseal(self, new: Kek) -> int:
        """Seal the file under ``new`` (KEK rotation); how many versions it holds."""
        self.kek = new
        if self._versions or self.path.exists():
            self._save()
        return len(self._versions)

    def _save(self) -> None:
        data = json.dumps({"kek_id": self.kek.kek_id, "versions": [
            {"pw_id": p, "sealed": self.kek.seal(netkey_aad(p), k).hex(), "created_at": c}
            for p, k, c in self._versions]})
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def encode(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict:
    """One message; raises ValueError on a malformed one, EOFError at the end."""
    try:
        head = await reader.readexactly(LENGTH.size)
        (length,) = LENGTH.unpack(head)
        if length > MAX_MESSAGE:
            raise ValueError(f"peering message of {length} bytes")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise EOFError("peer closed the connection") from None
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception:  # msgpack raises many types for garbage
        raise ValueError("undecodable peering message") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ValueError("peering message is not a map with a type")
    return check_message(msg)


def _peer_cert(ca, directory: Path) -> tuple[Path, Path]:
    """This server's client certificate for peering (issued once by its own CA)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "peer.crt", directory / "peer.key"
    if not (cert_path.exists() and key_path.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, PEER_OU),
                             x509.NameAttribute(NameOID.COMMON_NAME, PEER_CN)])
        cert = ca._issue(key.public_key(), subject, days=3650, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _is_peer(peercert: dict | None) -> bool:
    for rdn in (peercert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "organizationalUnitName" and value == PEER_OU:
                return True
    return False


class NetkeyPeering:
    """The peering channel of one key server.  Runs on its asyncio loop."""

    def __init__(self, ca, state_dir: Path, listen: tuple[str, int], peer: tuple[str, int], peer_ca: str,
                 rekey_after_s: float, on_new: Callable[[int, bytes], None], *, kek: Kek):
        self.ca = ca
        self.book = NetkeyBook(Path(state_dir) / NETKEY_FILE, kek)
        self.listen, self.peer, self.peer_fingerprint = listen, peer, peer_ca
        self.rekey_after_s = rekey_after_s
        self.on_new = on_new
        self.leader = ca.ca_fingerprint() < peer_ca
        self.cert_path, self.key_path = _peer_cert(ca, Path(state_dir) / "netkey")
        self.peer_ca_pem: bytes | None = None
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.server_ctx.verify_mode = ssl.CERT_OPTIONAL
        self.server_ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
        self._followers: set[asyncio.StreamWriter] = set()
        self._server = None
        self.synced = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1],
                                                  ssl=self.server_ctx, ssl_handshake_timeout=TIMEOUT_S,
                                                  reuse_address=True)
        log.info("netkey peering on %s:%d, peer %s:%d, %s", *self.listen, *self.peer,
                 "leader" if self.leader else "follower")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._followers):
            w.close()

    # --- both sides --------------------------------------------------------
    async def run(self) -> None:
        """Fetch and pin the peer's CA, then lead (rotate) or follow (sync).  Until cancelled."""
        await self.start()
        while self.peer_ca_pem is None:
            try:
                await self._fetch_peer_ca()
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError, EOFError) as exc:
                log.warning("netkey peer %s:%d: cannot fetch its CA: %s", *self.peer, exc)
                await asyncio.sleep(RETRY_S)
        if self.leader:
            await self._lead()
        else:
            await self._follow()

    async def _fetch_peer_ca(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the CA is checked against the pinned fingerprint below
        reader, writer = await wait_for(asyncio.open_connection(*self.peer, ssl=ctx), TIMEOUT_S)
        try:
            writer.write(encode({"t": "ca"}))
            msg = await wait_for(read_message(reader), TIMEOUT_S)
        finally:
            writer.close()
        pem = msg.get("cert")
        if msg.get("t") != "ca_cert" or not isinstance(pem, bytes):
            raise ValueError("the peer did not send its CA")
        if fingerprint_of_pem(pem) != self.peer_fingerprint:
            raise ValueError(f"peer CA fingerprint {fingerprint_of_pem(pem)} is not the configured one")
        self.server_ctx.load_verify_locations(cadata=pem.decode())
        self.peer_ca_pem = pem
        log.info("netkey peer CA pinned (%s)", self.peer_fingerprint)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authenticated = _is_peer(writer.get_extra_info("peercert"))
        set_keepalive(writer.get_extra_info("socket"))
        loop = asyncio.get_running_loop()
        end = loop.time() + TIMEOUT_S  # without a peer certificate: the whole connection
        try:
            while True:
                if writer in self._followers:  # synced: wait for the follower as long as TCP lives
                    timeout = None
                elif authenticated:
                    timeout = TIMEOUT_S
                else:
                    timeout = max(0.0, end - loop.time())
                msg = await wait_for(read_message(reader), timeout)
                if msg["t"] == "ca":
                    writer.write(encode({"t": "ca_cert", "cert": self.ca.ca_cert_pem}))
                elif msg["t"] == "sync" and authenticated and self.leader:
                    await self._serve_follower(msg, writer)
                else:
                    log.warning("netkey peering: refused %r (authenticated %s)", msg["t"], authenticated)
                    break
                await wait_for(writer.drain(), TIMEOUT_S)
        except asyncio.TimeoutError:
            log.info("netkey peering: closed a connection (authenticated %s): too slow", authenticated)
        except ValueError as exc:
            log.warning("netkey peering: refused a message: %s", exc)
        except (EOFError, OSError, ssl.SSLError):
            pass
        finally:
            self._followers.discard(writer)
            writer.close()

    # --- leader ---------------------------------------------------------------
    async def _serve_follower(self, msg: dict, writer: asyncio.StreamWriter) -> None:
        theirs = msg["pw_id"]  # 0..PW_ID_MAX (check_message)
        if theirs >= self.book.newest_pw_id():
            self._new(*self.book.create(time.time(), above=theirs))
        for pw_id, key, created in self.book._versions:
            writer.write(encode({"t": "netkey", "pw_id": pw_id, "key": key, "created_at": created}))
        self._followers.add(writer)
        self.synced = True

    async def _lead(self) -> None:
        while True:
            newest = self.book.newest()
            if newest is None or time.time() - newest[2] >= self.rekey_after_s:
                self._new(*self.book.create(time.time()))
            await asyncio.sleep(min(1.0, self.rekey_after_s / 4))

    def _new(self, pw_id: int, key: bytes) -> None:
        log.info("netkey pw_id %d created", pw_id)
        created = self.book.newest()[2]
        for w in list(self._followers):
            w.write(encode({"t": "netkey", "pw_id": pw_id, "key": key, "created_at": created}))
        self.on_new(pw_id, key)

    # --- follower -------------------------------------------------------------
    async def _follow(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.peer_ca_pem.decode())
        ctx.load_cert_chain(self.cert_path, self.key_path)
        while True:
            try:
                reader, writer = await wait_for(
                    asyncio.open_connection(*self.peer, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME), TIMEOUT_S)
                set_keepalive(writer.get_extra_info("socket"))
                try:
                    writer.write(encode({"t": "sync", "pw_id": self.book.newest_pw_id()}))
                    timeout = TIMEOUT_S  # the leader answers a sync at once; later versions come when they come
                    while True:
                        msg = await wait_for(read_message(reader), timeout)
                        timeout = None
                        if msg.get("t") != "netkey":
                            raise ValueError(f"unexpected {msg.get('t')!r}")
                        pw_id, key, created = msg["pw_id"], msg["key"], float(msg["created_at"])
                        self.synced = True
                        if self.book.add(pw_id, key, created):
                            log.info("netkey pw_id %d received from the peer", pw_id)
                            self.on_new(pw_id, key)
                finally:
                    writer.close()
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError, EOFError) as exc:
                log.warning("netkey peer %s:%d: %s", *self.peer, exc or type(exc).__name__)
            await asyncio.sleep(RETRY_S)
