"""Where this host's private key is: a file (mutual TLS) or a token (a challenge).

1. ``load_credentials(state_dir, pin_file)`` looks at the state directory
   ``l2crypt enroll`` wrote:
   - ``host.key`` + ``host.crt`` + ``ca.crt``: the key is a file; the TLS
     context shows the certificate (``tls_files.client_context``);
   - ``host.token`` + ``host.crt`` + ``ca.crt``: the key is on a PKCS#11
     token (``host.token`` names it, see ``pkcs11_token.TokenRef``); the TLS
     context verifies the server as always but shows no certificate, and
     ``token_auth`` answers the key server's challenge inside the channel
     (``l2crypt.core.challenge_auth`` explains why that is sound).
   Both at once is refused: which one is meant would be a guess.
2. The token's PIN comes from ``pin_file`` (config key ``pkcs11_pin_file``) or
   the systemd credential ``pkcs11-pin``, read again at every signature.
3. ``describe()`` is what ``l2crypt status`` shows: ``host_key`` is ``file`` or
   ``token``, and for a token which one.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from l2crypt.core.challenge_auth import Signer
from l2crypt.core.errors import LocalError
from l2crypt.io.pkcs11_token import TokenRef, TokenSigner, read_pin

from .tls_files import CA_CERT, HOST_CERT, HOST_KEY, client_context, host_identity, server_verifying_context

#: The token reference of a host whose key is on a token (JSON; never the PIN).
HOST_TOKEN = "host.token"


@dataclass(frozen=True)
class TokenAuth:
    """What a key-server client needs to answer a challenge: who it is, its
    certificate (PEM) and the device that signs."""

    host_id: str
    cert_pem: bytes
    signer: Signer


@dataclass(frozen=True)
class HostCredentials:
    """This host's identity toward the key server (see the module docstring)."""

    host_id: str
    ssl_ctx: ssl.SSLContext
    #: None: the key is ``host.key`` and TLS is mutual.
    token: TokenRef | None = None
    token_auth: TokenAuth | None = None

    def describe(self) -> dict:
        if self.token is None:
            return {"host_key": "file"}
        return {"host_key": "token", "host_key_token": self.token.describe()}


def load_credentials(state_dir: str | Path, pin_file: str = "") -> HostCredentials:
    """The credentials enrolled in ``state_dir``; LocalError if there are none or two."""
    d = Path(state_dir)
    host_id = host_identity(d)
    if not (d / HOST_TOKEN).exists():
        return HostCredentials(host_id, client_context(d))
    if (d / HOST_KEY).exists():
        raise LocalError(f"{d} holds both {HOST_KEY} and {HOST_TOKEN}: remove the one this host no longer "
                         "uses (or enroll again with --force)")
    if not (d / CA_CERT).exists():
        raise LocalError(f"not enrolled: {d / CA_CERT} is missing (run 'l2crypt enroll' first)")
    ref = TokenRef.load(d / HOST_TOKEN)
    signer = TokenSigner(ref, lambda: read_pin(pin_file, "pkcs11_pin_file"))
    auth = TokenAuth(host_id, (d / HOST_CERT).read_bytes(), signer)
    return HostCredentials(host_id, server_verifying_context(d / CA_CERT), ref, auth)
