"""keyserverd.store.sqlite (SQLite) and keyserverd.store.postgres (PostgreSQL): durability, tokens,
the ID-MAC table, pair keys, schema.  Tests taking ``store`` or ``store_opener``
run against both back-ends (see conftest.py)."""

import sqlite3
import threading
import time

import pytest

from keyserverd.store.schema import SCHEMA_VERSION
from keyserverd.store.sqlite import MIGRATIONS, SqliteStore
from keyserverd.tokens import TOKEN_RE, hash_token, new_token
from l2crypt.core.errors import LocalError, RefusedError

NOW = 1_700_000_000.0
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
TOKEN = "abcdef.0123456789abcdef"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "keyserver.db"


@pytest.fixture
def store(store_opener):
    s = store_opener(NOW)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path):
    s = SqliteStore.open(db_path, NOW)
    yield s
    s.close()


def add(store, host_id, mac=None, token=TOKEN, ttl=3600, role="host"):
    store.add_host(host_id, mac, role, hash_token(token), NOW + ttl, NOW)


def test_file_mode_wal_and_schema_version(sqlite_store, db_path):
    store = sqlite_store
    assert db_path.stat().st_mode & 0o777 == 0o600
    assert store.schema_version() == SCHEMA_VERSION == 5
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


def test_schema_version(store):
    assert store.schema_version() == 5


def test_ip_bindings_on_every_backend(store):
    add(store, "a")
    add(store, "b")
    ip = bytes([10, 71, 0, 2])
    assert store.bind_ip("a", ip) is True
    assert store.bind_ip("a", ip) is False
    with pytest.raises(RefusedError) as err:
        store.bind_ip("b", ip)
    assert err.value.code == "ip_conflict"
    assert store.host_id_by_ip(ip) == "a" and store.host_id_by_ip(bytes(4)) is None
    assert store.ips_of("a") == [ip] and store.ips_of("b") == []
    ip6 = bytes.fromhex("fd71" + "00" * 13 + "02")
    assert store.bind_ip("b", ip6) is True
    with pytest.raises(RefusedError):
        store.bind_ip("a", ip6)
    assert store.host_id_by_ip(ip6) == "b" and store.ips_of("b") == [ip6]


def test_a_version_3_database_keeps_its_ipv4_bindings_and_takes_ipv6(db_path):
    """Migration 4 copies the ID-IP table to one whose CHECK allows 16 bytes."""
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (3)")
    for statement in ";".join(MIGRATIONS[:3]).split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO hosts (id, role, created_at) VALUES ('a', 'host', 1.0)")
    db.execute("INSERT INTO host_ips (ip, id) VALUES (?, 'a')", (bytes([10, 71, 0, 2]),))
    db.commit()
    db.close()
    s = SqliteStore.open(db_path, NOW)
    try:
        assert s.schema_version() == 5 and s.ips_of("a") == [bytes([10, 71, 0, 2])]
        assert s.bind_ip("a", bytes.fromhex("fd71" + "00" * 13 + "02")) is True
    finally:
        s.close()


def test_everything_survives_reopening(store_opener):
    s = store_opener(NOW)
    add(s, "a")
    add(s, "b")
    s.bind_mac("a", MAC_A)
    s.bind_mac("b", MAC_B)
    pair = s.get_or_create_pair_key("a", "b", NOW)
    mcast = s.current_multicast_key()
    s.consume_token("a", hash_token(TOKEN), NOW)
    s.revoke_host("b", NOW)
    s.close()  # no explicit commit anywhere: each write was committed on return

    s = store_opener(NOW + 10)
    assert s.get_or_create_pair_key("b", "a", NOW + 10) == pair
    assert s.current_multicast_key() == mcast
    assert s.host_by_mac(MAC_A).id == "a"
    assert s.is_revoked("b") and not s.is_revoked("a")
    with pytest.raises(RefusedError) as e:
        s.consume_token("a", hash_token(TOKEN), NOW)
    assert e.value.code == "token_used"
    s.close()


def test_write_is_visible_to_another_connection_at_once(sqlite_store, db_path):
    add(sqlite_store, "a")
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT id FROM hosts").fetchall() == [("a",)]
    other.close()


def test_token_is_stored_only_as_hash(sqlite_store, db_path):
    add(sqlite_store, "a")
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


def test_pair_versions_lists_versions_newest_first_without_keys(store):
    add(store, "a")
    add(store, "b")
    assert store.pair_versions("a", "b") == []
    key1, _ = store.get_or_create_pair_key("a", "b", NOW)
    store.rotate_pair_key("b", "a", NOW + 10)
    versions = store.pair_versions("b", "a")
    assert [(pw, round(t)) for pw, t in versions] == [(2, NOW + 10), (1, NOW)]
    assert all(not isinstance(x, bytes) for v in versions for x in v)
    assert store.pair_key("a", "b", 1) == key1


def test_pair_key_creation_is_atomic_across_connections(store_opener):
    """Many connections (as several keyserverd instances) race to create the same
    pair key, from both ends; all get the same one and only one row exists."""
    store_opener(NOW).close()
    start = threading.Barrier(8)
    results, errors = [], []

    def worker(n):
        try:
            s = store_opener(NOW)  # a store is used by the thread that opened it
            start.wait(timeout=20)
            results.append(s.get_or_create_pair_key(*(("x", "y") if n % 2 else ("y", "x")), NOW))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert len(results) == 8 and len(set(results)) == 1
    s = store_opener(NOW)
    assert s.pairs() == [("x", "y")]
    assert s.pair_key("x", "y", 2) is None
    s.close()


def test_concurrent_rotations_rotate_once_and_events_keep_order(store_opener):
    """Timers of several instances fire together: one new version, one event."""
    s = store_opener(NOW)
    s.get_or_create_pair_key("x", "y", NOW)
    s.close()
    start = threading.Barrier(6)
    results = []

    def worker():
        s = store_opener(NOW)
        start.wait(timeout=20)
        results.append(s.rotate_pair_key("x", "y", NOW + 10, if_created_before=NOW + 5))
        results.append(s.rotate_multicast_key(NOW + 10, if_created_before=NOW + 5))
        s.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(r for r in results if r is not None) == [2, 2]
    s = store_opener(NOW)
    events = s.events_since(0)
    assert sorted((e.kind, e.pw_id) for e in events) == [("multicast", 2), ("pair", 2)]
    assert s.events_since(events[0].seq) == events[1:]
    s.close()


def test_multicast_key_created_once(store_opener):
    s = store_opener(NOW)
    key, pw_id = s.current_multicast_key()
    s.close()
    assert len(key) == 32 and pw_id == 1
    s = store_opener(NOW + 1)
    assert s.current_multicast_key() == (key, 1)
    s.close()


def test_adopted_multicast_versions_must_be_newer_and_are_announced(store_opener):
    """A follower of peered key servers stores the leader's multicast versions as
    they are: only newer ones, each with an event; older ones retire past gaps."""
    s = store_opener(NOW)
    own, _ = s.current_multicast_key()
    leader = bytes(range(32))
    assert s.adopt_multicast_key(1, leader, NOW + 1) is False  # not newer than our PW_ID 1
    assert s.current_multicast_key() == (own, 1)
    seq = s.last_event_seq()
    assert s.adopt_multicast_key(5, leader, NOW + 2) is True
    assert s.current_multicast_key() == (leader, 5) and s.multicast_key(1) == own
    assert [(e.kind, e.pw_id) for e in s.events_since(seq)] == [("multicast", 5)]
    assert s.adopt_multicast_key(5, bytes(32), NOW + 3) is False
    assert s.adopt_multicast_key(4, bytes(32), NOW + 3) is False
    assert s.current_multicast_key() == (leader, 5)
    with pytest.raises(LocalError):
        s.adopt_multicast_key(6, b"short", NOW + 3)
    # PW_ID 1 is superseded by 5 (no 2..4 in between) and retires like any other.
    s.retire_old_versions(NOW + 10)
    assert s.multicast_key(1) is None and s.multicast_key(5) == leader
    s.close()


def test_token_format():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(TOKEN_RE.match(t) for t in tokens)


def test_store_url_selects_the_backend(tmp_path):
    from keyserverd.config import load_config
    from keyserverd.store import open_store
    from l2crypt.core.errors import ConfigError

    assert load_config(None, {}).store == ""
    with pytest.raises(ConfigError, match="--store: want postgresql"):
        load_config(None, {"store": "mysql://x"})
    s = open_store("", tmp_path / "st", NOW)
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "st" / "keyserver.db"
    s.close()
    s = open_store(f"sqlite:///{tmp_path}/other.db", tmp_path / "st", NOW)
    assert s.path == tmp_path / "other.db"
    s.close()


def test_postgresql_newer_schema_is_refused_and_password_is_not_shown(pg_url):
    import psycopg

    from store_kek import PG_KEK
    from keyserverd.store.postgres import PgStore, redact_url

    PgStore.open(pg_url, NOW, kek=PG_KEK).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(LocalError, match="schema version 99"):
        PgStore.open(pg_url, NOW, kek=PG_KEK)
    assert redact_url("postgresql://ks:s3cret@db:5432/l2") == "postgresql://ks:***@db:5432/l2"
    with pytest.raises(LocalError) as e:
        PgStore.open("postgresql://ks:s3cret@/nodb?host=/nonexistent", NOW, kek=PG_KEK)
    assert "s3cret" not in str(e.value)


def test_key_summary_names_versions_never_keys(store):
    store.add_host("a", None, "host", b"h" * 32, NOW + 60, NOW)
    store.add_host("b", None, "host", b"i" * 32, NOW + 60, NOW)
    key, _ = store.get_or_create_pair_key("a", "b", NOW)
    store.rotate_pair_key("a", "b", NOW + 1)
    summary = store.key_summary()
    assert [p[:3] for p in summary["pairs"]] == [("a", "b", 2)]
    assert summary["pair_versions"] == 2
    assert summary["multicast"][0] == 1
    assert key not in repr(summary).encode() and key.hex() not in repr(summary)


def test_a_write_the_database_cannot_take_is_a_clear_refusal(tmp_path):
    """A full disk (here: SQLite's max_page_count) rolls the write back and
    raises StoreUnavailable; the store keeps working once there is room."""
    import sqlite3

    from keyserverd.store.protocol import StoreUnavailable

    store = SqliteStore.open(tmp_path / "ks.db", 0.0)
    store.add_host("first", bytes.fromhex("020000000001"), "host", b"h" * 32, 1e10, 0.0)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnavailable) as err:
        for i in range(10_000):
            store.add_host(f"h{i}", None, "host", b"h" * 32 + bytes(2000), 1e10, 0.0)
    assert err.value.code == "store_unavailable"
    assert "full" in str(err.value)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    added = [h.id for h in store.list_hosts()]
    assert "first" in added
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.add_host("after", None, "host", b"h" * 32, 1e10, 0.0)
    assert store.get_host("after") is not None
    store.close()
    assert sqlite3.connect(tmp_path / "ks.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_both_stores_are_the_one_implementation_of_the_protocol():
    """The service sees ``KeyStore``; SQLite and PostgreSQL run the same methods
    (``SqlStore``), with the protocol's parameters, and override none of them."""
    import inspect

    from keyserverd.store.postgres import PgStore
    from keyserverd.store.protocol import KeyStore
    from keyserverd.store.sql_store import SqlStore

    methods = {n for n, f in vars(KeyStore).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert {"get_or_create_pair_key", "bind_ip", "reseal", "close"} <= methods
    for name in methods:
        wanted = list(inspect.signature(getattr(KeyStore, name)).parameters)
        for store in (SqliteStore, PgStore):
            assert list(inspect.signature(getattr(store, name)).parameters) == wanted, (store, name)
            if name != "close":
                assert inspect.unwrap(getattr(store, name)) is getattr(SqlStore, name), (store, name)


def test_retirement_with_nothing_to_retire_holds_no_writer_off(sqlite_store, db_path):
    """keyserverd calls it every few seconds; with nothing to drop it must not
    take the write lock (a worker's group of requests would wait for it)."""
    store = sqlite_store
    add(store, "a", MAC_A)
    add(store, "b", MAC_B)
    store.get_or_create_pair_key("a", "b", NOW)
    store.rotate_pair_key("a", "b", NOW + 100)
    other = sqlite3.connect(db_path, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another worker's group, writing
    try:
        started = time.monotonic()
        assert store.retire_old_versions(NOW + 50) == 0  # version 1 was superseded after NOW + 50
        assert time.monotonic() - started < 1.0
    finally:
        other.rollback()
        other.close()
    assert store.retire_old_versions(NOW + 200) == 1
    assert [v[0] for v in store.pair_key_versions("a", "b", NOW + 200)] == [2]


def test_checkpoints_leave_the_committing_connection_for_a_thread(sqlite_store, db_path):
    """keyserverd's connections no longer checkpoint in their commits (up to
    580 ms on a busy disk, in the event loop); worker 0's thread copies the
    WAL into the database file on its own connection."""
    def file_state():
        st = db_path.stat()
        return st.st_size, st.st_mtime_ns

    sqlite_store.checkpoint_in_background(run=False)()
    assert sqlite_store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    before = file_state()
    wal = db_path.with_name(db_path.name + "-wal")
    n = 0
    while wal.stat().st_size < 1100 * 4096:  # past the 1,000 pages of SQLite's own checkpoint
        add(sqlite_store, f"h{n:04d}")
        n += 1
    time.sleep(0.3)
    assert file_state() == before  # everything is still in the WAL only
    stop = sqlite_store.checkpoint_in_background(run=True, every_s=0.05)
    try:
        deadline = time.monotonic() + 5
        while file_state() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert file_state() != before  # the thread copied the WAL into the file
    finally:
        stop()
    assert not any(t.name == "sqlite-checkpoint" for t in threading.enumerate())
