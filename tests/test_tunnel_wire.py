"""The tunnel datagram format: round trip, truncation, wrong lengths and fields."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import tunnel_wire as T

SENDER = bytes.fromhex("024c470000a1")


@given(pw_id=st.integers(0, 2**32 - 1), pn=st.integers(0, 2**64 - 1),
       body=st.binary(min_size=T.MIN_INNER_FRAME + 16, max_size=300))
def test_round_trip(pw_id, pn, body):
    datagram = T.encode_datagram(SENDER, pw_id, pn, body)
    assert len(datagram) == T.HEADER_LEN + len(body)
    assert T.decode_header(datagram) == (SENDER, pw_id, pn)
    assert T.aad_of(datagram) == T.encode_header(SENDER, pw_id, pn)
    assert T.body_of(datagram) == body


def test_header_is_twenty_bytes_and_overhead_36():
    assert T.HEADER_LEN == 20 and T.OVERHEAD == 36 and T.MIN_DATAGRAM == 50


@pytest.mark.parametrize("cut", [0, 1, 19, 20, 49])
def test_truncated(cut):
    datagram = T.encode_datagram(SENDER, 1, 1, bytes(100))[:cut]
    assert T.decode_header(datagram) == T.TRUNCATED


def test_oversized():
    assert T.decode_header(T.encode_datagram(SENDER, 1, 1, bytes(T.MAX_DATAGRAM))) == T.OVERSIZED


@pytest.mark.parametrize("version", [0, 1, 3, 255])  # 1: one key per sender, derived by every NETKEY holder
def test_wrong_version(version):
    datagram = bytearray(T.encode_datagram(SENDER, 1, 1, bytes(40)))
    assert datagram[0] == T.TUNNEL_VERSION == 2
    datagram[0] = version
    assert T.decode_header(bytes(datagram)) == T.UNKNOWN_VERSION


def test_wrong_kind():
    datagram = bytearray(T.encode_datagram(SENDER, 1, 1, bytes(40)))
    datagram[1] = 7
    assert T.decode_header(bytes(datagram)) == T.UNKNOWN_KIND


@pytest.mark.parametrize("sender", [b"", b"12345", b"1234567"])
def test_sender_must_be_six_bytes(sender):
    with pytest.raises(ValueError, match="6 bytes"):
        T.encode_header(sender, 1, 1)
