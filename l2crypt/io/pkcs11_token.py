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
5. ``generate_secret_key`` makes an AES-256 key on the token (sensitive, not
   extractable); ``TokenSecretKey`` encrypts and decrypts with it (AES-GCM)
   and computes AES-CMACs, in one session it keeps open (the key server's
   KEK, ``keyserverd.store.kek.TokenKek``).

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
#: The logged-in session a ``TokenSecretKey`` keeps open, by (module, token label).  PKCS#11
#: logs the whole process in: while one is open, other sessions on that token open without
#: the PIN (a second login fails with UserAlreadyLoggedIn) and do not log out when they close.
_LOGINS: dict[tuple[str, str], object] = {}


class TokenError(LocalError):
    """The token, its module, its PIN or its key cannot be used."""

    code = "token"


class NoSuchTokenKey(TokenError):
    """The token is there, but the key asked for is not on it."""


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


def _open(module: str, token_label: str, pin: str, rw: bool = False):
    """(lib, an open, logged-in session on the token); TokenError with the reason otherwise.
    The caller holds ``_TOKEN_LOCK``."""
    errors = _pkcs11().exceptions
    lib = _library(module)
    try:
        token = lib.get_token(token_label=token_label)
        if (module, token_label) in _LOGINS:
            return lib, token.open(rw=rw)
        return lib, token.open(user_pin=pin, rw=rw)
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


def _close(lib, session) -> None:
    try:
        session.close()
    except _pkcs11().exceptions.PKCS11Error:
        _reinitialize(lib)


@contextmanager
def _session(module: str, token_label: str, pin: str, rw: bool = False):
    """An open, logged-in session on the token, closed afterwards; TokenError with the reason otherwise."""
    errors = _pkcs11().exceptions
    with _TOKEN_LOCK:
        lib, session = _open(module, token_label, pin, rw)
        try:
            yield session
        except errors.PKCS11Error as exc:
            raise TokenError(f"token {token_label!r}: {type(exc).__name__} {exc}".rstrip()) from None
        finally:
            _close(lib, session)


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


# --- secret keys (the key server's KEK) -------------------------------------

def generate_secret_key(module: str, token_label: str, key_label: str, pin: str) -> None:
    """A new AES-256 key labelled ``key_label`` on the token: sensitive, not
    extractable, good for encrypting, decrypting and AES-CMAC only.  TokenError
    if the token holds a key of that label already (a key is never replaced)."""
    pkcs11 = _pkcs11()
    attr = pkcs11.Attribute
    with _session(module, token_label, pin, rw=True) as session:
        if list(session.get_objects({attr.CLASS: pkcs11.ObjectClass.SECRET_KEY, attr.LABEL: key_label})):
            raise TokenError(f"token {token_label!r} holds a key labelled {key_label!r} already "
                             f"(a key is never replaced)")
        session.generate_key(pkcs11.KeyType.AES, 256, label=key_label, id=secrets.token_bytes(KEY_ID_BYTES),
                             store=True, template={
                                 attr.SENSITIVE: True, attr.EXTRACTABLE: False, attr.ENCRYPT: True,
                                 attr.DECRYPT: True, attr.SIGN: True, attr.VERIFY: False, attr.WRAP: False,
                                 attr.UNWRAP: False, attr.DERIVE: False})


class TokenSecretKey:
    """AES-256-GCM and AES-CMAC with the secret key labelled ``key_label`` on a
    token; the key never leaves it.  One logged-in session stays open (an
    operation then costs some 40 us on SoftHSM2, a login each time some 3 ms).
    An operation that fails opens the session again and is tried once more, so
    a token put back works without a restart and a pulled one is a TokenError.
    The PIN is read by ``pin_source`` at each login; while the session is open,
    other sessions of this process on the token share its login (``_LOGINS``)."""

    def __init__(self, module: str, token_label: str, key_label: str, pin_source: Callable[[], str]):
        self.module, self.token_label, self.key_label = module, token_label, key_label
        self._pin_source = pin_source
        self._lib = self._session = self._key = None

    def describe(self) -> str:
        return f"key {self.key_label!r} on token {self.token_label!r} (module {self.module})"

    def gcm_encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """Ciphertext and 16-byte tag."""
        gcm = _gcm(nonce, aad)
        return self._call(lambda key: key.encrypt(data, **gcm), "encrypt")

    def gcm_decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None if ``data`` does not authenticate under ``nonce`` and ``aad``."""
        gcm = _gcm(nonce, aad)
        return self._call(lambda key: key.decrypt(data, **gcm), None)

    def cmac(self, data: bytes) -> bytes:
        """AES-CMAC of ``data`` (16 bytes)."""
        mechanism = _pkcs11().Mechanism.AES_CMAC
        return self._call(lambda key: key.sign(data, mechanism=mechanism), "compute a CMAC")

    def close(self) -> None:
        with _TOKEN_LOCK:
            self._drop()

    def _call(self, op, failing: str | None):
        """``op(key)``; after a PKCS#11 error the session is opened again and ``op`` tried once more.
        If that fails too: TokenError (``failing`` says what), or None when ``failing`` is None."""
        errors = _pkcs11().exceptions
        with _TOKEN_LOCK:
            for last in (False, True):
                if self._key is None:
                    self._connect()
                try:
                    return bytes(op(self._key))
                except errors.PKCS11Error as exc:
                    self._drop()
                    if last and failing is not None:
                        raise TokenError(f"{self.describe()} cannot {failing}: {type(exc).__name__} "
                                         f"{exc}".rstrip()) from None
        return None

    def _connect(self) -> None:
        pkcs11 = _pkcs11()
        errors = pkcs11.exceptions
        lib, session = _open(self.module, self.token_label, self._pin_source())
        try:
            key = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=self.key_label)
        except errors.NoSuchKey:
            _close(lib, session)
            raise NoSuchTokenKey(f"token {self.token_label!r} holds no key labelled {self.key_label!r}") from None
        except errors.MultipleObjectsReturned:
            _close(lib, session)
            raise TokenError(f"token {self.token_label!r} holds more than one key labelled "
                             f"{self.key_label!r}") from None
        except errors.PKCS11Error as exc:
            _close(lib, session)
            raise TokenError(f"token {self.token_label!r}: {type(exc).__name__} {exc}".rstrip()) from None
        self._lib, self._session, self._key = lib, session, key
        _LOGINS.setdefault((self.module, self.token_label), session)

    def _drop(self) -> None:
        if self._session is not None:
            if _LOGINS.get((self.module, self.token_label)) is self._session:
                del _LOGINS[(self.module, self.token_label)]
            _close(self._lib, self._session)
        self._lib = self._session = self._key = None


def _gcm(nonce: bytes, aad: bytes) -> dict:
    """The mechanism arguments of AES-GCM with a 128-bit tag."""
    pkcs11 = _pkcs11()
    try:
        from pkcs11.mechanisms import GCMParams
    except ImportError:
        raise TokenError("this python-pkcs11 has no GCMParams; AES-GCM on a token needs a newer one "
                         "(tested with 0.10): pip install -U 'l2crypt[pkcs11]'") from None
    return {"mechanism": pkcs11.Mechanism.AES_GCM, "mechanism_param": GCMParams(nonce, aad, 128)}
