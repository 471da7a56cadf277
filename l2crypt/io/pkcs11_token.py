"""Keys on a PKCS#11 token (a smart card, an HSM, SoftHSM2), through python-pkcs11.

1. ``TokenRef`` names a key: the PKCS#11 module (a shared library), the
   token label, the key label and id.  It is what a state directory keeps
   (``TOKEN_REF_FILE`` of a host, ``ca.token`` of a key server), as JSON:
   never the PIN, never key material.
2. ``read_pin`` takes the user PIN from a file, or from the systemd credential
   ``PIN_CREDENTIAL`` (``$CREDENTIALS_DIRECTORY``); never from the command line.
3. ``generate_key`` makes an EC P-256 key pair on the token: the private half
   sensitive and not extractable.  ``public_key`` reads the public half back.
4. ``TokenSigner.sign(data)`` opens the token, signs SHA-256 of ``data``
   (CKM_ECDSA) and closes it again, every time: a token that was pulled (or
   deleted) fails the next signature at once with ``TokenError``, and one put
   back works again without a restart.  Signatures are DER (as ``cryptography``).

Every failure is a ``TokenError`` (a ``LocalError``) whose sentence says which
token and what to do; python-pkcs11 is imported only when a token is used, so
hosts with key files do not need it (``pip install 'l2crypt[pkcs11]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from l2crypt.core.errors import LocalError

#: The systemd credential holding the PIN when no PIN file is given.
PIN_CREDENTIAL = "pkcs11-pin"
MISSING_LIBRARY = ("python-pkcs11 is not installed; keys on a token need it: "
                   "pip install 'l2crypt[pkcs11]'")
KEY_ID_BYTES = 8
#: One token operation at a time in this process (python-pkcs11 sessions are not thread-safe).
_TOKEN_LOCK = threading.Lock()


class TokenError(LocalError):
    """The token, its module, its PIN or its key cannot be used."""

    code = "token"


@dataclass(frozen=True)
class TokenRef:
    """Where a key lives: module path, token label, key label, key id (hex)."""

    module: str
    token_label: str
    key_label: str
    key_id: str

    def describe(self) -> str:
        return f"token {self.token_label!r} (module {self.module}, key {self.key_label!r})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> "TokenRef":
        """Read a reference file; LocalError naming the file if it is not one."""
        try:
            doc = json.loads(path.read_text())
            ref = cls(**{k: doc[k] for k in ("module", "token_label", "key_label", "key_id")})
            bytes.fromhex(ref.key_id)
        except OSError as exc:
            raise LocalError(f"{path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"{path}: not a token reference ({exc})") from None
        if not all(isinstance(v, str) and v for v in asdict(ref).values()):
            raise LocalError(f"{path}: not a token reference (empty field)")
        return ref

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())


def read_pin(pin_file: str | Path | None, what: str = "--pin-file") -> str:
    """The token PIN from ``pin_file``, else from the systemd credential
    ``PIN_CREDENTIAL``; TokenError if neither is there."""
    if pin_file:
        path = Path(pin_file)
    else:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        path = Path(creds) / PIN_CREDENTIAL if creds else None
        if path is None or not path.exists():
            raise TokenError(f"no token PIN: give {what} FILE, or the systemd credential {PIN_CREDENTIAL!r} "
                             f"(LoadCredential={PIN_CREDENTIAL}:FILE); a PIN is never taken from the command line")
    try:
        pin = path.read_text().strip()
    except OSError as exc:
        raise TokenError(f"token PIN file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TokenError(f"token PIN file {path}: not a text file") from None
    if not pin:
        raise TokenError(f"token PIN file {path} is empty")
    return pin


def _pkcs11():
    try:
        import pkcs11
    except ImportError:
        raise TokenError(MISSING_LIBRARY) from None
    return pkcs11


def _library(module: str):
    pkcs11 = _pkcs11()
    if not Path(module).exists():
        raise TokenError(f"PKCS#11 module {module} does not exist (is the token's driver installed?)")
    try:
        return pkcs11.lib(module)
    except (pkcs11.exceptions.PKCS11Error, RuntimeError, OSError) as exc:
        raise TokenError(f"cannot load the PKCS#11 module {module}: {exc or type(exc).__name__}") from None


@contextmanager
def _session(module: str, token_label: str, pin: str, rw: bool = False):
    """An open, logged-in session on the token; TokenError with the reason otherwise."""
    pkcs11 = _pkcs11()
    errors = pkcs11.exceptions
    with _TOKEN_LOCK:
        lib = _library(module)
        try:
            token = lib.get_token(token_label=token_label)
            session = token.open(user_pin=pin, rw=rw)
        except errors.NoSuchToken:
            raise TokenError(f"token {token_label!r} is not present in {module} (removed, or another label?)") \
                from None
        except errors.MultipleTokensReturned:
            raise TokenError(f"more than one token is labelled {token_label!r} in {module}") from None
        except (errors.PinIncorrect, errors.PinInvalid, errors.PinLenRange):
            raise TokenError(f"the PIN of token {token_label!r} is wrong") from None
        except errors.PinLocked:
            raise TokenError(f"the PIN of token {token_label!r} is locked") from None
        except errors.PKCS11Error as exc:
            _reinitialize(lib)
            raise TokenError(f"token {token_label!r} cannot be opened ({type(exc).__name__}): "
                             "was it removed?") from None
        try:
            yield session
        except errors.PKCS11Error as exc:
            raise TokenError(f"token {token_label!r}: {type(exc).__name__} {exc}".rstrip()) from None
        finally:
            try:
                session.close()
            except errors.PKCS11Error:
                _reinitialize(lib)


def _reinitialize(lib) -> None:
    """Forget the module's view of its slots, so a token put back is seen again."""
    try:
        lib.reinitialize()
    except Exception:  # noqa: BLE001 - best effort; the next open says what is wrong
        pass


def _find(session, ref: TokenRef, object_class):
    pkcs11 = _pkcs11()
    try:
        return session.get_key(object_class=object_class, label=ref.key_label, id=bytes.fromhex(ref.key_id))
    except pkcs11.exceptions.NoSuchKey:
        raise TokenError(f"key {ref.key_label!r} (id {ref.key_id}) is not on token {ref.token_label!r}") from None


def generate_key(module: str, token_label: str, key_label: str, pin: str) -> tuple[TokenRef, ec.EllipticCurvePublicKey]:
    """A new EC P-256 key pair on the token (private half sensitive, not
    extractable); its reference and public key."""
    pkcs11 = _pkcs11()
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    attr = pkcs11.Attribute
    ref = TokenRef(module, token_label, key_label, secrets.token_hex(KEY_ID_BYTES))
    with _session(module, token_label, pin, rw=True) as session:
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC, {attr.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        public, _private = params.generate_keypair(
            store=True, label=key_label, id=bytes.fromhex(ref.key_id),
            public_template={attr.VERIFY: True},
            private_template={attr.SIGN: True, attr.SENSITIVE: True, attr.EXTRACTABLE: False})
        der = encode_ec_public_key(public)
    return ref, load_der_public_key(der)


def public_key(ref: TokenRef, pin: str) -> ec.EllipticCurvePublicKey:
    """The public half of the key ``ref`` names."""
    pkcs11 = _pkcs11()
    from pkcs11.util.ec import encode_ec_public_key

    with _session(ref.module, ref.token_label, pin) as session:
        der = encode_ec_public_key(_find(session, ref, pkcs11.ObjectClass.PUBLIC_KEY))
    return load_der_public_key(der)


class TokenSigner:
    """Signs with the key ``ref`` names (``challenge_auth.Signer``); the PIN is read
    by ``pin_source`` at each signature, so a changed PIN file needs no restart."""

    def __init__(self, ref: TokenRef, pin_source: Callable[[], str]):
        self.ref = ref
        self._pin_source = pin_source

    def sign(self, data: bytes) -> bytes:
        pkcs11 = _pkcs11()
        digest = hashlib.sha256(data).digest()
        with _session(self.ref.module, self.ref.token_label, self._pin_source()) as session:
            key = _find(session, self.ref, pkcs11.ObjectClass.PRIVATE_KEY)
            raw = key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
