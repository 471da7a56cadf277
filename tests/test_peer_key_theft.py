"""Three peered key servers over mutual TLS on 127.0.0.1 (issue 15, finding 3):
a peer key server cannot take other peers' pair keys.

    KS-X (CA X, hosts x*)        KS-Y (CA Y, hosts y*)        KS-Z (CA Z, hosts z*)
       x1                           y1, y2                       z1
    each peered with both others: IDS=sha256:<their CA>@127.0.0.1:<port>

X turns hostile.  It talks to Y's peering port with its own, genuine peering
certificate and asks for pair keys of Y's hosts on behalf of IDs that are
not X's; and it answers Z's lookups for a MAC bound at Y."""

import asyncio
import ssl

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.peering import messages as pm
from keyserverd.peering import service as peer_service
from keyserverd.peering.channel import Peering, PeerSpec, peer_client_files
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from test_peering import NOW, free_port, pinned, run

MACS = {"x1": bytes.fromhex("0200000000a1"), "y1": bytes.fromhex("0200000000b1"),
        "y2": bytes.fromhex("0200000000b2"), "z1": bytes.fromhex("0200000000c1")}


class Server:
    def __init__(self, tmp_path, name: str, hosts: tuple[str, ...]):
        self.name = name
        self.ca = CertificateAuthority.open(tmp_path / name, ())
        self.store = SqliteStore.open(tmp_path / name / "keyserver.db", NOW)
        for host_id in hosts:
            self.store.add_host(host_id, MACS[host_id], "host", b"x" * 32, 4e9, NOW)
        self.service = KeyService(self.store, "aes-256-gcm", name, self.ca)
        self.service.peering_enabled = True
        self.port = free_port()
        self.peering: Peering | None = None

    def spec(self) -> PeerSpec:
        return PeerSpec.parse(f"{self.name[-1].lower()}*={self.ca.ca_fingerprint()}@127.0.0.1:{self.port}")

    def peer_with(self, *others: "Server") -> Peering:
        self.peering = Peering(self.ca, tuple(o.spec() for o in others), f"127.0.0.1:{self.port}")
        self.peering.register("resolve", lambda m, peer: self.service.resolve_for_peer(
            m["mac"], m["from_id"], peer, NOW))
        return self.peering

    def pairs(self) -> list[tuple[str, str]]:
        return self.store.pairs()


@pytest.fixture
def xyz(tmp_path):
    servers = (Server(tmp_path, "KS-X", ("x1",)), Server(tmp_path, "KS-Y", ("y1", "y2")),
               Server(tmp_path, "KS-Z", ("z1",)))
    yield servers
    for s in servers:
        s.store.close()


async def started(*servers):
    x, y, z = servers
    for me in servers:
        me.peer_with(*(o for o in servers if o is not me))
        await me.peering.start()
    for me in servers:
        await pinned(me.peering)


async def closed(*servers):
    for s in servers:
        if s.peering is not None:
            await s.peering.close()


async def as_peer(attacker: Server, victim: Server, msg: dict) -> dict:
    """``msg`` to ``victim``'s peering port over TLS with ``attacker``'s own
    peering certificate (what a hostile peer key server can always do)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=victim.ca.ca_cert_pem.decode())
    ctx.load_cert_chain(*peer_client_files(attacker.ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", victim.port, ssl=ctx,
                                                   server_hostname=KEYSERVER_TLS_NAME)
    try:
        writer.write(pm.encode_message(msg))
        frames = pm.FrameReader()
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the peer closed the connection without an answer"
            answers = frames.feed(data)
            if answers:
                return answers[0]
    finally:
        writer.close()


def resolve(mac: bytes, from_id: str, rid: int = 1) -> dict:
    return {"t": "resolve", "rid": rid, "mac": mac, "from_id": from_id, "hops": 0, "origin": []}


def test_x_gets_no_key_of_a_pair_of_y_and_z_nor_of_two_hosts_of_y(xyz):
    x, y, z = xyz

    async def body():
        await started(x, y, z)
        try:
            # Z's host z1 with Y's host y1: the pair lives at Y (y1 < z1).  X asks for it.
            stolen = await as_peer(x, y, resolve(MACS["y1"], "z1"))
            assert stolen["t"] == "error" and stolen["code"] == "forbidden" and "key" not in stolen, stolen
            # Y's own hosts y1 and y2.
            stolen = await as_peer(x, y, resolve(MACS["y1"], "y2"))
            assert stolen["t"] == "error" and stolen["code"] == "forbidden" and "key" not in stolen, stolen
            assert y.pairs() == []  # and no row was made for either
            # Z asking for z1 is answered with the key: the refusal is about who asks.
            legit = await as_peer(z, y, resolve(MACS["y1"], "z1"))
            assert legit["t"] == "resolved" and legit["id"] == "y1" and len(legit["key"]) == 32, legit
            assert y.pairs() == [("y1", "z1")]
            # X on behalf of its own host: answered (x1 < y1: X owns that pair, so no key from Y).
            own = await as_peer(x, y, resolve(MACS["y1"], "x1"))
            assert own["t"] == "resolved" and own["id"] == "y1" and "key" not in own, own
            assert y.service.refusals["peer_forbidden"] == 2
        finally:
            await closed(x, y, z)

    run(body)


def test_x_cannot_answer_for_a_mac_bound_at_y(xyz):
    x, y, z = xyz

    async def body():
        await started(x, y, z)
        forged_key = b"\xee" * 32
        try:
            # X answers every lookup as if it held the MAC, under Y's host ID.
            x.peering.register("resolve", lambda m, peer: {"t": "resolved", "id": "y1", "mac": m["mac"],
                                                           "key": forged_key, "pw_id": 1})
            session = Session("z1", bound_mac=MACS["z1"])
            found = await z.peering.resolve(MACS["y1"], "z1")
            assert found is not None and found[0].address == y.spec().address  # Y's answer, not X's
            [(_, answer)] = z.service.answer_from_peer(session, 7, MACS["y1"], found, NOW)
            assert answer["t"] == "key" and answer["peer_id"] == "y1" and answer["key"] != forged_key
            assert answer["key"] == y.store.get_or_create_pair_key("y1", "z1", NOW)[0]
            assert z.peering.counters["foreign_answers"] == 1
            # Now under an ID of its own: two peers answer for one MAC, and nobody wins.
            x.peering.register("resolve", lambda m, peer: {"t": "resolved", "id": "x9", "mac": m["mac"],
                                                           "key": forged_key, "pw_id": 1})
            assert await z.peering.resolve(MACS["y1"], "z1") is None
            assert z.peering.counters["conflicts"] == 1
            # A MAC only X claims, under an ID of its own: believed.
            unknown_mac = bytes.fromhex("0200000000f1")
            found = await z.peering.resolve(unknown_mac, "z1")
            assert found is not None and found[1]["id"] == "x9"
        finally:
            await closed(x, y, z)

    run(body)


def test_a_peer_cannot_fill_our_database_with_pair_rows(xyz, monkeypatch):
    x, y, z = xyz
    monkeypatch.setattr(peer_service, "MAX_IDS_PER_PEER", 5)
    monkeypatch.setattr(peer_service, "PEER_REQUEST_BURST", 12)
    y.service._init_peer_state()  # the smaller budget

    async def body():
        await started(x, y, z)
        try:
            # Z asks on behalf of made-up IDs of its namespace (above y1: Y owns
            # those pairs and makes a row for each), up to the cap.
            answers = [await as_peer(z, y, resolve(MACS["y1"], f"z-made-up-{i}", rid=i + 1)) for i in range(8)]
            assert [a["t"] for a in answers[:5]] == ["resolved"] * 5
            assert [a.get("code") for a in answers[5:]] == ["too_many"] * 3
            assert len(y.pairs()) == 5
            # An ID that has its row is still answered, until the rate limit.
            assert (await as_peer(z, y, resolve(MACS["y1"], "z-made-up-0", rid=20)))["t"] == "resolved"
            codes = [(await as_peer(z, y, resolve(MACS["y1"], "z-made-up-1", rid=30 + i))).get("code")
                     for i in range(6)]
            assert "rate_limited" in codes
            assert len(y.pairs()) == 5
            # X is not held back by Z's budget.
            assert (await as_peer(x, y, resolve(MACS["y1"], "x1", rid=50)))["t"] == "resolved"
        finally:
            await closed(x, y, z)

    run(body)


def test_a_key_from_a_peer_is_taken_only_for_a_pair_the_peer_owns(xyz):
    x, y, z = xyz
    session = Session("y1", bound_mac=MACS["y1"])
    spec_z, spec_x = z.spec(), x.spec()
    forged = b"\xee" * 32
    # y1 < z1: Y owns the pair; a key in Z's answer is ignored, Y's own is handed out.
    [(_, answer)] = y.service.answer_from_peer(session, 3, MACS["z1"], (spec_z, {
        "t": "resolved", "id": "z1", "mac": MACS["z1"], "key": forged, "pw_id": 9}), NOW)
    assert answer["t"] == "key" and answer["key"] != forged
    assert (answer["key"], answer["pw_id"]) == y.store.get_or_create_pair_key("y1", "z1", NOW)
    # x1 < y1: X owns the pair; an answer without its key gets nothing.
    [(_, answer)] = y.service.answer_from_peer(session, 4, MACS["x1"], (spec_x, {
        "t": "resolved", "id": "x1", "mac": MACS["x1"]}), NOW)
    assert answer["t"] == "unknown"
    # An answer naming one of our own hosts, or the requester, gets nothing.
    for own in ("y2", "y1"):
        [(_, answer)] = y.service.answer_from_peer(session, 5, MACS["x1"], (spec_x, {
            "t": "resolved", "id": own, "mac": MACS["x1"], "key": forged, "pw_id": 1}), NOW)
        assert answer["t"] == "unknown"
    assert ("y1", "y2") not in y.store.pairs()
