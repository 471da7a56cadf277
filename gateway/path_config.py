"""The paths of the inter-subnet tunnel, as the config names them (``tunnel_paths``).

One string per path::

    "gB path=1 local=192.0.2.1:4789 remote=198.51.100.1:4789 weight=2"

* the peer gateway's enrolled ID, then ``key=value`` words in any order;
* ``path``: 0-15, the path's ID: it picks the path's keys (the key server
  derives one pair per path) and must be the same at both ends;
* ``local``: the HOST:PORT this gateway sends from and listens on for the
  path (an uplink's address); ``remote``: the peer's, or a relay's
  (``l2crypt-gateway relay``) on the way;
* ``weight`` (optional, 0.01-100, default 1): the path's share before any
  measurement, and its base share after.

A ``tunnel_peers`` entry ``ID=HOST:PORT`` is path 0 of that peer, from
``tunnel_listen``: a one-path config is still valid as it was.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from l2crypt.agent.config import parse_hostport
from l2crypt.core.tunnel_keys import sender_tag

PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
MAX_PATH_ID = 15
#: How the frames of a link are spread over its paths (``tunnel_mode``).
MODES = ("split", "redundant", "fec")
_WORDS = ("path", "local", "remote", "weight")


class PathSpec(NamedTuple):
    """One configured path of one tunnel peer."""

    peer: str
    path: int
    local: tuple[str, int]
    remote: tuple[str, int]
    weight: float = 1.0


def _hostport(word: str, value: str, item: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(value, default_port=0)
    except ValueError as exc:
        raise ValueError(f"{item!r}: {word}: {exc}") from None
    if port == 0:
        raise ValueError(f"{item!r}: {word}: needs a port")
    return host, port


def parse_path(item: Any) -> PathSpec:
    """One ``tunnel_paths`` string; ValueError names what is wrong."""
    if not isinstance(item, str):
        raise ValueError(f"want a string 'PEER path=N local=HOST:PORT remote=HOST:PORT', got {item!r}")
    peer, *words = item.split() or [""]
    if not PEER_NAME.match(peer):
        raise ValueError(f"{item!r}: first the peer gateway's enrolled ID (up to 32 characters)")
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in _WORDS:
            raise ValueError(f"{item!r}: {word!r}: want one of {', '.join(w + '=' for w in _WORDS)}")
        if key in values:
            raise ValueError(f"{item!r}: {key} given twice")
        values[key] = value
    missing = [w for w in ("path", "local", "remote") if w not in values]
    if missing:
        raise ValueError(f"{item!r}: missing {', '.join(missing)}")
    if not values["path"].isdigit() or not 0 <= int(values["path"]) <= MAX_PATH_ID:
        raise ValueError(f"{item!r}: path: want 0-{MAX_PATH_ID}, got {values['path']!r}")
    try:
        weight = float(values.get("weight", "1"))
    except ValueError:
        weight = -1.0
    if not 0.01 <= weight <= 100:
        raise ValueError(f"{item!r}: weight: want 0.01-100, got {values.get('weight')!r}")
    return PathSpec(peer, int(values["path"]), _hostport("local", values["local"], item),
                    _hostport("remote", values["remote"], item), weight)


def check_paths(value: Any) -> tuple[str, ...]:
    """The ``tunnel_paths`` key: every string valid, no (peer, path) twice, no two
    paths of one local address to one remote host (the arrival could not tell them apart)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("want a list of 'PEER path=N local=HOST:PORT remote=HOST:PORT' strings")
    seen: dict[tuple[str, int], str] = {}
    routes: dict[tuple[tuple[str, int], str], str] = {}
    tags: dict[bytes, str] = {}
    for item in value:
        spec = parse_path(item)
        if (spec.peer, spec.path) in seen:
            raise ValueError(f"path {spec.path} of {spec.peer!r} given twice")
        route = (spec.local, spec.remote[0])
        if route in routes:
            raise ValueError(f"{item!r} and {routes[route]!r}: same local address and remote host")
        other = tags.setdefault(sender_tag(spec.peer), spec.peer)
        if other != spec.peer:
            raise ValueError(f"peers {other!r} and {spec.peer!r} have the same tunnel sender tag; rename one")
        seen[(spec.peer, spec.path)], routes[route] = item, item
    return tuple(value)
