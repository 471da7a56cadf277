"""Keys at rest (issue 14, section 3): every key the key server keeps is sealed
under a KEK kept outside the database, in SQLite and in PostgreSQL, and in
netkey.json.  Tests taking ``backend`` run on both stores.

    TLS 1.3 clients a, b (hosts) and g (gateway)
        --> KeyServer on 127.0.0.1 --> store: SQLite file | PostgreSQL (throwaway, Unix socket)
                                   \\-> state_dir/netkey.json (NETKEY versions)
    then the database is dumped (SQLite: iterdump + the raw bytes of the file
    and its WAL; PostgreSQL: pg_dump) with netkey.json, and searched for every
    key the clients were handed (raw, hex, base64).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import sqlite3

import pytest

from store_kek import PG_KEK
from keyserverd.ca import CertificateAuthority
from keyserverd.cli import main
from keyserverd.peering.netkey import NETKEY_FILE, NetkeyBook
from keyserverd.client_port import make_server_ssl_context
from keyserverd.server import KeyServer
from keyserverd.service import KeyService
from keyserverd.store import DB_FILE, open_store
from keyserverd.store.kek import (
    DEFAULT_KEK_FILE,
    Kek,
    KekError,
    create_kek_file,
    multicast_aad,
    netkey_aad,
    pair_aad,
    read_kek_credential,
    read_kek_file,
)
from keyserverd.store.postgres import MIGRATIONS as PG_MIGRATIONS
from keyserverd.store.protocol import StoreUnavailable
from keyserverd.store.schema import SEALED_SCHEMA
from keyserverd.store.sqlite import MIGRATIONS
from keyserverd.tokens import hash_token, new_token
from l2crypt.core.errors import LocalError
from test_keyserver_tls import Client, enroll

NOW = 1_700_000_000.0
PEER_CA = "sha256:" + "ab" * 32  # the NETKEY peer segment's CA (its gateway: gB)
MAC = {"a": bytes.fromhex("020000000a0a"), "b": bytes.fromhex("020000000b0b"), "g": bytes.fromhex("020000000c0c")}


# --- the two stores ------------------------------------------------------------------

class Backend:
    """One store (SQLite in ``state``, or a PostgreSQL database) and how to dump it."""

    def __init__(self, kind: str, state, url: str = "", pg=None):
        self.kind, self.state, self.url, self.pg = kind, state, url, pg

    def open(self, kek: Kek | None = None, now: float = NOW):
        if self.kind == "sqlite":
            return open_store("", self.state, now, kek=kek)
        return open_store(self.url, self.state, now, kek=kek or PG_KEK)

    def sql(self, statement: str, params=()):
        """Run SQL beside the store (SQLite placeholders; rewritten for PostgreSQL)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.state / DB_FILE) as db:
                return db.execute(statement, params).fetchall()
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as db:
            cur = db.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def dump(self) -> bytes:
        """What a copy of the state would give away: the database's dump (and for
        SQLite the raw file and WAL bytes), plus netkey.json."""
        out = b""
        if self.kind == "sqlite":
            db = sqlite3.connect(f"file:{self.state / DB_FILE}?mode=ro", uri=True)
            out += "\n".join(db.iterdump()).encode()
            db.close()
            for suffix in ("", "-wal"):
                path = self.state / (DB_FILE + suffix)
                if path.exists():
                    out += path.read_bytes()
        else:
            out += self.pg.dump(self.url)
        netkeys = self.state / NETKEY_FILE
        return out + (netkeys.read_bytes() if netkeys.exists() else b"")

    def sealed_values(self) -> list[tuple[bytes, bytes]]:
        """(AAD, sealed value) of every key the store and netkey.json hold."""
        rows = [(pair_aad(i1, i2, p), bytes(k)) for i1, i2, p, k in self.sql("SELECT id1, id2, pw_id, key FROM pair_keys")]
        rows += [(multicast_aad(p), bytes(k)) for p, k in self.sql("SELECT pw_id, key FROM multicast_keys")]
        path = self.state / NETKEY_FILE
        if path.exists():
            rows += [(netkey_aad(v["pw_id"]), bytes.fromhex(v["sealed"]))
                     for v in json.loads(path.read_text())["versions"]]
        return rows


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    state = tmp_path / "ks"
    state.mkdir(mode=0o700)
    if request.param == "sqlite":
        return Backend("sqlite", state)
    return Backend("postgresql", state, request.getfixturevalue("pg_url"), request.getfixturevalue("pg_server"))


def forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]


def found_in(keys: dict, blob: bytes) -> list:
    """The names of the ``keys`` that appear in ``blob`` in any form."""
    return [name for name, key in keys.items() if any(f in blob for f in forms(key))]


def opened(blob: bytes, sealed: list[tuple[bytes, bytes]], kek: Kek) -> bytes:
    """``blob`` with every sealed value (hex or raw) replaced by its key (hex):
    the dump as the holder of the KEK would read it."""
    for aad, value in sealed:
        key = kek.open(aad, value, "control")
        for form in (value.hex().encode(), value.hex().upper().encode(), value):
            blob = blob.replace(form, key.hex().encode())
    return blob


# --- a real TLS key server ---------------------------------------------------------------

async def call(client: Client, msg: dict) -> list[dict]:
    """Send ``msg`` and return every reply with its rid (skipping pushes)."""
    await client.send(msg)
    got = []
    while not got or client.pending:
        m = await client.recv()
        if m.get("rid") == msg["rid"]:
            got.append(m)
    return got


def serve(store, ca, netkeys, body):
    service = KeyService(store, "aes-256-gcm", "ks-test", ca)
    service.netkeys, service.netkey_peer_ca = netkeys, PEER_CA

    async def main_():
        server = KeyServer(service, make_server_ssl_context(ca), "127.0.0.1", 0)
        _, port = await server.start()
        try:
            return await asyncio.wait_for(body(port), 60)
        finally:
            await server.close()

    return asyncio.run(main_())


def test_a_dump_of_the_store_holds_no_key_it_handed_out(backend, tmp_path):
    """Keys made, rotated, NETKEY stored and the KEK rotated; the clients keep
    their keys across the KEK rotation; the dump holds none of them, and the
    same search finds every one once the sealed values are opened."""
    ca = CertificateAuthority.open(backend.state, ())
    store = backend.open()
    tokens = {h: new_token() for h in ("a", "b", "g")}
    for host_id in tokens:
        store.add_host(host_id, None, "gateway" if host_id == "g" else "host", hash_token(tokens[host_id]),
                       4e9, NOW)
    book = NetkeyBook(backend.state / NETKEY_FILE, store.kek)
    book.create(NOW)
    book.create(NOW + 1)
    handed: dict[str, bytes] = {}
    links: dict[int, tuple[bytes, bytes]] = {}  # the gateway's tunnel link keys, derived from NETKEY
    files: dict[str, tuple] = {}

    async def first(port):
        for h in tokens:
            ca_pem, files[h] = await enroll(tmp_path, port, h, tokens[h], ca.ca_fingerprint())
        c = {h: await Client.connect(port, ca_pem, files[h]) for h in tokens}
        for h in c:
            (welcome,) = await call(c[h], {"t": "hello", "rid": 1, "mac": MAC[h]})
            handed[f"multicast{welcome['multicast_pw_id']}"] = welcome["multicast_key"]
        (k,) = await call(c["a"], {"t": "key_req", "rid": 2, "peer_mac": MAC["b"]})
        handed[f"ab{k['pw_id']}"] = k["key"]
        (k,) = await call(c["a"], {"t": "rekey_req", "rid": 3, "peer_mac": MAC["b"], "pw_id": 1})
        handed[f"ab{k['pw_id']}"] = k["key"]
        (k,) = await call(c["g"], {"t": "key_req", "rid": 4, "peer_mac": MAC["a"]})
        handed[f"ag{k['pw_id']}"] = k["key"]
        store.rotate_multicast_key(NOW + 5)
        (m,) = await call(c["b"], {"t": "mcast_req", "rid": 5})
        handed[f"multicast{m['pw_id']}"] = m["key"]
        for n in await call(c["g"], {"t": "netkey_req", "rid": 6, "peer_id": "gB"}):
            links[n["pw_id"]] = (n["send_key"], n["recv_key"])
        for client in c.values():
            client.close()

    serve(store, ca, book, first)
    assert sorted(handed) == ["ab1", "ab2", "ag1", "multicast1", "multicast2"] and sorted(links) == [1, 2]
    handed.update({f"netkey{pw_id}": key for pw_id, key in book.versions()})  # NETKEY as stored
    before, links_before = dict(handed), dict(links)

    # Rotate the KEK (nothing else has the store open): no PW_ID, no key changes.
    new_key = secrets.token_bytes(32)
    new = Kek(new_key, "test")
    counts = store.reseal(new)
    assert counts == {"pair_keys": 3, "multicast_keys": 2}
    assert book.reseal(new) == 2

    async def after(port):
        c = {h: await Client.connect(port, None, files[h]) for h in ("a", "g")}
        (welcome,) = await call(c["a"], {"t": "hello", "rid": 1, "mac": MAC["a"]})
        assert (welcome["multicast_pw_id"], welcome["multicast_key"]) == (2, before["multicast2"])
        await call(c["g"], {"t": "hello", "rid": 1, "mac": MAC["g"]})
        (k,) = await call(c["a"], {"t": "key_req", "rid": 2, "peer_mac": MAC["b"]})
        assert (k["pw_id"], k["key"]) == (2, before["ab2"])
        assert {n["pw_id"]: (n["send_key"], n["recv_key"])
                for n in await call(c["g"], {"t": "netkey_req", "rid": 3, "peer_id": "gB"})} == links_before
        (k,) = await call(c["a"], {"t": "rekey_req", "rid": 4, "peer_mac": MAC["b"], "pw_id": 2})
        handed[f"ab{k['pw_id']}"] = k["key"]  # made under the new KEK
        for client in c.values():
            client.close()

    serve(store, ca, NetkeyBook(backend.state / NETKEY_FILE, new), after)
    assert store.pair_key("a", "b", 1) == before["ab1"]
    store.close()
    assert len(handed) == 8

    dump = backend.dump()
    assert found_in(handed, dump) == []
    assert found_in({f"link{p}/{i}": k for p, ks in links.items() for i, k in enumerate(ks)}, dump) == []
    assert found_in({"kek": new_key}, dump) == []
    # Presence: the dump does hold every sealed value, and opened with the KEK it shows every key.
    sealed = backend.sealed_values()
    assert len(sealed) == 8
    assert all(value.hex().encode() in dump or value.hex().upper().encode() in dump for _, value in sealed)
    assert sorted(found_in(handed, opened(dump, sealed, new))) == sorted(handed)


def test_a_start_with_the_wrong_kek_is_refused_and_changes_nothing(backend, capsys):
    store = backend.open()
    store.add_host("a", None, "host", b"h" * 32, 4e9, NOW)
    store.add_host("b", None, "host", b"h" * 32, 4e9, NOW)
    key, _ = store.get_or_create_pair_key("a", "b", NOW)
    right = store.kek
    store.close()

    def snapshot():
        if backend.kind == "postgresql":  # pg_dump's \restrict line has a random key of its own
            return re.sub(rb"\\(un)?restrict \S+", b"", backend.pg.dump(backend.url))
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(backend.state.iterdir())}

    before = snapshot()
    wrong = Kek(secrets.token_bytes(32), "wrong.kek")
    with pytest.raises(KekError) as err:
        backend.open(kek=wrong)
    text = str(err.value)
    assert "\n" not in text and wrong.shown_id in text and right.shown_id in text and "nothing was changed" in text
    assert snapshot() == before
    if backend.kind == "sqlite":
        # The same through the command line: one line, exit 1.
        path = backend.state.parent / "wrong.kek"
        create_kek_file(path)
        with pytest.raises(SystemExit) as code:
            main(["host", "list", "--state-dir", str(backend.state), "--kek-file", str(path)])
        assert code.value.code == 1
        out, errors = capsys.readouterr()
        assert out == "" and len(errors.splitlines()) == 1 and "does not open it" in errors
        # Without its KEK file, the sealed database refuses too, and no new KEK is made.
        kek_file = backend.state / DEFAULT_KEK_FILE
        saved = kek_file.read_bytes()
        kek_file.unlink()
        with pytest.raises(KekError, match="KEK file .* is missing: restore it"):
            backend.open()
        assert not kek_file.exists()
        kek_file.write_bytes(saved)
        kek_file.chmod(0o600)
        assert snapshot() == before
    again = backend.open()  # the right KEK still opens everything
    assert again.pair_key("a", "b", 1) == key
    again.close()


def test_a_store_sealed_under_a_token_kek_is_not_read_with_a_file_kek(tmp_path, capsys):
    """The other way round (a file-KEK store and a token KEK) runs on SoftHSM2 in
    netns_tests/test_tokens.py; here the store names a token KEK's id."""
    state = tmp_path / "ks"
    open_store("", state, NOW).close()
    token_id = "pkcs11:" + "5e" * 16
    with sqlite3.connect(state / DB_FILE) as db:
        db.execute("UPDATE kek_check SET kek_id = ?", (token_id,))
    for kek_file in (state / DEFAULT_KEK_FILE, None):  # the default file, then none at all
        with pytest.raises(SystemExit) as code:
            main(["host", "list", "--state-dir", str(state)])
        assert code.value.code == 1
        out, errors = capsys.readouterr()
        assert out == "" and len(errors.splitlines()) == 1, errors
        assert "sealed under a KEK on a PKCS#11 token (id pkcs11:5e5e5e5e5e5e5e5e)" in errors
        assert "start with pkcs11_kek_label" in errors and "nothing was changed" in errors
        if kek_file is not None:
            kek_file.unlink()
    assert not (state / DEFAULT_KEK_FILE).exists()  # no new KEK file was made for it


def _clear_v3_database(backend) -> dict[str, bytes]:
    """A database as f3b867d made it (schema 3, its migrations unchanged since),
    with clear keys written by raw SQL; one pair key deleted again (retired)."""
    migrations = MIGRATIONS if backend.kind == "sqlite" else PG_MIGRATIONS
    keys = {name: secrets.token_bytes(32) for name in ("ab1", "ab2", "ac1", "m1", "m2")}
    statements = ["CREATE TABLE schema_version (version INTEGER NOT NULL)", "INSERT INTO schema_version VALUES (3)"]
    statements += [s for m in migrations[:SEALED_SCHEMA - 1] for s in m.split(";") if s.strip()]
    for statement in statements:
        backend.sql(statement)
    for host in "abc":
        backend.sql("INSERT INTO hosts (id, role, created_at) VALUES (?, 'host', ?)", (host, NOW))
    for (i1, i2, p), name in ((("a", "b", 1), "ab1"), (("a", "b", 2), "ab2"), (("a", "c", 1), "ac1")):
        backend.sql("INSERT INTO pair_keys VALUES (?, ?, ?, ?, ?)", (i1, i2, p, keys[name], NOW + p))
    for p in (1, 2):
        backend.sql("INSERT INTO multicast_keys VALUES (?, ?, ?)", (p, keys[f"m{p}"], NOW + p))
    backend.sql("DELETE FROM pair_keys WHERE id2 = 'c'")
    return keys


def test_a_clear_database_made_before_sealing_is_sealed_by_the_migration(backend):
    keys = _clear_v3_database(backend)
    # Control: before the migration the dump gives the live keys away (SQLite's
    # raw bytes also the deleted one).
    assert set(found_in(keys, backend.dump())) >= {"ab1", "ab2", "m1", "m2"}
    legacy = backend.state / NETKEY_FILE
    netkey = secrets.token_bytes(32)
    legacy.write_text(json.dumps([{"pw_id": 7, "key": netkey.hex(), "created_at": NOW}]))
    assert found_in({"netkey": netkey}, backend.dump()) == ["netkey"]

    store = backend.open()
    assert store.schema_version() >= SEALED_SCHEMA  # sealed, and later migrations ran too
    assert store.pair_key("a", "b", 1) == keys["ab1"] and store.pair_key("b", "a", 2) == keys["ab2"]
    assert store.get_or_create_pair_key("a", "b", NOW) == (keys["ab2"], 2)
    assert store.current_multicast_key() == (keys["m2"], 2) and store.multicast_key(1) == keys["m1"]
    assert NetkeyBook(legacy, store.kek).versions() == [(7, netkey)]
    kek = store.kek
    store.close()
    keys["netkey"] = netkey
    dump = backend.dump()
    assert found_in(keys, dump) == []
    assert sorted(found_in(keys, opened(dump, backend.sealed_values(), kek))) == ["ab1", "ab2", "m1", "m2", "netkey"]


def test_kek_rotation_waits_for_every_other_user_of_the_store(backend):
    first = backend.open()
    first.add_host("a", None, "host", b"h" * 32, 4e9, NOW)
    first.add_host("b", None, "host", b"h" * 32, 4e9, NOW)
    first.get_or_create_pair_key("a", "b", NOW)
    first.rotate_pair_key("a", "b", NOW + 1)
    held = {p: first.pair_key("a", "b", p) for p in (1, 2)}
    old = first.kek
    other = backend.open()  # a running keyserverd, say
    new = Kek(secrets.token_bytes(32), "new")
    with pytest.raises(LocalError, match="stop"):
        first.reseal(new)
    assert other.pair_key("a", "b", 2) == held[2]  # nothing changed under it
    other.rotate_pair_key("a", "b", NOW + 2)
    held[3] = other.pair_key("a", "b", 3)
    other.close()
    assert first.reseal(new) == {"pair_keys": 3, "multicast_keys": 1}
    first.close()
    with pytest.raises(KekError):
        backend.open(kek=old)
    again = backend.open(kek=new)
    assert {p: again.pair_key("a", "b", p) for p in (1, 2, 3)} == held
    again.close()


def test_a_sealed_key_moved_to_another_row_does_not_open(backend):
    store = backend.open()
    for h in "abc":
        store.add_host(h, None, "host", b"h" * 32, 4e9, NOW)
    ab, _ = store.get_or_create_pair_key("a", "b", NOW)
    store.get_or_create_pair_key("a", "c", NOW)
    backend.sql("UPDATE pair_keys SET key = (SELECT key FROM pair_keys WHERE id2 = 'b') WHERE id2 = 'c'")
    assert store.pair_key("a", "b", 1) == ab  # the row it belongs to still opens
    with pytest.raises(StoreUnavailable) as err:
        store.pair_key("a", "c", 1)
    assert err.value.code == "store_unavailable" and ab.hex() not in str(err.value)
    store.close()


def test_kek_rotate_and_generate_on_the_command_line(tmp_path, capsys):
    state = tmp_path / "ks"

    def run(*args):
        with pytest.raises(SystemExit) as code:
            main(list(args))
        return (code.value.code, *capsys.readouterr())

    assert run("host", "add", "a", "--state-dir", str(state), "--server", "x:1")[0] == 0
    assert run("host", "add", "b", "--state-dir", str(state), "--server", "x:1")[0] == 0
    store = open_store("", state, NOW)
    pair = store.get_or_create_pair_key("a", "b", NOW)
    mcast = store.current_multicast_key()
    netkey = NetkeyBook(state / NETKEY_FILE, store.kek).create(NOW)
    # While the store is open elsewhere: refused in one line, nothing changed.
    new_file = tmp_path / "new.kek"
    code, out, err = run("kek", "rotate", "--state-dir", str(state), "--new-kek-file", str(new_file))
    assert code == 1 and len(err.splitlines()) == 1 and "stop it" in err
    store.close()
    old_kek = (state / DEFAULT_KEK_FILE).read_bytes()
    code, out, err = run("kek", "rotate", "--state-dir", str(state), "--new-kek-file", str(new_file))
    assert code == 0, err
    assert "re-sealed 1 pair key version(s), 1 multicast key version(s), 1 NETKEY version(s)" in out
    assert "no PW_ID changed" in out
    assert (state / DEFAULT_KEK_FILE).read_bytes() == new_file.read_bytes() != old_kek
    assert (state / DEFAULT_KEK_FILE).stat().st_mode & 0o777 == 0o600
    store = open_store("", state, NOW)
    assert store.get_or_create_pair_key("a", "b", NOW) == pair and store.current_multicast_key() == mcast
    assert NetkeyBook(state / NETKEY_FILE, store.kek).versions() == [netkey]
    assert NetkeyBook(state / NETKEY_FILE, Kek(old_kek)).versions() == []  # the old KEK opens nothing
    store.close()
    # The same KEK again: refused.
    code, out, err = run("kek", "rotate", "--state-dir", str(state), "--new-kek-file", str(new_file))
    assert code == 1 and "holds the KEK in use" in err
    # generate: 32 random bytes, 0600, never over a file.
    code, out, err = run("kek", "generate", str(tmp_path / "g.kek"))
    assert code == 0 and re.search(r"id [0-9a-f]{16}", out)
    assert (tmp_path / "g.kek").stat().st_mode & 0o777 == 0o600 and len((tmp_path / "g.kek").read_bytes()) == 32
    code, out, err = run("kek", "generate", str(tmp_path / "g.kek"))
    assert code == 1 and "never overwritten" in err
    code, out, err = run("kek", "rotate", "--help")
    assert code == 0 and "--new-kek-file" in out and "Stop every keyserverd" in out


@pytest.mark.parametrize("content, error", [
    (bytes(range(32)), None),
    (bytes(range(32)).hex().encode() + b"\n", None),
    (b"short", "holds 5 bytes"),
    (b"z" * 64, "holds 64 bytes"),
])
def test_kek_file_contents(tmp_path, content, error):
    path = tmp_path / "kek"
    path.write_bytes(content)
    path.chmod(0o600)
    if error is None:
        assert read_kek_file(path).kek_id == Kek(bytes(range(32))).kek_id
    else:
        with pytest.raises(KekError, match=error):
            read_kek_file(path)


def test_kek_file_readable_by_others_and_credentials(tmp_path):
    path = tmp_path / "kek"
    path.write_bytes(bytes(32))
    path.chmod(0o640)
    with pytest.raises(KekError, match="mode 640"):
        read_kek_file(path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "l2crypt-kek").write_bytes(bytes(range(32)))
    kek = read_kek_credential("l2crypt-kek", {"CREDENTIALS_DIRECTORY": str(creds)})
    assert kek.kek_id == Kek(bytes(range(32))).kek_id and "credential" in repr(kek)
    assert bytes(range(32)).hex() not in repr(kek)
    with pytest.raises(KekError, match="CREDENTIALS_DIRECTORY is not set"):
        read_kek_credential("l2crypt-kek", {})


@pytest.mark.parametrize("text, problem", [
    ('store = "postgresql://ks@/l2c?host=/run/postgresql"\n', "kek_file: missing: a PostgreSQL store needs"),
    ('kek_file = "/etc/k"\nkek_credential = "k"\n', "not both kek_file and kek_credential"),
    ('kek_file = "/etc/k"\npkcs11_kek_label = "kek"\npkcs11_module = "/m.so"\npkcs11_token_label = "t"\n',
     "pkcs11_kek_label: set one of kek_file, kek_credential and pkcs11_kek_label"),
    ('pkcs11_kek_label = "kek"\npkcs11_module = "/m.so"\n', "pkcs11_token_label: missing: a KEK on a token"),
    ('pkcs11_ca = "no"\n', "pkcs11_ca: not true or false"),
    ('pkcs11_kek_label = "kek"\npkcs11_module = "/m.so"\npkcs11_token_label = "t"\nworkers = 2\n',
     "workers: pkcs11_module runs in one process"),
    ('kek_credential = "a/b"\n', "kek_credential: not a credential name"),
    ('store = "postgresql://ks@db.example.net/l2c?sslmode=require"\nkek_file = "/k"\n', "sslmode=require"),
    ('store_tls_insecure = "yes"\n', "store_tls_insecure: not true or false"),
])
def test_check_config_names_kek_and_store_tls_problems(tmp_path, capsys, text, problem):
    path = tmp_path / "ks.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as code:
        main(["check-config", str(path)])
    assert code.value.code == 2
    assert problem in capsys.readouterr().err


def test_check_config_accepts_a_verified_or_explicitly_insecure_store(tmp_path, capsys):
    path = tmp_path / "ks.toml"
    for text in ('store = "postgresql://ks@db.example.net/l2c?sslrootcert=/etc/ca.crt"\nkek_credential = "k"\n',
                 'store = "postgresql://ks@db.example.net/l2c?sslrootcert=/etc/ca.crt"\npkcs11_kek_label = "k"\n'
                 'pkcs11_module = "/m.so"\npkcs11_token_label = "t"\n',
                 'store = "postgresql://ks@db.example.net/l2c?sslmode=require"\nkek_file = "/k"\n'
                 'store_tls_insecure = true\n'):
        path.write_text(text)
        with pytest.raises(SystemExit) as code:
            main(["check-config", str(path)])
        assert code.value.code == 0, capsys.readouterr().err


def test_a_kek_on_a_token_is_named_by_the_pkcs11_keys_and_may_keep_a_file_ca():
    from keyserverd.config import load_config
    from keyserverd.store.kek import KekToken
    from keyserverd.workers import workers_for

    token = {"pkcs11_module": "/m.so", "pkcs11_token_label": "t", "pkcs11_pin_file": "/p",
             "listen": "127.0.0.1:7788"}
    both = load_config(None, {**token, "pkcs11_kek_label": "kek"})
    assert both.kek_token() == KekToken("/m.so", "t", "kek", "/p") and both.ca_token() is not None
    kek_only = load_config(None, {**token, "pkcs11_kek_label": "kek", "pkcs11_ca": False})
    assert kek_only.kek_token() is not None and kek_only.ca_token() is None
    assert workers_for(kek_only) == 1  # the token's session is not shared across a fork
    ca_only = load_config(None, token)
    assert ca_only.kek_token() is None and ca_only.ca_token() is not None
