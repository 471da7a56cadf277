"""keyserverd: MACs mapped to gateways (ID_X86 / NETID) and the tunnel link keys handed to gateways."""

import pytest

from keyserverd import service as S
from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.errors import LocalError
from l2crypt.core.ks_messages import encode_message
from l2crypt.core.tunnel_keys import Endpoint, link_keys

PEER_CA = "sha256:" + "b" * 64  # the NETKEY peer server's CA

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
    ({"t": "netkey_req", "rid": 2, "peer_id": "gB"}, "forbidden"),
    ({"t": "map_release", "rid": 2, "mac": MAC_P1}, "forbidden"),
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
    (err,) = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 2, "peer_id": "gB"}))
    assert err["code"] == "no_netkey"
    service.netkeys, service.netkey_peer_ca = Book(), PEER_CA
    got = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 3, "peer_id": "gB"}))
    assert [(m["t"], m["peer_id"], m["pw_id"]) for m in got] == [("netkey", "gB", 1), ("netkey", "gB", 2)]
    pushes = service.netkey_pushes(3, b"3" * 32)
    assert [(t, m["peer_id"], m["pw_id"]) for t, m in pushes] == [(("push", "gw"), "gB", 3)]


def _link(service, gw_id: str, peer_id: str, netkey: bytes, pw_id: int) -> tuple[bytes, bytes]:
    return link_keys(netkey, pw_id, Endpoint(service.ca.ca_fingerprint(), gw_id), Endpoint(PEER_CA, peer_id))


def test_a_gateway_gets_only_the_keys_of_its_own_links_never_netkey(env):
    """Finding 8 (issue 15): with NETKEY, every gateway could seal datagrams under any
    other gateway's sender tag.  Now the key server keeps NETKEY and hands a gateway
    the two keys of each link it is an end of, as the server authenticated it."""
    service, store, s = env
    store.add_host("gw2", None, "gateway", hash_token("t"), NOW + 60, NOW)
    s["gw2"] = Session(identity="gw2")
    call(service, s["gw2"], {"t": "hello", "rid": 1, "mac": bytes.fromhex("0200000000bb")})
    service.netkeys, service.netkey_peer_ca = Book(), PEER_CA
    (err,) = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 2}))
    assert err["code"] == "bad_request" and "peer_id" in err["msg"]  # an old gateway is told why
    got = {}
    for name in ("gw", "gw2"):
        for peer in ("gB", "gw", "gw2"):
            for m in replies(call(service, s[name], {"t": "netkey_req", "rid": 3, "peer_id": peer})):
                got[(name, peer, m["pw_id"])] = (m["send_key"], m["recv_key"])
                assert set(m) == {"t", "rid", "peer_id", "pw_id", "send_key", "recv_key"}
    netkeys = [key for _, key in Book().versions()]
    assert not {k for pair in got.values() for k in pair} & set(netkeys)  # NETKEY never leaves the server
    for (name, peer, pw_id), keys in got.items():
        assert keys == _link(service, name, peer, dict(Book().versions())[pw_id], pw_id)
    # gw's keys toward gB are not gw2's: neither can seal what gB would take as from the other.
    assert got[("gw", "gB", 2)][0] != got[("gw2", "gB", 2)][0]
    # Asking "as a peer" gives nothing of another local gateway: the link (us, gw2@peer segment)
    # is not gw2's link to anyone.
    all_keys_of_gw = {k for (name, _, _), pair in got.items() if name == "gw" for k in pair}
    all_keys_of_gw2 = {k for (name, _, _), pair in got.items() if name == "gw2" for k in pair}
    assert not all_keys_of_gw & all_keys_of_gw2
    # gB's server (its own CA first) hands gB the same two keys, the other way round.
    assert _link(service, "gw", "gB", b"2" * 32, 2) == tuple(reversed(link_keys(
        b"2" * 32, 2, Endpoint(PEER_CA, "gB"), Endpoint(service.ca.ca_fingerprint(), "gw"))))


def test_tunnel_peers_per_gateway_are_capped(env):
    service, store, s = env
    service.netkeys, service.netkey_peer_ca = Book(), PEER_CA
    for i in range(S.MAX_TUNNEL_PATHS):
        assert replies(call(service, s["gw"], {"t": "netkey_req", "rid": 2, "peer_id": f"p{i}"}))[0]["t"] == "netkey"
    (err,) = replies(call(service, s["gw"], {"t": "netkey_req", "rid": 3, "peer_id": "one-more"}))
    assert err["code"] == "too_many"
    assert len(service.netkey_pushes(3, b"3" * 32)) == S.MAX_TUNNEL_PATHS


def test_map_release_frees_the_mac_for_the_gateway_that_holds_it_only(env):
    """Finding 7 (issue 15): a gateway's aged-out MACs are released, so they stop counting
    toward its limit; another gateway cannot release them."""
    service, store, s = env
    service.macs.max_per_gateway = 2
    store.add_host("gw2", None, "gateway", hash_token("t"), NOW + 60, NOW)
    s["gw2"] = Session(identity="gw2")
    call(service, s["gw2"], {"t": "hello", "rid": 1, "mac": bytes.fromhex("0200000000bb")})
    macs = [bytes.fromhex(f"0250000000{i:02x}") for i in range(3)]
    for mac in macs[:2]:
        assert replies(call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": mac, "side": "plain"}))[0]["t"] == "mapped"
    (err,) = replies(call(service, s["gw"], {"t": "map_req", "rid": 3, "mac": macs[2], "side": "plain"}))
    assert err["code"] == "too_many"
    (ans,) = replies(call(service, s["gw2"], {"t": "map_release", "rid": 4, "mac": macs[0]}))
    assert ans == {"t": "unmapped", "rid": 4, "mac": macs[0]} and service.macs.owner(macs[0]) == "gw"
    (ans,) = replies(call(service, s["gw"], {"t": "map_release", "rid": 5, "mac": macs[0]}))
    assert ans["t"] == "unmapped" and service.macs.owner(macs[0]) is None
    assert replies(call(service, s["gw"], {"t": "map_req", "rid": 6, "mac": macs[2], "side": "plain"}))[0]["t"] == "mapped"
    assert [m for m, _ in service.macs.macs_of("gw")] == sorted(macs[1:])


def test_rotation_of_a_gateway_pair_reaches_the_host_under_mapped_macs(env):
    service, store, s = env
    call(service, s["gw"], {"t": "map_req", "rid": 2, "mac": MAC_P1, "side": "plain"})
    call(service, s["h1"], {"t": "key_req", "rid": 3, "peer_mac": MAC_P1})
    pw_id = store.rotate_pair_key("h1", "gw", NOW + 1)
    (event,) = [e for e in store.events_since(0) if e.kind == "pair"]
    to_h1 = [m["peer_mac"] for t, m in service.on_event(event) if t == ("push", "h1")]
    assert sorted(to_h1) == sorted([MAC_GW, MAC_P1]) and pw_id == 2


def test_each_path_of_a_link_gets_its_own_keys_and_its_own_pushes(env):
    """Issue 17: a link over several paths gets one key pair per path (path 0 keeps the
    one-path key), pushed per path on a NETKEY rotation; a path outside 0-15 is refused."""
    service, store, s = env
    service.netkeys, service.netkey_peer_ca = Book(), PEER_CA
    got = {}
    for path in (0, 1, 2):
        req = {"t": "netkey_req", "rid": 2, "peer_id": "gB"} | ({"path": path} if path else {})
        for ans in replies(call(service, s["gw"], req)):
            assert ans["t"] == "netkey" and ans.get("path", 0) == path
            got[(path, ans["pw_id"])] = (ans["send_key"], ans["recv_key"])
    pw_ids = {pw for _, pw in got}
    for pw in pw_ids:
        assert len({got[(p, pw)] for p in (0, 1, 2)}) == 3  # no two paths share a key
    netkey = dict(service.netkeys.versions())[max(pw_ids)]
    assert got[(0, max(pw_ids))] == _link(service, "gw", "gB", netkey, max(pw_ids))
    me, peer = Endpoint(service.ca.ca_fingerprint(), "gw"), Endpoint(PEER_CA, "gB")
    assert got[(2, max(pw_ids))] == link_keys(netkey, max(pw_ids), me, peer, path=2)
    pushes = service.netkey_pushes(9, b"9" * 32)
    assert sorted(m.get("path", 0) for _, m in pushes) == [0, 1, 2]
    with pytest.raises(LocalError, match="netkey_req.path: 16, want 0-15"):
        encode_message({"t": "netkey_req", "rid": 3, "peer_id": "gB", "path": 16})
