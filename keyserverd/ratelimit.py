"""Per-host limits of the key server, without I/O (time comes in as ``now``).

1. ``HostBuckets`` keeps one token bucket per host ID: ``rate_per_s`` tokens a
   second, at most ``burst`` saved up.  ``take(host_id, now)`` spends one token
   or says no.  Idle full buckets are forgotten, so the table stays as small
   as the set of busy hosts.
(Log lines are rate-limited with ``l2crypt.ops.logs.RateLimiter``.)
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
