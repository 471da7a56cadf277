"""Prometheus metrics of the gateway (``metrics_listen``, 127.0.0.1:9480 by default).

Read at scrape time from what the gateway already counts (the core's
``counters`` and drops, its engines' and tunnel's counters, the key client,
the port guards' nftables counters),
on the gateway's own loop (``l2crypt.ops.metrics.serve_metrics``): the packet path
pays nothing.  Ports are ``encrypted`` (sealed frames on the segment),
``tunnel`` (NETKEY-sealed datagrams to peer gateways) and ``plain`` (clear
frames on the full-decrypt uplink).  No metric carries key material: counts,
ages, versions and MACs only.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.core import Metric

from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.metrics import counter, gauge, port_guard_metrics

from .core import ENGINE_COUNTERS


def _engine_totals(core) -> Counter:
    total: Counter = Counter()
    for engine in core.engines():
        for k in ENGINE_COUNTERS:
            total[k] += engine.counters.get(k, 0)
    return total


def gateway_metrics(gw, now: float) -> list[Metric]:
    """Every gateway metric, from ``gw`` (a ``daemon.Gateway``) at ``now`` (loop time)."""
    core, client = gw.core, gw.client
    if core is None:
        return []
    c, t, e = core.counters, core.tunnel.counters, _engine_totals(core)
    cfg = gw.config
    out: list[Metric] = [
        gauge("l2crypt_gateway_info", "The gateway's identity (value 1).",
              labels=("id", "mac", "encrypted_port", "plain_port", "cipher"),
              samples=[([gw.gw_id, format_mac(core.gw_mac), cfg.encrypted_port, cfg.plain_port or "",
                         core.main.cipher], 1)]),
        gauge("l2crypt_gateway_datapath_info",
              "The path of each port that runs (encrypted: wire_path; plain: simple or batched) and why, "
              "if not the one configured (value 1).",
              labels=("port", "path", "reason"),
              samples=[(["encrypted", *gw.wire_path.partition(": ")[::2]], 1)]
              + ([(["plain", gw.datapath, gw.datapath_reason], 1)] if cfg.plain_port else [])
              + ([(["tunnel", *gw.tunnel.path.partition(": ")[::2]], 1)] if gw.tunnel is not None else [])),
        counter("l2crypt_gateway_frames_sealed", "Frames sealed, by port (encrypted segment, tunnel).",
                labels=("port",), samples=[(["encrypted"], e["sealed"]), (["tunnel"], t["tunnel_sealed"])]),
        counter("l2crypt_gateway_frames_opened", "Frames opened, by port (encrypted segment, tunnel).",
                labels=("port",), samples=[(["encrypted"], e["opened"]), (["tunnel"], t["tunnel_opened"])]),
        counter("l2crypt_gateway_bytes_sealed", "Plain bytes (whole inner frames) sealed, by port.",
                labels=("port",), samples=[(["encrypted"], e["bytes_sealed"]),
                                           (["tunnel"], t["tunnel_bytes_sealed"])]),
        counter("l2crypt_gateway_bytes_opened", "Plain bytes (whole inner frames) opened, by port.",
                labels=("port",), samples=[(["encrypted"], e["bytes_opened"]),
                                           (["tunnel"], t["tunnel_bytes_opened"])]),
        counter("l2crypt_gateway_plain_frames", "Clear frames on the plain port, by direction.",
                labels=("direction",), samples=[(["in"], c["from_plain"]), (["out"], c["to_plain"])]),
        counter("l2crypt_gateway_plain_bytes", "Clear bytes on the plain port, by direction.",
                labels=("direction",), samples=[(["in"], c["from_plain_bytes"]), (["out"], c["to_plain_bytes"])]),
    ]
    drops = core.all_drops()
    if gw.tunnel is not None and gw.tunnel.unknown_sender:
        drops["tunnel_unknown_sender"] += gw.tunnel.unknown_sender
    out.append(counter("l2crypt_gateway_frames_dropped", "Frames and datagrams dropped, by reason.",
                       labels=("reason",), samples=[([r], n) for r, n in sorted(drops.items())]))
    out += [
        counter("l2crypt_gateway_key_requests", "Host key requests raised by the gateway's engines.",
                e["key_requests"]),
        counter("l2crypt_gateway_key_answers", "Host pair keys installed from the key server.", e["key_answers"]),
        counter("l2crypt_gateway_map_requests", "MAC map requests sent to the key server.", c["map_requests"]),
        counter("l2crypt_gateway_rekeys", "New key versions taken into use: host (pair and multicast keys, "
                "summed over the gateway's engines) and netkey.", labels=("key",),
                samples=[(["host"], e["rekeys"]), (["netkey"], t["netkey_rekeys"])]),
        counter("l2crypt_gateway_macs_learned", "MACs learned on the plain or tunnel side.", c["macs_learned"]),
        counter("l2crypt_gateway_maps_refused", "MACs the key server refused to map (spoofing).",
                c["maps_refused"]),
        counter("l2crypt_gateway_macs_aged_out", "Learned MACs forgotten after mac_ageing_s without traffic.",
                c["macs_aged_out"]),
    ]
    out += port_guard_metrics("l2crypt_gateway_port_guard_intact", "l2crypt_gateway_port_guard_frames_dropped",
                              gw.guard_readings())
    states: Counter = Counter((entry.side, entry.state) for entry in core.table.values())
    states.update((side, "refused") for side, until in core.refused.values() if until > now)
    out.append(gauge("l2crypt_gateway_macs", "MACs the gateway knows on its sides, by side and state.",
                     labels=("side", "state"), samples=[([side, state], n) for (side, state), n in sorted(states.items())]))
    out.append(gauge("l2crypt_gateway_hosts", "Encrypted hosts the gateway holds a pair key for.",
                     len(core.host_keys)))
    ages = [now - p.keys.current.created_at for engine in core.virtual.values() for p in engine.peers.values()]
    if ages:
        out.append(gauge("l2crypt_gateway_key_age_seconds", "Age of the current host pair keys: min and max.",
                         labels=("stat",), samples=[(["min"], round(min(ages), 3)), (["max"], round(max(ages), 3))]))
    group = core.main.group.current
    if group is not None:
        out.append(gauge("l2crypt_gateway_multicast_key_age_seconds", "Age of the current multicast key.",
                         round(now - group.created_at, 3)))
        out.append(gauge("l2crypt_gateway_multicast_key_pw_id", "Current multicast key version.", group.pw_id))
    netkey = core.tunnel.current()
    if netkey is not None:
        out.append(gauge("l2crypt_gateway_netkey_age_seconds", "Age of the NETKEY version sent with.",
                         round(now - netkey.created_at, 3)))
        out.append(gauge("l2crypt_gateway_netkey_pw_id", "NETKEY version sent with.", netkey.pw_id))
    out += _path_metrics(core.multipath.snapshot())
    if client is not None:
        out += [
            gauge("l2crypt_gateway_keyserver_connected", "1 when connected to a key server.",
                  1 if client.connected else 0),
            counter("l2crypt_gateway_keyserver_connects", "Sessions established with a key server.", client.connects),
            counter("l2crypt_gateway_keyserver_failovers",
                    "Moves to a lower-priority key server after the one in use failed.", client.selector.failovers),
            counter("l2crypt_gateway_keyserver_failbacks",
                    "Returns to a higher-priority key server after its hold-down.", client.selector.failbacks),
        ]
        latency = getattr(client, "latency", None)
        if latency is not None:
            out.extend(latency.collect())
    return out


def _path_metrics(paths: list[dict]) -> list:
    """Per path of every multi-path tunnel link (``tunnel_paths``): none for one-path links."""
    if not paths:
        return []
    labels = ("peer", "path")

    def each(key: str, scale: float = 1.0) -> list:
        return [([p["peer"], str(p["id"])], round(p[key] * scale, 6) if p[key] is not None else 0) for p in paths]

    return [
        gauge("l2crypt_gateway_tunnel_path_up", "1 while the path is in use (state up), 0 while out or held down.",
              labels=labels, samples=[([p["peer"], str(p["id"])], 1 if p["state"] == "up" else 0) for p in paths]),
        gauge("l2crypt_gateway_tunnel_path_rtt_seconds", "Round trip of the path's probes (smoothed).",
              labels=labels, samples=each("rtt_ms", 1e-3)),
        gauge("l2crypt_gateway_tunnel_path_loss_ratio", "Share of the path's frames lost in the last interval.",
              labels=labels, samples=each("loss")),
        gauge("l2crypt_gateway_tunnel_path_weight", "The path's share of new traffic (sums to 1 over live paths).",
              labels=labels, samples=each("weight")),
        counter("l2crypt_gateway_tunnel_path_bytes", "Bytes of datagrams on the path, by direction.",
                labels=labels + ("direction",),
                samples=[([p["peer"], str(p["id"]), d], p[f"{d}_bytes"]) for p in paths for d in ("tx", "rx")]),
        gauge("l2crypt_gateway_tunnel_path_pw_id", "Key version (PW_ID) the path sends with.",
              labels=labels, samples=[([p["peer"], str(p["id"])], p["pw_id"] or 0) for p in paths]),
    ]
