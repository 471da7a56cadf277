"""Wire format of what a token host signs to authenticate (issue 19, seed 002 S605).

The key server sends a fresh challenge inside the TLS 1.3 channel; the host's
signing device signs these bytes, and the key server rebuilds them and checks
the signature against the host's enrolled certificate::

    offset  size  field
    0       22    LABEL, b"l2crypt host-auth v1\\0\\0": the signature is for
                  this use only (never a CSR, a certificate or a TLS handshake)
    22      32    challenge           the key server's random, fresh per connection
    54      32    host_nonce          the host's own random (S605's single-use data
                                      of the KEY): the device never signs bytes that
                                      the server alone chose
    86      32    server_fingerprint  SHA-256 of the DER of the TLS certificate the
                                      host saw: a signature made for another server
                                      is worthless here
    118     1     host ID length N (1..MAX_ID_LEN)
    119     N     host ID, ASCII (``ks_messages.valid_host_id``)

1. ``encode_signed_challenge`` builds the bytes (the host before signing, the
   key server before verifying); it raises ``ValueError`` on our own bad input.
2. ``decode_signed_challenge`` parses them back (tests, tools); truncated,
   over-long or mislabelled bytes raise ``RemoteProtocolError`` (code ``malformed``).
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import RemoteProtocolError
from .ks_messages import MAX_ID_LEN, valid_host_id

# --- wire constants -------------------------------------------------------
LABEL = b"l2crypt host-auth v1\0\0"
LABEL_LEN = len(LABEL)
CHALLENGE_LEN = 32
NONCE_LEN = 32
FINGERPRINT_LEN = 32
CHALLENGE_OFFSET = LABEL_LEN
NONCE_OFFSET = CHALLENGE_OFFSET + CHALLENGE_LEN
FINGERPRINT_OFFSET = NONCE_OFFSET + NONCE_LEN
ID_LEN_OFFSET = FINGERPRINT_OFFSET + FINGERPRINT_LEN
ID_OFFSET = ID_LEN_OFFSET + 1
MIN_LEN = ID_OFFSET + 1
MAX_LEN = ID_OFFSET + MAX_ID_LEN


class SignedChallenge(NamedTuple):
    """The fields of the signed bytes."""

    challenge: bytes
    host_nonce: bytes
    server_fingerprint: bytes
    host_id: str


def encode_signed_challenge(challenge: bytes, host_nonce: bytes, server_fingerprint: bytes, host_id: str) -> bytes:
    """The bytes the host's device signs; ValueError on a wrong length or host ID."""
    for name, value, size in (("challenge", challenge, CHALLENGE_LEN), ("host_nonce", host_nonce, NONCE_LEN),
                              ("server_fingerprint", server_fingerprint, FINGERPRINT_LEN)):
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{name}: want {size} bytes")
    if not isinstance(host_id, str) or not valid_host_id(host_id):
        raise ValueError(f"not a valid host ID: {host_id!r}")
    ident = host_id.encode("ascii")
    return LABEL + challenge + host_nonce + server_fingerprint + bytes([len(ident)]) + ident


def decode_signed_challenge(data: bytes) -> SignedChallenge:
    """Parse signed bytes; RemoteProtocolError (``malformed``) if they are not exactly that."""
    if not MIN_LEN <= len(data) <= MAX_LEN:
        raise RemoteProtocolError(f"signed challenge of {len(data)} bytes, want {MIN_LEN}-{MAX_LEN}", "malformed")
    if data[:LABEL_LEN] != LABEL:
        raise RemoteProtocolError("signed challenge: unknown label", "malformed")
    n = data[ID_LEN_OFFSET]
    if len(data) != ID_OFFSET + n:
        raise RemoteProtocolError(f"signed challenge: host ID length {n} does not match the {len(data)} bytes",
                                  "malformed")
    try:
        host_id = data[ID_OFFSET:].decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("signed challenge: host ID is not ASCII", "malformed") from None
    if not valid_host_id(host_id):
        raise RemoteProtocolError("signed challenge: not a valid host ID", "malformed")
    return SignedChallenge(data[CHALLENGE_OFFSET:NONCE_OFFSET], data[NONCE_OFFSET:FINGERPRINT_OFFSET],
                           data[FINGERPRINT_OFFSET:ID_LEN_OFFSET], host_id)
