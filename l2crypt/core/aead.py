"""AEAD ciphers, per-direction key derivation and nonces.

Why a (key, nonce) pair is never used twice:

1. Pair keys.  The key server hands both hosts of a pair the same 32-byte
   pair key.  Each *direction* gets its own key:
   ``HKDF-SHA256(pair_key, info = "l2crypt v2 pair" | cipher | sender MAC | receiver MAC | PW_ID)``.
   A -> B and B -> A therefore never share a key, whatever their counters.
2. The multicast key.  Every sender derives its own sending key:
   ``HKDF-SHA256(multicast_key, info = "l2crypt v2 group" | cipher | sender MAC | PW_ID)``;
   receivers derive the same key from the frame's source MAC.
2a. The cipher is in every ``info`` (one length byte, then its name), so a
   segment that changes its cipher never uses a derived key under two
   ciphers.  (Version 1 of the labels left it out.)
3. Restarts.  The nonce is the 64-bit packet number.  A host has one packet
   counter for all the keys it sends with, so (sender, packet number) never
   repeats at all.  The agent starts it at ``initial_packet_number(wall_s)`` =
   wall-clock seconds * 2**30.  A host cannot send 2**30 frames a second, so
   every number it used before a crash is below the start value it picks after
   the restart (the agent also keeps a floor on the wall clock across
   restarts, see ``packet_clock.py``).

The nonce is 4 zero bytes followed by the packet number, big-endian.
"""

from __future__ import annotations

import functools
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AES_256_GCM = "aes-256-gcm"
CHACHA20_POLY1305 = "chacha20-poly1305"
CIPHERS = {AES_256_GCM: AESGCM, CHACHA20_POLY1305: ChaCha20Poly1305}
KEY_LEN = 32

_PAIR_INFO = b"l2crypt v2 pair"
_GROUP_INFO = b"l2crypt v2 group"
_L3_INFO = b"l2crypt v2 l3 pair"
_NONCE = struct.Struct("!IQ")
PN_PER_SECOND = 2**30


def check_cipher(name: str) -> str:
    """Return ``name`` if it is a supported cipher, else raise ValueError."""
    if name not in CIPHERS:
        raise ValueError(f"unknown cipher {name!r} (supported: {', '.join(CIPHERS)})")
    return name


def hkdf(secret: bytes, info: bytes) -> bytes:
    """``HKDF-SHA256(secret, info)``, ``KEY_LEN`` bytes, no salt: every key
    derivation of l2crypt (the pair, group, layer-3 and tunnel keys)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(secret)


def label(text: str) -> bytes:
    """A variable part of an ``info``: one length byte, then the UTF-8 bytes."""
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"too long for a key label: {text[:40]!r}...")
    return bytes([len(raw)]) + raw


def _cipher_info(cipher: str) -> bytes:
    return label(check_cipher(cipher))


def pair_direction_key(pair_key: bytes, pw_id: int, sender_mac: bytes, receiver_mac: bytes, cipher: str) -> bytes:
    """The key one host uses to send to the other under one pair-key version and cipher."""
    return hkdf(pair_key, _PAIR_INFO + _cipher_info(cipher) + sender_mac + receiver_mac + pw_id.to_bytes(4, "big"))


def l3_direction_key(pair_key: bytes, pw_id: int, sender_id: str, receiver_id: str, cipher: str) -> bytes:
    """The key one host uses to send IP packets to the other (layer-3 modes).

    Bound to the host IDs, not to addresses, so a NAT rewriting them changes
    nothing; the IDs are length-prefixed so no two pairs share an ``info``.
    """
    return hkdf(pair_key, _L3_INFO + _cipher_info(cipher) + label(sender_id) + label(receiver_id)
                + pw_id.to_bytes(4, "big"))


def group_sender_key(multicast_key: bytes, pw_id: int, sender_mac: bytes, cipher: str) -> bytes:
    """The key one host uses to send broadcast and multicast frames under one cipher."""
    return hkdf(multicast_key, _GROUP_INFO + _cipher_info(cipher) + sender_mac + pw_id.to_bytes(4, "big"))


def make_aead(cipher: str, key: bytes):
    """An AEAD object with ``encrypt(nonce, data, aad)`` and ``decrypt(...)``."""
    return CIPHERS[cipher](key)


#: ``nonce(packet_number)``: the 12-byte nonce of a packet number (a C-level
#: partial: it runs once per frame).
nonce = functools.partial(_NONCE.pack, 0)


def initial_packet_number(wall_s: float) -> int:
    """The first packet number of a key installed at wall-clock time ``wall_s``."""
    return int(wall_s * PN_PER_SECOND)
