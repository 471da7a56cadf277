"""One-time enrollment tokens, kubeadm style: ``abcdef.0123456789abcdef``.

1. ``new_token()`` makes one from ``secrets`` (6 + 16 characters of [a-z0-9],
   about 113 bits).
2. ``hash_token(token)`` is all the store ever keeps (SHA-256).
The token itself is printed once by ``keyserverd host add`` and never logged.
"""

from __future__ import annotations

import hashlib
import re
import secrets

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
TOKEN_RE = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")


def new_token() -> str:
    def part(n: int) -> str:
        return "".join(secrets.choice(ALPHABET) for _ in range(n))

    return f"{part(6)}.{part(16)}"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
