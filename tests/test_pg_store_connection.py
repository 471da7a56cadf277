"""The PostgreSQL store's connection: TLS verify-full for a database that is not
local (issue 14, section 3), and coming back after PostgreSQL restarts without
losing anything acknowledged (section 4).  PostgreSQL is the throwaway server
of ``l2crypt.lab.pg_throwaway`` on a Unix socket; a restart test starts its own."""

from __future__ import annotations

import secrets
import threading
import time

import pytest

from store_kek import PG_KEK
from keyserverd.store import pg_connection
from keyserverd.store.kek import Kek, KekError
from keyserverd.store.pg_tls import tls_parameters
from keyserverd.store.protocol import StoreUnavailable
from l2crypt.core.errors import LocalError

NOW = 1_700_000_000.0
REMOTE = "postgresql://ks:s3cret@db.example.net:5432/l2crypt"


@pytest.mark.parametrize("url, insecure, environ, expected", [
    # local: a Unix socket, localhost, loopback: as written
    ("postgresql://ks@/l2c?host=/run/postgresql", False, {}, {}),
    ("postgresql:///l2c", False, {}, {}),
    ("postgresql://ks@localhost/l2c", False, {}, {}),
    ("postgresql://ks@127.0.0.1/l2c?sslmode=disable", False, {}, {}),
    ("postgresql://ks@[::1]:5433/l2c", False, {}, {}),
    ("postgresql://ks@%2Fvar%2Frun%2Fpostgresql/l2c", False, {}, {}),
    # not local: verify-full is added, or must be what the URL says
    (REMOTE, False, {}, {"sslmode": "verify-full"}),
    (REMOTE + "?sslmode=verify-full&sslrootcert=/etc/ca.crt", False, {}, {}),
    ("postgresql://ks@192.0.2.7/l2c", False, {}, {"sslmode": "verify-full"}),
    ("postgresql://ks@localhost,db.example.net/l2c", False, {}, {"sslmode": "verify-full"}),
    ("postgresql://ks@localhost/l2c?hostaddr=192.0.2.7", False, {}, {"sslmode": "verify-full"}),
    ("postgresql:///l2c", False, {"PGHOST": "db.example.net"}, {"sslmode": "verify-full"}),
    ("postgresql:///l2c", False, {"PGHOST": "/run/postgresql"}, {}),
    # weaker modes: refused, unless store_tls_insecure; even then no mode = verify-full
    (REMOTE + "?sslmode=require", False, {}, "sslmode=require does not verify"),
    (REMOTE + "?sslmode=prefer", False, {}, "sslmode=prefer does not verify"),
    (REMOTE + "?sslmode=verify-ca", False, {}, "sslmode=verify-ca does not verify"),
    (REMOTE + "?sslmode=disable", False, {}, "sslmode=disable does not verify"),
    (REMOTE + "?sslmode=require", True, {}, {}),
    (REMOTE + "?sslmode=disable", True, {}, {}),
    (REMOTE, True, {}, {"sslmode": "verify-full"}),
    (REMOTE + "?sslmode=bogus", True, {}, "not a libpq sslmode"),
])
def test_which_tls_a_store_url_gets(url, insecure, environ, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected) as err:
            tls_parameters(url, insecure, environ)
        assert "s3cret" not in str(err.value)
    else:
        assert tls_parameters(url, insecure, environ) == expected


def test_a_remote_database_is_verified_before_anything_is_sent(monkeypatch):
    """What reaches libpq: verify-full for a remote host; a weak mode never gets that far."""
    from keyserverd.store.postgres import PgStore

    import psycopg

    seen = []

    def connect(url, **kwargs):
        seen.append(kwargs.get("sslmode"))
        raise psycopg.OperationalError("no route (test)")

    monkeypatch.setattr(psycopg, "connect", connect)
    with pytest.raises(LocalError, match="cannot connect") as err:
        PgStore.open(REMOTE, NOW, kek=PG_KEK)
    assert seen == ["verify-full"] and "s3cret" not in str(err.value)
    with pytest.raises(LocalError, match="sslmode=require does not verify"):
        PgStore.open(REMOTE + "?sslmode=require", NOW, kek=PG_KEK)
    assert seen == ["verify-full"]  # refused without a connection attempt
    with pytest.raises(LocalError, match="cannot connect"):
        PgStore.open(REMOTE + "?sslmode=require", NOW, kek=PG_KEK, tls_insecure=True)
    assert seen == ["verify-full", None]  # the URL's own mode, as the operator asked


def test_a_unix_socket_needs_no_tls(pg_url):
    from keyserverd.store.postgres import PgStore

    for url in (pg_url, pg_url + "&sslmode=disable"):
        store = PgStore.open(url, NOW, kek=PG_KEK)
        assert store._db.info.parameter_status("server_version") and store._db.pgconn.ssl_in_use is False
        store.close()


def test_postgresql_needs_a_kek():
    from keyserverd.store.postgres import PgStore

    with pytest.raises(KekError, match="needs a KEK"):
        PgStore.open("postgresql://ks@/l2c?host=/nonexistent", NOW)


# --- a lost connection -----------------------------------------------------------------

def _store_with_pair(url):
    from keyserverd.store.postgres import PgStore

    store = PgStore.open(url, NOW, kek=PG_KEK)
    store.add_host("a", None, "host", b"h" * 32, 4e9, NOW)
    store.add_host("b", None, "host", b"h" * 32, 4e9, NOW)
    return store, store.get_or_create_pair_key("a", "b", NOW)


def _terminate(admin_url: str, pid: int) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_dropped_connection_is_store_unavailable_then_comes_back(pg_url):
    store, pair = _store_with_pair(pg_url)
    _terminate(pg_url, store._db.info.backend_pid)
    with pytest.raises(StoreUnavailable) as err:
        store.get_or_create_pair_key("a", "b", NOW)
    assert err.value.code == "store_unavailable"
    assert store.get_or_create_pair_key("a", "b", NOW) == pair  # reconnected
    store.close()


def test_a_connection_lost_inside_a_write_acknowledges_nothing(pg_url):
    """The store's transaction waits on a row lock; its connection is killed
    meanwhile: the call fails with store_unavailable and nothing of it stays."""
    import psycopg

    store, _ = _store_with_pair(pg_url)
    pid = store._db.info.backend_pid
    outcome = []
    with psycopg.connect(pg_url) as blocker:
        blocker.execute("SELECT 1 FROM hosts WHERE id = 'a' FOR UPDATE")

        def revoke():
            try:
                outcome.append(store.revoke_host("a", NOW))
            except StoreUnavailable as exc:
                outcome.append(exc)

        worker = threading.Thread(target=revoke)
        worker.start()
        time.sleep(0.5)  # revoke_host now waits for the row lock inside its transaction
        _terminate(pg_url, pid)
        worker.join(timeout=10)
        blocker.rollback()
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
    assert not store.is_revoked("a") and store.events_since(0) == []
    assert store.revoke_host("a", NOW) is True  # the client's retry
    store.close()


def test_a_reconnection_checks_the_kek_again(pg_url):
    """The KEK was rotated while this instance was cut off: it does not come
    back under the old KEK (it would seal keys nobody else can open)."""
    from keyserverd.store.postgres import PgStore

    store, pair = _store_with_pair(pg_url)
    _terminate(pg_url, store._db.info.backend_pid)
    with pytest.raises(StoreUnavailable):
        store.is_revoked("a")  # notices the loss; holds no lock now
    rotator = PgStore.open(pg_url, NOW, kek=PG_KEK)
    new = Kek(secrets.token_bytes(32), "new")
    rotator.reseal(new)
    rotator.close()
    with pytest.raises(StoreUnavailable, match="does not open it"):
        store.get_or_create_pair_key("a", "b", NOW)
    store.close()
    again = PgStore.open(pg_url, NOW, kek=new)
    assert again.get_or_create_pair_key("a", "b", NOW) == pair
    again.close()


def test_postgresql_restart_loses_nothing_acknowledged(monkeypatch):
    """A crash of PostgreSQL (immediate stop) while keys are rotated: calls fail
    fast with store_unavailable during the outage, the store is back within
    the backoff once PostgreSQL is, and every acknowledged version is there."""
    from l2crypt.lab.pg_throwaway import PgServer, unavailable_reason
    from keyserverd.store.postgres import PgStore

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    monkeypatch.setattr(pg_connection, "RECONNECT_MAX_S", 1.0)
    pg = PgServer.start()
    try:
        url = pg.create_database()
        store = PgStore.open(url, NOW, kek=PG_KEK)
        store.add_host("a", None, "host", b"h" * 32, 4e9, NOW)
        store.add_host("b", None, "host", b"h" * 32, 4e9, NOW)
        acked = dict([store.get_or_create_pair_key("a", "b", NOW)[::-1]])
        for i in range(5):
            pw_id = store.rotate_pair_key("a", "b", NOW + i)
            acked[pw_id] = store.pair_key("a", "b", pw_id)
        pg.crash()
        refusals, slowest = 0, 0.0
        for i in range(10):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.rotate_pair_key("a", "b", NOW + 10 + i)
            slowest = max(slowest, time.monotonic() - t0)
            refusals += 1
            time.sleep(0.05)
        assert slowest < 1.0, f"a refusal took {slowest:.2f} s"
        pg.start_again()
        t0 = time.monotonic()
        while True:
            try:
                pw_id = store.rotate_pair_key("a", "b", NOW + 100)
                break
            except StoreUnavailable:
                assert time.monotonic() - t0 < 10, "the store did not come back within 10 s"
                time.sleep(0.1)
        acked[pw_id] = store.pair_key("a", "b", pw_id)
        assert refusals == 10 and pw_id == 7
        assert {p: store.pair_key("a", "b", p) for p in acked} == acked
        store.close()
    finally:
        pg.stop()
