"""Host authentication by challenge, for hosts whose key lives on a signing device.

Why a challenge, and how it rides on TLS
----------------------------------------
Python's ``ssl`` cannot hand a PKCS#11 key to OpenSSL, so a host whose key
is on a token cannot show a client certificate in the TLS handshake.  Two
designs were weighed:

* an ephemeral, throwaway client key and self-signed certificate in TLS, the
  token signing its fingerprint: it would bind the proof to the TLS session,
  but the key server verifies client certificates against its CA in OpenSSL,
  and Python gives no hook to accept an unknown self-signed one next to
  CA-signed ones (``CERT_OPTIONAL`` still refuses it);
* no client certificate at all: the key server already accepts such TLS
  connections for ``ca`` and ``enroll``, under tight caps (at most
  ``max_unauthenticated_connections``, closed after ``unauth_deadline_s``).

We use the second.  It is sound because of what the host checks and signs:

1. The host does TLS 1.3 and verifies the server certificate against the CA
   pinned at enrollment and the fixed name, as every host does; only a
   holder of a server key certified by that CA can be at the other end.
2. The host says ``auth_begin``; the key server answers ``challenge`` with
   ``CHALLENGE_LEN`` fresh random bytes, remembered on this connection only.
3. The host's device signs ``challenge_wire.encode_signed_challenge``:
   a label, the challenge, a nonce of the host's own, the SHA-256 of the server
   certificate the host saw in this handshake, and the host ID.  The host
   sends ``auth`` with its certificate, these fields and the signature.
4. The key server (``ChallengeIssuer.verify``) refuses unless: the answer is
   to the challenge outstanding on this very connection (each is used once:
   a recorded answer replayed on another connection, or twice, is refused),
   issued at most ``CHALLENGE_TTL_S`` ago; the fingerprint is its own server
   certificate's (a server that relays a challenge of ours gets a signature
   useless anywhere else); the certificate was issued by its CA, is valid now,
   is for client auth and names the host ID; the host is known and not
   revoked; and the signature verifies with the certificate's key.
5. Only then does the connection get the host's identity; before it, only
   ``ca``, ``enroll``, ``auth_begin`` and ``auth`` are answered.

An attacker who can make a host's token sign (malware on the host) is that
host while it does, as with any key; it cannot copy the key out, and removing
the token ends the next session.  Hosts with key files keep mutual TLS.

This module imports no socket, asyncio, os or time: the clock comes in as
``now`` and randomness from ``random_bytes`` (``secrets`` by default).
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .challenge_wire import CHALLENGE_LEN, NONCE_LEN, encode_signed_challenge
from .errors import RefusedError

#: Seconds a challenge may be answered after the key server sent it.
CHALLENGE_TTL_S = 30.0
#: The signature scheme of the signed bytes.
SIGNATURE_HASH = hashes.SHA256


class Signer(Protocol):
    """A host key that never leaves its device."""

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``data``, DER-encoded; raises ``LocalError``
        (with a sentence an operator can act on) when the device cannot sign."""


class HostRecordLike(Protocol):
    """What the verifier reads of a host record (``store.HostRecord``)."""

    revoked: bool


class HostDirectory(Protocol):
    """The key server's host table (``KeyStore``)."""

    def get_host(self, host_id: str) -> Optional[HostRecordLike]:
        """The host's record, or None for an unknown ID."""


def server_fingerprint(cert_der: bytes) -> bytes:
    """SHA-256 of a certificate's DER: what the host signs for the server it saw."""
    return hashlib.sha256(cert_der).digest()


# --- the host's side ----------------------------------------------------------
def answer_challenge(challenge: bytes, server_cert_der: bytes, host_id: str, cert_pem: bytes, signer: Signer,
                     host_nonce: bytes | None = None) -> dict:
    """The ``auth`` message (without ``rid``) answering ``challenge`` for the
    server whose TLS certificate was ``server_cert_der``."""
    nonce = host_nonce if host_nonce is not None else secrets.token_bytes(NONCE_LEN)
    fingerprint = server_fingerprint(server_cert_der)
    data = encode_signed_challenge(challenge, nonce, fingerprint, host_id)
    return {"t": "auth", "id": host_id, "cert": cert_pem, "challenge": challenge, "nonce": nonce,
            "server_fp": fingerprint, "sig": signer.sign(data)}


# --- the key server's side ----------------------------------------------------------
@dataclass(frozen=True)
class PendingChallenge:
    """A challenge sent on one connection; kept in its session until answered."""

    challenge: bytes
    issued_at: float


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)


class ChallengeIssuer:
    """Issues challenges and verifies answers (see the module docstring, 2-4).
    One per key server; the per-connection state is the caller's ``PendingChallenge``."""

    def __init__(self, ca_cert: x509.Certificate, own_fingerprint: bytes, hosts: HostDirectory,
                 ttl_s: float = CHALLENGE_TTL_S, random_bytes: Callable[[int], bytes] = secrets.token_bytes):
        self.ca_cert = ca_cert
        self.own_fingerprint = own_fingerprint
        self.hosts = hosts
        self.ttl_s = ttl_s
        self._random = random_bytes

    def issue(self, now: float) -> PendingChallenge:
        return PendingChallenge(self._random(CHALLENGE_LEN), now)

    def verify(self, pending: PendingChallenge | None, msg: dict, now: float) -> str:
        """The authenticated host ID for an ``auth`` message, or RefusedError with
        a code: ``challenge_replayed``, ``challenge_stale``, ``wrong_server``,
        ``bad_certificate``, ``revoked``, ``unknown_host``, ``bad_signature``.
        The caller must drop ``pending`` first: a challenge is answered once."""
        if pending is None or not secrets.compare_digest(pending.challenge, msg["challenge"]):
            raise RefusedError("the answer is not to the challenge sent on this connection (replayed?)",
                               "challenge_replayed")
        if not 0 <= now - pending.issued_at <= self.ttl_s:
            raise RefusedError(f"the challenge was answered after {now - pending.issued_at:.1f} s "
                               f"(at most {self.ttl_s:g} s)", "challenge_stale")
        if not secrets.compare_digest(msg["server_fp"], self.own_fingerprint):
            raise RefusedError("the signature is for another server's certificate", "wrong_server")
        host_id = msg["id"]
        public_key = self._host_key(msg["cert"], host_id, now)
        host = self.hosts.get_host(host_id)
        if host is None:
            raise RefusedError(f"host {host_id!r} is not known to this key server", "unknown_host")
        if host.revoked:
            raise RefusedError(f"host {host_id!r} is revoked", "revoked")
        data = encode_signed_challenge(pending.challenge, msg["nonce"], self.own_fingerprint, host_id)
        try:
            public_key.verify(msg["sig"], data, ec.ECDSA(SIGNATURE_HASH()))
        except (InvalidSignature, ValueError):
            raise RefusedError(f"the signature does not verify with the certificate of {host_id!r}",
                               "bad_signature") from None
        return host_id

    def _host_key(self, cert_pem: bytes, host_id: str, now: float) -> ec.EllipticCurvePublicKey:
        """The key of a host certificate issued by our CA for ``host_id``, valid at ``now``."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise RefusedError(f"the certificate was not issued by this key server's CA ({exc})",
                               "bad_certificate") from None
        when = _utc(now)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise RefusedError("the certificate is expired or not yet valid", "bad_certificate")
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [host_id]:
            raise RefusedError(f"the certificate names {names}, not {host_id!r}", "bad_certificate")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise RefusedError("the certificate is not for client authentication", "bad_certificate")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise RefusedError(f"a {type(key).__name__} cannot answer a challenge (EC only)", "bad_certificate")
        return key
