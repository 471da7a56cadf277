"""The key server's certificate authority.

1. ``CertificateAuthority.open(state_dir, server_names)`` loads ``ca.key`` /
   ``ca.crt`` from the state directory, or creates them on first start (EC
   P-256, self-signed, 10 years).  It does the same for ``server.key`` /
   ``server.crt``, the TLS server certificate (SAN ``keyserver.l2crypt`` plus
   the configured extra names, EKU serverAuth).  A server certificate whose
   names no longer match the config, or that expires within 30 days, is
   re-issued; the CA itself is never replaced.
2. ``ca_fingerprint()`` is what an operator hands to a host with its token.
3. ``check_csr(csr_pem)`` refuses a malformed or badly signed CSR before the
   enrollment token is spent; ``sign_csr(csr_pem, host_id, role)`` then issues
   the host certificate (CN = host ID, OU = role, EKU clientAuth).  The CSR's
   own subject and extensions are ignored.

Private keys are written with mode 0600 (created by ``os.open(..., 0o600)``,
then renamed into place), the state directory with 0700.

4. The CA key may live on a PKCS#11 token instead (``CaToken``, keyserverd
   ``--pkcs11-module``, ``--pkcs11-token-label``): at the first start the key
   pair is made on the token (EC P-256, not extractable) and the self-signed
   CA certificate is signed there; the state directory keeps ``ca.crt`` and
   ``ca.token`` (module, token label, key label and id; never the PIN), no
   ``ca.key``.  Every host and server certificate is then signed on the
   token (``x509_der.resign_certificate``), with the PIN read from
   ``pkcs11_pin_file`` or the systemd credential ``pkcs11-pin`` each time.  A
   state directory with ``ca.key`` keeps its file CA: a CA is never moved.
   The TLS server key stays a file (Python's ``ssl`` needs it).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.errors import LocalError, RefusedError
from l2crypt.core.x509_der import resign_certificate
from l2crypt.io.pkcs11_token import TokenRef, TokenSigner, generate_key, read_pin

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
SERVER_KEY_FILE = "server.key"
SERVER_CERT_FILE = "server.crt"
CA_TOKEN_FILE = "ca.token"
CA_KEY_LABEL = "l2crypt CA"

CA_DAYS = 3650
SERVER_CERT_DAYS = 3650
SERVER_CERT_RENEW_BEFORE_DAYS = 30
DEFAULT_CERT_DAYS = 365
ROLES = ("host", "gateway")
#: Smallest RSA key we sign for; EC (P-256/P-384/P-521) and Ed25519 are accepted too.
MIN_RSA_BITS = 2048


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Write a file atomically with ``mode`` from its creation on."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class CaToken:
    """Where the CA key is to live: a PKCS#11 module, a token label, the PIN file
    ("" = the systemd credential ``pkcs11-pin``)."""

    module: str
    token_label: str
    pin_file: str = ""

    def pin(self) -> str:
        return read_pin(self.pin_file, "pkcs11_pin_file")


def _sign(builder, key):
    """Sign a certificate builder with a key object or a ``TokenSigner``."""
    if isinstance(key, TokenSigner):
        return resign_certificate(builder.sign(new_key(), hashes.SHA256()), key.sign)
    return builder.sign(key, hashes.SHA256())


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _random_serial() -> int:
    return x509.random_serial_number()


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _san_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


class CertificateAuthority:
    """The CA and the server certificate in one state directory.

    Owned by the keyserverd process; the CLI opens its own to add hosts.
    """

    def __init__(self, state_dir: Path, ca_key, ca_cert: x509.Certificate):
        self.state_dir = state_dir
        self._ca_key = ca_key
        self.ca_cert = ca_cert
        self.ca_cert_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    # --- paths the TLS server loads ----------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.state_dir / CA_CERT_FILE

    @property
    def server_cert_path(self) -> Path:
        return self.state_dir / SERVER_CERT_FILE

    @property
    def server_key_path(self) -> Path:
        return self.state_dir / SERVER_KEY_FILE

    # --- 1. open or create ---------------------------------------------------
    @property
    def on_token(self) -> bool:
        return isinstance(self._ca_key, TokenSigner)

    @classmethod
    def open(cls, state_dir: Path | str, server_names: tuple[str, ...] | None = None,
             token: CaToken | None = None) -> "CertificateAuthority":
        """Load the CA from ``state_dir``, creating it and the server certificate as needed.

        ``server_names`` are the extra SANs the server certificate must carry;
        None (the admin commands) leaves an existing server certificate alone.
        ``token``: where a new CA key is made, or the token an existing one
        is on (see the module docstring, 4).
        """
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_path, cert_path = state_dir / CA_KEY_FILE, state_dir / CA_CERT_FILE
            ref_path = state_dir / CA_TOKEN_FILE
            if ref_path.exists() or (token is not None and token.module):
                ca = cls._open_on_token(state_dir, token)
                ca._ensure_server_cert(server_names)
                return ca
            if key_path.exists() != cert_path.exists():
                missing = cert_path if key_path.exists() else key_path
                raise LocalError(f"{missing} is missing but its pair exists; refusing to create a new CA")
            if key_path.exists():
                ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            else:
                ca_key, ca_cert = cls._create_ca()
                write_private(key_path, key_pem(ca_key), 0o600)
                write_private(cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            ca = cls(state_dir, ca_key, ca_cert)
            ca._ensure_server_cert(server_names)
        except (OSError, ValueError) as exc:
            raise LocalError(f"key server state in {state_dir}: {exc}") from None
        return ca

    @classmethod
    def _open_on_token(cls, state_dir: Path, token: CaToken | None) -> "CertificateAuthority":
        """The CA whose key is on a token, made there at the first start."""
        key_path, cert_path, ref_path = state_dir / CA_KEY_FILE, state_dir / CA_CERT_FILE, state_dir / CA_TOKEN_FILE
        if key_path.exists():
            raise LocalError(f"the CA key is the file {key_path}; a CA on a token is made on the token at "
                             "the first start of a new state directory (a CA is never moved)")
        if ref_path.exists():
            ref = TokenRef.load(ref_path)
            if token is not None and token.module and (token.module, token.token_label) != (ref.module,
                                                                                           ref.token_label):
                raise LocalError(f"the CA key is on {ref.describe()} ({ref_path}), not on token "
                                 f"{token.token_label!r} of {token.module}")
            if not cert_path.exists():
                raise LocalError(f"{cert_path} is missing but {ref_path} exists; refusing to create a new CA")
            pin_source = CaToken(ref.module, ref.token_label, token.pin_file if token else "").pin
            return cls(state_dir, TokenSigner(ref, pin_source), x509.load_pem_x509_certificate(cert_path.read_bytes()))
        if cert_path.exists():
            raise LocalError(f"{cert_path} exists without its key; refusing to create a new CA on the token")
        if not token.token_label:
            raise LocalError("a CA on a token needs pkcs11_token_label as well as pkcs11_module")
        pin = token.pin()
        ref, public = generate_key(token.module, token.token_label, CA_KEY_LABEL, pin)
        signer = TokenSigner(ref, token.pin)
        _, cert = cls._create_ca(signer, public)
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_private(ref_path, ref.to_json().encode(), 0o644)
        return cls(state_dir, signer, cert)

    @staticmethod
    def _create_ca(key=None, public_key=None):
        """A new self-signed CA: with a new file key, or with ``key`` (a ``TokenSigner``) and its ``public_key``."""
        key = key or new_key()
        public_key = public_key or key.public_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l2crypt"),
                x509.NameAttribute(NameOID.COMMON_NAME, "l2crypt key server CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
        )
        return key, _sign(builder, key)

    def _ensure_server_cert(self, server_names: tuple[str, ...] | None) -> None:
        key_path, cert_path = self.server_key_path, self.server_cert_path
        if server_names is None:
            if key_path.exists() and cert_path.exists():
                return
            server_names = ()
        wanted = {KEYSERVER_TLS_NAME, *server_names}
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            fresh = _not_after(cert) - _now() > datetime.timedelta(days=SERVER_CERT_RENEW_BEFORE_DAYS)
            if fresh and _san_names(cert) == {str(_san_entry(n).value) for n in wanted}:
                return
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        else:
            key = new_key()
            write_private(key_path, key_pem(key), 0o600)
        cert = self._issue(
            key.public_key(),
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KEYSERVER_TLS_NAME)]),
            days=SERVER_CERT_DAYS,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            san=[_san_entry(n) for n in sorted(wanted)],
        )
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _issue(self, public_key, subject: x509.Name, days: int, eku, san=None) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_cert.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return _sign(builder, self._ca_key)

    def check_token(self) -> None:
        """With the CA key on a token: sign once and verify, so a missing token or a
        wrong PIN stops keyserverd at its start (LocalError) instead of at the first enrollment."""
        if not self.on_token:
            return
        probe = b"l2crypt keyserverd start"
        try:
            self.ca_cert.public_key().verify(self._ca_key.sign(probe), probe, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise LocalError(f"the key on {self._ca_key.ref.describe()} is not the key of "
                             f"{self.ca_cert_path}") from None

    # --- 2. fingerprint ------------------------------------------------------
    def ca_fingerprint(self) -> str:
        """``sha256:`` + lowercase hex of SHA-256 over the CA certificate's DER."""
        return fingerprint_of(self.ca_cert_pem)

    def server_fingerprint(self) -> bytes:
        """SHA-256 of the server certificate's DER (what a token host signs, ``challenge_auth``)."""
        cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()

    # --- 3. host certificates -----------------------------------------------
    @staticmethod
    def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
        """Parse a CSR and verify its self-signature; raise RefusedError(code "bad_csr")."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as exc:
            raise RefusedError(f"CSR is not a PEM certificate request: {exc}", "bad_csr") from None
        try:
            public_key = csr.public_key()
            valid = csr.is_signature_valid
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise RefusedError(f"CSR cannot be verified: {exc}", "bad_csr") from None
        if not valid:
            raise RefusedError("CSR signature does not verify", "bad_csr")
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < MIN_RSA_BITS:
                raise RefusedError(f"CSR RSA key of {public_key.key_size} bits is too small", "bad_csr")
        elif not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            raise RefusedError(f"CSR key type {type(public_key).__name__} is not accepted", "bad_csr")
        return csr

    def sign_csr(
        self, csr_pem: bytes, host_id: str, role: str = "host", days: int = DEFAULT_CERT_DAYS
    ) -> bytes:
        """Issue a client certificate for ``host_id``; return its PEM.

        The subject is ``CN=host_id, OU=role``; whatever the CSR asked for is ignored.
        """
        if role not in ROLES:
            raise LocalError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if days <= 0:
            raise LocalError(f"certificate validity must be positive, not {days} days")
        csr = self.check_csr(csr_pem)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "l2crypt"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, host_id),
            ]
        )
        cert = self._issue(csr.public_key(), subject, days=days, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint_of(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER (the agent checks the CA this way)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()
