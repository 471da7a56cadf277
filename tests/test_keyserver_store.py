"""keyserverd.store: durability, tokens, the ID-MAC table, pair keys, schema."""

import sqlite3
import threading

import pytest

from keyserverd.store import SCHEMA_VERSION, SqliteStore
from keyserverd.tokens import TOKEN_RE, hash_token, new_token
from l2crypt.errors import LocalError, RefusedError

NOW = 1_700_000_000.0
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
TOKEN = "abcdef.0123456789abcdef"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "keyserver.db"


@pytest.fixture
def store(db_path):
    s = SqliteStore.open(db_path, NOW)
    yield s
    s.close()


def add(store, host_id, mac=None, token=TOKEN, ttl=3600, role="host"):
    store.add_host(host_id, mac, role, hash_token(token), NOW + ttl, NOW)


def test_file_mode_wal_and_schema_version(store, db_path):
    assert db_path.stat().st_mode & 0o777 == 0o600
    assert store.schema_version() == SCHEMA_VERSION == 3
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_newer_schema_is_refused(db_path):
    SqliteStore.open(db_path, NOW).close()
    db = sqlite3.connect(db_path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(LocalError, match="schema version 99"):
        SqliteStore.open(db_path, NOW)


def test_everything_survives_reopening(db_path):
    s = SqliteStore.open(db_path, NOW)
    add(s, "a")
    add(s, "b")
    s.bind_mac("a", MAC_A)
    s.bind_mac("b", MAC_B)
    pair = s.get_or_create_pair_key("a", "b", NOW)
    mcast = s.current_multicast_key()
    s.consume_token("a", hash_token(TOKEN), NOW)
    s.revoke_host("b", NOW)
    s.close()  # no explicit commit anywhere: each write was committed on return

    s = SqliteStore.open(db_path, NOW + 10)
    assert s.get_or_create_pair_key("b", "a", NOW + 10) == pair
    assert s.current_multicast_key() == mcast
    assert s.host_by_mac(MAC_A).id == "a"
    assert s.is_revoked("b") and not s.is_revoked("a")
    with pytest.raises(RefusedError) as e:
        s.consume_token("a", hash_token(TOKEN), NOW)
    assert e.value.code == "token_used"
    s.close()


def test_write_is_visible_to_another_connection_at_once(store, db_path):
    add(store, "a")
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT id FROM hosts").fetchall() == [("a",)]
    other.close()


def test_token_is_stored_only_as_hash(store, db_path):
    add(store, "a")
    raw = db_path.read_bytes() + (db_path.parent / "keyserver.db-wal").read_bytes()
    assert TOKEN.encode() not in raw
    assert hash_token(TOKEN) in raw


def test_token_single_use(store):
    add(store, "a")
    host = store.consume_token("a", hash_token(TOKEN), NOW + 1)
    assert host.id == "a" and host.token_used
    with pytest.raises(RefusedError) as e:
        store.consume_token("a", hash_token(TOKEN), NOW + 2)
    assert e.value.code == "token_used"


@pytest.mark.parametrize(
    "host_id, token, now, code",
    [
        ("a", "zzzzzz.zzzzzzzzzzzzzzzz", NOW, "bad_token"),
        ("nobody", TOKEN, NOW, "bad_token"),
        ("a", TOKEN, NOW + 3600, "token_expired"),
    ],
)
def test_token_refusals(store, host_id, token, now, code):
    add(store, "a", ttl=3600)
    with pytest.raises(RefusedError) as e:
        store.consume_token(host_id, hash_token(token), now)
    assert e.value.code == code
    # a refusal spends nothing: the right token still works in time
    assert store.consume_token("a", hash_token(TOKEN), NOW).token_used


def test_revoked_host_cannot_enroll(store):
    add(store, "a")
    assert store.revoke_host("a", NOW)
    assert not store.revoke_host("a", NOW)  # already revoked
    with pytest.raises(RefusedError) as e:
        store.consume_token("a", hash_token(TOKEN), NOW)
    assert e.value.code == "revoked"


def test_duplicate_host_and_unknown_revoke(store):
    add(store, "a", mac=MAC_A)
    with pytest.raises(LocalError, match="already exists"):
        add(store, "a")
    with pytest.raises(LocalError, match="already bound"):
        add(store, "b", mac=MAC_A)
    with pytest.raises(LocalError, match="no host"):
        store.revoke_host("nobody", NOW)
    assert store.is_revoked("nobody")  # unknown fails closed


def test_mac_conflict(store):
    add(store, "a")
    add(store, "b")
    store.bind_mac("a", MAC_A)
    store.bind_mac("a", MAC_A)  # idempotent
    with pytest.raises(RefusedError) as e:
        store.bind_mac("b", MAC_A)
    assert e.value.code == "mac_conflict"
    with pytest.raises(RefusedError) as e:
        store.bind_mac("a", MAC_B)  # the first binding sticks
    assert e.value.code == "mac_conflict"
    assert store.host_by_mac(MAC_A).id == "a"
    assert store.host_by_mac(MAC_B) is None


def test_pinned_mac(store):
    add(store, "a", mac=MAC_A)
    with pytest.raises(RefusedError) as e:
        store.bind_mac("a", MAC_B)
    assert e.value.code == "mac_conflict"
    store.bind_mac("a", MAC_A)


def test_pair_key_is_symmetric_and_starts_at_pw_id_1(store):
    add(store, "a")
    add(store, "b")
    add(store, "c")
    key_ab, pw_id = store.get_or_create_pair_key("a", "b", NOW)
    assert len(key_ab) == 32 and pw_id == 1
    assert store.get_or_create_pair_key("b", "a", NOW + 5) == (key_ab, 1)
    key_ac, _ = store.get_or_create_pair_key("c", "a", NOW)
    assert key_ac != key_ab
    with pytest.raises(LocalError):
        store.get_or_create_pair_key("a", "a", NOW)


def test_pair_key_creation_is_atomic_across_connections(db_path):
    """Many connections race to create the same pair key; all get the same one."""
    SqliteStore.open(db_path, NOW).close()
    results, errors = [], []

    def worker():
        try:
            s = SqliteStore.open(db_path, NOW)
            results.append(s.get_or_create_pair_key("x", "y", NOW))
            s.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert len(results) == 8 and len(set(results)) == 1
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT COUNT(*) FROM pair_keys").fetchone()[0] == 1
    db.close()


def test_multicast_key_created_once(db_path):
    s = SqliteStore.open(db_path, NOW)
    key, pw_id = s.current_multicast_key()
    s.close()
    assert len(key) == 32 and pw_id == 1
    s = SqliteStore.open(db_path, NOW + 1)
    assert s.current_multicast_key() == (key, 1)
    s.close()


def test_token_format():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(TOKEN_RE.match(t) for t in tokens)
