"""Key-server message framing: round trips, truncation, wrong lengths, limits, fuzz."""

from collections import Counter

import msgpack
import pytest
from hypothesis import event, given, settings, strategies as st

from message_strategies import decoder_codes, framed_then_mutated

from l2crypt.core import ks_messages as km
from l2crypt.core.constants import MAX_MESSAGE_BYTES
from l2crypt.core.errors import LocalError, RemoteProtocolError

MAC = bytes.fromhex("020000000001")
KEY = bytes(range(32))

EXAMPLES = [
    {"t": "ca", "rid": 1},
    {"t": "enroll", "rid": 2, "id": "h1", "token": "abcdef.0123456789abcdef", "csr": b"-----BEGIN"},
    {"t": "hello", "rid": 3, "mac": MAC},
    {"t": "key_req", "rid": 4, "peer_mac": MAC},
    {"t": "key_req", "rid": 4, "peer_mac": MAC, "my_mac": MAC},
    {"t": "rekey_req", "rid": 6, "peer_mac": MAC, "pw_id": 3},
    {"t": "key_report", "rid": 7, "peer_mac": MAC, "pw_id": 3},
    {"t": "mcast_req", "rid": 8},
    {"t": "peer_revoked", "rid": 0, "peer_mac": MAC},
    {"t": "ping", "rid": 5},
    {"t": "ca_cert", "rid": 1, "cert": b"pem"},
    {"t": "enrolled", "rid": 2, "cert": b"pem", "ca": b"pem"},
    {"t": "welcome", "rid": 3, "id": "h1", "mac": MAC, "cipher": "aes-256-gcm",
     "multicast_key": KEY, "multicast_pw_id": 1, "server": "ks1"},
    {"t": "key", "rid": 0, "peer_mac": MAC, "peer_id": "h2", "key": KEY, "pw_id": 7},
    {"t": "key", "rid": 9, "peer_mac": MAC, "peer_id": "h2", "key": KEY, "pw_id": 7, "age_s": 3,
     "older": [[6, KEY, 8], [5, KEY, 13]]},
    {"t": "welcome", "rid": 3, "id": "h1", "mac": MAC, "cipher": "aes-256-gcm",
     "multicast_key": KEY, "multicast_pw_id": 1, "server": "ks1", "key_max_age_s": 7200},
    {"t": "unknown", "rid": 4, "peer_mac": MAC},
    {"t": "multicast", "rid": 0, "key": KEY, "pw_id": 2},
    {"t": "pong", "rid": 5},
    {"t": "error", "rid": 4, "code": "forbidden", "msg": "no"},
]


OLDER_BAD = [
    [[6, KEY, 8], [5, KEY, 13], [4, KEY, 18]],   # more than the ring holds
    [[5, KEY, 8], [6, KEY, 13]],                 # not newest first
    [[7, KEY, 8]],                               # not older than pw_id
    [[6, KEY[:31], 8]],                          # short key
    [[6, KEY, True]],                            # bool age
    [[6, KEY]],                                  # missing age
    [6, KEY, 8],                                 # not a list of versions
]


@pytest.mark.parametrize("older", OLDER_BAD)
def test_bad_older_versions_are_refused(older):
    msg = {"t": "key", "rid": 1, "peer_mac": MAC, "peer_id": "h2", "key": KEY, "pw_id": 7, "older": older}
    with pytest.raises(RemoteProtocolError):
        km.decode_body(msgpack.packb(msg, use_bin_type=True))


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m["t"])
def test_round_trip(msg):
    assert km.decode_message(km.encode_message(msg)) == msg


def test_stream_split_anywhere():
    data = b"".join(km.encode_message(m) for m in EXAMPLES)
    for cut in range(0, len(data), 7):
        reader = km.FrameReader()
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert got == EXAMPLES


def test_truncated_is_not_a_message():
    data = km.encode_message(EXAMPLES[2])
    with pytest.raises(RemoteProtocolError):
        km.decode_message(data[:-1])


@pytest.mark.parametrize("bad", [
    {"t": "hello", "rid": 1, "mac": b"\x00" * 5},               # wrong MAC length
    {"t": "key", "rid": 1, "peer_mac": MAC, "peer_id": "h", "key": b"k" * 31, "pw_id": 1},
    {"t": "hello", "rid": -1, "mac": MAC},                      # negative rid
    {"t": "hello", "rid": True, "mac": MAC},                    # bool is not an int here
    {"t": "hello", "rid": 1},                                   # missing field
    {"t": "hello", "rid": 1, "mac": MAC, "id": "x"},            # extra field
    {"t": "teleport", "rid": 1},                                # unknown type
    {"t": "enroll", "rid": 1, "id": "../etc", "token": "t", "csr": b""},  # bad ID
    [1, 2, 3],                                                  # not a map
])
def test_wrong_shapes_are_refused(bad):
    body = msgpack.packb(bad, use_bin_type=True)
    with pytest.raises(RemoteProtocolError):
        km.decode_message(km.LENGTH.pack(len(body)) + body)
    if isinstance(bad, dict):
        with pytest.raises(LocalError):
            km.encode_message(bad)


def test_oversized_length_is_refused_before_the_body_arrives():
    reader = km.FrameReader()
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(km.LENGTH.pack(MAX_MESSAGE_BYTES + 1))
    assert info.value.code == "oversized"


def test_garbage_body():
    with pytest.raises(RemoteProtocolError):
        km.decode_message(b"\x00\x00\x00\x03\xc1\xc1\xc1")


def test_fuzz_reader_reaches_whole_messages_and_every_error_code():
    """Valid messages of every type, framed by ``encode_message`` and mutated,
    fed in chunks: what comes out is valid, every failure is a protocol error,
    and both messages and every error code of the codec were reached."""
    outcomes: Counter = Counter()

    @settings(max_examples=100, deadline=None)
    @given(st.lists(framed_then_mutated(km), min_size=1, max_size=3), st.integers(1, 64))
    def feed(framed, chunk):
        stream, reader = b"".join(framed), km.FrameReader()
        try:
            for pos in range(0, len(stream), chunk):
                for msg in reader.feed(stream[pos:pos + chunk]):
                    assert km.decode_message(km.encode_message(msg)) == msg  # what we accept, we could send
                    outcomes["message"] += 1
                    event(f"message {msg['t']}")
        except RemoteProtocolError as exc:
            outcomes[exc.code] += 1
            event(f"refused {exc.code}")

    feed()
    assert set(outcomes) == {"message"} | decoder_codes(), outcomes


def test_fuzz_single_bodies_decode_to_themselves_or_are_malformed():
    """One mutated body at a time: a body that decodes is the message it
    packs; both outcomes were reached."""
    outcomes: Counter = Counter()

    @settings(max_examples=150, deadline=None)
    @given(framed_then_mutated(km))
    def decode(framed):
        try:
            msg = km.decode_body(framed[4:])
        except RemoteProtocolError as exc:
            assert exc.code == "malformed"
            outcomes["malformed"] += 1
            event("malformed")
            return
        assert msgpack.unpackb(framed[4:], raw=False) == msg
        outcomes["message"] += 1
        event(f"message {msg['t']}")

    decode()
    assert set(outcomes) == {"message", "malformed"}, outcomes
