"""Where a host keeps its certificate, and the TLS contexts built from it.

State directory layout (written by ``l2crypt enroll``):

    host.key   the host's private key (mode 0600), or, for a key on a PKCS#11
    host.token token, the reference to it (``host_key``; never the PIN)
    host.crt   its certificate, signed by the key server's CA (CN = host ID)
    ca.crt     the CA, pinned by fingerprint at enrollment
"""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

from cryptography import x509

from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.errors import LocalError

HOST_KEY = "host.key"
HOST_CERT = "host.crt"
CA_CERT = "ca.crt"


def fingerprint_of_pem(pem: bytes) -> str:
    """``sha256:<hex>`` over the DER of a PEM certificate; raises ValueError."""
    cert = x509.load_pem_x509_certificate(pem)
    from cryptography.hazmat.primitives.serialization import Encoding

    return "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``sha256:AB:CD...``, ``abcd...``; return ``sha256:abcd...`` or raise ValueError."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    value = value.replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"not a SHA-256 fingerprint: {text!r} (want sha256:<64 hex digits>)")
    return "sha256:" + value


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def host_identity(state_dir: str | Path) -> str:
    """The host ID (certificate CN) enrolled in ``state_dir``."""
    cert_path = Path(state_dir) / HOST_CERT
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise LocalError(f"not enrolled: {cert_path} is missing (run 'l2crypt enroll' first)") from None
    except ValueError:
        raise LocalError(f"{cert_path}: not a PEM certificate") from None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        raise LocalError(f"{cert_path}: certificate has no CN")
    return str(names[0].value)


def server_verifying_context(ca_path: Path) -> ssl.SSLContext:
    """TLS 1.3 toward the key server, trusting only the pinned CA; no client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca_path))
    except (ssl.SSLError, OSError) as exc:
        raise LocalError(f"cannot load the pinned CA {ca_path}: {exc}") from None
    return ctx


def client_context(state_dir: str | Path) -> ssl.SSLContext:
    """Mutual TLS 1.3 toward the key server, trusting only the pinned CA."""
    d = Path(state_dir)
    for name in (HOST_KEY, HOST_CERT, CA_CERT):
        if not (d / name).exists():
            raise LocalError(f"not enrolled: {d / name} is missing (run 'l2crypt enroll' first)")
    ctx = server_verifying_context(d / CA_CERT)
    try:
        ctx.load_cert_chain(certfile=str(d / HOST_CERT), keyfile=str(d / HOST_KEY))
    except (ssl.SSLError, OSError) as exc:
        raise LocalError(f"cannot load the host certificate from {d}: {exc}") from None
    return ctx


SERVER_NAME = KEYSERVER_TLS_NAME
