"""Connection caps, deadlines and one session per identity (issue 15, finding 9 and
the low items), on a real keyserverd server object over TLS 1.3 on 127.0.0.1:

    host a (client cert) x 100 --+
    host a (a second agent) -----+--> KeyServer (ConnectionLimits)     NETKEY listener
    clients without a cert ------+                                     <-- slow clients

- 100 connections of one host: ``max_connections_per_host`` stay and keep
  working, the others are told ``too_many_connections`` and closed, and one
  log line (with ``suppressed``) says so;
- a client without a certificate that keeps asking for the CA is still cut
  at ``unauth_deadline_s``; ``max_unauthenticated_connections`` and
  ``max_connections`` hold;
- a second hello of the same identity takes over: the first connection is
  told ``session_replaced`` and closed, and logged; two real key clients of
  one identity alternate slowly, never in a hot loop;
- the NETKEY listener closes a client that sends half a message, or keeps
  asking for the CA.
"""

import asyncio
import logging
import ssl

import pytest

from keyserverd.ca import CertificateAuthority
import keyserverd.peering.netkey as netkey_peering
from keyserverd.peering.netkey import LENGTH, NetkeyPeering, encode
from keyserverd.client_port import ConnectionLimits, make_server_ssl_context
from keyserverd.server import KeyServer
from keyserverd.service import KeyService
from keyserverd.store.kek import Kek
from keyserverd.store.sqlite import SqliteStore
from l2crypt.agent import keyclient
from l2crypt.agent.keyclient import KeyClient
from l2crypt.agent.tls_files import CA_CERT, HOST_CERT, HOST_KEY, client_context
from l2crypt.core.ks_messages import encode_message
from l2crypt.ops.logs import TextFormatter
from test_keyserver_tls import Client, new_identity

MAC_A = bytes.fromhex("020000000001")
PER_HOST = 8


@pytest.fixture
def ks(tmp_path):
    """(ca, files of host a, run): run(body, limits) serves on a free port and awaits body(port, server)."""
    ca = CertificateAuthority.open(tmp_path / "ks", ())
    store = SqliteStore.open(tmp_path / "ks" / "keyserver.db", 0)
    store.add_host("a", None, "host", b"x" * 32, 4e9, 0)
    key_path, csr = new_identity(tmp_path, "a")
    cert_path = tmp_path / "a.crt"
    cert_path.write_bytes(ca.sign_csr(csr, "a"))
    service = KeyService(store, "aes-256-gcm", "ks-test", ca)

    def run(body, limits=ConnectionLimits(max_connections_per_host=PER_HOST), unauth_idle_s=0.5):
        async def main():
            server = KeyServer(service, make_server_ssl_context(ca), "127.0.0.1", 0,
                               unauth_idle_s=unauth_idle_s, limits=limits)
            _, port = await server.start()
            try:
                await asyncio.wait_for(body(port, server), 60)
            finally:
                await server.close()

        asyncio.run(main())

    yield ca, (cert_path, key_path), run
    store.close()


def log_lines(caplog, event):
    return [TextFormatter().format(r) for r in caplog.records if r.getMessage() == event]


async def first_message_or_close(client):
    """The first message the server sends, or None if it closes first."""
    try:
        return await client.recv()
    except (EOFError, ConnectionError, ssl.SSLError):
        return None


def test_one_host_with_100_connections_gets_the_cap_and_the_first_ones_keep_working(ks, caplog):
    ca, files, run = ks
    caplog.set_level(logging.INFO, logger="keyserverd")

    async def body(port, server):
        clients = [await Client.connect(port, ca.ca_cert_pem, files) for _ in range(100)]
        try:
            # Every connection asks for a pong; the kept ones answer, the others are told why.
            for i, c in enumerate(clients):
                c.writer.write(encode_message({"t": "ping", "rid": i + 1}))  # refused ones may be closed already
            answers = await asyncio.gather(*(first_message_or_close(c) for c in clients))
            kept = [c for c, a in zip(clients, answers) if a is not None and a["t"] == "pong"]
            refused = [a for a in answers if a is not None and a["t"] == "error"]
            assert len(kept) == PER_HOST, answers[:12]
            assert len(refused) == 100 - PER_HOST
            assert {(a["code"], a["rid"]) for a in refused} == {("too_many_connections", 0)}
            assert all(await asyncio.gather(*(c.closed_by_server() for c, a in zip(clients, answers)
                                              if a is not None and a["t"] == "error")))
            assert server.connected_hosts() == {"a": PER_HOST}
            assert server.connections_refused == {"too_many_connections": 100 - PER_HOST}
            # The first ones keep working, and a freed slot can be used again.
            assert (await kept[0].call({"t": "hello", "rid": 200, "mac": MAC_A}))["t"] == "welcome"
            for i, c in enumerate(kept[1:]):
                assert await c.call({"t": "ping", "rid": 300 + i}) == {"t": "pong", "rid": 300 + i}
            kept[-1].close()
            await asyncio.sleep(0.3)
            again = await Client.connect(port, ca.ca_cert_pem, files)
            clients.append(again)
            assert await again.call({"t": "ping", "rid": 9}) == {"t": "pong", "rid": 9}
        finally:
            for c in clients:
                c.close()

    run(body)
    lines = log_lines(caplog, "connection_refused")
    assert lines and all("host=a" in ln and "reason=too_many_connections" in ln and "limit=8" in ln
                         for ln in lines), lines
    assert len(lines) < 5, "refusals must be logged at a rate limit"


def test_a_client_without_certificate_is_cut_at_the_deadline_however_often_it_asks(ks, caplog):
    ca, files, run = ks
    caplog.set_level(logging.INFO, logger="keyserverd")
    limits = ConnectionLimits(unauth_deadline_s=1.5)

    async def body(port, server):
        host = await Client.connect(port, ca.ca_cert_pem, files)
        slow = await Client.connect(port, ca.ca_cert_pem)
        loop = asyncio.get_running_loop()
        start, answered, closed_after = loop.time(), 0, None
        try:
            while loop.time() - start < 6.0:  # a `ca` every 0.2 s: never idle for unauth_idle_s (0.5 s)
                try:
                    out = await slow.call({"t": "ca", "rid": answered + 1})
                    assert out["t"] == "ca_cert"
                    answered += 1
                    await asyncio.sleep(0.2)
                except (EOFError, ConnectionError, ssl.SSLError):
                    closed_after = loop.time() - start
                    break
            assert answered >= 3, "the slow client was served before the deadline"
            assert closed_after is not None, "a client without a certificate stayed connected for 6 s"
            assert 1.4 <= closed_after < 3.0, closed_after
            assert await host.call({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}  # hosts stay
        finally:
            slow.close()
            host.close()

    run(body, limits)
    assert any("open for 1.5 s" in ln for ln in log_lines(caplog, "connection_closed"))


def test_unauthenticated_and_global_caps(ks, caplog):
    ca, files, run = ks
    caplog.set_level(logging.INFO, logger="keyserverd")

    async def body(port, server):
        anon = [await Client.connect(port, ca.ca_cert_pem) for _ in range(3)]
        extra = await Client.connect(port, ca.ca_cert_pem)
        try:
            assert await extra.closed_by_server()
            for i, c in enumerate(anon):
                assert (await c.call({"t": "ca", "rid": i + 1}))["t"] == "ca_cert"
            host = await Client.connect(port, ca.ca_cert_pem, files)  # the 4th of max_connections 4
            assert await host.call({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}
            try:
                over = await Client.connect(port, ca.ca_cert_pem, files)
                await over.send({"t": "ping", "rid": 1})
                assert await over.closed_by_server()
            except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
                pass  # refused before or during the handshake
            assert server.connections_refused == {"max_unauthenticated_connections": 1, "max_connections": 1}
            assert await host.call({"t": "ping", "rid": 2}) == {"t": "pong", "rid": 2}
            host.close()
        finally:
            for c in anon + [extra]:
                c.close()

    run(body, ConnectionLimits(max_connections=4, max_unauthenticated_connections=3), unauth_idle_s=5.0)
    reasons = " ".join(log_lines(caplog, "connection_refused"))
    assert "reason=max_unauthenticated_connections" in reasons and "reason=max_connections" in reasons


def test_a_second_hello_of_one_identity_takes_over_and_is_logged(ks, caplog):
    ca, files, run = ks
    caplog.set_level(logging.INFO, logger="keyserverd")

    async def body(port, server):
        old = await Client.connect(port, ca.ca_cert_pem, files)
        new = await Client.connect(port, ca.ca_cert_pem, files)
        try:
            assert (await old.call({"t": "hello", "rid": 1, "mac": MAC_A}))["t"] == "welcome"
            assert await new.call({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}  # no hello: no takeover
            assert await old.call({"t": "ping", "rid": 2}) == {"t": "pong", "rid": 2}
            assert (await new.call({"t": "hello", "rid": 2, "mac": MAC_A}))["t"] == "welcome"
            told = await old.recv()
            assert (told["t"], told["rid"], told["code"]) == ("error", 0, "session_replaced")
            assert await old.closed_by_server()
            assert await new.call({"t": "ping", "rid": 3}) == {"t": "pong", "rid": 3}
            assert server.connected_hosts() == {"a": 1}
        finally:
            old.close()
            new.close()

    run(body)
    [line] = log_lines(caplog, "session_taken_over")
    assert "host=a" in line and "old_peer=127.0.0.1:" in line and "new_peer=127.0.0.1:" in line


def test_layer3_sessions_take_over_their_own_kind_only(ks):
    ca, files, run = ks

    async def body(port, server):
        l2, l3_old, l3_new = [await Client.connect(port, ca.ca_cert_pem, files) for _ in range(3)]
        try:
            assert (await l2.call({"t": "hello", "rid": 1, "mac": MAC_A}))["t"] == "welcome"
            assert (await l3_old.call({"t": "l3_hello", "rid": 1}))["t"] == "l3_welcome"
            assert await l2.call({"t": "ping", "rid": 2}) == {"t": "pong", "rid": 2}  # an L2 session stays
            assert (await l3_new.call({"t": "l3_hello", "rid": 1}))["t"] == "l3_welcome"
            assert (await l3_old.recv())["code"] == "session_replaced"
            assert await l3_old.closed_by_server()
            for c in (l2, l3_new):
                assert await c.call({"t": "ping", "rid": 3}) == {"t": "pong", "rid": 3}
        finally:
            for c in (l2, l3_old, l3_new):
                c.close()

    run(body)


class _Events:
    def __init__(self):
        self.welcomes = 0

    def on_welcome(self, msg):
        self.welcomes += 1

    def __getattr__(self, name):  # on_key, on_disconnect, ...: nothing to do here
        return lambda *args: None


def test_two_agents_of_one_identity_alternate_slowly(ks, tmp_path, monkeypatch, caplog):
    """A cloned machine: both key clients keep trying, but each waits
    REPLACED_WAIT_S after being replaced, so the server sees a few takeovers,
    not a hot loop, and each side logs session_replaced."""
    ca, files, run = ks
    monkeypatch.setattr(keyclient, "REPLACED_WAIT_S", 1.0)
    caplog.set_level(logging.INFO)
    state = tmp_path / "a-state"
    state.mkdir()
    (state / HOST_CERT).write_bytes(files[0].read_bytes())
    (state / HOST_KEY).write_bytes(files[1].read_bytes())
    (state / CA_CERT).write_bytes(ca.ca_cert_pem)

    async def body(port, server):
        stop = asyncio.Event()
        events = [_Events(), _Events()]
        clients = [KeyClient((f"127.0.0.1:{port}",), client_context(state), MAC_A, ev) for ev in events]
        tasks = [asyncio.ensure_future(c.run(stop)) for c in clients]
        await asyncio.sleep(4.0)
        stop.set()
        for c in clients:
            if c._writer is not None:
                c._writer.close()
        await asyncio.wait(tasks, timeout=5)
        welcomes = [ev.welcomes for ev in events]
        assert all(w >= 2 for w in welcomes), welcomes  # both got back in
        assert sum(welcomes) <= 10, welcomes  # ... about once a second, not hundreds of times

    run(body)
    taken = log_lines(caplog, "session_taken_over")
    replaced = [r for r in caplog.records if r.getMessage() == "session_replaced"]
    assert taken and replaced and all(r.levelno == logging.ERROR for r in replaced)


@pytest.fixture
def netkey_listener(tmp_path, monkeypatch):
    monkeypatch.setattr(netkey_peering, "TIMEOUT_S", 1.0)
    ca = CertificateAuthority.open(tmp_path / "nk", ())
    peering = NetkeyPeering(ca, tmp_path / "nk", ("127.0.0.1", 0), ("127.0.0.1", 9), "sha256:" + "f" * 64,
                            3600.0, on_new=lambda pw_id, key: None, kek=Kek(bytes(32)))
    return peering


def test_the_netkey_listener_closes_half_messages_and_endless_ca_requests(netkey_listener):
    peering = netkey_listener
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def closed_within(reader, seconds) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            while await asyncio.wait_for(reader.read(65536), seconds):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        return loop.time() - start

    async def body():
        await peering.start()
        port = peering._server.sockets[0].getsockname()[1]
        try:
            # Half a length header, then nothing.
            r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            w1.write(LENGTH.pack(100)[:2])
            # A `ca` request every 0.3 s: answered, but the connection is closed after TIMEOUT_S in all.
            r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            answers = 0
            loop = asyncio.get_running_loop()
            start = loop.time()
            try:
                while loop.time() - start < 5.0:
                    w2.write(encode({"t": "ca"}))
                    head = await asyncio.wait_for(r2.readexactly(LENGTH.size), 2.0)
                    await asyncio.wait_for(r2.readexactly(LENGTH.unpack(head)[0]), 2.0)
                    answers += 1
                    await asyncio.sleep(0.3)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            assert answers >= 2, "the listener answers ca"
            assert loop.time() - start < 3.0, "a client without a certificate stayed for 5 s"
            assert await closed_within(r1, 3.0) < 3.0
            w1.close()
            w2.close()
        finally:
            await peering.close()

    asyncio.run(asyncio.wait_for(body(), 30))
