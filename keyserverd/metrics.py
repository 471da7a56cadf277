"""Prometheus metrics of the key server (see ``l2crypt.ops.metrics`` for the endpoint).

Read at scrape time from the ``KeyServer`` and its ``KeyService`` counters
and the store's key summary; request handling time is the one histogram
observed as requests go.  No key bytes, no tokens.
"""

from __future__ import annotations

import time

from prometheus_client import Histogram
from prometheus_client.core import Metric

from keyserverd.store.protocol import StoreUnavailable
from l2crypt.ops.metrics import LATENCY_BUCKETS_S, FunctionCollector, counter, gauge, new_registry


class KeyServerMetrics:
    """The key server's Prometheus registry: request latency by type and the server's counters."""

    def __init__(self, server):
        self.server = server
        self.handling = Histogram("keyserverd_request_duration_seconds",
                                  "Time to handle one request, by message type.", ["type"],
                                  registry=None, buckets=LATENCY_BUCKETS_S)
        server.observe_request = self._observe
        self.registry = new_registry()
        self.registry.register(FunctionCollector(self.collect))

    def _observe(self, kind: str | None, seconds: float) -> None:
        self.handling.labels(kind or "?").observe(seconds)

    def collect(self, now: float | None = None) -> list[Metric]:
        now = time.time() if now is None else now
        server, service = self.server, self.server.service
        store = service.store
        try:
            hosts, keys, store_up = store.list_hosts(), store.key_summary(), 1
        except StoreUnavailable:
            hosts, keys, store_up = [], {"pairs": [], "pair_versions": 0, "multicast": None}, 0
        out: list[Metric] = [
            gauge("keyserverd_store_up", "1 when the store answered this scrape, 0 while it is unavailable.",
                  store_up),
            gauge("keyserverd_hosts", "Hosts in the ID-MAC table, by state.", labels=("state",), samples=[
                (["enrolled"], sum(1 for h in hosts if h.enrolled and not h.revoked)),
                (["pending"], sum(1 for h in hosts if not h.enrolled and not h.revoked)),
                (["revoked"], sum(1 for h in hosts if h.revoked)),
            ]),
            gauge("keyserverd_connected_hosts", "Hosts with at least one live authenticated connection.",
                  len(server.connected_hosts())),
            gauge("keyserverd_connections", "Live connections (authenticated or not).", server.connections),
            counter("keyserverd_connections_accepted", "Connections accepted.", server.connections_total),
            counter("keyserverd_connections_refused", "Connections refused by a cap, by reason.",
                    labels=("reason",), samples=[([k], v) for k, v in sorted(server.connections_refused.items())]),
            counter("keyserverd_requests", "Requests, by message type.", labels=("type",),
                    samples=[([k], v) for k, v in sorted(service.requests.items())]),
            counter("keyserverd_key_requests", "Pair key requests (key_req).", service.requests.get("key_req", 0)),
            counter("keyserverd_refusals", "Refused requests, by code.", labels=("code",),
                    samples=[([k], v) for k, v in sorted(service.refusals.items())]),
            counter("keyserverd_rekeys", "Key rotations made by this server, by cause.", labels=("cause",),
                    samples=[([k], v) for k, v in sorted(service.rotations.items())]),
            counter("keyserverd_events_pushed", "Rotation and revocation events pushed, by kind.",
                    labels=("kind",), samples=[([k], v) for k, v in sorted(service.events.items())]),
            gauge("keyserverd_event_seq", "Last key event sequence number pushed.", server.event_seq),
            gauge("keyserverd_pair_keys", "Pairs with a key.", len(keys["pairs"])),
            gauge("keyserverd_pair_key_versions", "Pair key versions held (current and superseded).",
                  keys["pair_versions"]),
        ]
        ages = [now - created for _, _, _, created in keys["pairs"]]
        if ages:
            out.append(gauge("keyserverd_pair_key_age_seconds", "Age of the current pair keys: min and max.",
                             labels=("stat",), samples=[(["min"], min(ages)), (["max"], max(ages))]))
        if keys["multicast"]:
            pw_id, created = keys["multicast"]
            out.append(gauge("keyserverd_multicast_key_age_seconds", "Age of the current multicast key.",
                             now - created))
            out.append(gauge("keyserverd_multicast_key_pw_id", "Current multicast key version.", pw_id))
        out.extend(self.handling.collect())
        return out
