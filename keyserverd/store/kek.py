"""The key-encryption key (KEK): the keys the key server keeps are sealed under it.

Pair keys and multicast keys (in the store) and NETKEY versions
(``netkey.json``) are kept sealed, so a copied database, a PostgreSQL backup
or a copied state directory opens nothing without the KEK.

1. Where the KEK comes from (``load_kek``):
   - ``kek_credential = NAME``: the systemd credential
     ``$CREDENTIALS_DIRECTORY/NAME`` (``LoadCredential=`` or
     ``LoadCredentialEncrypted=`` in the unit);
   - ``kek_file = PATH``: a file that only its owner may read (0600 or 0400);
   - neither (SQLite store only): ``state_dir/kek``, which the first start of a
     new database creates (32 random bytes, 0600); see ``store.SqliteStore.open``.
   A KEK file holds 32 raw bytes, or 64 hex digits (a newline may follow).
2. ``Kek.seal(aad, value)``: AES-256-GCM with a random 96-bit nonce per value.
   The AAD names the row (``pair_aad``, ``multicast_aad``, ``netkey_aad``), so
   a sealed value copied to another row (another pair, PW_ID or table) does
   not open.  Sealed value: ``FORMAT (1 byte) | nonce (12) | ciphertext | tag (16)``.
3. ``Kek.kek_id`` is an HMAC-SHA256 of a fixed label under the KEK (for a KEK
   on a token: ``pkcs11:`` and the AES-CMAC of that label, computed by the
   token).  The store keeps it (``check_kek``), so a start with another KEK is
   refused before anything is written, with one line that names both IDs (and
   says so when one KEK is on a token and the other is not).
The KEK's bytes never appear in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from l2crypt.core.errors import LocalError
from l2crypt.io.pkcs11_token import NoSuchTokenKey, TokenError, TokenSecretKey, generate_secret_key, read_pin
from l2crypt.ops.logs import fields

log = logging.getLogger("keyserverd")

KEK_BYTES = 32
#: The KEK file a SQLite store uses when the config names none (in state_dir).
DEFAULT_KEK_FILE = "kek"
#: First byte of a sealed value: AES-256-GCM, 12-byte nonce, 16-byte tag.
SEALED_FORMAT = 1
NONCE_BYTES = 12
TAG_BYTES = 16
#: Characters of ``kek_id`` shown in messages.
SHOWN_ID = 16
#: How the id of a KEK on a PKCS#11 token begins.
TOKEN_KEK_PREFIX = "pkcs11:"

_ID_LABEL = b"l2crypt keyserverd kek id v1"
_AAD_LABEL = b"l2crypt sealed key v1"


class KekError(LocalError):
    """The KEK cannot be loaded, or it does not open what is stored."""


class Kek:
    """A loaded KEK.  ``source`` says where it came from (for messages)."""

    __slots__ = ("_aead", "kek_id", "source")

    def __init__(self, key: bytes, source: str = "given"):
        if len(key) != KEK_BYTES:
            raise KekError(f"a KEK has {KEK_BYTES} bytes")
        self._aead = AESGCM(key)
        self.kek_id = hmac.new(key, _ID_LABEL, hashlib.sha256).hexdigest()[:32]
        self.source = source

    def __repr__(self) -> str:
        return f"Kek(id={self.shown_id}, source={self.source})"

    @property
    def shown_id(self) -> str:
        return shown_kek_id(self.kek_id)

    def close(self) -> None:
        """Let go of what holds the KEK (a token session); nothing for a KEK in memory."""

    def seal(self, aad: bytes, value: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return bytes([SEALED_FORMAT]) + nonce + self._aead.encrypt(nonce, value, aad)

    def open(self, aad: bytes, sealed: bytes, what: str) -> bytes:
        """The value sealed for ``aad``; KekError naming ``what`` (never a byte of it) otherwise."""
        sealed = bytes(sealed)
        if len(sealed) < 1 + NONCE_BYTES + TAG_BYTES or sealed[0] != SEALED_FORMAT:
            raise KekError(f"{what} is not a sealed value")
        try:
            return self._aead.decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:], aad)
        except InvalidTag:
            raise KekError(f"{what} does not open under KEK id {self.shown_id} "
                           f"(altered, or copied from another row)") from None


def shown_kek_id(kek_id: str) -> str:
    """What messages show of a KEK id: its first ``SHOWN_ID`` hex digits (after ``pkcs11:``)."""
    prefix = TOKEN_KEK_PREFIX if kek_id.startswith(TOKEN_KEK_PREFIX) else ""
    return prefix + kek_id[len(prefix):len(prefix) + SHOWN_ID]


@dataclass(frozen=True)
class KekToken:
    """Where a KEK on a PKCS#11 token is: the module, the token label, the key
    label, and the PIN file ("" = the systemd credential ``pkcs11-pin``)."""

    module: str
    token_label: str
    key_label: str
    pin_file: str = ""

    def pin(self) -> str:
        return read_pin(self.pin_file, "pkcs11_pin_file")


class TokenKek(Kek):
    """A KEK that is an AES-256 key on a PKCS#11 token: ``seal`` and ``open``
    are AES-GCM on the token (``TokenSecretKey``), in the format of a file KEK.
    Made with the token open and the key found, or KekError with the reason."""

    __slots__ = ("_key",)

    def __init__(self, where: KekToken):
        self._key = TokenSecretKey(where.module, where.token_label, where.key_label, where.pin)
        self.source = f"the KEK {self._key.describe()}"
        try:
            self.kek_id = TOKEN_KEK_PREFIX + self._key.cmac(_ID_LABEL).hex()
        except NoSuchTokenKey as exc:
            raise KekError(f"pkcs11_kek_label: {exc}: make it with 'keyserverd kek generate' and the same "
                           f"pkcs11_* settings") from None
        except TokenError as exc:
            raise KekError(f"pkcs11_kek_label {where.key_label!r}: {exc}") from None

    def seal(self, aad: bytes, value: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            return bytes([SEALED_FORMAT]) + nonce + self._key.gcm_encrypt(nonce, value, aad)
        except TokenError as exc:
            raise KekError(f"cannot seal a key: {exc}") from None

    def open(self, aad: bytes, sealed: bytes, what: str) -> bytes:
        sealed = bytes(sealed)
        if len(sealed) < 1 + NONCE_BYTES + TAG_BYTES or sealed[0] != SEALED_FORMAT:
            raise KekError(f"{what} is not a sealed value")
        try:
            value = self._key.gcm_decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:], aad)
        except TokenError as exc:
            raise KekError(f"{what}: {exc}") from None
        if value is None:
            raise KekError(f"{what} does not open under KEK id {self.shown_id} "
                           f"(altered, or copied from another row)")
        return value

    def close(self) -> None:
        self._key.close()


def create_token_kek(where: KekToken) -> TokenKek:
    """Make a new KEK on the token (never over a key of the same label) and load it."""
    try:
        generate_secret_key(where.module, where.token_label, where.key_label, where.pin())
    except TokenError as exc:
        raise KekError(f"pkcs11_kek_label {where.key_label!r}: {exc}") from None
    return TokenKek(where)


def _aad(*parts: str | int) -> bytes:
    out = [_AAD_LABEL]
    for part in parts:
        data = str(part).encode()
        out.append(len(data).to_bytes(2, "big") + data)
    return b"".join(out)


def pair_aad(id1: str, id2: str, pw_id: int) -> bytes:
    """AAD of a pair key version (``id1 < id2``)."""
    return _aad("pair_keys", id1, id2, pw_id)


def multicast_aad(pw_id: int) -> bytes:
    return _aad("multicast_keys", pw_id)


def netkey_aad(pw_id: int) -> bytes:
    return _aad("netkey", pw_id)


def check_kek(stored_id: str, kek: Kek, where: str) -> None:
    """KekError unless ``kek`` is the KEK whose id the store holds."""
    if hmac.compare_digest(stored_id, kek.kek_id):
        return
    on_token = stored_id.startswith(TOKEN_KEK_PREFIX)
    if on_token != isinstance(kek, TokenKek):
        raise KekError(f"{where}: its keys are sealed under " + (
            f"a KEK on a PKCS#11 token (id {shown_kek_id(stored_id)}), not under the KEK from {kek.source}: start with "
            f"pkcs11_kek_label and the token's pkcs11_* settings" if on_token else
            f"a KEK file or credential (id {shown_kek_id(stored_id)}), not under {kek.source} (id "
            f"{kek.shown_id}): start with that KEK (kek_file, kek_credential or STATE_DIR/kek)")
            + " (nothing was changed)")
    raise KekError(
        f"{where}: the KEK from {kek.source} (id {kek.shown_id}) does not open it: its keys are sealed "
        f"under KEK id {shown_kek_id(stored_id)}; start with that KEK (nothing was changed)")


# --- loading -------------------------------------------------------------------

def parse_kek(data: bytes, where: str) -> bytes:
    """32 raw bytes, or 64 hex digits with optional surrounding white space."""
    if len(data) == KEK_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEK_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KekError(f"{where}: holds {len(data)} bytes; a KEK is {KEK_BYTES} random bytes or "
                   f"{2 * KEK_BYTES} hex digits ('keyserverd kek generate FILE' makes one)")


def read_kek_file(path: Path | str, what: str = "kek_file") -> Kek:
    """The KEK in ``path``; KekError if it is missing, unreadable, malformed or
    readable by group or others."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(4096)
    except FileNotFoundError:
        raise KekError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise KekError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise KekError(f"{what} {path}: group or others may access it (mode {mode & 0o777:o}); "
                       f"chmod 600 {path}")
    return Kek(parse_kek(data, f"{what} {path}"), source=str(path))


def read_kek_credential(name: str, environ: dict | None = None) -> Kek:
    """The KEK in the systemd credential ``name``."""
    environ = os.environ if environ is None else environ
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise KekError(f"kek_credential {name!r}: $CREDENTIALS_DIRECTORY is not set (run keyserverd from "
                       f"its unit with LoadCredential=, or under systemd-run with the same "
                       f"-p LoadCredential...=, or give --kek-file)")
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KekError(f"kek_credential {name!r}: cannot read {path}: {exc.strerror or exc}") from None
    return Kek(parse_kek(data, f"kek_credential {name!r}"), source=f"credential {name}")


def load_kek(kek_file: str, kek_credential: str, environ: dict | None = None, *,
             token: KekToken | None = None) -> Kek | None:
    """The KEK the config names, or None when it names none (the SQLite default applies)."""
    if token is not None:
        return TokenKek(token)
    if kek_credential:
        return read_kek_credential(kek_credential, environ)
    if kek_file:
        return read_kek_file(kek_file)
    return None


def default_kek(path: Path, sealed_under: str | None, where: str) -> Kek:
    """The KEK of a SQLite store whose config names none: the file ``path``
    (``state_dir/kek``).  It is created for a new database, or one made before
    sealing; a sealed database whose KEK file is gone is refused."""
    if sealed_under is not None and sealed_under.startswith(TOKEN_KEK_PREFIX):
        raise KekError(f"{where}: its keys are sealed under a KEK on a PKCS#11 token (id "
                       f"{shown_kek_id(sealed_under)}): start with pkcs11_kek_label and the token's pkcs11_* "
                       f"settings (nothing was changed)")
    if path.exists():
        return read_kek_file(path, "KEK file")
    if sealed_under is not None:
        raise KekError(f"{where} is sealed under KEK id {shown_kek_id(sealed_under)}, but the KEK file {path} is "
                       f"missing: restore it from its backup (the database alone opens nothing)")
    try:
        kek = create_kek_file(path)
    except KekError:
        if path.exists():  # another process opening the new database made it first
            return read_kek_file(path, "KEK file")
        raise
    log.warning("kek_created", extra=fields(path=str(path), kek_id=kek.shown_id,
                                            note="back this file up apart from the database"))
    return kek


def create_kek_file(path: Path | str) -> Kek:
    """Write a new random KEK to ``path`` (mode 0600, never over an existing
    file); the file appears whole or not at all."""
    path = Path(path)
    key = secrets.token_bytes(KEK_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails if path exists
        _fsync_dir(path.parent)
    except FileExistsError:
        raise KekError(f"{path} exists already (a KEK is never overwritten)") from None
    except OSError as exc:
        raise KekError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Kek(key, source=str(path))


def replace_kek_file(path: Path | str, source: Path | str) -> None:
    """Put the KEK of the file ``source`` in ``path`` (atomically, mode 0600)."""
    path = Path(path)
    data = Path(source).read_bytes()
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
