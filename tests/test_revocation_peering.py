"""Revocations cross peering (issue 15, finding 2), over mutual TLS on 127.0.0.1:

    KS-X (hosts x*: x1, x2, ...)  <--- ext "revocations", polled --->  KS-Y (hosts y*: y1, y2)

A host revoked at X is dropped by Y's hosts: Y reads X's revoked list,
pushes ``peer_revoked``, names the MAC in its welcomes (also after a restart
of Y) and stops answering for the ID.  A peer's list is believed only for IDs
of its namespace and never for MACs of Y's own hosts."""

import msgpack
import pytest

from keyserverd.peering import revocations as rp
from keyserverd.revocations import RevocationBook, WelcomeRevocations
from keyserverd.service import KeyService, Session, revoke_and_rotate
from l2crypt.core.ks_messages import revoked_macs
from test_peer_key_theft import MACS, Server, closed, started
from test_peering import NOW, run

MACS.update({"x2": bytes.fromhex("0200000000a2")})


@pytest.fixture
def xyz(tmp_path):
    servers = (Server(tmp_path, "KS-X", ("x1", "x2")), Server(tmp_path, "KS-Y", ("y1", "y2")),
               Server(tmp_path, "KS-Z", ("z1",)))
    for s in servers:  # each keeps its book on disk, as keyserverd does
        s.book_path = tmp_path / s.name / "revocations.json"
        s.service.welcome_revocations = WelcomeRevocations(2 * s.service.key_max_age_s,
                                                           RevocationBook(s.book_path))
    yield servers
    for s in servers:
        s.store.close()


def syncs(*servers):
    pushed = {s.name: [] for s in servers}
    out = {}
    for s in servers:
        out[s.name] = rp.RevocationSync(s.peering, s.service, act=pushed[s.name].extend)
    return out, pushed


def welcome_of(server, host):
    [(_, msg)] = server.service.handle(Session(host), {"t": "hello", "rid": 1, "mac": MACS[host]}, NOW + 5)
    assert msg["t"] == "welcome", msg
    return msg


def test_a_host_revoked_at_x_is_dropped_by_the_hosts_of_y(xyz):
    x, y, z = xyz

    async def body():
        await started(x, y, z)
        sync, pushed = syncs(x, y, z)
        try:
            spec_x = next(p for p in y.peering.peers if p.address.endswith(str(x.port)))
            assert await sync["KS-Y"].sync_peer(spec_x) == 0  # nothing revoked yet
            revoke_and_rotate(x.store, "x1", NOW + 1)  # e.g. while Y was down
            assert await sync["KS-Y"].sync_peer(spec_x) == 1
            assert pushed["KS-Y"] == [(("broadcast", None), {"t": "peer_revoked", "rid": 0, "peer_mac": MACS["x1"]})]
            assert revoked_macs(welcome_of(y, "y1")) == [MACS["x1"]]
            # Y stops answering for x1 and on its behalf.
            session = Session("y1", bound_mac=MACS["y1"])
            found = (spec_x, {"t": "resolved", "id": "x1", "mac": MACS["x1"], "key": b"k" * 32, "pw_id": 1})
            assert y.service.answer_from_peer(session, 2, MACS["x1"], found, NOW)[0][1]["t"] == "unknown"
            asked = y.service.resolve_for_peer(MACS["y1"], "x1", spec_x, NOW)
            assert asked["t"] == "error" and asked["code"] == "forbidden"
            # The next poll finds the same version: nothing is pushed again.
            assert await sync["KS-Y"].sync_peer(spec_x) == 0 and len(pushed["KS-Y"]) == 1
            # A restarted Y still names x1 in its welcomes (the book is on disk).
            again = KeyService(y.store, "aes-256-gcm", "KS-Y", y.ca,
                               revocation_book=RevocationBook(y.book_path))
            [(_, msg)] = again.handle(Session("y2"), {"t": "hello", "rid": 1, "mac": MACS["y2"]}, NOW + 5)
            assert revoked_macs(msg) == [MACS["x1"]]
        finally:
            await closed(x, y, z)

    run(body)


def test_a_peer_cannot_revoke_hosts_that_are_not_its_own(xyz, monkeypatch):
    x, y, z = xyz
    monkeypatch.setattr(rp, "PAGE", 2)  # and every page is read

    async def body():
        await started(x, y, z)
        sync, pushed = syncs(x, y, z)
        try:
            # X lists Y's host y1, a "host" of its own with y2's MAC, one with
            # Z's host's ID, and its genuinely revoked x2 (and x3, x4 for paging).
            x.store.add_host("y1", bytes.fromhex("0200000000d1"), "host", b"x" * 32, 4e9, NOW)
            x.store.add_host("x-evil", MACS["y2"], "host", b"x" * 32, 4e9, NOW)
            x.store.add_host("z1", bytes.fromhex("0200000000d2"), "host", b"x" * 32, 4e9, NOW)
            for host_id, mac in (("x3", "0200000000a3"), ("x4", "0200000000a4")):
                x.store.add_host(host_id, bytes.fromhex(mac), "host", b"x" * 32, 4e9, NOW)
            for host_id in ("y1", "x-evil", "z1", "x2", "x3", "x4"):
                revoke_and_rotate(x.store, host_id, NOW + 1)
            spec_x = next(p for p in y.peering.peers if p.address.endswith(str(x.port)))
            assert await sync["KS-Y"].sync_peer(spec_x) == 3
            assert sorted(m["peer_mac"] for _, m in pushed["KS-Y"]) == [
                bytes.fromhex(m) for m in ("0200000000a2", "0200000000a3", "0200000000a4")]
            assert sync["KS-Y"].counters["refused"] == 3
            assert MACS["y2"] not in revoked_macs(welcome_of(y, "y1"))
            assert not y.store.is_revoked("y1")
        finally:
            await closed(x, y, z)

    run(body)


GOOD_VERSION = bytes(32)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"since": b""}), msgpack.packb({"since": b"", "after": 3}),
    msgpack.packb({"since": b"x" * 31, "after": ""}), msgpack.packb({"since": b"", "after": "-bad"}),
    msgpack.packb({"since": b"", "after": "", "x": 1}), b"\x00" * (rp.MAX_BODY + 1),
])
def test_malformed_requests_are_refused(body):
    with pytest.raises(ValueError):
        rp.decode_request(body)


@pytest.mark.parametrize("answer", [
    {"version": GOOD_VERSION[:31], "hosts": [], "more": False},
    {"version": GOOD_VERSION, "hosts": [], "more": 1},
    {"version": GOOD_VERSION, "hosts": [], "more": True},                       # more, but nothing
    {"version": GOOD_VERSION, "hosts": [["a", b"\x02" * 5]], "more": False},    # short MAC
    {"version": GOOD_VERSION, "hosts": [["b", b"\x02" * 6], ["a", b"\x02" * 6]], "more": False},  # order
    {"version": GOOD_VERSION, "hosts": [["a", b"\x02" * 6], ["a", b"\x02" * 6]], "more": False},  # twice
    {"version": GOOD_VERSION, "hosts": [["-a", b"\x02" * 6]], "more": False},
    {"version": GOOD_VERSION, "hosts": [["a" * 65, b"\x02" * 6]], "more": False},
    {"version": GOOD_VERSION, "hosts": [["a", b"\x02" * 6, 1]], "more": False},
    {"version": GOOD_VERSION, "hosts": [[f"h{i:04}", b"\x02" * 6] for i in range(rp.PAGE + 1)], "more": True},
    {"version": GOOD_VERSION, "hosts": {}, "more": False},
    {"version": GOOD_VERSION, "hosts": [], "more": False, "extra": 1},
])
def test_malformed_answers_are_refused(answer):
    with pytest.raises(ValueError):
        rp.decode_answer(msgpack.packb(answer, use_bin_type=True), "")


def test_answers_round_trip_and_pages_continue_after_the_last_id():
    hosts = [("a1", b"\x02" * 6), ("b2", b"\x04" * 6)]
    body = rp.encode_answer(rp.list_version(hosts), hosts, True)
    assert rp.decode_answer(body, "") == (rp.list_version(hosts), hosts, True)
    with pytest.raises(ValueError):
        rp.decode_answer(body, "a1")  # a page must start after the last ID already read
    assert rp.decode_request(rp.encode_request(b"", "a1")) == (b"", "a1")
    assert rp.list_version(hosts) != rp.list_version(hosts[:1])
