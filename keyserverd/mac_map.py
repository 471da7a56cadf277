"""MACs that gateways speak for: the patent's ID_X86 / NETID mapping.

A gateway learns MACs on its plain port (side ``plain``) or from a peer
gateway's tunnel (side ``tunnel:NAME``) and asks for each (``map_req``).  The
key server then answers a host's key request for such a MAC with
KEY(host, gateway).

Rules (``MacMap.map``):
1. a group MAC is refused (``bad_request``);
2. a MAC bound to (or reserved for) an enrolled host in the ID-MAC table is
   refused (``mac_bound``): a plain-side host spoofing an enrolled host's MAC
   never gets that host's frames;
3. a MAC mapped to another, unrevoked gateway is refused (``mac_conflict``);
4. at most ``max_per_gateway`` MACs per gateway (``too_many``);
5. (in the service, with peering) a MAC a host of a peered key server holds
   is refused (``mac_held_by_peer``).
An enrolled host that later says hello with a mapped MAC takes it:
``release`` drops the mapping and the service tells the gateway (``unmapped``).

A gateway releases a MAC it aged out (``map_release``, ``MacMap.unmap``), so
its mappings follow its table and a flood it has forgotten does not keep
counting toward ``max_per_gateway``.

The map lives in memory: gateways announce their MACs again after every
reconnect, so a restarted key server fills it again.  (With several key
servers on one store each keeps its own map; see the README.)
"""

from __future__ import annotations

import re

from l2crypt.core.errors import RefusedError
from l2crypt.core.frame_wire import format_mac, is_group_address

SIDE = re.compile(r"^(plain|tunnel:[A-Za-z0-9][A-Za-z0-9._-]{0,31})$")
DEFAULT_MAX_PER_GATEWAY = 4096


class MacMap:
    """Which gateway speaks for which learned MAC, with a limit per gateway (see the module
    docstring)."""

    def __init__(self, max_per_gateway: int = DEFAULT_MAX_PER_GATEWAY):
        self.max_per_gateway = max_per_gateway
        self._owner: dict[bytes, tuple[str, str]] = {}  # mac -> (gateway id, side)
        self._by_gateway: dict[str, set[bytes]] = {}

    def map(self, store, gateway_id: str, mac: bytes, side: str) -> None:
        """Map ``mac`` to ``gateway_id``; raise RefusedError (see the module docstring)."""
        owner = self.check(store, gateway_id, mac, side)
        macs = self._by_gateway.setdefault(gateway_id, set())
        if owner is not None and owner[0] != gateway_id:
            self._by_gateway.get(owner[0], set()).discard(mac)
        self._owner[mac] = (gateway_id, side)
        macs.add(mac)

    def check(self, store, gateway_id: str, mac: bytes, side: str) -> tuple[str, str] | None:
        """Raise RefusedError if ``map`` would refuse; else the MAC's present (gateway, side) or None."""
        if not SIDE.match(side):
            raise RefusedError(f"side must be 'plain' or 'tunnel:NAME', not {side[:40]!r}", "bad_request")
        if is_group_address(mac):
            raise RefusedError(f"{format_mac(mac)} is a group address", "bad_request")
        if store.host_by_mac(mac) is not None:
            raise RefusedError(f"{format_mac(mac)} is bound to an enrolled host", "mac_bound")
        owner = self._owner.get(mac)
        if owner is not None and owner[0] != gateway_id and not store.is_revoked(owner[0]):
            raise RefusedError(f"{format_mac(mac)} is mapped to another gateway", "mac_conflict")
        macs = self._by_gateway.get(gateway_id, set())
        if mac not in macs and len(macs) >= self.max_per_gateway:
            raise RefusedError(f"gateway maps {len(macs)} MACs already", "too_many")
        return owner

    def release(self, mac: bytes) -> str | None:
        """Drop the mapping of ``mac`` (an enrolled host claimed it); the gateway it had, or None."""
        entry = self._owner.pop(mac, None)
        if entry is None:
            return None
        self._by_gateway.get(entry[0], set()).discard(mac)
        return entry[0]

    def unmap(self, gateway_id: str, mac: bytes) -> bool:
        """Release ``mac`` if it is mapped to ``gateway_id``; True if it was."""
        owner = self._owner.get(mac)
        if owner is None or owner[0] != gateway_id:
            return False
        del self._owner[mac]
        self._by_gateway.get(gateway_id, set()).discard(mac)
        return True

    def owner(self, mac: bytes) -> str | None:
        entry = self._owner.get(mac)
        return entry[0] if entry else None

    def macs_of(self, gateway_id: str) -> list[tuple[bytes, str]]:
        return [(m, self._owner[m][1]) for m in sorted(self._by_gateway.get(gateway_id, ()))]

    def forget_gateway(self, gateway_id: str) -> list[bytes]:
        macs = self._by_gateway.pop(gateway_id, set())
        for mac in macs:
            self._owner.pop(mac, None)
        return sorted(macs)

    def __len__(self) -> int:
        return len(self._owner)
