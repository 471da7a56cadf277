"""virtio-net header wire format: a fixed vector, round trips, truncation,
wrong sizes, and bad input giving only the typed error."""

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from l2crypt.core.vnet_hdr import (
    DATA_VALID,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    VNET_HDR_LEN,
    VNET_HDR_V1_LEN,
    ZERO_VNET_HDR,
    VnetHdr,
    VnetHdrError,
    decode_vnet_hdr,
    encode_vnet_hdr,
    split_vnet_frame,
)

# Fixed vector.  Source: written out by hand from struct virtio_net_hdr in
# linux/include/uapi/linux/virtio_net.h (u8 flags, u8 gso_type, then four
# __virtio16 fields, little-endian on x86): the header the kernel puts before a
# TCPv4 super-frame of a TAP -- NEEDS_CSUM, GSO_TCPV4|ECN, hdr_len 66 (14+20+32),
# gso_size 1448, csum_start 34, csum_offset 16.
VECTOR_BYTES = bytes([0x01, 0x81, 0x42, 0x00, 0xA8, 0x05, 0x22, 0x00, 0x10, 0x00])
VECTOR_HDR = VnetHdr(NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 66, 1448, 34, 16)


def test_fixed_vector_both_ways():
    assert decode_vnet_hdr(VECTOR_BYTES) == VECTOR_HDR
    assert encode_vnet_hdr(VECTOR_HDR) == VECTOR_BYTES
    # Independent: the same fields packed with an explicit little-endian format.
    assert struct.pack("<BBHHHH", 1, 0x81, 66, 1448, 34, 16) == VECTOR_BYTES


def test_sizes_and_constants():
    assert VNET_HDR_LEN == 10 and VNET_HDR_V1_LEN == 12
    assert (NEEDS_CSUM, DATA_VALID) == (1, 2)
    assert (GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN) == (0, 1, 4, 0x80)
    assert encode_vnet_hdr(ZERO_VNET_HDR) == bytes(10)


@pytest.mark.parametrize("size", [VNET_HDR_LEN, VNET_HDR_V1_LEN])
def test_round_trip(size):
    hdr = VnetHdr(NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16, 1 if size == 12 else 0)
    data = encode_vnet_hdr(hdr, size)
    assert len(data) == size
    assert decode_vnet_hdr(data + b"frame follows", size) == hdr


def test_v1_header_carries_num_buffers():
    data = encode_vnet_hdr(VnetHdr(num_buffers=0x0102), VNET_HDR_V1_LEN)
    assert data[10:] == b"\x02\x01"
    assert decode_vnet_hdr(data, VNET_HDR_V1_LEN).num_buffers == 0x0102


@pytest.mark.parametrize("data, size, code", [
    (b"", 10, "vnet_truncated"),
    (VECTOR_BYTES[:9], 10, "vnet_truncated"),
    (VECTOR_BYTES, 12, "vnet_truncated"),
    (VECTOR_BYTES, 8, "vnet_bad_size"),
    (None, 10, "vnet_bad_field"),
    ("0123456789", 10, "vnet_bad_field"),
])
def test_bad_input_is_a_typed_error(data, size, code):
    with pytest.raises(VnetHdrError) as info:
        decode_vnet_hdr(data, size)
    assert info.value.code == code and str(info.value)


@pytest.mark.parametrize("hdr", [
    VnetHdr(gso_size=65536), VnetHdr(flags=256), VnetHdr(csum_start=-1), VnetHdr(hdr_len="66"),
])
def test_encode_out_of_range_is_a_typed_error(hdr):
    with pytest.raises(VnetHdrError) as info:
        encode_vnet_hdr(hdr)
    assert info.value.code == "vnet_bad_field"


def test_split_returns_reason_or_parts():
    assert split_vnet_frame(b"\x01\x02") == "vnet_truncated"
    hdr, frame = split_vnet_frame(VECTOR_BYTES + b"ETHERNET")
    assert hdr == VECTOR_HDR and frame == b"ETHERNET"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=16), st.sampled_from([10, 12]))
def test_any_bytes_decode_or_raise_the_typed_error(data, size):
    try:
        hdr = decode_vnet_hdr(data, size)
    except VnetHdrError:
        event("rejected")
        assert len(data) < size
        return
    event("decoded")
    assert encode_vnet_hdr(hdr, size) == bytes(data[:size])
