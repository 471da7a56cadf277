"""Store back-ends for the key-server tests: SQLite always, PostgreSQL when one can be had
(``$L2CRYPT_TEST_PG_URL``, or a throwaway server started from Debian's postgresql package)."""

import pytest

from store_kek import PG_KEK
from keyserverd.store.sqlite import SqliteStore
from l2crypt.lab.cpu_share import share_cpu
from l2crypt.lab.pg_throwaway import PgServer, unavailable_reason


@pytest.fixture(scope="module", autouse=True)
def cpu_share():
    """Unit test modules never run beside a lab module that asserts rates (see netns_tests)."""
    with share_cpu():
        yield



@pytest.fixture(scope="session")
def pg_server():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no PostgreSQL for the tests: {reason}")
    server = PgServer.from_env()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """URL of a new, empty database (dropped after the test)."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_opener(request, tmp_path):
    """``open(now)`` -> a store; every call opens the same database again."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "keyserver.db"
        return lambda now: SqliteStore.open(path, now)
    from keyserverd.store.postgres import PgStore

    url = request.getfixturevalue("pg_url")
    return lambda now: PgStore.open(url, now, kek=PG_KEK)
