"""The bytes a token host signs (``l2crypt.core.challenge_wire``): a fixed
vector, round trips, truncation and wrong lengths."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from l2crypt.core import challenge_wire as W
from l2crypt.core.errors import RemoteProtocolError
from l2crypt.core.x509_der import build_csr_pem, der_tlv, resign_certificate

# Made by hand from the layout in the module docstring: the label, challenge
# 00..1f, host nonce 20..3f, server fingerprint 40..5f, then length 2 and "h1".
VECTOR = bytes.fromhex(
    "6c32637279707420686f73742d61757468207631" "0000"
    + bytes(range(0, 32)).hex() + bytes(range(32, 64)).hex() + bytes(range(64, 96)).hex()
    + "02" + "6831")
FIELDS = (bytes(range(0, 32)), bytes(range(32, 64)), bytes(range(64, 96)), "h1")


def test_fixed_vector_both_ways():
    assert W.encode_signed_challenge(*FIELDS) == VECTOR
    assert W.decode_signed_challenge(VECTOR) == W.SignedChallenge(*FIELDS)
    assert len(VECTOR) == W.ID_OFFSET + 2 and VECTOR[:W.LABEL_LEN] == W.LABEL


@pytest.mark.parametrize("host_id", ["a", "gw-1.site_b", "x" * 64])
def test_round_trip(host_id):
    data = W.encode_signed_challenge(b"\1" * 32, b"\2" * 32, b"\3" * 32, host_id)
    assert W.decode_signed_challenge(data).host_id == host_id


@pytest.mark.parametrize("cut", [0, 1, W.LABEL_LEN, W.ID_LEN_OFFSET, W.ID_OFFSET, len(VECTOR) - 1])
def test_truncated_is_malformed(cut):
    with pytest.raises(RemoteProtocolError) as info:
        W.decode_signed_challenge(VECTOR[:cut])
    assert info.value.code == "malformed"


@pytest.mark.parametrize("bad", [
    VECTOR + b"x",                                   # one byte more than the ID length says
    b"X" + VECTOR[1:],                               # another label
    VECTOR[:W.ID_LEN_OFFSET] + b"\x02-a",            # not a host ID
    VECTOR[:W.ID_LEN_OFFSET] + b"\x02h\xff",         # not ASCII
    VECTOR[:W.ID_LEN_OFFSET] + b"\x41" + b"a" * 65,  # longer than a host ID may be
])
def test_wrong_content_is_malformed(bad):
    with pytest.raises(RemoteProtocolError):
        W.decode_signed_challenge(bad)


@pytest.mark.parametrize("args", [
    (b"\1" * 31, b"\2" * 32, b"\3" * 32, "h1"),
    (b"\1" * 32, b"\2" * 33, b"\3" * 32, "h1"),
    (b"\1" * 32, b"\2" * 32, b"\3" * 16, "h1"),
    (b"\1" * 32, b"\2" * 32, b"\3" * 32, ""),
    (b"\1" * 32, b"\2" * 32, b"\3" * 32, "bad id"),
])
def test_encode_refuses_wrong_lengths(args):
    with pytest.raises(ValueError):
        W.encode_signed_challenge(*args)


# --- DER around a token's signature (x509_der) ------------------------------------

def _soft_sign(key):
    return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))


def test_der_lengths():
    assert der_tlv(0x04, b"") == b"\x04\x00"
    assert der_tlv(0x04, b"a" * 0x7f)[:2] == b"\x04\x7f"
    assert der_tlv(0x04, b"a" * 0x80)[:3] == b"\x04\x81\x80"
    assert der_tlv(0x04, b"a" * 0x1234)[:4] == b"\x04\x82\x12\x34"


def test_csr_signed_outside_cryptography_verifies():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h1")])
    csr = x509.load_pem_x509_csr(build_csr_pem(name, key.public_key(), _soft_sign(key)))
    assert csr.is_signature_valid and csr.subject == name
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    other = ec.generate_private_key(ec.SECP256R1())  # signed by another key than the one it names
    assert not x509.load_pem_x509_csr(build_csr_pem(name, key.public_key(), _soft_sign(other))).is_signature_valid


def test_resigned_certificate_verifies_under_the_real_key():
    import datetime
    ca_key, throwaway = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(throwaway, hashes.SHA256()))
    resigned = resign_certificate(cert, _soft_sign(ca_key))
    resigned.verify_directly_issued_by(resigned)  # self-signed by ca_key now
    assert resigned.tbs_certificate_bytes == cert.tbs_certificate_bytes
