"""keyserverd: MACs mapped to gateways (ID_X86 / NETID) and NETKEY handed to gateways."""

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.ks_messages import encode_message

NOW = 1_700_000_000.0
MAC_H1 = bytes.fromhex("020000000001")
MAC_H2 = bytes.fromhex("020000000002")
MAC_GW = bytes.fromhex("0200000000aa")
MAC_P1 = bytes.fromhex("025000000001")


class Book:
    def versions(self):
        return [(1, b"1" * 32), (2, b"2" * 32)]


@pytest.fixture
def env(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id, mac, role in (("h1", MAC_H1, "host"), ("h2", MAC_H2, "host"), ("gw", None, "gateway")):
        store.add_host(host_id, mac, role, hash_token("t"), NOW + 60, NOW)
    service = KeyService(store, "aes-256-gcm", "ks-test", ca)
    sessions = {}
    for host_id, mac in (("h1", MAC_H1), ("h2", MAC_H2), ("gw", MAC_GW)):
        sessions[host_id] = Session(identity=host_id)
        assert call(service, sessions[host_id], {"t": "hello", "rid": 1, "mac": mac})[0][1]["t"] == "welcome"
    yield service, store, sessions
    store.close()


def call(service, session, msg):
    actions = service.handle(session, msg, NOW)
    for target, out in actions:
        if target != "close":
            encode_message(out)
    return actions


def replies(actions):
    return [m for t, m in actions if t == "reply"]


def test_mapped_mac_gets_the_pair_key_with_the_gateway(env):
    service, store, s = env
    (ans,) = replies(call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": MAC_P1, "side": "plain"}))
    assert ans == {"t": "mapped", "rid": 2, "mac": MAC_P1, "side": "plain"}
    actions = call(service, s["h1"], {"t": "key_req", "rid": 3, "peer_mac": MAC_P1})
    (key,) = replies(actions)
    assert (key["t"], key["peer_mac"], key["peer_id"]) == ("key", MAC_P1, "gw")
    push = [m for t, m in actions if t == ("push", "gw")]
    assert push[0]["peer_mac"] == MAC_H1 and push[0]["key"] == key["key"]
    # The gateway asks by the host's MAC and gets the same key.
    (gw_key,) = replies(call(service, s["gw"], {"t": "key_req", "rid": 4, "peer_mac": MAC_H1}))
    assert gw_key["key"] == key["key"] and gw_key["pw_id"] == key["pw_id"]
    # The gateway never gets a key "with itself" for a MAC it speaks for.
    (unknown,) = replies(call(service, s["gw"], {"t": "key_req", "rid": 5, "peer_mac": MAC_P1}))
    assert unknown["t"] == "unknown"
    # A restarted gateway gets its MACs back.
    assert replies(call(service, s["gw"], {"t": "map_list", "rid": 6})) == [
        {"t": "mapped", "rid": 6, "mac": MAC_P1, "side": "plain"}]


def test_a_mac_bound_to_an_enrolled_host_is_never_mapped(env):
    service, store, s = env
    (err,) = replies(call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": MAC_H2, "side": "plain"}))
    assert (err["t"], err["code"]) == ("error", "mac_bound")
    (key,) = replies(call(service, s["h1"], {"t": "key_req", "rid": 3, "peer_mac": MAC_H2}))
    assert key["peer_id"] == "h2"


@pytest.mark.parametrize("msg, code", [
    ({"t": "map_req", "rid": 2, "mac": MAC_P1, "side": "plain"}, "forbidden"),
    ({"t": "netkey_req", "rid": 2}, "forbidden"),
    ({"t": "map_list", "rid": 2}, "forbidden"),
])
def test_gateway_requests_are_for_gateways_only(env, msg, code):
    service, store, s = env
    (err,) = replies(call(service, s["h1"], msg))
    assert (err["t"], err["code"]) == ("error", code)


@pytest.mark.parametrize("side", ["", "tunnel:", "uplink", "tunnel:a b", "tunnel:" + "x" * 40])
def test_bad_sides_are_refused(env, side):
    service, store, s = env
    (err,) = replies(call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": MAC_P1, "side": side}))
    assert err["code"] == "bad_request"


def test_netkey_only_when_peered(env):
    service, store, s = env
    (err,) = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 2}))
    assert err["code"] == "no_netkey"
    service.netkeys = Book()
    got = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 3}))
    assert [(m["t"], m["pw_id"]) for m in got] == [("netkey", 1), ("netkey", 2)]
    pushes = service.netkey_pushes(3, b"3" * 32)
    assert [t for t, _ in pushes] == [("push", "gw")]


def test_rotation_of_a_gateway_pair_reaches_the_host_under_mapped_macs(env):
    service, store, s = env
    call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": MAC_P1, "side": "plain"})
    call(service, s["h1"], {"t": "key_req", "rid": 3, "peer_mac": MAC_P1})
    pw_id = store.rotate_pair_key("h1", "gw", NOW + 1)
    (event,) = [e for e in store.events_since(0) if e.kind == "pair"]
    to_h1 = [m["peer_mac"] for t, m in service.on_event(event) if t == ("push", "h1")]
    assert sorted(to_h1) == sorted([MAC_GW, MAC_P1]) and pw_id == 2
