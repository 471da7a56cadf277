"""keyserverd: the ID-IP table and the layer-3 requests (l3_hello, ip_bind,
ip_key_req, id_key_req, l3 rekey), without sockets."""

import ipaddress

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.errors import RemoteProtocolError
from l2crypt.core.ks_messages import decode_message, encode_message, unpack_peer_ips

NOW = 1_700_000_000.0
IP_A, IP_B, IP_C = bytes([10, 71, 0, 2]), bytes([10, 72, 0, 2]), bytes([10, 73, 0, 2])


@pytest.fixture
def env(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in ("a", "b", "c"):
        store.add_host(host_id, None, "host", hash_token("t.0123456789abcdef"), NOW + 60, NOW)
    # First come, first served (require_pinned_ips off); test_keyserver_claims.py covers pinning.
    yield KeyService(store, "aes-256-gcm", "ks-test", ca, require_pinned_ips=False), store
    store.close()


def call(service, session, msg):
    actions = service.handle(session, msg, NOW)
    for target, out in actions:
        if target != "close":
            assert decode_message(encode_message(out)) == out  # every answer is a valid message
    return actions


def reply(actions):
    [r] = [m for t, m in actions if t == "reply"]
    return r


def l3(service, host_id, ip):
    s = Session(host_id)
    assert reply(call(service, s, {"t": "l3_hello", "rid": 1}))["t"] == "l3_welcome"
    assert reply(call(service, s, {"t": "ip_bind", "rid": 2, "ip": ip}))["t"] == "ip_bound"
    return s


def test_ip_key_req_gives_the_pair_key_and_pushes_it_to_the_peer(env):
    service, _ = env
    a, _b = l3(service, "a", IP_A), l3(service, "b", IP_B)
    actions = call(service, a, {"t": "ip_key_req", "rid": 5, "peer_ip": IP_B})
    answer = reply(actions)
    assert (answer["t"], answer["peer_id"], answer["peer_ips"], answer["pw_id"]) == ("l3_key", "b", IP_B, 1)
    [(target, push)] = [(t, m) for t, m in actions if t != "reply"]
    assert target == ("push", "b") and push["peer_id"] == "a" and push["peer_ips"] == IP_A
    assert push["key"] == answer["key"]
    # nat mode: the peer finds the same key by the sender's ID.
    by_id = reply(call(service, _b, {"t": "id_key_req", "rid": 6, "peer_id": "a"}))
    assert by_id["key"] == answer["key"]


def test_one_ip_cannot_be_bound_to_two_ids(env):
    service, store = env
    l3(service, "a", IP_A)
    c = Session("c")
    call(service, c, {"t": "l3_hello", "rid": 1})
    err = reply(call(service, c, {"t": "ip_bind", "rid": 2, "ip": IP_A}))
    assert (err["t"], err["code"]) == ("error", "ip_conflict")
    assert store.host_id_by_ip(IP_A) == "a" and store.ips_of("c") == []


def test_l3_requests_need_l3_hello_and_never_give_foreign_pairs(env):
    service, _ = env
    l3(service, "b", IP_B)
    plain = Session("a")
    assert reply(call(service, plain, {"t": "ip_key_req", "rid": 1, "peer_ip": IP_B}))["code"] == "not_bound"
    a = l3(service, "a", IP_A)
    # Its own address, an unknown address, itself by ID, an unknown ID: no key.
    assert reply(call(service, a, {"t": "ip_key_req", "rid": 3, "peer_ip": IP_A}))["code"] == "bad_request"
    assert reply(call(service, a, {"t": "ip_key_req", "rid": 4, "peer_ip": IP_C}))["t"] == "l3_unknown"
    assert reply(call(service, a, {"t": "id_key_req", "rid": 5, "peer_id": "a"}))["t"] == "l3_unknown"
    assert reply(call(service, a, {"t": "id_key_req", "rid": 6, "peer_id": "zz"}))["t"] == "l3_unknown"
    # c exists but bound no address: it is no layer-3 peer.
    assert reply(call(service, a, {"t": "id_key_req", "rid": 7, "peer_id": "c"}))["t"] == "l3_unknown"
    # A rekey of a pair the requester is not in cannot be asked for.
    assert reply(call(service, a, {"t": "l3_rekey_req", "rid": 8, "peer_id": "b", "pw_id": 1}))["code"] == "bad_request"


def test_revoked_peer_is_unknown_and_its_revocation_is_pushed(env):
    service, store = env
    a, _ = l3(service, "a", IP_A), l3(service, "b", IP_B)
    store.revoke_host("b", NOW)
    assert reply(call(service, a, {"t": "ip_key_req", "rid": 3, "peer_ip": IP_B}))["t"] == "l3_unknown"
    [event] = store.events_since(0)
    pushes = service.on_event(event)
    assert (("broadcast", None), {"t": "l3_peer_revoked", "rid": 0, "peer_id": "b"}) in pushes


def test_rotation_is_pushed_to_both_l3_ends(env):
    service, store = env
    a, _ = l3(service, "a", IP_A), l3(service, "b", IP_B)
    call(service, a, {"t": "ip_key_req", "rid": 3, "peer_ip": IP_B})
    r = reply(call(service, a, {"t": "l3_rekey_req", "rid": 4, "peer_id": "b", "pw_id": 1}))
    assert r["pw_id"] == 2
    pushes = [(t, m) for e in store.events_since(0) for t, m in service.on_event(e)]
    l3_pushes = {t[1]: m for t, m in pushes if m["t"] == "l3_key"}
    assert set(l3_pushes) == {"a", "b"} and l3_pushes["a"]["pw_id"] == 2


def test_bad_bind_addresses_are_refused(env):
    service, _ = env
    s = Session("a")
    call(service, s, {"t": "l3_hello", "rid": 1})
    for ip in (bytes([127, 0, 0, 1]), bytes([224, 0, 0, 1]), bytes(4)):
        assert reply(call(service, s, {"t": "ip_bind", "rid": 2, "ip": ip}))["code"] == "bad_request"


@pytest.mark.parametrize("msg", [
    {"t": "ip_bind", "rid": 1, "ip": b"\x01\x02\x03"},
    {"t": "l3_key", "rid": 0, "peer_id": "a", "key": b"k" * 32, "pw_id": 1, "peer_ips": b"\x01\x02\x03\x04\x05"},
    {"t": "l3_key", "rid": 0, "peer_id": "a", "key": b"k" * 32, "pw_id": 1, "peer_ips": b""},
    {"t": "id_key_req", "rid": 1, "peer_id": "-bad"},
    {"t": "ip_bind", "rid": 1, "ip": b"\x01" * 15},
    {"t": "ip_key_req", "rid": 1, "peer_ip": b"\x01" * 17},
    {"t": "l3_key", "rid": 0, "peer_id": "a", "key": b"k" * 32, "pw_id": 1, "peer_ips": b"", "peer_ips6": b"\x01" * 15},
    {"t": "l3_key", "rid": 0, "peer_id": "a", "key": b"k" * 32, "pw_id": 1, "peer_ips": b"\x01" * 4 * 9,
     "peer_ips6": b"\x02" * 16 * 8},  # 17 addresses
])
def test_l3_messages_with_wrong_lengths_are_refused(msg):
    import msgpack

    body = msgpack.packb(msg, use_bin_type=True)
    with pytest.raises(RemoteProtocolError):
        decode_message(len(body).to_bytes(4, "big") + body)


IP6_A, IP6_B = bytes.fromhex("fd71" + "00" * 13 + "02"), bytes.fromhex("fd72" + "00" * 13 + "02")


def test_an_ipv6_address_binds_and_finds_its_owner_like_an_ipv4_one(env):
    service, store = env
    a = l3(service, "a", IP_A)
    assert reply(call(service, a, {"t": "ip_bind", "rid": 3, "ip": IP6_A}))["t"] == "ip_bound"
    b = l3(service, "b", IP6_B)  # b has an IPv6 address only
    c = Session("c")
    call(service, c, {"t": "l3_hello", "rid": 1})
    assert reply(call(service, c, {"t": "ip_bind", "rid": 2, "ip": IP6_A}))["code"] == "ip_conflict"
    answer = reply(call(service, a, {"t": "ip_key_req", "rid": 4, "peer_ip": IP6_B}))
    assert (answer["peer_id"], answer["peer_ips"], answer["peer_ips6"]) == ("b", b"", IP6_B)
    back = reply(call(service, b, {"t": "ip_key_req", "rid": 5, "peer_ip": IP6_A}))
    assert (back["peer_id"], back["key"]) == ("a", answer["key"])
    assert unpack_peer_ips(back) == [IP_A, IP6_A]
    assert store.ips_of("a") == [IP_A, IP6_A] and store.host_id_by_ip(IP6_B) == "b"


def test_ipv6_addresses_a_host_cannot_own_are_refused(env):
    service, _ = env
    s = Session("a")
    call(service, s, {"t": "l3_hello", "rid": 1})
    for text in ("::", "::1", "ff02::1", "fe80::1", "::ffff:10.71.0.2"):
        ip = ipaddress.ip_address(text).packed
        assert reply(call(service, s, {"t": "ip_bind", "rid": 2, "ip": ip}))["code"] == "bad_request", text
