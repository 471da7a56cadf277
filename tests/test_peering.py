"""Peering of key servers over mutual TLS on 127.0.0.1 (cascaded switches):

    host a1 -- KS-A (CA A) <--- mutual TLS, pinned CA fingerprints ---> KS-B (CA B) -- host b1

Each server asks the other for the MACs it does not hold; both ends of a
cross-server pair get the same key; requests never loop; only the configured
peer key servers are trusted."""

import asyncio
import socket
import ssl

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.peering.channel import Peering, PeerSpec
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from test_keyserver_tls import new_identity

MAC_A1 = bytes.fromhex("020000000a01")
MAC_B1 = bytes.fromhex("020000000b01")
NOW = 1_700_000_000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Side:
    def __init__(self, tmp_path, name, host_id, mac):
        self.ca = CertificateAuthority.open(tmp_path / name, ())
        self.store = SqliteStore.open(tmp_path / name / "keyserver.db", NOW)
        self.store.add_host(host_id, mac, "host", b"x" * 32, 4e9, NOW)
        self.service = KeyService(self.store, "aes-256-gcm", name, self.ca)
        self.service.peering_enabled = True
        self.ids = host_id[0] + "*"  # its namespace: a* at KS-A, b* at KS-B
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"


@pytest.fixture
def sides(tmp_path):
    a = Side(tmp_path, "ks-a", "a1", MAC_A1)
    b = Side(tmp_path, "ks-b", "b1", MAC_B1)
    yield a, b
    a.store.close()
    b.store.close()


def make_peering(side, other, fingerprint=None):
    spec = PeerSpec.parse(f"{other.ids}={fingerprint or other.ca.ca_fingerprint()}@{other.address}")
    p = Peering(side.ca, (spec,), side.address, request_timeout_s=3.0)
    p.register("resolve", lambda m, peer: side.service.resolve_for_peer(m["mac"], m["from_id"], peer, NOW))
    return p


async def pinned(p, timeout_s=15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(p.pinned) < len(p.peers):
        assert loop.time() < deadline, "peer CA not pinned in time"
        await asyncio.sleep(0.05)


def run(body):
    asyncio.run(asyncio.wait_for(body(), 60))


def test_both_ends_of_a_cross_server_pair_get_one_key(sides):
    a, b = sides

    async def body():
        pa, pb = make_peering(a, b), make_peering(b, a)
        await pa.start()
        await pb.start()
        try:
            await pinned(pa)
            await pinned(pb)
            # a1 asks KS-A for b1's MAC: KS-A does not hold it, so it asks KS-B.
            session_a = Session("a1", bound_mac=MAC_A1)
            actions = a.service.handle(session_a, {"t": "key_req", "rid": 5, "peer_mac": MAC_B1}, NOW)
            assert actions == [(("peer_resolve", None), {"rid": 5, "peer_mac": MAC_B1})]
            found = await pa.resolve(MAC_B1, "a1")
            assert found[0] is pa.peers[0]
            assert found[1]["id"] == "b1" and "key" not in found[1]  # the pair lives with a1's server
            [(target, key_a)] = a.service.answer_from_peer(session_a, 5, MAC_B1, found, NOW)
            assert target == "reply" and key_a["t"] == "key" and key_a["peer_id"] == "b1"
            # b1 asks KS-B for a1's MAC: KS-A owns the pair and hands out the same key.
            found = await pb.resolve(MAC_A1, "b1")
            [(_, key_b)] = b.service.answer_from_peer(Session("b1", bound_mac=MAC_B1), 6, MAC_A1, found, NOW)
            assert (key_b["key"], key_b["pw_id"], key_b["peer_id"]) == (key_a["key"], key_a["pw_id"], "a1")
            # A MAC nobody holds is unknown everywhere.
            assert await pa.resolve(bytes.fromhex("020000000c01"), "a1") is None
            assert pb.counters["requests_in"] == 2 and pa.counters["requests_in"] == 1
        finally:
            await pa.close()
            await pb.close()

    run(body)


def test_requests_that_passed_a_server_are_refused_and_never_forwarded(sides):
    a, b = sides

    async def body():
        pa, pb = make_peering(a, b), make_peering(b, a)
        await pa.start()
        await pb.start()
        try:
            await pinned(pa)
            spec = pa.peers[0]
            looped = {"t": "resolve", "rid": 3, "mac": MAC_B1, "from_id": "a1", "hops": 0,
                      "origin": [pa.name, pb.name]}
            assert (await pa.ask(spec, looped))["code"] == "loop"
            hopped = dict(looped, origin=[pa.name], hops=1)
            assert (await pa.ask(spec, hopped))["code"] == "loop"
            # B does not hold a1's MAC and does not ask anyone else: plain unknown.
            plain = dict(looped, mac=MAC_A1, origin=[pa.name])
            assert (await pa.ask(spec, plain)) == {"t": "unknown", "rid": 3, "mac": MAC_A1}
            assert pa.counters["requests_in"] == 0
        finally:
            await pa.close()
            await pb.close()

    run(body)


def test_only_configured_peer_key_servers_are_trusted(sides, tmp_path):
    a, b = sides

    async def body():
        wrong = "sha256:" + "0" * 64
        pa = make_peering(a, b, fingerprint=wrong)  # A expects some other CA at B's address
        pb = make_peering(b, a)
        await pa.start()
        await pb.start()
        try:
            await pinned(pb)
            await asyncio.sleep(1.5)
            assert pa.pinned == {}, "a CA with another fingerprint must not be pinned"
            assert await pa.resolve(MAC_B1, "a1") is None
            # A host certificate of a trusted CA (A's) is not a key server: refused.
            key_path, csr = new_identity(tmp_path, "a1")
            (tmp_path / "a1.crt").write_bytes(a.ca.sign_csr(csr, "a1"))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=b.ca.ca_cert_pem.decode())
            ctx.load_cert_chain(tmp_path / "a1.crt", key_path)
            from keyserverd.peering import messages as pm
            r, w = await asyncio.open_connection("127.0.0.1", b.port, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME)
            w.write(pm.encode_message({"t": "resolve", "rid": 1, "mac": MAC_B1, "from_id": "a1", "hops": 0,
                                       "origin": []}))
            answer = pm.FrameReader().feed(await asyncio.wait_for(r.read(65536), 5))[0]
            assert answer["code"] == "unauthenticated"
            w.close()
        finally:
            await pa.close()
            await pb.close()

    run(body)


def test_garbage_at_one_peer_address_does_not_stop_pinning_the_others(sides, tmp_path):
    """A listener that answers ``ca`` with something that is not a certificate."""
    a, b = sides
    from keyserverd.peering import messages as pm

    async def garbage(reader, writer):
        await reader.read(65536)
        writer.write(pm.encode_message({"t": "ca_cert", "rid": 1, "cert": b"not a certificate"}))
        await writer.drain()
        writer.close()

    async def body():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(b.ca.server_cert_path, b.ca.server_key_path)
        bogus_port = free_port()
        bogus = await asyncio.start_server(garbage, "127.0.0.1", bogus_port, ssl=ctx)
        specs = (PeerSpec.parse(f"c*=sha256:{'1' * 64}@127.0.0.1:{bogus_port}"),
                 PeerSpec.parse(f"{b.ids}={b.ca.ca_fingerprint()}@{b.address}"))
        pa = Peering(a.ca, specs, a.address)
        pb = make_peering(b, a)
        await pa.start()
        await pb.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while b.ca.ca_fingerprint() not in pa.pinned:
                assert loop.time() < deadline, "B was never pinned after the garbage answer"
                await asyncio.sleep(0.05)
            assert specs[0].ca_fingerprint not in pa.pinned
        finally:
            await pa.close()
            await pb.close()
            bogus.close()

    run(body)


def test_peer_specs_name_their_host_ids_and_never_overlap():
    fp1, fp2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    spec = PeerSpec.parse(f"b-*,h3={fp1}@192.0.2.2:7790")
    assert spec.ids == ("b-*", "h3") and spec.ca_fingerprint == fp1 and spec.address == "192.0.2.2:7790"
    assert spec.owns("b-web1") and spec.owns("h3") and not spec.owns("h30") and not spec.owns("a-b-1")
    assert PeerSpec.parse(str(spec)) == spec
    from keyserverd.peering.spec import check_peers
    for bad in (f"{fp1}@192.0.2.2:7790",                       # which IDs?
                f"={fp1}@192.0.2.2:7790", f"*={fp1}@192.0.2.2:7790", f"-x*={fp1}@192.0.2.2:7790",
                f"a b={fp1}@192.0.2.2:7790", f"b-*={fp1}@192.0.2.2:99999", f"b-*=md5:00@192.0.2.2:7790"):
        with pytest.raises(ValueError):
            PeerSpec.parse(bad)
    for peers in ([f"b-*={fp1}@192.0.2.2:7790", f"b-x*={fp2}@192.0.2.3:7790"],   # b-x1 is both
                  [f"h3={fp1}@192.0.2.2:7790", f"h*={fp2}@192.0.2.3:7790"],
                  [f"a1={fp1}@192.0.2.2:7790", f"a1={fp2}@192.0.2.3:7790"],
                  [f"a*={fp1}@192.0.2.2:7790", f"b*={fp1}@192.0.2.3:7790"]):     # one CA twice
        with pytest.raises(ValueError):
            check_peers(peers)
    assert len(check_peers([f"b-*={fp1}@192.0.2.2:7790", f"c-*,h3={fp2}@192.0.2.3:7790"])) == 2
