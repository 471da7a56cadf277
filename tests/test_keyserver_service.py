"""keyserverd.service: every rule and error code, without sockets."""

import ast
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
import keyserverd.service
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.ks_messages import encode_message
from l2crypt.ops.logs import JsonFormatter, TextFormatter


def logged(records) -> list[str]:
    """The log lines as an operator reads them, in both formats."""
    return [f.format(r) for r in records for f in (TextFormatter(), JsonFormatter())]

NOW = 1_700_000_000.0
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")
TOKEN_A = "aaaaaa.0123456789abcdef"


def make_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def env(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in ("a", "b", "c"):
        store.add_host(host_id, None, "host", hash_token(TOKEN_A), NOW + 60, NOW)
    service = KeyService(store, "chacha20-poly1305", "ks-test", ca)
    yield service, store
    store.close()


def call(service, session, msg):
    actions = service.handle(session, msg, NOW)
    for target, out in actions:  # every answer must be a valid wire message
        if target != "close":
            encode_message(out)
    return actions


def reply(actions):
    replies = [m for t, m in actions if t == "reply"]
    assert len(replies) == 1
    return replies[0]


def bound(service, host_id, mac):
    s = Session(identity=host_id)
    assert reply(call(service, s, {"t": "hello", "rid": 1, "mac": mac}))["t"] == "welcome"
    return s


def test_service_core_imports_no_io():
    tree = ast.parse(Path(keyserverd.service.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "asyncio", "time", "ssl", "select"}


@pytest.mark.parametrize("kind", ["hello", "key_req", "ping"])
def test_without_certificate_only_ca_and_enroll(env, kind):
    service, _ = env
    msg = {"t": kind, "rid": 7}
    if kind == "hello":
        msg["mac"] = MAC_A
    if kind == "key_req":
        msg["peer_mac"] = MAC_B
    out = reply(call(service, Session(identity=None), msg))
    assert out == {"t": "error", "rid": 7, "code": "unauthenticated", "msg": out["msg"]}


def test_ca(env):
    service, _ = env
    out = reply(call(service, Session(identity=None), {"t": "ca", "rid": 3}))
    assert out["t"] == "ca_cert" and out["rid"] == 3
    assert out["cert"] == service.ca.ca_cert_pem


def test_enroll(env):
    service, store = env
    msg = {"t": "enroll", "rid": 2, "id": "a", "token": TOKEN_A, "csr": make_csr()}
    out = reply(call(service, Session(identity=None), msg))
    assert out["t"] == "enrolled" and out["ca"] == service.ca.ca_cert_pem
    cert = x509.load_pem_x509_certificate(out["cert"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    assert store.get_host("a").enrolled
    again = reply(call(service, Session(identity=None), dict(msg, rid=3)))
    assert again["code"] == "enroll_refused"


@pytest.mark.parametrize(
    "host_id, token, csr, code",
    [
        ("a", "bbbbbb.0123456789abcdef", None, "enroll_refused"),
        ("nobody", TOKEN_A, None, "enroll_refused"),
        ("a", TOKEN_A, b"garbage", "bad_csr"),
    ],
)
def test_enroll_refusals(env, host_id, token, csr, code):
    service, store = env
    msg = {"t": "enroll", "rid": 2, "id": host_id, "token": token, "csr": csr or make_csr()}
    assert reply(call(service, Session(identity=None), msg))["code"] == code
    assert not store.get_host("a").token_used  # a refusal never spends the token


def test_enroll_expired(env):
    service, _ = env
    msg = {"t": "enroll", "rid": 2, "id": "a", "token": TOKEN_A, "csr": make_csr()}
    out = service.handle(Session(identity=None), msg, NOW + 61)
    assert reply(out)["code"] == "enroll_refused"


def test_every_enrollment_refusal_looks_the_same_to_the_client(env, caplog):
    """Unknown ID, wrong token, used token, expired token, revoked host: one answer
    (so a client cannot probe which IDs exist); the log keeps the real reason."""
    service, store = env
    store.add_host("used", None, "host", hash_token(TOKEN_A), NOW + 60, NOW)
    store.consume_token("used", hash_token(TOKEN_A), NOW)
    store.add_host("gone", None, "host", hash_token(TOKEN_A), NOW + 60, NOW)
    store.revoke_host("gone", NOW)
    cases = {  # (host ID, token, time) -> the reason the log must name
        ("nobody", TOKEN_A, NOW): "bad_token",
        ("a", "bbbbbb.0123456789abcdef", NOW): "bad_token",
        ("used", TOKEN_A, NOW): "token_used",
        ("a", TOKEN_A, NOW + 61): "token_expired",
        ("gone", TOKEN_A, NOW): "revoked",
    }
    answers = set()
    for i, ((host_id, token, now), reason) in enumerate(cases.items()):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="keyserverd"):
            out = service.handle(Session(identity=None, peer=f"192.0.2.{i}:1"),
                                 {"t": "enroll", "rid": 7, "id": host_id, "token": token, "csr": make_csr()}, now)
        answer = reply(out)
        answers.add((answer["t"], answer["code"], answer["msg"]))
        lines = logged(caplog.records)
        assert any("enroll_refused" in line and f"code={reason}" in line and f"host={host_id}" in line
                   for line in lines), (reason, lines)
    assert answers == {("error", "enroll_refused", keyserverd.service.ENROLL_REFUSED_TEXT)}
    assert not store.get_host("a").token_used


def test_hello_welcome(env):
    service, store = env
    s = Session(identity="a")
    out = reply(call(service, s, {"t": "hello", "rid": 4, "mac": MAC_A}))
    key, pw_id = store.current_multicast_key()
    assert out == {
        "t": "welcome", "rid": 4, "id": "a", "mac": MAC_A, "cipher": "chacha20-poly1305",
        "multicast_key": key, "multicast_pw_id": pw_id, "server": "ks-test",
        "key_max_age_s": 7200, "revoked_macs": b"",  # 2 x rekey_after_s; nobody is revoked
    }
    assert s.bound_mac == MAC_A


def test_hello_mac_conflict_is_logged(env, caplog):
    service, _ = env
    bound(service, "a", MAC_A)
    s = Session(identity="b")
    with caplog.at_level(logging.WARNING, logger="keyserverd"):
        out = reply(call(service, s, {"t": "hello", "rid": 5, "mac": MAC_A}))
    assert out["code"] == "mac_conflict"
    assert s.bound_mac is None
    assert any("code=mac_conflict" in ln and "host=b" in ln for ln in logged(caplog.records))


def test_revoked_is_refused_and_closed(env):
    service, store = env
    s = bound(service, "a", MAC_A)
    store.revoke_host("a", NOW)
    actions = call(service, s, {"t": "ping", "rid": 9})
    assert reply(actions)["code"] == "revoked"
    assert ("close", {}) in actions


def test_unknown_cert_id_counts_as_revoked(env):
    service, _ = env
    actions = call(service, Session(identity="stranger"), {"t": "hello", "rid": 1, "mac": MAC_C})
    assert reply(actions)["code"] == "revoked"


def test_key_req_before_hello(env):
    service, _ = env
    out = reply(call(service, Session(identity="a"), {"t": "key_req", "rid": 1, "peer_mac": MAC_B}))
    assert out["code"] == "not_bound"


def test_key_req_forbidden_my_mac_is_logged(env, caplog):
    service, _ = env
    s = bound(service, "a", MAC_A)
    bound(service, "b", MAC_B)
    msg = {"t": "key_req", "rid": 1, "peer_mac": MAC_B, "my_mac": MAC_C}
    with caplog.at_level(logging.WARNING, logger="keyserverd"):
        actions = call(service, s, msg)
    assert reply(actions)["code"] == "forbidden"
    assert len(actions) == 1  # nothing pushed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("code=forbidden" in ln and "host=a " in ln and "02:00:00:00:00:03" in ln for ln in logged(warnings))


def test_key_req_own_mac(env):
    service, _ = env
    s = bound(service, "a", MAC_A)
    assert reply(call(service, s, {"t": "key_req", "rid": 1, "peer_mac": MAC_A}))["code"] == "bad_request"


def test_key_req_unknown_and_revoked_peer(env):
    service, store = env
    s = bound(service, "a", MAC_A)
    bound(service, "b", MAC_B)
    assert reply(call(service, s, {"t": "key_req", "rid": 1, "peer_mac": MAC_C})) == {
        "t": "unknown", "rid": 1, "peer_mac": MAC_C}
    store.revoke_host("b", NOW)
    actions = call(service, s, {"t": "key_req", "rid": 2, "peer_mac": MAC_B})
    assert reply(actions)["t"] == "unknown" and len(actions) == 1


def test_key_req_answers_and_pushes_to_peer(env, caplog):
    service, store = env
    s = bound(service, "a", MAC_A)
    bound(service, "b", MAC_B)
    with caplog.at_level(logging.DEBUG, logger="keyserverd"):
        actions = call(service, s, {"t": "key_req", "rid": 11, "peer_mac": MAC_B, "my_mac": MAC_A})
    key, pw_id = store.get_or_create_pair_key("a", "b", NOW)
    assert actions == [
        ("reply", {"t": "key", "rid": 11, "peer_mac": MAC_B, "peer_id": "b", "key": key, "pw_id": pw_id,
                   "age_s": 0}),
        (("push", "b"), {"t": "key", "rid": 0, "peer_mac": MAC_A, "peer_id": "a", "key": key, "pw_id": pw_id,
                         "age_s": 0}),
    ]
    assert pw_id == 1
    # the other direction gets the same key
    sb = Session(identity="b", bound_mac=MAC_B)
    assert reply(call(service, sb, {"t": "key_req", "rid": 1, "peer_mac": MAC_A}))["key"] == key
    text = "\n".join(logged(caplog.records))
    assert "pair_key_sent" in text
    assert key.hex() not in text and repr(key) not in text and TOKEN_A not in text


def test_ping_and_server_to_client_types(env):
    service, _ = env
    s = Session(identity="a")
    assert reply(call(service, s, {"t": "ping", "rid": 8})) == {"t": "pong", "rid": 8}
    assert reply(call(service, s, {"t": "pong", "rid": 8}))["code"] == "bad_request"


def test_bad_cipher():
    with pytest.raises(ValueError):
        KeyService(None, "rot13", "x", None)
