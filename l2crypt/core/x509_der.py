"""X.509 structures signed by a key that ``cryptography`` cannot hold (a token's).

``cryptography`` signs CSRs and certificates only with keys it holds itself.
A key on a PKCS#11 token signs bytes; these helpers put the DER around them
(RFC 2986 for the request, RFC 5280 for the certificate), always with
ecdsa-with-SHA256:

1. ``build_csr_pem(subject, public_key, sign)``: CertificationRequestInfo
   (version 0, the subject, the key, no attributes), signed by ``sign``.
2. ``resign_certificate(cert, sign)``: the to-be-signed part of a certificate
   that ``cryptography`` built (and signed with a throwaway EC key, so that
   its signature algorithm is already ecdsa-with-SHA256), signed again by
   ``sign``.

``sign(data) -> bytes`` returns a DER ECDSA signature over SHA-256 of ``data``.
"""

from __future__ import annotations

from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: DER of AlgorithmIdentifier { ecdsa-with-SHA256 (1.2.840.10045.4.3.2) }, no parameters (RFC 5758).
ECDSA_SHA256_ALGORITHM = bytes.fromhex("300a06082a8648ce3d040302")
TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_SEQUENCE = 0x30
TAG_CONTEXT_0 = 0xA0

SignFunction = Callable[[bytes], bytes]


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        body = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return bytes([tag]) + length + content


def _signed(tbs: bytes, sign: SignFunction) -> bytes:
    """SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }."""
    signature = der_tlv(TAG_BIT_STRING, b"\0" + sign(tbs))
    return der_tlv(TAG_SEQUENCE, tbs + ECDSA_SHA256_ALGORITHM + signature)


def build_csr_pem(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, sign: SignFunction) -> bytes:
    """A PKCS#10 request for ``public_key``, signed by ``sign`` (which must hold its private half)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = der_tlv(TAG_SEQUENCE, der_tlv(TAG_INTEGER, b"\0") + subject.public_bytes() + spki
                   + der_tlv(TAG_CONTEXT_0, b""))
    csr = x509.load_der_x509_csr(_signed(info, sign))
    return csr.public_bytes(serialization.Encoding.PEM)


def resign_certificate(cert: x509.Certificate, sign: SignFunction) -> x509.Certificate:
    """``cert`` (signed with ecdsa-with-SHA256 by any key) signed by ``sign`` instead."""
    if cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise ValueError("resign_certificate: build the certificate with an EC key and SHA-256")
    return x509.load_der_x509_certificate(_signed(cert.tbs_certificate_bytes, sign))
