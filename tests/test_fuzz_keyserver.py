"""Fuzzing the key-server side: the message decoder (``FrameReader`` fed in
arbitrary chunks, msgpack values of every type) and ``KeyService.handle``
with valid-shaped messages from arbitrary sessions.

The service must answer every message with typed actions only (never an
exception), every answer must be a valid wire message, and a pair key may
only ever go to the two hosts of that pair.  A seeded loop of fuzzed steps
(no scripted prelude: its keys come from the fuzzed hellos and requests)
must reach every answer a host can get and every refusal code a host can
cause; ``HOST_REFUSALS`` is checked against the codes the service can raise.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import keyserverd.ca as ca_mod
import keyserverd.mac_map as mac_map_mod
import keyserverd.service as service_mod
import keyserverd.store.sql_store as store_mod
import l2crypt.core.ks_messages as km
from drop_reasons import refusal_codes
from message_strategies import decoder_codes, framed_then_mutated
from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.errors import RemoteProtocolError
from test_keyserver_service import make_csr

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NOW = 1_700_000_000.0
HOSTS = {"a": bytes.fromhex("020000000001"), "b": bytes.fromhex("020000000002"),
         "c": bytes.fromhex("020000000003"), "gone": bytes.fromhex("020000000004")}
TOKEN = "tok123.0123456789abcdef"
CSR = make_csr()
CLIENT_TYPES = ["ca", "enroll", "hello", "key_req", "rekey_req", "key_report", "mcast_req", "ping"]
ACTION_KINDS = {"reply", "close", "push", "broadcast", "disconnect"}
#: Every answer a host's request can get.
HOST_ANSWERS = {"ca_cert", "enrolled", "welcome", "key", "unknown", "multicast", "pong", "error"}
#: Every refusal code a host (role ``host``, no peering, MACs not pinned) can cause.
HOST_REFUSALS = {"unauthenticated", "revoked", "rate_limited", "bad_request", "not_bound", "forbidden",
                 "mac_conflict", "enroll_refused", "bad_csr"}
#: Codes a host cannot cause here, and why.
OTHER_REFUSALS = {
    "mac_not_pinned": "only with require_pinned_macs",
    "mac_held_by_peer": "only for a gateway's map_req with a peered key server",
    "no_netkey": "only for a gateway's netkey_req",
    "too_many": "only for a gateway's map_req or netkey_req",
    "mac_bound": "only for a gateway's map_req",
    "bad_token": "an enroll is told only enroll_refused",
    "token_expired": "an enroll is told only enroll_refused",
    "token_used": "an enroll is told only enroll_refused",
    "ip_conflict": "only for a layer-3 host's ip_bind (l3_service)",
    "too_many_ips": "only for a layer-3 host's ip_bind (l3_service)",
}

# --- the decoder ------------------------------------------------------------------

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=20),
              st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)


def _maps():
    fields = sorted(km._FIELDS) + ["t", "x"]
    typed = st.fixed_dictionaries({"t": st.sampled_from(sorted(km.SCHEMA) + ["nope"])})
    return st.builds(lambda base, extra: {**extra, **base}, typed,
                     st.dictionaries(st.sampled_from(fields), values, max_size=6))


def test_frame_reader_in_chunks_yields_valid_messages_or_a_protocol_error():
    """Random maps and values, and valid messages framed by the encoder then
    mutated, fed in chunks; both whole messages and refusals were reached."""
    outcomes: set = set()

    @settings(FUZZ, max_examples=80)
    @given(st.lists(st.one_of(_maps(), values).map(
        lambda m: (lambda b: km.LENGTH.pack(len(b)) + b)(msgpack.packb(m, use_bin_type=True)))
        | framed_then_mutated(km), max_size=4), st.data())
    def feed(framed, data):
        stream = b"".join(framed)
        if data.draw(st.booleans()):
            stream += data.draw(st.binary(max_size=30))
        reader = km.FrameReader(max_bytes=4096)
        try:
            pos = 0
            while pos < len(stream):
                step = data.draw(st.integers(1, 64))
                for msg in reader.feed(stream[pos:pos + step]):
                    assert km.validate(dict(msg)) == msg
                    km.encode_message(msg)  # what we accept, we could have sent
                    outcomes.add("message")
                    event(f"message {msg['t']}")
                pos += step
        except RemoteProtocolError as exc:
            assert exc.code in decoder_codes()
            outcomes.add(exc.code)
            event(f"refused {exc.code}")

    feed()
    assert {"message", "malformed"} <= outcomes, outcomes


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_any_length_prefix_is_bounded(length):
    reader = km.FrameReader()
    try:
        assert reader.feed(km.LENGTH.pack(length)) == []
        assert length <= km.MAX_MESSAGE_BYTES
    except RemoteProtocolError as exc:
        # an empty body is not a message; anything over the limit is refused unread
        assert (exc.code, length > 0) == ("oversized", True) and length > km.MAX_MESSAGE_BYTES \
            or (exc.code, length) == ("malformed", 0)


# --- the service ------------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in HOSTS:
        store.add_host(host_id, None, "host", hash_token(TOKEN), NOW + 60, NOW)
    store.add_host("waiting", None, "host", hash_token(TOKEN), NOW + 60, NOW)
    svc = KeyService(store, "aes-256-gcm", "ks", ca, key_requests_per_s=1000, key_request_burst=100000)
    for host_id in ("a", "b", "c", "gone"):  # everyone bound once
        svc.handle(Session(identity=host_id), {"t": "hello", "rid": 1, "mac": HOSTS[host_id]}, NOW)
    store.revoke_host("gone", NOW)
    yield svc, store
    store.close()


macs = st.one_of(st.sampled_from(list(HOSTS.values()) + [b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01"]),
                 st.binary(min_size=6, max_size=6))
FIELD_VALUES = {
    "rid": st.integers(0, 2**32 - 1),
    "mac": macs, "my_mac": macs, "peer_mac": macs,
    "id": st.sampled_from(list(HOSTS) + ["waiting", "nobody", "a.b-c_d"]),
    "token": st.sampled_from([TOKEN, "x" * 23, ""]),
    "csr": st.sampled_from([CSR, b"", b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n"]),
    "pw_id": st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
}


@st.composite
def client_message(draw):
    t = draw(st.sampled_from(CLIENT_TYPES))
    required, optional = km.SCHEMA[t]
    names = sorted(required) + [o for o in sorted(optional) if draw(st.booleans())]
    msg = {"t": t}
    for name in names:
        msg[name] = draw(FIELD_VALUES[name])
    return km.validate(msg)


# Sessions as the server makes them (an identity from the certificate, or
# none); only the service's hello binds a MAC to one.
sessions = st.builds(
    Session,
    identity=st.sampled_from([None, "a", "b", "c", "gone", "nobody", "waiting"]),
    peer=st.just("198.51.100.7:4242"),
)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4), client_message()), min_size=1, max_size=25),
       st.lists(sessions, min_size=5, max_size=5), st.data())
def test_service_answers_everything_and_keys_only_go_to_their_pair(service, steps, sess, data):
    svc, store = service
    if data.draw(st.booleans()):  # most hosts said hello first, as agents do
        prelude = []
        for who, s in enumerate(sess):
            if s.identity in HOSTS:
                prelude.append((who, {"t": "hello", "rid": 9, "mac": HOSTS[s.identity]}))
                other = "b" if s.identity == "a" else "a"
                prelude.append((who, {"t": "key_req", "rid": 10, "peer_mac": HOSTS[other]}))
        steps = prelude + steps
    for i, (who, msg) in enumerate(steps):
        actions = svc.handle(sess[who], msg, NOW + i * 0.01)  # never raises
        for target, out in check_actions(store, sess[who], msg, actions):
            event(f"answer: {out['t']}" + (f" {out['code']}" if out["t"] == "error" else ""))


def check_actions(store, session: Session, msg: dict, actions) -> list:
    """Check the service's answer to one message; returns the replies."""
    replies = []
    for target, out in actions:
        kind = target if isinstance(target, str) else target[0]
        assert kind in ACTION_KINDS, target
        if kind in ("close", "disconnect"):
            continue
        km.encode_message(out)  # a valid wire message
        if kind == "reply":
            replies.append((target, out))
            assert out["rid"] == msg["rid"]
            if out["t"] == "error":
                assert out["code"] != "internal"
        if out["t"] == "key":
            # The holder of this key message: the requester (reply) or the pushed host.
            holder = session.identity if kind == "reply" else target[1]
            assert holder is not None and holder != out["peer_id"]
            assert not store.is_revoked(holder) and not store.is_revoked(out["peer_id"])
            assert store.pair_key(holder, out["peer_id"], out["pw_id"]) == out["key"]
            assert store.host_by_mac(out["peer_mac"]).id == out["peer_id"]
            if kind == "reply":
                assert session.bound_mac == store.get_host(holder).mac
    assert len(replies) == 1, actions
    return replies


def test_the_refusal_lists_are_the_codes_the_service_can_raise():
    in_code = set().union(*(refusal_codes(m) for m in (service_mod, store_mod, ca_mod, mac_map_mod)))
    assert HOST_REFUSALS | set(OTHER_REFUSALS) == in_code
    assert not HOST_REFUSALS & set(OTHER_REFUSALS)


POOLS = {
    "mac": list(HOSTS.values()) + [b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", bytes.fromhex("02000000ffff")],
    "id": list(HOSTS) + ["waiting", "nobody"],
    "token": [TOKEN, "x" * 23],
    "csr": [CSR, b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n"],
    "pw_id": [0, 1, 2, 2**32 - 1],
}
POOLS["my_mac"] = POOLS["peer_mac"] = POOLS["mac"]


def _random_message(rng: random.Random) -> dict:
    t = rng.choice(CLIENT_TYPES)
    required, optional = km.SCHEMA[t]
    msg = {"t": t, "rid": rng.randrange(1, 2**32)}
    for name in sorted(required) + [o for o in sorted(optional) if rng.random() < 0.3]:
        if name != "rid":
            msg[name] = rng.choice(POOLS[name])
    return km.validate(msg)


def test_fuzz_loop_reaches_every_answer_and_refusal(tmp_path):
    """A seeded loop (it runs the same alone or in any order), with no
    scripted prelude: hosts say hello, ask for keys and make mistakes in
    random order.  Every answer in ``HOST_ANSWERS`` and every code in
    ``HOST_REFUSALS`` is reached, and every answer passes ``check_actions``."""
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in HOSTS:
        store.add_host(host_id, None, "host", hash_token(TOKEN), NOW + 60, NOW)
    store.add_host("waiting", None, "host", hash_token(TOKEN), NOW + 60, NOW)
    store.revoke_host("gone", NOW)
    # A key-request budget a busy host runs out of (40 at once, then 1 a second).
    svc = KeyService(store, "aes-256-gcm", "ks", ca, key_requests_per_s=1, key_request_burst=40)
    rng = random.Random(0x45)
    sessions = [Session(identity=who, peer="198.51.100.7:4242")
                for who in (None, "a", "a", "b", "c", "gone", "nobody", "waiting")]
    answers, refusals = set(), set()
    try:
        for i in range(700):
            session, msg = rng.choice(sessions), _random_message(rng)
            for _, out in check_actions(store, session, msg, svc.handle(session, msg, NOW + i * 0.01)):
                answers.add(out["t"])
                if out["t"] == "error":
                    refusals.add(out["code"])
    finally:
        store.close()
    assert answers == HOST_ANSWERS, sorted(HOST_ANSWERS - answers)
    assert refusals == HOST_REFUSALS, sorted(HOST_REFUSALS - refusals)
    assert set(+svc.refusals) == refusals  # every refusal counted under its code
