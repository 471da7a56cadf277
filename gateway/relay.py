"""``l2crypt-gateway relay``: a keyless UDP forwarder for sealed tunnel datagrams.

A relay stands between two gateways that cannot reach each other directly (one
path of a multipath tunnel, issue 17).  It holds no key and never parses a
datagram beyond its length:

1. ``parse_endpoint`` turns each ``HOST:PORT`` of ``--listen`` and ``--join``
   into an ``(ip, port)`` pair (IPv4 literals; a bad one is a one-line error).
2. ``RelayTable`` (no I/O) is built from the joins: each join is two endpoints,
   and a datagram from one (same IP *and* port) goes to the other.
3. ``RelayTable.decide(source, length)`` says where a datagram goes, or why it
   is dropped (``empty``, ``oversized``, ``unknown_sender``); ``count`` adds the
   outcome to the counters (forwarded datagrams and bytes per direction, drops
   per reason, ``send_error`` when the kernel refused to send).
4. ``run_relay`` is the I/O loop: one UDP socket, ``poll`` bounded by the next
   stats time, at most ``BATCH`` datagrams per wakeup, a JSON line of the
   counters every ``stats_interval_s`` and at exit (SIGTERM or SIGINT), and the
   same document written atomically to ``stats_file`` if given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from .ports import BUFFER_BYTES

#: The largest UDP payload over IPv4 (65,535 - 20 - 8): the limit of ``--max-datagram-bytes``.
UDP_MAX_PAYLOAD = 65507
#: Default of ``--max-datagram-bytes``: a tunnel datagram of a 9,000-byte inner frame fits, with room.
DEFAULT_MAX_DATAGRAM_BYTES = 16384
#: Datagrams read per wakeup (then the loop checks the clock and signals again).
BATCH = 64
DROP_REASONS = ("empty", "oversized", "unknown_sender", "send_error")

Endpoint = tuple[str, int]


def parse_endpoint(text: str) -> Endpoint:
    """``"10.73.1.1:4789"`` -> ``("10.73.1.1", 4789)``; ValueError with a one-line reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return str(ip), int(port_text)


def endpoint_text(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


@dataclass
class RelayCounters:
    """What the relay did: per direction (``"A->B"``) datagrams and bytes, drops per reason."""

    forwarded: dict[str, dict[str, int]] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def as_dict(self) -> dict:
        return {"forwarded": {k: dict(v) for k, v in self.forwarded.items()}, "drops": dict(self.drops)}


class RelayTable:
    """The relay's decisions, without I/O: which endpoint a datagram goes to, or why not.

    ``joins``: pairs of endpoints; a datagram from one goes to the other.  An
    endpoint may stand in one join only, and never opposite itself (ValueError).
    """

    def __init__(self, joins: list[tuple[Endpoint, Endpoint]], max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES):
        if not joins:
            raise ValueError("give at least one --join A_HOST:PORT B_HOST:PORT")
        if not 1 <= max_datagram_bytes <= UDP_MAX_PAYLOAD:
            raise ValueError(f"max_datagram_bytes must be from 1 to {UDP_MAX_PAYLOAD}")
        self.max_datagram_bytes = max_datagram_bytes
        self.route: dict[Endpoint, Endpoint] = {}
        self.counters = RelayCounters()
        for a, b in joins:
            if a == b:
                raise ValueError(f"--join {endpoint_text(a)} {endpoint_text(b)}: the two endpoints are the same")
            for end in (a, b):
                if end in self.route:
                    raise ValueError(f"--join: {endpoint_text(end)} stands in more than one join")
            self.route[a], self.route[b] = b, a
            for src, dst in ((a, b), (b, a)):
                self.counters.forwarded[self.direction(src, dst)] = {"datagrams": 0, "bytes": 0}

    @staticmethod
    def direction(src: Endpoint, dst: Endpoint) -> str:
        return f"{endpoint_text(src)}->{endpoint_text(dst)}"

    def decide(self, source: Endpoint, length: int) -> Endpoint | str:
        """The endpoint a datagram of ``length`` bytes from ``source`` goes to, or a drop reason."""
        if length <= 0:
            return "empty"
        if length > self.max_datagram_bytes:
            return "oversized"
        return self.route.get((source[0], source[1]), "unknown_sender")

    def count(self, source: Endpoint, length: int, outcome: Endpoint | str) -> None:
        """Count what happened to a datagram: forwarded to ``outcome``, or dropped for it."""
        if isinstance(outcome, str):
            self.counters.drops[outcome] = self.counters.drops.get(outcome, 0) + 1
            return
        entry = self.counters.forwarded[self.direction((source[0], source[1]), outcome)]
        entry["datagrams"] += 1
        entry["bytes"] += length


# --- I/O ------------------------------------------------------------------------------


def open_relay_socket(listen: Endpoint) -> socket.socket:
    """The relay's UDP socket, bound and non-blocking; OSError with a one-line reason."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # the gateways' tunnel sockets' size: a burst waits, not lost
        sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
    try:
        sock.bind(listen)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {endpoint_text(listen)}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def stats_document(event: str, listen: Endpoint, table: RelayTable, started: float) -> dict:
    return {"event": event, "listen": endpoint_text(listen), "uptime_s": round(time.monotonic() - started, 3),
            **table.counters.as_dict()}


def write_stats(doc: dict, path: str | None) -> None:
    """One JSON line on stderr, and the same document written atomically to ``path``."""
    line = json.dumps(doc, sort_keys=True)
    print(line, file=sys.stderr, flush=True)
    if path:
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as out:
                out.write(line + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            print(json.dumps({"event": "relay_stats_file_error", "error": str(exc)}), file=sys.stderr, flush=True)


def forward_ready(sock: socket.socket, table: RelayTable) -> int:
    """Read at most ``BATCH`` datagrams and forward or drop each; how many were read."""
    n = 0
    for n in range(1, BATCH + 1):
        try:
            data, source = sock.recvfrom(table.max_datagram_bytes + 1)  # one byte more: oversized shows
        except (BlockingIOError, InterruptedError):
            return n - 1
        except OSError:
            continue  # e.g. an ICMP error queued on the socket: nothing to forward
        outcome = table.decide(source, len(data))
        if not isinstance(outcome, str):
            try:
                sock.sendto(data, outcome)
            except OSError:
                outcome = "send_error"
        table.count(source, len(data), outcome)
    return n


def run_relay(listen: Endpoint, table: RelayTable, stats_interval_s: float = 10.0,
              stats_file: str | None = None) -> None:
    """Forward until SIGTERM or SIGINT; the counters at every interval and at exit."""
    sock = open_relay_socket(listen)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    stopping = []
    old = {s: signal.signal(s, lambda signum, frame: stopping.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r.fileno(), select.POLLIN)
    try:
        write_stats({"event": "relay_listening", "listen": endpoint_text(listen),
                     "joins": sorted(table.counters.forwarded), "max_datagram_bytes": table.max_datagram_bytes},
                    None)
        next_stats = started + stats_interval_s
        while not stopping:
            timeout_ms = max(0, int((next_stats - time.monotonic()) * 1000))
            for fd, _ in poller.poll(timeout_ms):
                if fd == sock.fileno():
                    forward_ready(sock, table)
                else:
                    try:
                        wake_r.recv(64)
                    except OSError:
                        pass
            if time.monotonic() >= next_stats:
                write_stats(stats_document("relay_stats", listen, table, started), stats_file)
                next_stats = time.monotonic() + stats_interval_s
        write_stats(stats_document("relay_stopped", listen, table, started), stats_file)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in (sock, wake_r, wake_w):
            s.close()
