"""The agent's key client against two real keyserverd fronts on 127.0.0.1 (TLS 1.3):
it fails over when the one in use drops or stops answering pings, asks again
for what it waits for, and returns to the first once it has answered for the
hold-down.

    KeyClient --TLS--> ks1 (priority 1) --+
              \\--TLS--> ks2 (priority 2) --+-- one store
"""

import asyncio
import ssl

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.client_port import make_server_ssl_context
from keyserverd.server import KeyServer
from keyserverd.service import KeyService
from keyserverd.store.sqlite import SqliteStore
from l2crypt.core.constants import KEYSERVER_TLS_NAME  # noqa: F401  (the name the client checks)
from l2crypt.agent.keyclient import KeyClient
from l2crypt.core.failover import RECONNECT_MIN_S
from test_keyserver_tls import new_identity

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


class Events:
    def __init__(self):
        self.welcomes: list[str] = []
        self.keys: list[tuple[bytes, int]] = []
        self.disconnects = 0
        self.client = None

    def on_welcome(self, msg):
        self.welcomes.append(msg["server"])

    def on_key(self, peer_mac, peer_id, key, pw_id, age_s=0, older=()):
        self.keys.append((peer_mac, pw_id))

    def on_unknown(self, peer_mac):
        pass

    def on_key_refused(self, peer_mac, code, text):
        pass

    def on_multicast(self, key, pw_id):
        pass

    def on_peer_revoked(self, peer_mac):
        pass

    def on_disconnect(self):
        self.disconnects += 1


@pytest.fixture
def two_servers(tmp_path):
    ca = CertificateAuthority.open(tmp_path / "ks", ())
    store = SqliteStore.open(tmp_path / "ks" / "keyserver.db", 0)
    for host_id, mac in (("a", MAC_A), ("b", MAC_B)):
        store.add_host(host_id, mac, "host", b"x" * 32, 4e9, 0)
    key_path, csr = new_identity(tmp_path, "a")
    cert_path = tmp_path / "a.crt"
    cert_path.write_bytes(ca.sign_csr(csr, "a"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca.ca_cert_pem.decode())
    ctx.load_cert_chain(cert_path, key_path)
    services = [KeyService(store, "aes-256-gcm", name, ca) for name in ("ks1", "ks2")]
    yield ca, services, ctx
    store.close()


async def wait_until(what, probe, timeout_s=15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(body):
    asyncio.run(asyncio.wait_for(body(), 60))


def test_drop_fails_over_rerequests_and_fails_back_after_hold_down(two_servers):
    ca, services, ctx = two_servers

    async def body():
        servers = [KeyServer(s, make_server_ssl_context(ca), "127.0.0.1", 0) for s in services]
        ports = [(await s.start())[1] for s in servers]
        events = Events()
        client = KeyClient(tuple(f"127.0.0.1:{p}" for p in ports), ctx, MAC_A, events,
                           probe_interval_s=0.1, probe_failures=2, failback_holddown_s=1.0)
        stop = asyncio.Event()
        task = asyncio.ensure_future(client.run(stop))
        try:
            await wait_until("ks1 in use", lambda: client.connected and client.server.endswith(str(ports[0])))
            await servers[0].close()
            await wait_until("failover to ks2", lambda: events.welcomes[-1:] == ["ks2"] and client.connected)
            snap = client.selector.snapshot()
            assert snap["failovers"] == 1
            assert [s["state"] for s in snap["keyservers"]] == ["down", "in_use"]
            assert client.request_key(MAC_B)
            await wait_until("key from ks2", lambda: events.keys)
            # ks1 comes back on its port: not before the hold-down, then back to it.
            back = KeyServer(services[0], make_server_ssl_context(ca), "127.0.0.1", ports[0])
            await back.start()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await wait_until("fail-back to ks1", lambda: events.welcomes[-1] == "ks1" and client.connected)
            assert loop.time() - t0 >= 1.0, "returned before the hold-down"
            assert client.selector.snapshot()["failbacks"] == 1
            assert client.selector.snapshot()["failovers"] == 1
            await back.close()
        finally:
            stop.set()
            task.cancel()
            for s in servers:
                await s.close()

    run(body)


def test_missed_pongs_fail_over_although_the_connection_stays_open(two_servers):
    ca, services, ctx = two_servers
    services[0]._on_ping = lambda session, msg, now: []  # ks1 hangs: connected, but silent

    async def body():
        servers = [KeyServer(s, make_server_ssl_context(ca), "127.0.0.1", 0) for s in services]
        ports = [(await s.start())[1] for s in servers]
        events = Events()
        client = KeyClient(tuple(f"127.0.0.1:{p}" for p in ports), ctx, MAC_A, events,
                           probe_interval_s=0.1, probe_failures=3, failback_holddown_s=3600)
        stop = asyncio.Event()
        task = asyncio.ensure_future(client.run(stop))
        try:
            await wait_until("ks1 then ks2", lambda: events.welcomes[:2] == ["ks1", "ks2"] and client.connected)
            assert client.selector.snapshot()["failovers"] == 1
            assert events.disconnects == 1
        finally:
            stop.set()
            task.cancel()
            for s in servers:
                await s.close()

    run(body)


async def accept_and_close(name: str, attempts: list):
    """A loopback TCP listener that takes each connection, notes (name, time) and
    closes it at once: the TLS handshake fails, as with a dead key server."""
    loop = asyncio.get_running_loop()

    async def on_connect(reader, writer):
        attempts.append((name, loop.time()))
        writer.transport.abort()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_all_servers_down_keeps_trying_in_priority_order(two_servers):
    """Three listeners that close every connection: the client tries ks1, ks2,
    ks3 in that order, once each per round, and backs off between rounds."""
    _, _, ctx = two_servers

    async def body():
        attempts: list[tuple[str, float]] = []
        listeners = [await accept_and_close(name, attempts) for name in ("ks1", "ks2", "ks3")]
        events = Events()
        client = KeyClient(tuple(f"127.0.0.1:{port}" for _, port in listeners), ctx, MAC_A, events,
                           probe_interval_s=0.1)
        stop = asyncio.Event()
        task = asyncio.ensure_future(client.run(stop))
        try:
            await wait_until("two rounds of attempts", lambda: len(attempts) >= 6, timeout_s=5)
            assert not client.connected
            assert not client.request_key(MAC_B), "nothing can be asked while every server is down"
            stop.set()
            await asyncio.wait_for(task, 5)  # the round in progress ends; no new attempt
            assert [name for name, _ in attempts] == ["ks1", "ks2", "ks3", "ks1", "ks2", "ks3"]
            # the first back-off is drawn between half and all of RECONNECT_MIN_S
            assert attempts[3][1] - attempts[2][1] >= RECONNECT_MIN_S * 0.5 * 0.9, "no back-off between rounds"
            assert [s["state"] for s in client.selector.snapshot()["keyservers"]] == ["down", "down", "down"]
            assert events.welcomes == [] and client.connects == 0
        finally:
            stop.set()
            task.cancel()
            for server, _ in listeners:
                server.close()
                await server.wait_closed()

    run(body)
