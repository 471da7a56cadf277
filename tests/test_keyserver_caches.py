"""The per-worker caches of keyserverd (``host_cache``, ``OpenedPairKeys``):
what another worker or the CLI writes through its own store handle is seen by
the next request, on a real SQLite file."""

import secrets

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store.kek import pair_aad
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token

NOW = 1_700_000_000.0
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")


@pytest.fixture
def env(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in ("a", "b", "c"):
        store.add_host(host_id, None, "host", hash_token("t"), NOW + 60, NOW)
    service = KeyService(store, "chacha20-poly1305", "ks-test", ca, rekey_after_s=3600)
    other = SqliteStore.open(tmp_path / "keyserver.db", NOW)  # another worker's (or the CLI's) handle
    yield service, store, other
    other.close()
    store.close()


def request(service, store, session, msg):
    """One request as the server runs it: inside a store group."""
    with store.group():
        service.begin_group()
        try:
            actions = service.handle(session, msg, NOW)
        finally:
            service.end_group()
    return [out for target, out in actions if target == "reply"][0]


def hello(service, store, host_id, mac):
    session = Session(identity=host_id)
    assert request(service, store, session, {"t": "hello", "rid": 1, "mac": mac})["t"] == "welcome"
    return session


def key_req(service, store, session, peer_mac):
    return request(service, store, session, {"t": "key_req", "rid": 2, "peer_mac": peer_mac})


def test_a_requester_revoked_by_another_handle_is_refused_at_its_next_request(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    assert key_req(service, store, a, MAC_B)["t"] == "key"
    hits = service.hosts.hits
    assert key_req(service, store, a, MAC_B)["t"] == "key"
    assert service.hosts.hits == hits + 2  # a and b came from the cache
    assert other.revoke_host("a", NOW)
    answer = key_req(service, store, a, MAC_B)
    assert (answer["t"], answer["code"]) == ("error", "revoked")


def test_a_peer_revoked_by_another_handle_is_unknown_at_the_next_request(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    assert key_req(service, store, a, MAC_B)["t"] == "key"
    assert other.revoke_host("b", NOW)
    assert key_req(service, store, a, MAC_B)["t"] == "unknown"
    # outside a store group (peer answers, the event loop) too
    assert other.revoke_host("a", NOW)
    assert service.handle(a, {"t": "key_req", "rid": 3, "peer_mac": MAC_B}, NOW)[0][1]["code"] == "revoked"


def test_a_group_holds_other_writers_off_until_its_answers_are_committed(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    assert key_req(service, store, a, MAC_B)["t"] == "key"  # the pair exists: the group below only reads
    other._db.execute("PRAGMA busy_timeout = 50")
    with store.group():
        service.begin_group()
        assert service.handle(a, {"t": "key_req", "rid": 3, "peer_mac": MAC_B}, NOW)[0][1]["t"] == "key"
        with pytest.raises(Exception, match="locked"):  # so no revocation lands between the check and the answer
            other.revoke_host("a", NOW)
        service.end_group()
    assert other.revoke_host("a", NOW)


def test_a_host_bound_elsewhere_after_a_miss_is_found(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    assert key_req(service, store, a, MAC_C)["t"] == "unknown"
    other.bind_mac("c", MAC_C)  # c said hello at another worker
    assert key_req(service, store, a, MAC_C)["t"] == "key"


def test_a_pair_rotated_by_another_handle_is_served_at_its_new_version(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    first = key_req(service, store, a, MAC_B)
    new = other.rotate_pair_key("a", "b", NOW + 1)
    answer = key_req(service, store, a, MAC_B)
    assert (answer["pw_id"], answer["key"]) == (new, other.pair_key("a", "b", new))
    assert answer["key"] != first["key"]
    assert answer["older"] == [[first["pw_id"], first["key"], 0]]


def test_a_retired_version_is_not_served_from_memory(env):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    first = key_req(service, store, a, MAC_B)
    other.rotate_pair_key("a", "b", NOW + 1)
    assert "older" in key_req(service, store, a, MAC_B)
    assert other.retire_old_versions(NOW + 10) == 1
    answer = key_req(service, store, a, MAC_B)
    assert "older" not in answer
    assert first["key"] not in [k for v in store.opened_pair_keys._pairs.values() for _, k in v.values()]


def test_a_repeated_request_opens_no_sealed_row_and_a_changed_row_is_opened_again(env, monkeypatch):
    service, store, other = env
    a = hello(service, store, "a", MAC_A)
    hello(service, store, "b", MAC_B)
    opened = []
    real_unseal = store._unseal
    monkeypatch.setattr(store, "_unseal", lambda *args: opened.append(args[2]) or real_unseal(*args))
    first = key_req(service, store, a, MAC_B)  # made, and opened once when read back
    assert len(opened) == 1
    assert key_req(service, store, a, MAC_B)["key"] == first["key"]
    assert len(opened) == 1
    # Another key in the row (a store restored from another copy): opened again, not served from memory.
    replaced = secrets.token_bytes(32)
    other._q("UPDATE pair_keys SET key = ? WHERE id1 = 'a' AND id2 = 'b' AND pw_id = 1",
             (other.kek.seal(pair_aad("a", "b", 1), replaced),))
    assert key_req(service, store, a, MAC_B)["key"] == replaced
    assert len(opened) == 2
