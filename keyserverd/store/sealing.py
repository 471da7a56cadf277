"""Keys at rest in the stores: the sealed key column, and who may re-seal it.

1. ``SealedKeys`` (mixed into ``sql_store.SqlStore``)
   seals every new key under the store's ``kek`` with the AAD of its row, and
   opens what it reads; a value that does not open (altered, moved to another
   row) is ``StoreUnavailable`` for the client and an error in the log, never
   its bytes.  New key material is drawn ahead, ``KEYS_DRAWN_AHEAD`` keys
   from the system's CSPRNG at once (``FreshKeys``), so a group of new pairs
   costs one call; a key is used once and its slice dropped.  Pair keys
   opened are kept in memory (``OpenedPairKeys``), each with the sealed
   value it came from, and served again only for a row just read with the
   same bytes: a repeated key request costs no KEK open.
2. ``reseal_key_rows`` seals every stored key under a new KEK in the caller's
   transaction: the migration of a clear database (old KEK None) and
   ``keyserverd kek rotate`` (``reseal``).  No PW_ID changes.
3. ``StoreUsers``: every process that has a SQLite database open holds a
   shared flock on ``PATH.lock``; a rotation needs it alone, so nobody keeps
   writing under the old KEK.  (PostgreSQL does the same with an advisory lock.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections import OrderedDict
from pathlib import Path

from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .kek import Kek, KekError, multicast_aad, pair_aad
from .protocol import StoreUnavailable

log = logging.getLogger("keyserverd")

KEY_BYTES = 32
#: New keys drawn from the CSPRNG at once (``FreshKeys``).
KEYS_DRAWN_AHEAD = 64
#: Pairs whose opened keys a store keeps (``OpenedPairKeys``).
OPENED_PAIRS_KEPT = 32768


#: The tables that hold keys: (table, the columns naming a row, the row's AAD).
KEY_TABLES = (("pair_keys", ("id1", "id2", "pw_id"), pair_aad), ("multicast_keys", ("pw_id",), multicast_aad))


def reseal_key_rows(query, old: Kek | None, new: Kek) -> dict[str, int]:
    """Seal every stored key under ``new``: open it under ``old``, or take it as
    a clear key when ``old`` is None (a database made before sealing).  Runs in
    the caller's transaction; ``query(sql, params)`` is the store's execute
    (``?`` placeholders).  Returns the rows sealed per table."""
    counts = {}
    for table, columns, aad_of in KEY_TABLES:
        rows = query(f"SELECT {', '.join(columns)}, key FROM {table}", ()).fetchall()
        where = " AND ".join(f"{c} = ?" for c in columns)
        for *ids, stored in rows:
            aad, what = aad_of(*ids), f"{table} row {'/'.join(map(str, ids))}"
            if old is None:
                key = bytes(stored)
                if len(key) != KEY_BYTES:
                    raise KekError(f"{what}: a clear key has {KEY_BYTES} bytes, not {len(key)}")
            else:
                key = old.open(aad, stored, what)
            query(f"UPDATE {table} SET key = ? WHERE {where}", (new.seal(aad, key), *ids))
        counts[table] = len(rows)
    return counts


class FreshKeys:
    """New random keys, drawn ``KEYS_DRAWN_AHEAD`` at a time; each is handed out
    once.  A forked child (a keyserverd worker) never uses what its parent drew."""

    def __init__(self, ahead: int = KEYS_DRAWN_AHEAD):
        self._ahead = ahead
        self._drawn: list[bytes] = []
        self._pid = os.getpid()

    def take(self) -> bytes:
        if self._pid != os.getpid():
            self._drawn, self._pid = [], os.getpid()
        if not self._drawn:
            block = secrets.token_bytes(KEY_BYTES * self._ahead)
            self._drawn = [block[i:i + KEY_BYTES] for i in range(0, len(block), KEY_BYTES)]
        return self._drawn.pop()


class OpenedPairKeys:
    """Pair keys opened before, kept in memory so a repeated request does not
    open the KEK-sealed row again: (id1, id2) -> {PW_ID: (the sealed value as
    stored, the key)}, at most ``max_pairs`` pairs, the least recently used
    dropped first.  A key is served only for a row just read from the store
    with the same sealed bytes, so it never answers for a row the store no
    longer holds, and a re-sealed row (KEK rotation) is opened again; the
    versions a read of the pair's rows no longer shows (rotated out, retired)
    are dropped then (``keep_only``)."""

    def __init__(self, max_pairs: int = OPENED_PAIRS_KEPT):
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], dict[int, tuple[bytes, bytes]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, pair: tuple[str, str], pw_id: int, sealed: bytes) -> bytes | None:
        versions = self._pairs.get(pair)
        held = versions.get(pw_id) if versions is not None else None
        if held is None or held[0] != sealed:
            self.misses += 1
            return None
        self.hits += 1
        self._pairs.move_to_end(pair)
        return held[1]

    def put(self, pair: tuple[str, str], pw_id: int, sealed: bytes, key: bytes) -> None:
        versions = self._pairs.get(pair)
        if versions is None:
            versions = self._pairs[pair] = {}
            if len(self._pairs) > self.max_pairs:
                self._pairs.popitem(last=False)
        versions[pw_id] = (sealed, key)

    def keep_only(self, pair: tuple[str, str], pw_ids) -> None:
        """The store holds only ``pw_ids`` of ``pair`` now: forget the others' keys."""
        versions = self._pairs.get(pair)
        if versions is not None:
            for pw_id in [v for v in versions if v not in pw_ids]:
                del versions[pw_id]

    def clear(self) -> None:
        self._pairs.clear()

    def __len__(self) -> int:
        return len(self._pairs)


class SealedKeys:
    """Sealing and opening the key column (mixed into both stores, which set
    ``kek``); opened pair keys are kept (``OpenedPairKeys``, one per store)."""

    kek: Kek
    #: New key material, drawn ahead (one per process: see ``FreshKeys``).
    _fresh = FreshKeys()
    _opened_keys: OpenedPairKeys | None = None

    @property
    def opened_pair_keys(self) -> OpenedPairKeys:
        if self._opened_keys is None:
            self._opened_keys = OpenedPairKeys()
        return self._opened_keys

    def _new_pair_key(self, id1: str, id2: str, pw_id: int) -> bytes:
        return self._seal(pair_aad(id1, id2, pw_id), self._fresh.take())

    def _new_multicast_key(self, pw_id: int, key: bytes | None = None) -> bytes:
        return self._seal(multicast_aad(pw_id), key if key is not None else self._fresh.take())

    def _seal(self, aad: bytes, key: bytes) -> bytes:
        try:
            return self.kek.seal(aad, key)
        except KekError as exc:  # a KEK on a token that is gone: a refusal for the client
            log.error("key_not_sealed", extra=fields(reason=str(exc)))
            raise StoreUnavailable("the key server cannot seal a new key") from None

    def _open_pair_key(self, id1: str, id2: str, pw_id: int, sealed) -> bytes:
        sealed = bytes(sealed)
        key = self.opened_pair_keys.get((id1, id2), pw_id, sealed)
        if key is None:
            key = self._unseal(pair_aad(id1, id2, pw_id), sealed, f"pair key {id1}/{id2} pw_id {pw_id}")
            self.opened_pair_keys.put((id1, id2), pw_id, sealed, key)
        return key

    def _open_multicast_key(self, pw_id: int, sealed) -> bytes:
        return self._unseal(multicast_aad(pw_id), sealed, f"multicast key pw_id {pw_id}")

    def _unseal(self, aad: bytes, sealed, what: str) -> bytes:
        try:
            return self.kek.open(aad, sealed, what)
        except KekError as exc:  # a refusal for the client; the row stays as it is
            log.error("sealed_key_unreadable", extra=fields(reason=str(exc)))
            raise StoreUnavailable(f"the key server cannot open a stored key ({what})") from None


class StoreUsers:
    """A shared flock on ``PATH.lock`` while the database is open here; the
    KEK rotation takes it exclusively, so nobody writes under the old KEK."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise LocalError(f"database {db_path}: a KEK rotation is running on it; try again when it "
                             f"has finished") from None

    def exclusive(self) -> bool:
        """Hold the lock alone; False (and still shared) if anyone else holds it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self.shared()
            return False

    def shared(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another rotation got in between; ours gave up

    def close(self) -> None:
        os.close(self._fd)
