"""What the layer-3 agent shows: the ``l2crypt l3-status`` document and its
Prometheus metrics, both read from the engine's counters (and the agent's)
when asked, never per packet.  No key material in either.

1. ``engine_snapshot(engine, now)``: peers (IDs, bound IPs, endpoints, key
   versions and ages, traffic), pending keys, drops by reason, counters.
2. ``l3_metrics(agent, now)``: the same counters as metric families
   (``l2crypt_l3_*``), plus ``packets refused inbound`` (the kernel rule that
   drops plain packets from a peer address) and the key client's metrics.
"""

from __future__ import annotations

from prometheus_client.core import Metric

from l2crypt.core import l3_wire
from l2crypt.core.l3_engine import BY_IP, L3Engine
from l2crypt.ops.metrics import counter, gauge, keyclient_metrics

#: Engine counters shown by ``l3-status``; those with (metric name, description)
#: are also metrics (the others have a metric of their own below).
COUNTERS = {
    "sealed": None, "opened": None, "held": None,
    "key_requests": ("l2crypt_l3_key_requests", "Key requests sent to the key server."),
    "key_answers": ("l2crypt_l3_key_answers", "Pair keys received from the key server."),
    "hold_flushed": ("l2crypt_l3_hold_flushed", "Held packets released when their key arrived."),
    "rekeys": ("l2crypt_l3_rekeys", "New key versions (PW_ID) taken into use."),
    "rekey_requests": ("l2crypt_l3_rekey_requests", "Rekeys asked for after rekey_after_frames."),
    "lag_reports": ("l2crypt_l3_lag_reports", "Peers reported to the key server for using an old version."),
    "endpoint_changes": ("l2crypt_l3_endpoint_changes", "Nat mode: a peer's endpoint learned anew."),
    "mss_clamped": ("l2crypt_l3_mss_clamped", "TCP SYNs whose MSS was lowered to fit the path once sealed."),
    "keepalives_sent": ("l2crypt_l3_keepalives_sent", "Nat mode: sealed keepalives sent on idle paths."),
    "keepalives_received": ("l2crypt_l3_keepalives_received", "Nat mode: keepalives received (verified, then dropped)."),
}


def engine_snapshot(engine: L3Engine, now: float) -> dict:
    """Counters and per-peer state of ``engine`` at engine time ``now``."""
    peers = []
    for peer in engine.peers.values():
        ring = peer.keys
        endpoints = {f"ipv{v}": _endpoint(*ep) for v, ep in sorted(peer.endpoints.items())}
        peers.append({
            "id": peer.peer_id,
            "ips": sorted(l3_wire.format_ip(ip) for ip in peer.ips),
            "endpoint": endpoints.get("ipv4") or endpoints.get("ipv6"),
            "endpoints": endpoints,
            "pw_id": ring.current.pw_id,
            "pw_ids_held": sorted(s.pw_id for s in (ring.previous, ring.current, ring.next) if s),
            "key_age_s": round(now - ring.current.created_at, 1),
            "packets_in": peer.packets_in,
            "packets_out": peer.packets_out,
            "bytes_in": peer.bytes_in,
            "bytes_out": peer.bytes_out,
        })
    return {
        "mode": engine.settings.mode,
        "cipher": engine.cipher,
        "peers": peers,
        "revoked_peers": sorted(engine.revoked),
        "pending_keys": [f"{k}:{l3_wire.format_ip(v) if k == BY_IP else v}" for k, v in engine.holds.pending],
        "held_packets": engine.held_packets,
        "drops": dict(engine.drops),
        "counters": {k: engine.counters.get(k, 0) for k in COUNTERS},
    }


def _endpoint(ip: bytes, port: int) -> str:
    text = l3_wire.format_ip(ip)
    return f"[{text}]:{port}" if len(ip) == 16 else f"{text}:{port}"


def l3_metrics(agent, now: float) -> list[Metric]:
    """Every layer-3 agent metric, read from ``agent.engine``, ``agent.client``
    and ``agent.refused_inbound`` at ``now`` (engine time)."""
    engine, client = agent.engine, agent.client
    if engine is None:
        return []
    c = engine.counters
    out: list[Metric] = [
        gauge("l2crypt_l3_agent_info", "The layer-3 agent's identity (value 1).", labels=("id", "mode", "cipher"),
              samples=[([agent.host_id, engine.settings.mode, engine.cipher], 1)]),
        counter("l2crypt_l3_packets_sealed", "Packets sealed toward a peer.", c.get("sealed", 0)),
        counter("l2crypt_l3_packets_opened", "Packets opened and let in.", c.get("opened", 0)),
        counter("l2crypt_l3_packets_dropped", "Packets dropped by the agent, by reason.", labels=("reason",),
                samples=[([reason], n) for reason, n in sorted(engine.drops.items())]),
        counter("l2crypt_l3_packets_refused_inbound",
                "Plain packets from a peer address dropped by the agent's inbound rule.", agent.refused_inbound),
        counter("l2crypt_l3_packets_held", "Packets held while their key was requested.", c.get("held", 0)),
        gauge("l2crypt_l3_held_packets", "Packets held now (they occupy the kernel's queue).", engine.held_packets),
        gauge("l2crypt_l3_pending_keys", "Peers (by IP or ID) whose key is being requested now.",
              len(engine.holds.pending)),
        gauge("l2crypt_l3_peers", "Peers with a pair key.", len(engine.peers)),
        gauge("l2crypt_l3_key_age_seconds", "Age of the current pair key, by peer ID.", labels=("peer",),
              samples=[([pid], round(now - p.keys.current.created_at, 3)) for pid, p in engine.peers.items()]),
        gauge("l2crypt_l3_key_pw_id", "Current key version (PW_ID), by peer ID.", labels=("peer",),
              samples=[([pid], p.keys.current.pw_id) for pid, p in engine.peers.items()]),
    ]
    out += [counter(metric[0], metric[1], c.get(name, 0)) for name, metric in COUNTERS.items() if metric]
    if client is not None:
        out.extend(keyclient_metrics(client))
    return out
