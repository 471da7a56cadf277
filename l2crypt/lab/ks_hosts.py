"""Simulated hosts of a key server, for ``scripts/bench keyserver`` and the
process tests of keyserverd (loopback only).

1. ``prepare(state, hosts, store_url)`` makes a state directory with a CA, a
   KEK file and ``hosts`` enrolled hosts ``b0``, ``b1``, ... with fixed MACs
   (``mac_of``), each with a client certificate and key in ``state``.
2. ``start_keyserverd(state, port, ...)`` runs keyserverd as its own process
   on 127.0.0.1 and waits for its ``listening`` line.
3. ``client_context(state, n)`` is host ``n``'s TLS 1.3 client context (built
   from the files, so any process can make it); ``KsConnection`` is one TLS
   connection of a host: ``call`` sends a request and waits for the answer
   with its rid, pushes (rid 0) go to ``pushes``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from keyserverd.ca import CertificateAuthority
from keyserverd.store import open_store
from keyserverd.store.kek import DEFAULT_KEK_FILE, create_kek_file
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.ks_messages import FrameReader, encode_message
from l2crypt.io.aio_timeout import wait_for

#: The CA certificate clients trust, in the state directory.
CA_FILE = "ca.crt"
READ_CHUNK = 65536


def mac_of(n: int) -> bytes:
    return bytes([0x02, 0x4C, 0x42, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


def host_id(n: int) -> str:
    return f"b{n}"


def prepare(state: Path, hosts: int, store_url: str = "") -> None:
    """A CA, a KEK (``state/kek``) and ``hosts`` hosts with certificates, in ``store_url``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = CertificateAuthority.open(state, ())
    (state / CA_FILE).write_bytes(ca.ca_cert_pem)
    kek = create_kek_file(state / DEFAULT_KEK_FILE)
    store = open_store(store_url, state, time.time(), kek=kek)
    key = ec.generate_private_key(ec.SECP256R1())  # one key for every simulated host: certificates differ
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        for n in range(hosts):
            name = host_id(n)
            store.add_host(name, mac_of(n), "host", b"x" * 32, time.time() + 3600, time.time())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .sign(key, hashes.SHA256()))
            (state / f"{name}.crt").write_bytes(ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), name))
            (state / f"{name}.key").write_bytes(key_pem)
    finally:
        store.close()


def client_context(state: Path, n: int) -> ssl.SSLContext:
    """Host ``n``'s TLS 1.3 client context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(state / CA_FILE))
    ctx.load_cert_chain(state / f"{host_id(n)}.crt", state / f"{host_id(n)}.key")
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_keyserverd(state: Path, port: int, store_url: str = "", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """keyserverd on 127.0.0.1:``port`` (no metrics endpoint, no rate limit
    worth the name), once it prints its ``listening`` line."""
    argv = [str(Path(sys.executable).parent / "keyserverd"), "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}", "--log-level", "warning", "--metrics-listen", "",
            "--kek-file", str(state / DEFAULT_KEK_FILE),
            "--key-requests-per-s", "1000000", "--key-request-burst", "1000000", *extra]
    if store_url:
        argv += ["--store", store_url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"keyserverd did not start: {line!r}")
    return proc


class KsConnection:
    """One TLS connection of a simulated host to keyserverd."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._frames = FrameReader()
        self._waiting: dict[int, asyncio.Future] = {}
        self._rid = 0
        #: Messages with rid 0 (pushes), in arrival order.
        self.pushes: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext, timeout: float = 30.0, session=None) -> "KsConnection":
        reader, writer = await wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME, ssl_handshake_timeout=timeout),
            timeout)
        return cls(reader, writer)

    def send(self, msg: dict) -> asyncio.Future:
        """Send a request (a fresh rid is set); the future is its answer."""
        self._rid += 1
        msg = dict(msg, rid=self._rid)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[self._rid] = answer
        self.writer.write(encode_message(msg))
        return answer

    async def call(self, msg: dict, timeout: float = 30.0) -> dict:
        return await wait_for(self.send(msg), timeout)

    async def _read(self) -> None:
        error: BaseException = EOFError("keyserverd closed the connection")
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for msg in self._frames.feed(data):
                    waiter = self._waiting.pop(msg.get("rid", 0), None)
                    if waiter is None:
                        self.pushes.put_nowait(msg)
                    elif not waiter.done():
                        waiter.set_result(msg)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            error = exc
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(error)
            self._waiting.clear()

    @property
    def closed(self) -> bool:
        return self._task.done()

    def close(self) -> None:
        self._task.cancel()
        self.writer.close()
