"""Enrollment: trade a one-time token for a client certificate (kubeadm join style).

1. Connect without verifying the server and ask for the CA certificate.
2. Check its SHA-256 fingerprint against the one the operator gave; stop on
   a mismatch before anything secret is sent.
3. Reconnect, now verifying the server against that CA (and its fixed name).
4. Make a key pair, send a CSR with the token, store the signed certificate,
   the key (0600) and the CA in the state directory.  With a PKCS#11 token
   (``--pkcs11-module``, ``--token-label``) the key pair is made on the token
   (EC P-256, not extractable), the token signs the CSR, and the state
   directory gets ``host.token`` (module, token label, key label and id;
   never the PIN) instead of ``host.key``.
"""

from __future__ import annotations

import getpass
import socket
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from l2crypt.core import ks_messages
from l2crypt.core.errors import LocalError, RefusedError, RemoteProtocolError

from l2crypt.core.x509_der import build_csr_pem
from l2crypt.io.pkcs11_token import TokenSigner, generate_key, read_pin

from .config import parse_hostport
from .host_key import HOST_TOKEN
from .tls_files import (
    CA_CERT,
    HOST_CERT,
    HOST_KEY,
    SERVER_NAME,
    fingerprint_of_pem,
    normalize_fingerprint,
    write_private,
)

TIMEOUT_S = 10.0
#: Said when the token is given on the command line.
TOKEN_ON_COMMAND_LINE = ("the token on the command line is visible in ps and in shell history; "
                         "use --token-file FILE or --token - (read from stdin)")


def read_token(token: str | None, token_file: str | None, warn=lambda text: None) -> str:
    """The enrollment token: ``--token -`` reads stdin (a terminal is asked without
    echo), ``--token-file`` reads a file, ``--token VALUE`` works with a warning."""
    if (token is None) == (token_file is None):
        raise LocalError("give the token once: --token-file FILE, --token - (stdin) or --token VALUE")
    if token_file is not None:
        path = Path(token_file)
        try:
            text = path.read_text()
            if path.stat().st_mode & 0o077:
                warn(f"{token_file} can be read by other users; chmod 600 it")
        except OSError as exc:
            raise LocalError(f"--token-file: {token_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise LocalError(f"--token-file: {token_file}: not a text file") from None
    elif token == "-":
        text = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    else:
        warn(TOKEN_ON_COMMAND_LINE)
        text = token
    text = text.strip()
    if not text or len(text) > 256 or any(c.isspace() for c in text):
        raise LocalError("the token is empty or not one word (keyserverd host add prints it)")
    return text


def _exchange(tls: ssl.SSLSocket, msg: dict) -> dict:
    tls.sendall(ks_messages.encode_message(msg))
    reader = ks_messages.FrameReader()
    while True:
        data = tls.recv(65536)
        if not data:
            raise RemoteProtocolError("the key server closed the connection", "closed")
        msgs = reader.feed(data)
        if msgs:
            return msgs[0]


def _connect(host: str, port: int, ctx: ssl.SSLContext, server_hostname: str | None) -> ssl.SSLSocket:
    try:
        raw = socket.create_connection((host, port), timeout=TIMEOUT_S)
    except OSError as exc:
        raise LocalError(f"cannot reach the key server at {host}:{port}: {exc.strerror or exc}") from None
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise LocalError(f"TLS with the key server at {host}:{port} failed: {exc}") from None


def _check(reply: dict, want: str) -> dict:
    if reply["t"] == "error":
        raise RefusedError(f"the key server refused: {reply['msg']} ({reply['code']})", reply["code"])
    if reply["t"] != want:
        raise RemoteProtocolError(f"unexpected answer {reply['t']!r} (wanted {want!r})")
    return reply


def fetch_ca(server: str) -> bytes:
    """Step 1: the CA certificate, unverified (the caller checks its fingerprint)."""
    host, port = parse_hostport(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with _connect(host, port, ctx, None) as tls:
        return _check(_exchange(tls, {"t": "ca", "rid": 1}), "ca_cert")["cert"]


def enroll(server: str, host_id: str, token: str, ca_fingerprint: str, state_dir: str, force: bool = False,
           pkcs11_module: str | None = None, token_label: str | None = None, pin_file: str | None = None) -> str:
    """Run the whole enrollment; returns the path of the stored certificate.
    ``pkcs11_module`` and ``token_label``: make the key on that token (PIN from
    ``pin_file``, else the systemd credential ``pkcs11-pin``)."""
    if bool(pkcs11_module) != bool(token_label) or (pin_file and not pkcs11_module):
        raise LocalError("a key on a token needs --pkcs11-module and --token-label (and --pin-file "
                         "or the systemd credential pkcs11-pin)")
    pin = read_pin(pin_file) if pkcs11_module else None
    if not ks_messages.valid_host_id(host_id):
        raise LocalError(f"--id: not a valid host ID: {host_id!r}")
    try:
        expected = normalize_fingerprint(ca_fingerprint)
        parse_hostport(server)
    except ValueError as exc:
        raise LocalError(str(exc)) from None
    d = Path(state_dir)
    if (d / HOST_CERT).exists() and not force:
        raise LocalError(f"{d / HOST_CERT} exists: this host is already enrolled (use --force to replace it)")

    ca_pem = fetch_ca(server)
    try:
        actual = fingerprint_of_pem(ca_pem)
    except ValueError:
        raise RemoteProtocolError("the key server sent a CA that is not a PEM certificate") from None
    if actual != expected:
        raise LocalError(
            f"CA fingerprint mismatch: the server at {server} has {actual}, expected {expected}; "
            "nothing was sent"
        )

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)])
    if pkcs11_module:
        key = None
        ref, public = generate_key(pkcs11_module, token_label, f"l2crypt host {host_id}", pin)
        csr_pem = build_csr_pem(subject, public, TokenSigner(ref, lambda: pin).sign)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        csr_pem = (x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
                   .public_bytes(serialization.Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_pem.decode())
    host, port = parse_hostport(server)
    with _connect(host, port, ctx, SERVER_NAME) as tls:
        reply = _check(
            _exchange(tls, {
                "t": "enroll", "rid": 1, "id": host_id, "token": token,
                "csr": csr_pem,
            }),
            "enrolled",
        )
    d.mkdir(parents=True, exist_ok=True)
    if key is None:
        (d / HOST_KEY).unlink(missing_ok=True)  # a key file of an earlier enrollment
        ref.save(d / HOST_TOKEN)
    else:
        (d / HOST_TOKEN).unlink(missing_ok=True)
        write_private(
            d / HOST_KEY,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        )
    (d / HOST_CERT).write_bytes(reply["cert"])
    (d / CA_CERT).write_bytes(ca_pem)
    return str(d / HOST_CERT)
