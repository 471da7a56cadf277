"""One configured peer key server and the host IDs it speaks for (no I/O).

A peer is written ``IDS=sha256:<its CA fingerprint>@HOST:PORT``:

- ``HOST:PORT`` is its peering listener;
- the fingerprint names the CA that issued its peering certificate: a
  connection is the peer's only when that CA verified it (not by the CN, which
  every key server shares);
- ``IDS`` is the peer's host-ID namespace, a comma-separated list of host IDs
  and ``PREFIX*`` patterns (``b-*``, ``h3,h4``).  The peer may ask for pair keys
  only on behalf of IDs in it (``from_id``), and its answers and revocations
  are believed only for IDs in it.  Namespaces of two peers must not overlap.

``check_peers(texts)`` checks a whole ``peers`` list (each parses, no CA twice,
no two namespaces overlap; ``check_specs`` the same for parsed ones); ``owner_of(specs, host_id)`` names the peer whose
namespace holds an ID.
"""

from __future__ import annotations

from dataclasses import dataclass

from l2crypt.agent.config import parse_hostport
from l2crypt.agent.tls_files import normalize_fingerprint
from l2crypt.core.ks_messages import valid_host_id

SYNTAX = "IDS=sha256:FINGERPRINT@HOST:PORT (IDS: host IDs or PREFIX*, comma-separated)"
MAX_PATTERNS = 256


def _pattern(text: str) -> str:
    body = text[:-1] if text.endswith("*") else text
    if not body or not valid_host_id(body):
        raise ValueError(f"{text!r} is not a host ID or PREFIX* (letters, digits, '.', '-', '_')")
    return text


def _overlap(a: str, b: str) -> bool:
    """Can one host ID match both patterns?"""
    a_prefix, b_prefix = a.endswith("*"), b.endswith("*")
    a_body, b_body = a.rstrip("*"), b.rstrip("*")
    if a_prefix and b_prefix:
        return a_body.startswith(b_body) or b_body.startswith(a_body)
    if a_prefix:
        return b_body.startswith(a_body)
    if b_prefix:
        return a_body.startswith(b_body)
    return a == b


@dataclass(frozen=True)
class PeerSpec:
    """One configured peer: its peering address, its CA and its host IDs."""

    address: str
    ca_fingerprint: str
    ids: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "PeerSpec":
        """``IDS=sha256:HEX@HOST:PORT``; ValueError with the reason."""
        if not isinstance(text, str) or "@" not in text:
            raise ValueError(f"want {SYNTAX}, got {text!r}")
        if "=" not in text:
            raise ValueError(f"say which host IDs the peer speaks for: want {SYNTAX}, got {text!r}")
        ids_text, rest = text.split("=", 1)
        fp, address = rest.rsplit("@", 1)
        parse_hostport(address)
        ids = tuple(_pattern(p.strip()) for p in ids_text.split(","))
        if len(ids) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} ID patterns per peer")
        return cls(address, normalize_fingerprint(fp), ids)

    def owns(self, host_id: str) -> bool:
        """True if ``host_id`` is in this peer's namespace."""
        return any(host_id.startswith(p[:-1]) if p.endswith("*") else host_id == p for p in self.ids)

    def overlaps(self, other: "PeerSpec") -> bool:
        return any(_overlap(a, b) for a in self.ids for b in other.ids)

    def __str__(self) -> str:
        return f"{','.join(self.ids)}={self.ca_fingerprint}@{self.address}"


def check_peers(texts) -> tuple[PeerSpec, ...]:
    """Parse a ``peers`` list; ValueError if one is malformed, a CA is named
    twice or two namespaces overlap."""
    return check_specs(tuple(PeerSpec.parse(t) for t in texts))


def check_specs(specs: tuple[PeerSpec, ...]) -> tuple[PeerSpec, ...]:
    """``specs`` if no CA is named twice and no two namespaces overlap, else ValueError."""
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.ca_fingerprint == b.ca_fingerprint:
                raise ValueError(f"two peers with one CA ({a.ca_fingerprint}): a peer is known by its CA")
            if a.overlaps(b):
                raise ValueError(f"the host IDs of peers {a.address} and {b.address} overlap "
                                 f"({','.join(a.ids)} / {','.join(b.ids)})")
    return specs


def owner_of(specs, host_id: str) -> PeerSpec | None:
    """The peer whose namespace holds ``host_id``, or None."""
    return next((s for s in specs if s.owns(host_id)), None)
