"""The KEK of the tests' PostgreSQL stores (a SQLite store makes its own beside the file).

A module of its own, not the conftest: ``tests/`` and ``netns_tests/`` both
have a conftest, so ``from conftest import`` would depend on which ran first.
"""

from keyserverd.store.kek import Kek

PG_KEK = Kek(bytes.fromhex("6b656b2d6f662d7468652d706f737467726573716c2d73746f72652d74657374"), "tests")
