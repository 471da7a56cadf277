"""keyserverd over real TLS 1.3 on 127.0.0.1: enrollment with a real CSR, then
hello, key_req and the push to the peer; bad clients only hurt themselves.

    client (no cert) --ca--> keyserverd          check the fingerprint
    client (verifies CA) --enroll(CSR)-->         get host.crt
    host a (cert) --hello, key_req(b)-->          key; host b gets the push
"""

import asyncio
import fcntl
import os
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyserverd import server as server_module
from keyserverd.ca import CertificateAuthority, fingerprint_of
from keyserverd.client_port import make_server_ssl_context
from keyserverd.ratelimit import HostBuckets
from keyserverd.server import KeyServer
from keyserverd.service import KeyService
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token, new_token
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.ks_messages import LENGTH, FrameReader, encode_message
from l2crypt.ops.logs import TextFormatter

STEP_S = 5.0  # bound on every network wait
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


class Client:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.frames = FrameReader()
        self.pending: list[dict] = []

    @classmethod
    async def connect(cls, port, ca_pem=None, cert_files=None, rcvbuf=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if ca_pem is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_verify_locations(cadata=ca_pem.decode())
        if cert_files:
            ctx.load_cert_chain(*cert_files)
        sock = None
        if rcvbuf is not None:  # a small receive window: what the server sends piles up at the server
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), STEP_S)
        where = {"sock": sock} if sock is not None else {"host": "127.0.0.1", "port": port}
        r, w = await asyncio.wait_for(
            asyncio.open_connection(**where, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME), STEP_S)
        return cls(r, w)

    async def send(self, msg):
        self.writer.write(encode_message(msg))
        await self.writer.drain()

    async def recv(self):
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), STEP_S)
            if not data:
                raise EOFError
            self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    async def call(self, msg):
        await self.send(msg)
        return await self.recv()

    async def closed_by_server(self) -> bool:
        try:
            while True:
                if not await asyncio.wait_for(self.reader.read(65536), STEP_S):
                    return True
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self):
        self.writer.close()


def new_identity(tmp_path, name):
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return key_path, csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def keyserver(tmp_path):
    """(state, run) where run(coro_fn) starts a server on an ephemeral port and awaits coro_fn(port)."""
    state = tmp_path / "ks"
    ca = CertificateAuthority.open(state, ())
    store = SqliteStore.open(state / "keyserver.db", 0)
    tokens = {}
    for host_id in ("a", "b"):
        tokens[host_id] = new_token()
        store.add_host(host_id, None, "host", hash_token(tokens[host_id]), 4e9, 0)
    service = KeyService(store, "aes-256-gcm", "ks-test", ca)

    def run(body):
        async def main():
            server = KeyServer(service, make_server_ssl_context(ca), "127.0.0.1", 0, unauth_idle_s=0.5)
            _, port = await server.start()
            try:
                await asyncio.wait_for(body(port), 30)
            finally:
                await server.close()

        asyncio.run(main())

    yield ca, store, tokens, run
    store.close()


async def enroll(tmp_path, port, host_id, token, expected_fp):
    """What the agent does: fetch the CA unverified, pin it, then enroll verified."""
    c = await Client.connect(port)
    ca_msg = await c.call({"t": "ca", "rid": 1})
    c.close()
    assert fingerprint_of(ca_msg["cert"]) == expected_fp
    key_path, csr = new_identity(tmp_path, host_id)
    c = await Client.connect(port, ca_pem=ca_msg["cert"])
    out = await c.call({"t": "enroll", "rid": 2, "id": host_id, "token": token, "csr": csr})
    c.close()
    assert out["t"] == "enrolled", out
    cert_path = tmp_path / f"{host_id}.crt"
    cert_path.write_bytes(out["cert"])
    return ca_msg["cert"], (cert_path, key_path)


def test_enroll_hello_key_req_and_push(tmp_path, keyserver):
    ca, store, tokens, run = keyserver

    async def body(port):
        ca_pem, files_a = await enroll(tmp_path, port, "a", tokens["a"], ca.ca_fingerprint())
        _, files_b = await enroll(tmp_path, port, "b", tokens["b"], ca.ca_fingerprint())
        a = await Client.connect(port, ca_pem, files_a)
        b = await Client.connect(port, ca_pem, files_b)
        welcome = await a.call({"t": "hello", "rid": 1, "mac": MAC_A})
        assert welcome["t"] == "welcome" and welcome["id"] == "a" and welcome["cipher"] == "aes-256-gcm"
        assert (await b.call({"t": "hello", "rid": 1, "mac": MAC_B}))["t"] == "welcome"
        key = await a.call({"t": "key_req", "rid": 2, "peer_mac": MAC_B, "my_mac": MAC_A})
        assert key["t"] == "key" and key["peer_id"] == "b" and key["pw_id"] == 1
        push = await b.recv()
        assert push == {"t": "key", "rid": 0, "peer_mac": MAC_A, "peer_id": "a",
                        "key": key["key"], "pw_id": 1, "age_s": key["age_s"]}
        # a claims b's MAC as its own: refused, connection kept
        bad = await a.call({"t": "key_req", "rid": 3, "peer_mac": MAC_B, "my_mac": MAC_B})
        assert bad["code"] == "forbidden"
        assert (await a.call({"t": "ping", "rid": 4})) == {"t": "pong", "rid": 4}
        # an unauthenticated client cannot say hello
        anon = await Client.connect(port, ca_pem)
        assert (await anon.call({"t": "hello", "rid": 1, "mac": MAC_A}))["code"] == "unauthenticated"
        anon.close()
        # revocation: the next request is refused and the connection closed
        store.revoke_host("b", 1)
        assert (await b.call({"t": "ping", "rid": 5}))["code"] == "revoked"
        assert await b.closed_by_server()
        for c in (a, b):
            c.close()

    run(body)


def test_malformed_and_idle_clients_do_not_hurt_others(tmp_path, keyserver):
    ca, store, tokens, run = keyserver

    async def body(port):
        ca_pem, files_a = await enroll(tmp_path, port, "a", tokens["a"], ca.ca_fingerprint())
        good = await Client.connect(port, ca_pem, files_a)
        assert (await good.call({"t": "hello", "rid": 1, "mac": MAC_A}))["t"] == "welcome"

        garbage = await Client.connect(port, ca_pem)
        garbage.writer.write(LENGTH.pack(5) + b"\xc1\xc1\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        assert await garbage.closed_by_server()

        huge = await Client.connect(port, ca_pem, files_a)
        huge.writer.write(LENGTH.pack(10_000_000))
        assert await huge.closed_by_server()

        silent = await Client.connect(port, ca_pem)
        assert await silent.closed_by_server()  # unauth_idle_s = 0.5

        # a certificate from some other CA never gets in
        other = CertificateAuthority.open(tmp_path / "other", ())
        key_path, csr = new_identity(tmp_path, "mallory")
        (tmp_path / "mallory.crt").write_bytes(other.sign_csr(csr, "a"))
        try:
            intruder = await Client.connect(port, ca_pem, (tmp_path / "mallory.crt", key_path))
            await intruder.send({"t": "ping", "rid": 1})
            assert await intruder.closed_by_server()
        except (ssl.SSLError, ConnectionError):
            pass

        assert (await good.call({"t": "ping", "rid": 2})) == {"t": "pong", "rid": 2}
        fresh = await Client.connect(port)
        assert (await fresh.call({"t": "ca", "rid": 1}))["t"] == "ca_cert"
        for c in (good, garbage, huge, silent, fresh):
            c.close()

    run(body)


def small_server_buffers(monkeypatch, caplog):
    """The server's accepted sockets get a 4 KiB send buffer (the kernel holds
    little of what a client leaves unread), and no request is rate limited;
    returns what gives the logged ``connection_closed`` lines."""
    monkeypatch.setattr(HostBuckets, "take", lambda self, host, now: True)
    keepalive = server_module.set_keepalive

    def small_send_buffer(sock):
        keepalive(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    monkeypatch.setattr(server_module, "set_keepalive", small_send_buffer)
    return lambda: [TextFormatter().format(r) for r in caplog.records if r.getMessage() == "connection_closed"]


async def a_and_slow_b(tmp_path, port, ca, tokens):
    """Hosts a and b enrolled and connected, b with a 4 KiB receive buffer and its hello said."""
    ca_pem, files_a = await enroll(tmp_path, port, "a", tokens["a"], ca.ca_fingerprint())
    _, files_b = await enroll(tmp_path, port, "b", tokens["b"], ca.ca_fingerprint())
    a = await Client.connect(port, ca_pem, files_a)
    b = await Client.connect(port, ca_pem, files_b, rcvbuf=4096)
    assert (await b.call({"t": "hello", "rid": 1, "mac": MAC_B}))["t"] == "welcome"
    return a, b


def test_requests_sent_without_waiting_are_all_answered_in_order(tmp_path, keyserver):
    """A client sends 60 requests, each in its own TLS record, without waiting,
    while another worker holds the store's turn: nothing is answered before the
    turn is free, then every request is, in order (the connection stops being
    read while two batches of it wait, and is read again after)."""
    ca, store, tokens, run = keyserver

    async def body(port):
        ca_pem, files_a = await enroll(tmp_path, port, "a", tokens["a"], ca.ca_fingerprint())
        a = await Client.connect(port, ca_pem, files_a)
        assert (await a.call({"t": "hello", "rid": 1, "mac": MAC_A}))["t"] == "welcome"
        turn = os.open(store.path.with_name(store.path.name + ".writer"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another worker's group holds
            for rid in range(2, 62):
                await a.send({"t": "ping", "rid": rid})
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.reader.read(65536), 0.3)
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
            os.close(turn)
        assert [(await a.recv())["rid"] for _ in range(60)] == list(range(2, 62))
        assert (await a.call({"t": "ping", "rid": 99})) == {"t": "pong", "rid": 99}
        a.close()

    run(body)


def test_a_host_that_stops_reading_is_closed_and_the_others_are_served(tmp_path, keyserver, caplog, monkeypatch):
    """b stops reading; the pushes a's key requests send it pile up at the
    server only up to MAX_WRITE_BUFFER_BYTES (16 KiB here): then b's
    connection is closed and logged, and a is answered throughout."""
    monkeypatch.setattr(server_module, "MAX_WRITE_BUFFER_BYTES", 16 * 1024)
    closed_lines = small_server_buffers(monkeypatch, caplog)
    ca, store, tokens, run = keyserver

    async def body(port):
        a, b = await a_and_slow_b(tmp_path, port, ca, tokens)
        assert (await a.call({"t": "hello", "rid": 1, "mac": MAC_A}))["t"] == "welcome"
        b.writer.transport.pause_reading()
        for rid in range(2, 20_000):
            answer = await a.call({"t": "key_req", "rid": rid, "peer_mac": MAC_B})
            assert answer["t"] == "key" and answer["rid"] == rid, answer  # each one also pushes the key to b
            if rid % 100 == 0 and any("does not read" in line for line in closed_lines()):
                break
        else:
            pytest.fail("b was never closed for not reading")
        assert any("host=b" in line for line in closed_lines()), closed_lines()
        assert (await a.call({"t": "ping", "rid": 1})) == {"t": "pong", "rid": 1}
        for c in (a, b):
            c.close()

    run(body)


def test_a_host_that_asks_but_leaves_its_answers_unread_is_closed_after_the_drain_timeout(
        tmp_path, keyserver, caplog, monkeypatch):
    """b sends pings and stops reading: once DRAIN_ABOVE_BYTES (8 KiB here) of
    answers wait at the server, b is not read any more, and DRAIN_TIMEOUT_S
    (1 s here) later it is closed and logged; a is answered throughout."""
    monkeypatch.setattr(server_module, "DRAIN_ABOVE_BYTES", 8 * 1024)
    monkeypatch.setattr(server_module, "DRAIN_TIMEOUT_S", 1.0)
    closed_lines = small_server_buffers(monkeypatch, caplog)
    ca, store, tokens, run = keyserver

    async def body(port):
        a, b = await a_and_slow_b(tmp_path, port, ca, tokens)
        b.writer.transport.pause_reading()
        # About 750 KB of answers, written without waiting: more than b's TLS
        # layer takes in before it stops reading the socket (256 KiB) and the kernels hold.
        for rid in range(2, 15_000):
            b.writer.write(encode_message({"t": "ping", "rid": rid}))
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not any("client does not read" in line for line in closed_lines()):
            assert loop.time() - started < 10, "b was never closed"
            assert (await a.call({"t": "ping", "rid": 1})) == {"t": "pong", "rid": 1}
            await asyncio.sleep(0.1)
        assert any("host=b" in line and "client does not read" in line for line in closed_lines())
        assert loop.time() - started >= 0.9  # not before the drain timeout
        for c in (a, b):
            c.close()

    run(body)


def expired_cert(ca_dir, csr_pem, cn):
    """A client certificate signed by the CA key in ``ca_dir`` that expired yesterday."""
    import datetime

    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    csr = x509.load_pem_x509_csr(csr_pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_refused_handshakes_are_logged_and_tricklers_dropped(tmp_path, keyserver, caplog):
    ca, store, tokens, run = keyserver
    caplog.set_level("INFO", logger="keyserverd")

    async def refused(port, ca_pem, files):
        try:
            c = await Client.connect(port, ca_pem, files)
            await c.send({"t": "ping", "rid": 1})
            assert await c.closed_by_server()
        except (ssl.SSLError, ConnectionError):
            pass

    async def body(port):
        ca_pem = ca.ca_cert_pem
        key_path, csr = new_identity(tmp_path, "old")
        (tmp_path / "old.crt").write_bytes(expired_cert(tmp_path / "ks", csr, "a"))
        await refused(port, ca_pem, (tmp_path / "old.crt", key_path))
        other = CertificateAuthority.open(tmp_path / "other", ())
        key_path, csr = new_identity(tmp_path, "mallory")
        (tmp_path / "mallory.crt").write_bytes(other.sign_csr(csr, "a"))
        await refused(port, ca_pem, (tmp_path / "mallory.crt", key_path))
        # Plain TCP garbage instead of a TLS ClientHello.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await r.read() == b""
        w.close()
        # An unauthenticated client trickling a message byte by byte is dropped
        # after unauth_idle_s (0.5 s) although it never goes silent.
        slow = await Client.connect(port, ca_pem)
        frame = encode_message({"t": "ca", "rid": 1})
        loop = asyncio.get_running_loop()
        start, closed = loop.time(), False
        for byte in frame[:-1]:
            try:
                slow.writer.write(bytes([byte]))
                await slow.writer.drain()
                if await asyncio.wait_for(slow.reader.read(1), 0.2) == b"":
                    closed = True
                    break
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                closed = True
                break
        assert closed and loop.time() - start < 3.0
        slow.close()

    run(body)
    lines = [TextFormatter().format(r) for r in caplog.records if r.getMessage() == "tls_handshake_refused"]
    assert any("certificate has expired" in ln for ln in lines), lines
    assert any("unable to get local issuer certificate" in ln or "unknown ca" in ln.lower() for ln in lines), lines
    assert any("WRONG_VERSION_NUMBER" in ln.upper() or "wrong version" in ln.lower() or "http" in ln.lower()
               for ln in lines), lines
