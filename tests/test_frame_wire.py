"""Data-frame wire format: round trips, truncation, wrong lengths, a fixed vector."""

import hashlib
import hmac

import pytest

from l2crypt.core import aead, frame_wire
from l2crypt.core.constants import FRAME_OVERHEAD, KEY_ID_PAIR
from l2crypt.core.engine import FrameEngine

ET = 0x88B5
DA = bytes.fromhex("020000000002")
SA = bytes.fromhex("020000000001")

# Fixed vector.  Source: the header layout was computed with l2crypt 0.1.0 and
# checked by hand against the layout in frame_wire's docstring; the body was
# recomputed when the HKDF labels became "l2crypt v2" with the cipher in the
# info (issue 15, Low), and the direction key it uses is checked against an
# RFC 5869 HKDF written out below (VECTOR_DIRECTION_KEY_HEX).  It pins the
# byte layout (header fields, AAD = first 28 bytes, nonce = 4 zero bytes + PN)
# and the key derivation, so that any change to either fails here.  Pair key
# 0x00..0x1f, PW_ID 7, PN 0x0102030405060708, AES-256-GCM, direction SA -> DA,
# plain frame DA|SA|0800|"l2crypt fixed vector!".
VECTOR_PAIR_KEY = bytes(range(32))
VECTOR_PLAIN = DA + SA + b"\x08\x00" + b"l2crypt fixed vector!"
VECTOR_DIRECTION_KEY_HEX = "8ddd6eaa3f5f5755a7c08e7a0e0a619d9cff66fed0b4e56185a9de3fa7b693bb"
EXPECTED_BODY_HEX = "1c12310593db77323b1725114c4275d0fbfb9e6ee7ec9057f75cb9792c279f4bcd7c73811c24f5"
VECTOR_SEALED_HEX = (
    "020000000002" "020000000001" "88b5" "01" "01" "00000007" "0102030405060708"
)


def rfc5869_hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with no salt, written out with hmac: an independent check."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def seal_vector() -> bytes:
    key = aead.pair_direction_key(VECTOR_PAIR_KEY, 7, SA, DA, aead.AES_256_GCM)
    aad = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 7, 0x0102030405060708)
    return aad + aead.make_aead(aead.AES_256_GCM, key).encrypt(aead.nonce(0x0102030405060708), VECTOR_PLAIN[12:], aad)


def test_fixed_vector_header_layout():
    sealed = seal_vector()
    assert sealed[:28].hex() == VECTOR_SEALED_HEX
    assert len(sealed) == len(VECTOR_PLAIN) + FRAME_OVERHEAD


def test_fixed_vector_ciphertext_is_stable():
    # The ciphertext+tag of the vector, recorded from the first run (see above).
    assert seal_vector()[28:].hex() == EXPECTED_BODY_HEX


def test_direction_key_info_layout():
    """info = label | cipher name (length-prefixed) | sender MAC | receiver MAC | PW_ID (u32)."""
    cipher = aead.AES_256_GCM.encode()
    info = b"l2crypt v2 pair" + bytes([len(cipher)]) + cipher + SA + DA + (7).to_bytes(4, "big")
    assert rfc5869_hkdf_sha256(VECTOR_PAIR_KEY, info).hex() == VECTOR_DIRECTION_KEY_HEX
    assert aead.pair_direction_key(VECTOR_PAIR_KEY, 7, SA, DA, aead.AES_256_GCM).hex() == VECTOR_DIRECTION_KEY_HEX


@pytest.mark.parametrize("derive", [
    lambda c: aead.pair_direction_key(VECTOR_PAIR_KEY, 7, SA, DA, c),
    lambda c: aead.group_sender_key(VECTOR_PAIR_KEY, 7, SA, c),
    lambda c: aead.l3_direction_key(VECTOR_PAIR_KEY, 7, "h1", "h2", c),
], ids=["pair", "group", "l3"])
def test_the_same_key_under_the_two_ciphers_derives_different_keys(derive):
    """A segment that changes its cipher never uses one derived key under both
    (issue 15, Low: the HKDF info left the cipher out)."""
    assert derive(aead.AES_256_GCM) != derive(aead.CHACHA20_POLY1305)


def test_overhead_is_at_most_32():
    assert FRAME_OVERHEAD <= 32


def test_decode_round_trip():
    aad = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 9, 12345)
    frame = aad + b"x" * 40
    hdr = frame_wire.decode_header(frame, ET)
    assert hdr == frame_wire.FrameHeader(DA, SA, KEY_ID_PAIR, 9, 12345)
    assert frame_wire.aad_of(frame) == aad
    assert frame_wire.body_of(frame) == b"x" * 40


@pytest.mark.parametrize("length", [0, 1, 13, 14, 27, 28, 45])
def test_truncated(length):
    aad = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 1, 1)
    frame = (aad + b"y" * 64)[:length]
    assert frame_wire.decode_header(frame, ET) == frame_wire.TRUNCATED


def test_smallest_whole_frame_parses():
    frame = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 1, 1) + b"z" * 18
    assert len(frame) == frame_wire.MIN_SEALED_FRAME
    assert isinstance(frame_wire.decode_header(frame, ET), frame_wire.FrameHeader)


def test_wrong_ethertype_and_version():
    frame = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 1, 1) + b"z" * 30
    assert frame_wire.decode_header(frame, 0x88B6) == frame_wire.NOT_L2CRYPT
    bad_version = frame[:14] + b"\x03" + frame[15:]
    assert frame_wire.decode_header(bad_version, ET) == frame_wire.UNKNOWN_VERSION


def test_version_2_carries_the_checksum_flag_beside_the_key_id():
    flagged = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 7, 9, csum_partial=True) + b"z" * 30
    assert flagged[14:16] == bytes([2, 0x80 | KEY_ID_PAIR])
    assert frame_wire.decode_header(flagged, ET) == (DA, SA, KEY_ID_PAIR, 7, 9)
    assert frame_wire.csum_partial_of(flagged)
    plain = frame_wire.encode_header(DA + SA, ET, KEY_ID_PAIR, 7, 9) + b"z" * 30
    assert plain[14] == 1 and not frame_wire.csum_partial_of(plain)
    # Version 1 has no flags: the same byte there is an unknown key id.
    assert frame_wire.decode_header(b"\x01".join((flagged[:14], flagged[15:])), ET).key_id == 0x81


def test_engine_output_matches_vector_layout():
    engine = FrameEngine(SA, pn_start=0x0102030405060708)
    engine.install_pair_key(DA, "h2", VECTOR_PAIR_KEY, 7, 0.0)
    assert engine.seal_from_tap(VECTOR_PLAIN, 0.0) == seal_vector()


def test_mac_parsing():
    assert frame_wire.parse_mac("02:00:00:00:00:01") == SA
    assert frame_wire.format_mac(SA) == "02:00:00:00:00:01"
    for bad in ("02:00", "zz:00:00:00:00:01", "0200.0000.0001", ""):
        with pytest.raises(ValueError):
            frame_wire.parse_mac(bad)
    assert frame_wire.is_group_address(b"\xff" * 6)
    assert frame_wire.is_group_address(bytes.fromhex("333300000001"))
    assert not frame_wire.is_group_address(SA)
