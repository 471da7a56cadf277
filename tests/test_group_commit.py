"""Group commit in the store (``SqlStore.group``): the writes of several
requests become one transaction, committed when the block ends; a refused
write rolls back alone; a failed commit stores nothing.  Tests taking
``store_opener`` run against both back-ends (see conftest.py)."""

import pytest

from keyserverd.store.protocol import StoreUnavailable
from keyserverd.store.sealing import FreshKeys
from keyserverd.tokens import hash_token
from l2crypt.core.errors import LocalError, RefusedError

NOW = 1_700_000_000.0
MACS = [bytes.fromhex(f"0200000000{n:02x}") for n in range(1, 8)]


def add(store, host_id, mac):
    store.add_host(host_id, mac, "host", hash_token("abcdef.0123456789abcdef"), NOW + 3600, NOW)


@pytest.fixture
def two(store_opener):
    """Two connections to one database: the writer and an outside reader."""
    writer, reader = store_opener(NOW), store_opener(NOW)
    for n, mac in enumerate(MACS[:4]):
        add(writer, f"h{n}", mac)
    yield writer, reader
    writer.close()
    reader.close()


def test_writes_of_a_group_are_seen_outside_only_after_it_ends(two):
    writer, reader = two
    with writer.group():
        key01, pw01 = writer.get_or_create_pair_key("h0", "h1", NOW)
        key23, _ = writer.get_or_create_pair_key("h2", "h3", NOW)
        assert writer.get_or_create_pair_key("h1", "h0", NOW) == (key01, pw01)  # the group reads its writes
        assert writer.rotate_pair_key("h0", "h1", NOW + 1) == 2
        assert reader.pairs() == []
    assert reader.pairs() == [("h0", "h1"), ("h2", "h3")]
    assert reader.pair_key("h0", "h1", 1) == key01 and reader.pair_key("h2", "h3", 1) == key23
    assert [e.pw_id for e in reader.events_since(0) if e.kind == "pair"] == [2]


def test_a_refused_write_rolls_back_alone(two):
    writer, reader = two
    with writer.group():
        writer.bind_mac("h0", MACS[0])
        with pytest.raises(RefusedError, match="bound to"):
            writer.bind_mac("h1", MACS[0])  # h1 is bound to MACS[1]
        with pytest.raises(LocalError, match="already exists"):
            add(writer, "h0", MACS[5])
        writer.get_or_create_pair_key("h0", "h2", NOW)
    assert reader.pairs() == [("h0", "h2")]
    assert reader.get_host("h1").mac == MACS[1]


def test_an_exception_out_of_the_block_stores_nothing(two):
    writer, reader = two
    with pytest.raises(RuntimeError):
        with writer.group():
            writer.get_or_create_pair_key("h0", "h1", NOW)
            raise RuntimeError("the server fell over")
    assert reader.pairs() == []
    writer.get_or_create_pair_key("h0", "h2", NOW)  # the store goes on, one transaction per write again
    assert reader.pairs() == [("h0", "h2")]


def test_groups_do_not_nest_and_an_empty_one_writes_nothing(two):
    writer, _ = two
    with writer.group():
        writer.list_hosts()
        with pytest.raises(LocalError, match="nest"):
            with writer.group():
                pass


def test_a_failed_commit_is_store_unavailable_and_stores_nothing(tmp_path):
    from keyserverd.store.sqlite import SqliteStore

    path = tmp_path / "keyserver.db"
    writer = SqliteStore.open(path, NOW)
    for n, mac in enumerate(MACS[:3]):
        add(writer, f"h{n}", mac)

    class Failing:
        """The connection, with COMMIT failing as on a full disk."""

        def __init__(self, db):
            self.db = db

        def execute(self, sql, params=()):
            if sql == "COMMIT":
                import sqlite3
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, params)

    real = writer._db
    writer._db = Failing(real)
    try:
        with pytest.raises(StoreUnavailable, match="disk is full"):
            with writer.group():
                writer.get_or_create_pair_key("h0", "h1", NOW)
                writer.rotate_pair_key("h0", "h1", NOW + 1)
    finally:
        writer._db = real
    assert writer.pairs() == [] and writer.last_event_seq() == 0
    writer.close()


def test_fresh_keys_are_drawn_ahead_once_each_and_never_shared_with_a_fork(monkeypatch):
    import os

    fresh = FreshKeys(ahead=4)
    keys = [fresh.take() for _ in range(9)]
    assert len(set(keys)) == 9 and all(len(k) == 32 for k in keys)
    left = list(fresh._drawn)
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked worker
    assert fresh.take() not in left
