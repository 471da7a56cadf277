"""Metrics read the engine's own counters at scrape time; the endpoint speaks HTTP;
no key bytes ever appear in a scrape.  Also: the key server's refusal log is
rate-limited, and ``status --watch`` computes rates."""

import asyncio
import logging
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keyserverd.client_port import make_server_ssl_context
from keyserverd.server import KeyServer
from l2crypt.agent.keyclient import KeyClient
from l2crypt.core.engine import FrameEngine
from l2crypt.ops.logs import RateLimiter, TextFormatter
from l2crypt.ops.metrics import FunctionCollector, agent_metrics, new_registry, parse_listen, serve_metrics
from l2crypt.ops.status_view import rates
from test_keyclient_failover import MAC_A, Events, two_servers, wait_until  # noqa: F401  (two_servers is a fixture)

H1 = bytes.fromhex("020000000001")
H2 = bytes.fromhex("020000000002")
PAIR_KEY = bytes(range(100, 132))
MCAST_KEY = bytes(range(1, 33))


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


GUARD_READING = {"port_guard": "intact", "inbound_refused": 12, "egress_blocked": 3}


def fake_agent(engine, client=None, guard=GUARD_READING):
    return SimpleNamespace(engine=engine, client=client, host_id="h1",
                           config=SimpleNamespace(port="eth0", tap="l2c0"), guard_reading=lambda: guard)


def scrape(agent, now):
    registry = new_registry()
    registry.register(FunctionCollector(lambda: agent_metrics(agent, now)))
    return generate_latest(registry).decode()


def engines():
    e1, e2 = FrameEngine(H1), FrameEngine(H2)
    for me, peer in ((e1, H2), (e2, H1)):
        me.install_multicast_key(MCAST_KEY, 1, 0.0)
        me.install_pair_key(peer, "h2" if peer == H2 else "h1", PAIR_KEY, 1, 0.0)
    return e1, e2


def test_counters_move_with_traffic_and_forged_frames():
    e1, e2 = engines()
    a1, a2 = fake_agent(e1), fake_agent(e2)
    before = samples(scrape(a2, 1.0))
    frame = H2 + H1 + b"\x08\x00" + b"x" * 100
    for _ in range(5):
        assert e2.open_from_wire(e1.seal_from_tap(frame, 1.0), 1.0) == frame
    sealed = e1.seal_from_tap(frame, 1.0)
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert e2.open_from_wire(forged, 1.0) is None
    s1, s2 = samples(scrape(a1, 31.0)), samples(scrape(a2, 31.0))
    assert s1[("l2crypt_frames_sealed_total", ())] == 6
    assert s1[("l2crypt_bytes_sealed_total", ())] == 6 * len(frame)
    assert s2[("l2crypt_frames_opened_total", ())] == 5
    assert s2[("l2crypt_bytes_opened_total", ())] == 5 * len(frame)
    assert before.get(("l2crypt_frames_dropped_total", (("reason", "bad_tag"),)), 0) == 0
    assert s2[("l2crypt_frames_dropped_total", (("reason", "bad_tag"),))] == 1
    assert s2[("l2crypt_key_age_seconds", (("peer", "02:00:00:00:00:01"),))] == 31.0
    assert s2[("l2crypt_key_pw_id", (("peer", "02:00:00:00:00:01"),))] == 1
    assert s2[("l2crypt_multicast_key_age_seconds", ())] == 31.0


def test_port_guard_counters_and_state():
    s = samples(scrape(fake_agent(FrameEngine(H1)), 0.0))
    assert s[("l2crypt_port_guard_frames_dropped_total", (("direction", "inbound"), ("port", "eth0")))] == 12
    assert s[("l2crypt_port_guard_frames_dropped_total", (("direction", "egress"), ("port", "eth0")))] == 3
    assert s[("l2crypt_port_guard_intact", (("port", "eth0"),))] == 1
    for state in ("missing", "altered"):
        gone = {"port_guard": state, "inbound_refused": None, "egress_blocked": None}
        s = samples(scrape(fake_agent(FrameEngine(H1), guard=gone), 0.0))
        assert s[("l2crypt_port_guard_intact", (("port", "eth0"),))] == 0
        assert not [k for k in s if k[0] == "l2crypt_port_guard_frames_dropped_total"]


def test_no_key_material_in_a_scrape():
    e1, e2 = engines()
    text = scrape(fake_agent(e1), 5.0)
    for secret in (PAIR_KEY, MCAST_KEY):
        assert secret.hex() not in text and secret.hex().upper() not in text
        assert repr(secret) not in text and secret.decode("latin-1") not in text


def test_key_client_times_requests():
    async def go():
        client = KeyClient(("ks1:7788", "ks2:7788"), None, H1, events=SimpleNamespace(
            on_key=lambda *a, **kw: None, on_unknown=lambda *a: None, on_key_refused=lambda *a: None))
        client.connected = True
        client._writer = SimpleNamespace(write=lambda data: None)
        assert client.request_key(H2)
        await asyncio.sleep(0.05)
        client._dispatch({"t": "key", "rid": client._rid, "peer_mac": H2, "peer_id": "h2",
                          "key": PAIR_KEY, "pw_id": 1})
        text = scrape(fake_agent(FrameEngine(H1), client), 0.0)
        return samples(text)

    s = asyncio.run(go())
    assert s[("l2crypt_key_request_duration_seconds_count", ())] == 1
    assert 0.04 <= s[("l2crypt_key_request_duration_seconds_sum", ())] < 5
    assert s[("l2crypt_key_request_duration_seconds_bucket", (("le", "0.025"),))] == 0


def test_key_client_counts_a_real_failover_and_fail_back(two_servers):
    """Two keyserverd on loopback: ks1 goes away (failover to ks2), comes back
    on its port and answers for the hold-down (fail-back); the scrape reads
    each move from the real key client."""
    ca, services, ctx = two_servers

    async def body():
        servers = [KeyServer(s, make_server_ssl_context(ca), "127.0.0.1", 0) for s in services]
        ports = [(await s.start())[1] for s in servers]
        events = Events()
        client = KeyClient(tuple(f"127.0.0.1:{p}" for p in ports), ctx, MAC_A, events,
                           probe_interval_s=0.05, probe_failures=2, failback_holddown_s=0.2)
        agent = fake_agent(FrameEngine(MAC_A), client)
        stop = asyncio.Event()
        task = asyncio.ensure_future(client.run(stop))
        seen = []
        try:
            await wait_until("ks1 in use", lambda: events.welcomes == ["ks1"] and client.connected, 5)
            seen.append(samples(scrape(agent, 0.0)))
            await servers[0].close()
            await wait_until("failover to ks2", lambda: events.welcomes[-1:] == ["ks2"] and client.connected, 5)
            seen.append(samples(scrape(agent, 0.0)))
            servers[0] = KeyServer(services[0], make_server_ssl_context(ca), "127.0.0.1", ports[0])
            await servers[0].start()
            await wait_until("fail-back to ks1", lambda: events.welcomes[-1:] == ["ks1"] and client.connected, 5)
            seen.append(samples(scrape(agent, 0.0)))
        finally:
            stop.set()
            task.cancel()
            for s in servers:
                await s.close()
        return seen

    first, after_failover, after_failback = asyncio.run(asyncio.wait_for(body(), 20))
    moves = [(s[("l2crypt_keyserver_failovers_total", ())], s[("l2crypt_keyserver_failbacks_total", ())],
              s[("l2crypt_keyserver_connects_total", ())], s[("l2crypt_keyserver_connected", ())])
             for s in (first, after_failover, after_failback)]
    assert moves == [(0, 0, 1, 1), (1, 0, 2, 1), (1, 1, 3, 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_serves_metrics_and_404():
    e1, _ = engines()
    agent = fake_agent(e1)

    async def go():
        registry = new_registry()
        registry.register(FunctionCollector(lambda: agent_metrics(agent, 0.0)))
        listen = f"127.0.0.1:{_free_port()}"
        server = await serve_metrics(listen, registry)
        try:
            def get(path):
                try:
                    with urllib.request.urlopen(f"http://{listen}{path}", timeout=5) as r:
                        return r.status, r.headers["Content-Type"], r.read().decode()
                except urllib.error.HTTPError as exc:
                    return exc.code, None, ""
            return (await asyncio.to_thread(get, "/metrics"), await asyncio.to_thread(get, "/nope"))
        finally:
            server.close()

    (code, ctype, body), (code404, _, _) = asyncio.run(go())
    assert code == 200 and ctype.startswith("text/plain") and "l2crypt_frames_sealed_total 0.0" in body
    assert code404 == 404
    assert asyncio.run(serve_metrics("", new_registry())) is None


@pytest.mark.parametrize("text", ["127.0.0.1", "eth0:80", "127.0.0.1:0", "127.0.0.1:70000", ":9478"])
def test_metrics_listen_rejects(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_metrics_listen_accepts():
    assert parse_listen("127.0.0.1:9478") == ("127.0.0.1", 9478)
    assert parse_listen("[::1]:9478") == ("::1", 9478)
    assert parse_listen("") is None


# --- logs -------------------------------------------------------------------------


def test_rate_limiter_counts_what_it_suppresses():
    limit = RateLimiter(10.0)
    assert limit.allow("a", now=0.0)
    assert not any(limit.allow("a", now=t) for t in (1.0, 2.0, 9.9))
    assert limit.allow("b", now=5.0)
    assert limit.allow("a", now=10.0) and limit.take_suppressed("a") == 3
    assert limit.take_suppressed("a") == 0


def test_a_flood_of_refusals_makes_one_line(tmp_path, caplog):
    from keyserverd.ca import CertificateAuthority
    from keyserverd.service import KeyService, Session
    from keyserverd.store.sqlite import SqliteStore

    store = SqliteStore.open(tmp_path / "ks.db", 0.0)
    service = KeyService(store, "aes-256-gcm", "ks", CertificateAuthority.open(tmp_path / "ca"))
    s = Session(identity="h3", peer="10.0.0.3:5555")
    with caplog.at_level(logging.INFO, logger="keyserverd"):
        for i in range(500):
            service.handle(s, {"t": "key_req", "rid": i + 1, "peer_mac": H2}, now=100.0 + i * 0.01)
        service.handle(s, {"t": "key_req", "rid": 999, "peer_mac": H2}, now=200.0)
    lines = [TextFormatter().format(r) for r in caplog.records if "request_refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "code=revoked" in lines[0] and "host=h3" in lines[0]  # h3 is not a host: refused as revoked
    assert "suppressed=499" in lines[1]
    assert service.refusals["revoked"] == 501
    store.close()


# --- status --watch ------------------------------------------------------------------


def test_watch_rates():
    peer = {"mac": "02:00:00:00:00:02", "id": "h2", "frames_in": 10, "frames_out": 20, "bytes_in": 1000,
            "bytes_out": 2000}
    before = {"peers": [peer], "counters": {"sealed": 20, "opened": 10, "bytes_sealed": 2000, "bytes_opened": 1000},
              "drops": {"bad_tag": 1}}
    after = {"peers": [dict(peer, frames_in=30, frames_out=20, bytes_in=5000)],
             "counters": {"sealed": 20, "opened": 30, "bytes_sealed": 2000, "bytes_opened": 5000},
             "drops": {"bad_tag": 3}}
    r = rates(before, after, 2.0)
    p = r["peers"]["02:00:00:00:00:02"]
    assert p["frames_in_per_s"] == 10 and p["frames_out_per_s"] == 0 and p["bytes_in_per_s"] == 2000
    assert r["total"]["opened_per_s"] == 10 and r["total"]["drops_per_s"] == 1
