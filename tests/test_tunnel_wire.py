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
    assert T.decode_header(datagram) == (SENDER, pw_id, pn, 0, T.KIND_DATA)
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


@pytest.mark.parametrize("version", [0, 1, 2, 255])  # 1: one key per sender, derived by every NETKEY holder
def test_wrong_version(version):                        # 2: no path, no kinds
    datagram = bytearray(T.encode_datagram(SENDER, 1, 1, bytes(40)))
    assert datagram[0] == T.TUNNEL_VERSION == 3
    datagram[0] = version
    assert T.decode_header(bytes(datagram)) == T.UNKNOWN_VERSION


@pytest.mark.parametrize("byte", [0, 5, 7, 15, 0xF0, 0x35])
def test_wrong_kind(byte):
    datagram = bytearray(T.encode_datagram(SENDER, 1, 1, bytes(40)))
    datagram[1] = byte
    assert T.decode_header(bytes(datagram)) == T.UNKNOWN_KIND


@pytest.mark.parametrize("path", [0, 1, 7, 15])
@pytest.mark.parametrize("kind", sorted(T.KINDS))
def test_path_and_kind_share_the_second_byte(path, kind):
    datagram = T.encode_datagram(SENDER, 9, 5, bytes(40), path=path, kind=kind)
    assert datagram[1] == path << 4 | kind
    assert T.decode_header(datagram) == (SENDER, 9, 5, path, kind)


@pytest.mark.parametrize("path, kind", [(16, 1), (-1, 1), (0, 0), (0, 5)])
def test_encode_refuses_a_path_or_kind_out_of_range(path, kind):
    with pytest.raises(ValueError, match="out of range"):
        T.encode_header(SENDER, 1, 1, path, kind)


@pytest.mark.parametrize("sender", [b"", b"12345", b"1234567"])
def test_sender_must_be_six_bytes(sender):
    with pytest.raises(ValueError, match="6 bytes"):
        T.encode_header(sender, 1, 1)
