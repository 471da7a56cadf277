"""A host that missed a revocation push learns it from its next welcome
(issue 15, finding 2), without sockets.

    hosts a, b, c at one key server; c is revoked while a is not connected;
    a's next hello gets a welcome naming c's MAC (``revoked_macs``) and the
    longest it may use a pair key (``key_max_age_s``)."""

import pytest

from keyserverd.revocations import RevocationBook, WelcomeRevocations
from keyserverd.service import KeyService, Session, revoke_and_rotate
from l2crypt.core.errors import LocalError, RemoteProtocolError
from l2crypt.core.ks_messages import MAX_REVOKED_MACS, decode_body, encode_body, revoked_macs
from test_keyserver_service import MAC_A, MAC_B, MAC_C, NOW, bound, call, env, reply  # noqa: F401

MAC_P1 = bytes.fromhex("025000000001")


def welcome(service, host, mac, now=NOW):
    out = reply(service.handle(Session(host), {"t": "hello", "rid": 1, "mac": mac}, now))
    assert out["t"] == "welcome", out
    encode_body(out)
    return out


def run_events(service, store, seq):
    """What ``KeyServer.run_events`` does with the events after ``seq``."""
    return [a for e in store.events_since(seq) for a in service.on_event(e)]


def test_a_welcome_names_hosts_revoked_while_the_host_was_away(env):
    service, store = env
    for host, mac in (("a", MAC_A), ("b", MAC_B), ("c", MAC_C)):
        bound(service, host, mac)
    store.get_or_create_pair_key("a", "c", NOW)
    seq = store.last_event_seq()
    revoke_and_rotate(store, "c", NOW + 1)  # a is not connected: the push never reaches it
    run_events(service, store, seq)
    got = welcome(service, "a", MAC_A)
    assert revoked_macs(got) == [MAC_C]
    assert got["key_max_age_s"] == 2 * 3600  # twice rekey_after_s
    assert revoked_macs(welcome(service, "b", MAC_B)) == [MAC_C]
    # The revoked host itself gets no welcome at all.
    assert reply(call(service, Session("c"), {"t": "hello", "rid": 1, "mac": MAC_C}))["code"] == "revoked"


def test_the_welcome_list_follows_revocation_events_and_its_window(env):
    service, store = env
    for host, mac in (("a", MAC_A), ("b", MAC_B), ("c", MAC_C)):
        bound(service, host, mac)
    assert revoked_macs(welcome(service, "a", MAC_A)) == []  # cached now
    seq = store.last_event_seq()
    revoke_and_rotate(store, "b", NOW + 1)
    revoke_and_rotate(store, "c", NOW + 2)
    run_events(service, store, seq)  # the cache is rebuilt
    assert revoked_macs(welcome(service, "a", MAC_A)) == [MAC_C, MAC_B]  # newest first
    # Older than twice key_max_age_s: no key an agent holds can be c's or b's any more.
    window = 2 * service.key_max_age_s
    assert revoked_macs(welcome(service, "a", MAC_A, now=NOW + 1 + window + 10)) == []


def test_the_list_is_capped_newest_first(tmp_path, env, caplog):
    service, store = env
    for i in range(MAX_REVOKED_MACS + 10):
        store.add_host(f"x{i}", bytes.fromhex("02aa") + i.to_bytes(4, "big"), "host", b"t" * 32, 4e9, NOW)
        store.revoke_host(f"x{i}", NOW + i / 1000)
    names = WelcomeRevocations(10 * 86400).macs(store, NOW + 100)
    assert len(names) == 6 * MAX_REVOKED_MACS
    assert names[:6] == bytes.fromhex("02aa") + (MAX_REVOKED_MACS + 9).to_bytes(4, "big")
    assert "welcome_revocations_truncated" in caplog.text
    # It still fits one message (64 KiB) with everything else of a welcome.
    bound(service, "a", MAC_A)
    service.welcome_revocations = WelcomeRevocations(10 * 86400)
    out = reply(call(service, Session("a"), {"t": "hello", "rid": 1, "mac": MAC_A}))
    assert len(out["revoked_macs"]) == 6 * MAX_REVOKED_MACS
    assert decode_body(encode_body(out)) == out


def test_the_macs_of_a_revoked_gateway_are_named_too_and_survive_a_restart(tmp_path, env):
    service, store = env
    book_path = tmp_path / "revocations.json"
    service.welcome_revocations = WelcomeRevocations(2 * service.key_max_age_s, RevocationBook(book_path))
    store.add_host("gw", None, "gateway", b"t" * 32, 4e9, NOW)
    gw = Session("gw")
    assert reply(call(service, gw, {"t": "hello", "rid": 1, "mac": bytes.fromhex("02000000009a")}))["t"] == "welcome"
    assert reply(call(service, gw, {"t": "map_req", "rid": 2, "mac": MAC_P1, "side": "plain"}))["t"] == "mapped"
    seq = store.last_event_seq()
    revoke_and_rotate(store, "gw", NOW + 1)
    pushes = [m["peer_mac"] for _, m in run_events(service, store, seq) if m.get("t") == "peer_revoked"]
    assert sorted(pushes) == sorted([bytes.fromhex("02000000009a"), MAC_P1])
    assert sorted(revoked_macs(welcome(service, "a", MAC_A))) == sorted(pushes)
    assert book_path.stat().st_mode & 0o077 == 0
    # A restarted key server has forgotten the map (it lives in memory), not the revocation.
    again = KeyService(store, "aes-256-gcm", "ks-test", service.ca, revocation_book=RevocationBook(book_path))
    assert sorted(revoked_macs(welcome(again, "b", MAC_B))) == sorted(pushes)


def test_welcome_revoked_macs_on_the_wire():
    base = {"t": "welcome", "rid": 1, "id": "a", "mac": MAC_A, "cipher": "aes-256-gcm",
            "multicast_key": bytes(32), "multicast_pw_id": 1, "server": "ks"}
    assert revoked_macs(decode_body(encode_body(base))) == []  # an older server sends neither field
    full = dict(base, key_max_age_s=7200, revoked_macs=MAC_B + MAC_C)
    assert revoked_macs(decode_body(encode_body(full))) == [MAC_B, MAC_C]
    for bad in (MAC_B[:5], MAC_B * (MAX_REVOKED_MACS + 1)):
        with pytest.raises(LocalError):
            encode_body(dict(base, revoked_macs=bad))
    import msgpack
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(dict(base, revoked_macs=MAC_B + b"\x01"), use_bin_type=True))
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(dict(base, key_max_age_s=-1), use_bin_type=True))
