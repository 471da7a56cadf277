"""keyserverd.ca: files and modes, fingerprint, signed host certificates, bad CSRs."""

import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyserverd.ca import CertificateAuthority, fingerprint_of
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.errors import RefusedError


def make_csr(cn="whatever-the-host-asks", key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.open(tmp_path / "ks", ("ks1.example.net", "192.0.2.10"))


def test_files_and_modes(ca, tmp_path):
    d = tmp_path / "ks"
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("ca.key", "server.key"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    for name in ("ca.crt", "server.crt"):
        assert (d / name).exists()


def test_reused_on_later_starts(ca, tmp_path):
    again = CertificateAuthority.open(tmp_path / "ks", ("ks1.example.net", "192.0.2.10"))
    assert again.ca_fingerprint() == ca.ca_fingerprint()
    assert again.server_cert_path.read_bytes() == ca.server_cert_path.read_bytes()


def test_server_cert_reissued_when_names_change_but_ca_kept(ca, tmp_path):
    before = ca.server_cert_path.read_bytes()
    again = CertificateAuthority.open(tmp_path / "ks", ("ks2.example.net",))
    assert again.ca_fingerprint() == ca.ca_fingerprint()
    assert again.server_cert_path.read_bytes() != before
    # admin commands (server_names=None) leave it alone
    after = again.server_cert_path.read_bytes()
    CertificateAuthority.open(tmp_path / "ks")
    assert again.server_cert_path.read_bytes() == after


def test_fingerprint_format(ca):
    fp = ca.ca_fingerprint()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    der = ca.ca_cert.public_bytes(serialization.Encoding.DER)
    assert fp == "sha256:" + hashlib.sha256(der).hexdigest()
    assert fingerprint_of(ca.ca_cert_path.read_bytes()) == fp


def test_server_cert(ca):
    cert = x509.load_pem_x509_certificate(ca.server_cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {KEYSERVER_TLS_NAME, "ks1.example.net"}
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.ca_cert)


def test_signed_host_cert(ca):
    pem = ca.sign_csr(make_csr("evil-admin"), "web-1", role="gateway", days=30)
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(ca.ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "gateway"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 30  # 30 days plus the 5-minute backdating
    other = x509.load_pem_x509_certificate(ca.sign_csr(make_csr(), "web-1"))
    assert other.serial_number != cert.serial_number


@pytest.mark.parametrize(
    "csr",
    [
        b"not a csr",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_bad_csr(ca, csr):
    with pytest.raises(RefusedError) as e:
        ca.sign_csr(csr, "web-1")
    assert e.value.code == "bad_csr"


def test_tampered_csr_signature(ca):
    csr = x509.load_pem_x509_csr(make_csr("aaaa"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    i = der.find(b"aaaa")
    der[i : i + 4] = b"bbbb"  # same length, so the DER stays well-formed
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(RefusedError) as e:
        ca.sign_csr(tampered, "web-1")
    assert e.value.code == "bad_csr"


def test_small_rsa_key_refused(ca):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(RefusedError) as e:
        ca.sign_csr(make_csr(key=key), "web-1")
    assert e.value.code == "bad_csr"
