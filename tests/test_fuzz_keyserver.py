"""Fuzzing the key-server side: the message decoder (``FrameReader`` fed in
arbitrary chunks, msgpack values of every type) and ``KeyService.handle``
with valid-shaped messages from arbitrary sessions.

The service must answer every message with typed actions only (never an
exception), every answer must be a valid wire message, and a pair key may
only ever go to the two hosts of that pair.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import l2crypt.ks_messages as km
from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.errors import RemoteProtocolError
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


@FUZZ
@given(st.lists(st.one_of(_maps(), values), max_size=6), st.data())
def test_frame_reader_in_chunks_yields_valid_messages_or_a_protocol_error(msgs, data):
    stream = b"".join(km.LENGTH.pack(len(b)) + b for b in
                      (msgpack.packb(m, use_bin_type=True) for m in msgs))
    if data.draw(st.booleans()):
        stream += data.draw(st.binary(max_size=30))
    reader = km.FrameReader(max_bytes=4096)
    got = []
    try:
        pos = 0
        while pos < len(stream):
            step = data.draw(st.integers(1, 64))
            got += reader.feed(stream[pos:pos + step])
            pos += step
    except RemoteProtocolError as exc:
        assert exc.code in ("malformed", "oversized")
    for msg in got:
        assert km.validate(dict(msg)) == msg
        km.encode_message(msg)  # what we accept, we could have sent


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
    handed_out = []
    if data.draw(st.booleans()):  # most hosts said hello first, as agents do
        prelude = []
        for who, s in enumerate(sess):
            if s.identity in HOSTS:
                prelude.append((who, {"t": "hello", "rid": 9, "mac": HOSTS[s.identity]}))
                other = "b" if s.identity == "a" else "a"
                prelude.append((who, {"t": "key_req", "rid": 10, "peer_mac": HOSTS[other]}))
        steps = prelude + steps
    for i, (who, msg) in enumerate(steps):
        session = sess[who]
        actions = svc.handle(session, msg, NOW + i * 0.01)  # never raises
        replies = 0
        for target, out in actions:
            kind = target if isinstance(target, str) else target[0]
            assert kind in ACTION_KINDS, target
            if kind in ("close", "disconnect"):
                continue
            km.encode_message(out)  # a valid wire message
            if kind == "reply":
                replies += 1
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
        assert replies == 1, actions
        handed_out.extend(out["t"] for t, out in actions if t == "reply")
    SEEN.update(handed_out)


SEEN: set = set()


def test_the_service_fuzzer_reached_the_key_paths():
    """Runs after the fuzzer: it must have produced real keys, not only refusals."""
    if not SEEN:
        pytest.skip("run together with the service fuzzer")
    assert {"key", "welcome", "error", "pong"} <= SEEN, SEEN
