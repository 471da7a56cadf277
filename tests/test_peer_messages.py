"""keyserverd.peering.messages: round trips, truncation, wrong lengths and types."""

import pytest

from keyserverd.peering import messages as pm
from l2crypt.core.errors import LocalError, RemoteProtocolError

MAC = bytes.fromhex("024c32000011")
KEY = bytes(range(32))

GOOD = [
    {"t": "ca", "rid": 1},
    {"t": "ca_cert", "rid": 1, "cert": b"-----BEGIN CERTIFICATE-----"},
    {"t": "resolve", "rid": 7, "mac": MAC, "from_id": "h1", "hops": 0, "origin": ["sha256:" + "a" * 64]},
    {"t": "resolved", "rid": 7, "id": "h4", "mac": MAC},
    {"t": "resolved", "rid": 7, "id": "h4", "mac": MAC, "key": KEY, "pw_id": 3},
    {"t": "unknown", "rid": 7, "mac": MAC},
    {"t": "ext", "rid": 9, "kind": "netkey", "body": b"\x01\x02"},
    {"t": "ext_ok", "rid": 9, "body": b""},
    {"t": "ping", "rid": 2},
    {"t": "pong", "rid": 2},
    {"t": "error", "rid": 2, "code": "loop", "msg": "already passed"},
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: m["t"])
def test_round_trip(msg):
    data = pm.encode_message(msg)
    assert pm.LENGTH.unpack_from(data)[0] == len(data) - 4
    assert pm.FrameReader().feed(data) == [msg]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: m["t"])
def test_truncated_frames_wait_for_the_rest(msg):
    data = pm.encode_message(msg)
    reader = pm.FrameReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i:i + 1]) == []
    assert reader.feed(data[-1:]) == [msg]
    assert reader.buffered == 0


@pytest.mark.parametrize("bad", [
    {"t": "resolve", "rid": 1, "mac": MAC[:5], "from_id": "h1", "hops": 0, "origin": []},
    {"t": "resolved", "rid": 1, "id": "h4", "mac": MAC, "key": KEY[:31], "pw_id": 1},
    {"t": "resolved", "rid": 1, "id": "h4", "mac": MAC, "key": KEY},          # key without pw_id
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "-bad", "hops": 0, "origin": []},
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "h1", "hops": -1, "origin": []},
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "h1", "hops": 0, "origin": ["x"] * 9},
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "h1", "hops": 0},         # no origin
    {"t": "ping", "rid": 1, "extra": 1},
    {"t": "hello", "rid": 1},
    {"t": "ping", "rid": True},
    {"t": "resolved", "rid": 1, "id": "h4", "mac": MAC, "key": KEY, "pw_id": 0},   # versions start at 1
    {"t": "resolved", "rid": 1, "id": "h4", "mac": MAC, "key": KEY, "pw_id": 2**32},
    {"t": "ext", "rid": 1, "kind": "Multicast!", "body": b""},
    {"t": "ext", "rid": 1, "kind": "k" * 33, "body": b""},
    {"t": "error", "rid": 1, "code": "no such code", "msg": "x"},
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "h" * 65, "hops": 0, "origin": []},
    {"t": "resolve", "rid": 1, "mac": MAC, "from_id": "h1", "hops": 0, "origin": [""]},
])
def test_bad_messages_are_refused_both_ways(bad):
    with pytest.raises(LocalError):
        pm.encode_message(bad)
    import msgpack
    body = msgpack.packb(bad, use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as e:
        pm.FrameReader().feed(pm.LENGTH.pack(len(body)) + body)
    assert e.value.code == "malformed"


def test_oversized_length_is_refused_before_the_body():
    with pytest.raises(RemoteProtocolError) as e:
        pm.FrameReader().feed(pm.LENGTH.pack(pm.MAX_MESSAGE_BYTES + 1))
    assert e.value.code == "oversized"


def test_garbage_body():
    with pytest.raises(RemoteProtocolError):
        pm.FrameReader().feed(pm.LENGTH.pack(3) + b"\xc1\xc1\xc1")
