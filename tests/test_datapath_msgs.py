"""The control <-> datapath messages (``l2crypt.core.datapath_msgs``): round
trips of every type, truncation at every byte, wrong lengths, unknown types."""

import pytest
from hypothesis import given, strategies as st

from l2crypt.core import datapath_msgs as m
from l2crypt.core.engine import GROUP_MAC

MAC = bytes.fromhex("024c32000012")
KEY = bytes(range(32))
OLD_KEY = bytes(range(32, 64))

EXAMPLES = [
    m.PairKey(MAC, 7, 12.5, "h2", KEY, ((6, OLD_KEY, 612.5), (5, KEY, 1212.0))),
    m.PairKey(MAC, 1, 0.0, "h\u00e9", KEY),
    m.MulticastKey(3, 0.0, KEY),
    m.UseCipher("chacha20-poly1305"),
    m.KeyMaxAge(7200.0),
    m.RevokePeer(MAC),
    m.PeerUnknown(MAC),
    m.RetryPending(),
    m.Stop(),
    m.KeyRequest(GROUP_MAC),
    m.Notice("report", MAC, 9),
    m.Stats({"snapshot": {"peers": [], "drops": {"bad_tag": 2}}, "counters": {"sealed": 5}}),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_round_trip(msg):
    data = m.encode_message(msg)
    assert m.decode_message(data) == msg
    assert data[0] == m.TYPE_OF[type(msg)] and int.from_bytes(data[1:5], "big") == len(data) - 5


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_truncation_is_refused(msg):
    data = m.encode_message(msg)
    for n in range(len(data)):
        with pytest.raises(m.DatapathMessageError) as err:
            m.decode_message(data[:n])
        assert err.value.code == "truncated", n


@pytest.mark.parametrize("msg", [x for x in EXAMPLES if not isinstance(x, m.Stats)], ids=lambda x: type(x).__name__)
def test_a_body_longer_than_its_fields_is_refused(msg):
    data = m.encode_message(msg)
    grown = bytes([data[0]]) + (len(data) - 4).to_bytes(4, "big") + data[5:] + b"\0"
    with pytest.raises(m.DatapathMessageError) as err:
        m.decode_message(grown)
    assert err.value.code == "wrong_length"


def test_a_packet_longer_than_its_header_says_is_refused():
    data = m.encode_message(m.KeyRequest(MAC))
    with pytest.raises(m.DatapathMessageError) as err:
        m.decode_message(data + b"\0")
    assert err.value.code == "wrong_length"


def test_unknown_type_bad_text_and_bad_json():
    with pytest.raises(m.DatapathMessageError) as err:
        m.decode_message(b"\x63\0\0\0\0")
    assert err.value.code == "unknown_type"
    with pytest.raises(m.DatapathMessageError) as err:
        m.decode_message(b"\x03\0\0\0\x02\x01\xff")  # UseCipher, one byte that is not UTF-8
    assert err.value.code == "malformed"
    for body in (b"{nope", b"[1, 2]"):
        with pytest.raises(m.DatapathMessageError) as err:
            m.decode_message(b"\x22" + len(body).to_bytes(4, "big") + body)
        assert err.value.code == "malformed"


def test_our_own_bad_values_raise_valueerror():
    for bad in (m.KeyRequest(MAC[:5]), m.Notice("rekey", MAC, -1), m.MulticastKey(1, 0.0, bytes(256)),
                m.Stats({"x": "y" * m.MAX_MESSAGE_BYTES})):
        with pytest.raises(ValueError):
            m.encode_message(bad)
    with pytest.raises(ValueError):
        m.encode_message(("not", "a", "message"))


def test_the_directions():
    assert m.PairKey in m.TO_DATAPATH and m.Stop in m.TO_DATAPATH
    assert m.KeyRequest not in m.TO_DATAPATH and m.Stats not in m.TO_DATAPATH


@given(st.binary(min_size=6, max_size=6), st.integers(0, 2**32 - 1), st.floats(0, 1e9),
       st.text(max_size=60), st.binary(max_size=255),
       st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=255), st.floats(0, 1e9)), max_size=4))
def test_pair_key_round_trips(mac, pw_id, age_s, peer_id, key, older):
    msg = m.PairKey(mac, pw_id, age_s, peer_id, key, tuple(older))
    assert m.decode_message(m.encode_message(msg)) == msg
