"""Prometheus metrics for the agent (and the pieces the key server and gateway reuse).

1. Each daemon builds a ``CollectorRegistry`` and registers a custom collector
   that reads the counters the daemon already keeps (the engine's ``counters``
   and ``drops``, the key client's attributes) at scrape time: the packet path
   pays nothing for metrics.  The port guard's counters live in the kernel
   and are read with one ``nft -j list table`` per scrape.
2. ``serve_metrics(listen, registry)`` answers ``GET /metrics`` on the daemon's
   own asyncio loop, so a scrape reads the counters on the thread that writes
   them (no locks, no threads).  It listens on loopback by default
   (``metrics_listen``); an empty ``metrics_listen`` turns it off.
3. ``LatencyHistogram`` times key requests (key client: request sent -> answer).

No metric carries key material: only counts, ages, versions and MACs.

A new daemon (e.g. the gateway) writes a collector with ``counter``/``gauge``
below, registers it on ``new_registry()`` and awaits ``serve_metrics``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from l2crypt.core.errors import LocalError
from l2crypt.io.port_guard import EGRESS_COUNTER, INBOUND_COUNTER
from l2crypt.io.aio_timeout import wait_for

log = logging.getLogger("l2crypt.metrics")

MAX_REQUEST_BYTES = 8192
CLIENT_TIMEOUT_S = 5.0
#: Key request latency buckets, seconds (LAN round trips up to backoff ceilings).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def new_registry() -> CollectorRegistry:
    """A registry of our own (the default one would add process/GC metrics twice)."""
    return CollectorRegistry(auto_describe=True)


def counter(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
            samples: Iterable[tuple[list[str], float]] = ()) -> CounterMetricFamily:
    """A counter family; ``name`` without the ``_total`` suffix."""
    fam = CounterMetricFamily(name, doc, value=value, labels=list(labels) or None)
    for label_values, v in samples:
        fam.add_metric(label_values, v)
    return fam


def gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
          samples: Iterable[tuple[list[str], float]] = ()) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, value=value, labels=list(labels) or None)
    for label_values, v in samples:
        fam.add_metric(label_values, v)
    return fam


class LatencyHistogram:
    """Request -> answer times.  ``observe(seconds)`` is called on the loop thread."""

    def __init__(self, name: str, doc: str):
        self._hist = Histogram(name, doc, registry=None, buckets=LATENCY_BUCKETS_S)
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self._hist.observe(max(0.0, seconds))

    def collect(self) -> list[Metric]:
        return self._hist.collect()


class FunctionCollector:
    """Adapts a function returning metric families to the registry's collector protocol."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]):
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return list(self._fn())


#: Direction label of the port guard's drop counters -> the counter of ``PortGuard.reading``.
GUARD_DIRECTIONS = (("inbound", INBOUND_COUNTER), ("egress", EGRESS_COUNTER))


def port_guard_metrics(intact_name: str, dropped_name: str, readings: dict[str, dict]) -> list[Metric]:
    """A gauge ``intact_name{port}`` and a counter ``dropped_name{port,direction}`` from
    ``readings``: port label -> ``PortGuard.reading()`` (read with nft at scrape time)."""
    return [
        gauge(intact_name,
              "1 while the port's nftables guard is in place as installed (0: missing or altered).",
              labels=("port",),
              samples=[([port], 1 if r["port_guard"] == "intact" else 0) for port, r in readings.items()]),
        counter(dropped_name,
                "Frames the port guard dropped: inbound (kept from the host stack), egress (kept off the wire).",
                labels=("port", "direction"),
                samples=[([port, direction], r[key]) for port, r in readings.items()
                         for direction, key in GUARD_DIRECTIONS if r.get(key) is not None]),
    ]


# --- the agent ----------------------------------------------------------------------


def agent_metrics(agent, now: float) -> list[Metric]:
    """Every agent metric, read from ``agent.engine`` (its ``snapshot(now)``,
    ``counters`` and ``drops``: the engine, or the datapath process's last
    Stats) and ``agent.client`` at ``now`` (engine time)."""
    engine, client = agent.engine, agent.client
    out: list[Metric] = []
    if engine is None:
        return out
    doc = engine.snapshot(now)
    c = engine.counters
    out.append(gauge("l2crypt_agent_info", "The agent's identity (value 1).", labels=("id", "mac", "port", "tap", "cipher"),
                     samples=[([agent.host_id, _mac(engine.my_mac), agent.config.port, agent.config.tap,
                                doc["cipher"]], 1)]))
    datapath = getattr(agent, "datapath", "simple")
    out.append(gauge("l2crypt_agent_datapath_info",
                     "The datapath that runs (simple or batched) and why, if not the one configured (value 1).",
                     labels=("datapath", "reason"), samples=[([datapath, getattr(agent, "datapath_reason", "")], 1)]))
    out.append(gauge("l2crypt_agent_datapath_process", "1 when the frame path runs in a process of its own.",
                     1 if getattr(agent, "process", None) is not None else 0))
    out.append(counter("l2crypt_frames_sealed", "Frames sealed and sent toward the wire.", c.get("sealed", 0)))
    out.append(counter("l2crypt_frames_opened", "Frames opened and written to the TAP.", c.get("opened", 0)))
    out.append(counter("l2crypt_bytes_sealed", "Plain bytes (whole frames) sealed.", c.get("bytes_sealed", 0)))
    out.append(counter("l2crypt_bytes_opened", "Plain bytes (whole frames) opened.", c.get("bytes_opened", 0)))
    out.append(counter("l2crypt_frames_dropped", "Frames dropped, by reason.", labels=("reason",),
                       samples=[([reason], n) for reason, n in sorted(engine.drops.items())]))
    out.append(counter("l2crypt_frames_held", "Frames held while their key was requested.", c.get("held", 0)))
    out.append(counter("l2crypt_key_requests", "Key requests raised by the engine.", c.get("key_requests", 0)))
    out.append(counter("l2crypt_key_answers", "Pair keys installed from the key server.", c.get("key_answers", 0)))
    out.append(counter("l2crypt_rekeys", "New key versions (PW_ID) taken into use, pair and multicast.",
                       c.get("rekeys", 0)))
    out.append(counter("l2crypt_rekey_requests", "Rekeys asked for after rekey_after_frames.",
                       c.get("rekey_requests", 0)))
    out.append(counter("l2crypt_lag_reports", "Peers reported to the key server for using an old version.",
                       c.get("lag_reports", 0)))
    out.append(gauge("l2crypt_pending_keys", "MACs whose key is being requested now.", len(doc["pending_keys"])))
    out.append(gauge("l2crypt_peers", "Peers with a pair key.", len(doc["peers"])))
    out.append(gauge("l2crypt_key_age_seconds", "Age of the current pair key, by peer MAC.", labels=("peer",),
                     samples=[([p["mac"]], p["key_age_s"]) for p in doc["peers"]]))
    out.append(gauge("l2crypt_key_pw_id", "Current key version (PW_ID), by peer MAC.", labels=("peer",),
                     samples=[([p["mac"]], p["pw_id"]) for p in doc["peers"]]))
    out += port_guard_metrics("l2crypt_port_guard_intact", "l2crypt_port_guard_frames_dropped",
                              {agent.config.port: agent.guard_reading()})
    if doc["multicast_pw_id"] is not None:
        out.append(gauge("l2crypt_multicast_key_age_seconds", "Age of the current multicast key.",
                         doc["multicast_key_age_s"]))
        out.append(gauge("l2crypt_multicast_key_pw_id", "Current multicast key version.", doc["multicast_pw_id"]))
    if client is not None:
        out.extend(keyclient_metrics(client))
    return out


def keyclient_metrics(client) -> list[Metric]:
    """The key client's metrics (connection, failovers, request latency), for
    every daemon that has a ``keyclient.KeyClient``."""
    out = [
        gauge("l2crypt_keyserver_connected", "1 when connected to a key server.", 1 if client.connected else 0),
        counter("l2crypt_keyserver_connects", "Sessions established with a key server.", client.connects),
        counter("l2crypt_keyserver_failovers", "Moves to a lower-priority key server after the one in use failed.",
                client.selector.failovers),
        counter("l2crypt_keyserver_failbacks", "Returns to a higher-priority key server after its hold-down.",
                client.selector.failbacks),
    ]
    latency = getattr(client, "latency", None)
    if latency is not None:
        out.extend(latency.collect())
    return out


def _mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# --- the HTTP endpoint --------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int] | None:
    """``metrics_listen`` (HOST:PORT) -> (host, port), or None when empty (metrics off)."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"not an IP address (or localhost): {host!r}") from None
    return host, int(port)


async def serve_metrics(listen: str, registry: CollectorRegistry) -> asyncio.AbstractServer | None:
    """Answer ``GET /metrics`` at ``listen`` (HOST:PORT); None when ``listen`` is empty.

    Raises LocalError naming ``metrics_listen`` when the address cannot be bound.
    """
    where = parse_listen(listen)
    if where is None:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                status, body, ctype = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
            elif parts[1].split(b"?")[0] in (b"/metrics", b"/"):
                status, body, ctype = b"200 OK", generate_latest(registry), CONTENT_TYPE_LATEST.encode()
            else:
                status, body, ctype = b"404 Not Found", b"see /metrics\n", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + (body if parts[:1] != [b"HEAD"] else b""))
            await wait_for(writer.drain(), CLIENT_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:  # a collector bug must not take the daemon down
            log.exception("metrics_scrape_failed")
        finally:
            writer.close()

    host, port = where
    try:
        return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES, reuse_address=True)
    except OSError as exc:
        raise LocalError(f"metrics_listen: cannot listen on {listen}: {exc.strerror or exc}") from None
