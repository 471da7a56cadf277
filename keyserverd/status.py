"""``keyserverd status``: what a running key server knows, for people and scripts.

1. The server answers on an admin socket, ``state_dir/keyserverd.sock``
   (mode 0600, the same one-line protocol as the agent's control socket,
   ``l2crypt.ops.control``), with ``snapshot(...)``.
2. ``keyserverd status`` asks it and prints a table (rich) or ``--json``.

The document holds host IDs, MACs, roles, connection counts, key versions
and key ages, request and refusal counts, the store's state and the id of the
KEK (an HMAC, not the KEK): never key bytes or tokens.  While the store is
unavailable (PostgreSQL restarting) it says so and lists no hosts or keys.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from keyserverd.store.protocol import StoreUnavailable
from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.status_view import format_age

_NO_KEYS = {"pairs": [], "pair_versions": 0, "multicast": None}


def snapshot(server, config, listen: str, now: float | None = None) -> dict:
    """The status document of a running key server (``server`` is a ``KeyServer``)."""
    now = time.time() if now is None else now
    service = server.service
    store = service.store
    connected = server.connected_hosts()
    try:
        records, keys, store_state = store.list_hosts(), store.key_summary(), "ok"
    except StoreUnavailable as exc:
        records, keys, store_state = [], _NO_KEYS, f"unavailable: {exc}"
    hosts = [{
        "id": h.id, "mac": format_mac(h.mac) if h.mac else None, "role": h.role,
        "enrolled": h.enrolled, "revoked": h.revoked, "connections": connected.get(h.id, 0),
    } for h in records]
    ages = [now - created for _, _, _, created in keys["pairs"]]
    mc = keys["multicast"]
    return {
        "listen": listen,
        "state_dir": str(config.state_dir),
        "cipher": service.cipher,
        "metrics_listen": config.metrics_listen,
        "store": store_state,
        "kek_id": store.kek.shown_id,
        "uptime_s": round(now - server.started_at, 1),
        "hosts": hosts,
        "hosts_total": len(hosts),
        "hosts_connected": len(connected),
        "connections": server.connections,
        **server.counters(),
        "connections_refused": dict(server.connections_refused),
        "event_seq": server.event_seq,
        "pair_keys": len(keys["pairs"]),
        "pair_key_versions": keys["pair_versions"],
        "pair_key_age_s": {"min": round(min(ages), 1), "max": round(max(ages), 1)} if ages else None,
        "pairs": [{"ids": [a, b], "pw_id": pw_id, "age_s": round(now - created, 1)}
                  for a, b, pw_id, created in keys["pairs"]],
        "multicast_pw_id": mc[0] if mc else None,
        "multicast_key_age_s": round(now - mc[1], 1) if mc else None,
        "requests": dict(service.requests),
        "refusals": dict(service.refusals),
        "rotations": dict(service.rotations),
        "events": dict(service.events),
    }


def render(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]keyserverd[/bold] listening on {doc['listen']}  cipher {doc['cipher']}  "
                  f"up {format_age(doc['uptime_s'])}  metrics {doc['metrics_listen'] or 'off'}")
    console.print(f"store: {doc['store']}   KEK id {doc['kek_id']}")
    console.print(f"hosts: {doc['hosts_total']} ({doc['hosts_connected']} connected, "
                  f"{doc['connections']} connections)   event seq: {doc['event_seq']}")
    ages = doc["pair_key_age_s"]
    console.print(f"pair keys: {doc['pair_keys']} pairs, {doc['pair_key_versions']} versions held"
                  + (f", ages {format_age(ages['min'])}..{format_age(ages['max'])}" if ages else "")
                  + f"   multicast PW_ID {doc['multicast_pw_id']}"
                  + (f" (age {format_age(doc['multicast_key_age_s'])})" if doc["multicast_key_age_s"] is not None else ""))
    table = Table(title="hosts", title_justify="left")
    for column in ("ID", "MAC", "role", "enrolled", "revoked", "connected"):
        table.add_column(column)
    for h in doc["hosts"]:
        table.add_row(h["id"], h["mac"] or "-", h["role"], "yes" if h["enrolled"] else "no",
                      "REVOKED" if h["revoked"] else "no",
                      f"yes ({h['connections']})" if h["connections"] else "no")
    console.print(table)
    for name in ("requests", "refusals", "rotations"):
        items = doc.get(name) or {}
        console.print(f"{name}: " + ("  ".join(f"{k}={v}" for k, v in sorted(items.items())) or "none"))
