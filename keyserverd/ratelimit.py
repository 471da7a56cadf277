"""Per-host limits of the key server, without I/O (time comes in as ``now``).

1. ``HostBuckets`` keeps one token bucket per host ID: ``rate_per_s`` tokens a
   second, at most ``burst`` saved up.  ``take(host_id, now)`` spends one token
   or says no.  Idle full buckets are forgotten, so the table stays as small
   as the set of busy hosts.
2. ``LogLimiter`` lets one log line per (key) through every ``every_s``
   seconds and counts the lines it held back, so a flood of refusals cannot
   flood the log.
"""

from __future__ import annotations


class HostBuckets:
    """Token buckets by host ID.  Owned by the ``KeyService``."""

    MAX_HOSTS = 65536

    def __init__(self, rate_per_s: float, burst: int):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)

    def take(self, host_id: str, now: float) -> bool:
        """Spend one token of ``host_id``; False when its bucket is empty."""
        tokens, at = self._buckets.get(host_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[host_id] = (tokens, now)
            return False
        if len(self._buckets) >= self.MAX_HOSTS and host_id not in self._buckets:
            self._forget_full(now)
        self._buckets[host_id] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        for host_id, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate_per_s >= self.burst:
                del self._buckets[host_id]


class LogLimiter:
    """At most one log line per key every ``every_s`` seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def allow(self, key: object, now: float) -> int | None:
        """None: stay quiet.  Otherwise log now; the int is how many lines were held back."""
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 65536:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)
