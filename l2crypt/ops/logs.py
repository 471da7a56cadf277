"""Structured logging: ``event key=value`` text lines, or one JSON object a line.

Callers log an event name and fields: ``log.info("key_installed", extra=fields(peer=..))``.
No caller passes key material or tokens; the tests grep logs for them.
"""

from __future__ import annotations

import json
import logging
import sys
import time


def fields(**kv) -> dict:
    """Attach structured fields to a log call."""
    return {"fields": kv}


class TextFormatter(logging.Formatter):
    """One line per record: ``logger: level event k=v ...``."""

    def format(self, record: logging.LogRecord) -> str:
        kv = getattr(record, "fields", None) or {}
        extra = "".join(f" {k}={v}" for k, v in kv.items())
        return f"{record.name}: {record.levelname.lower()} {record.getMessage()}{extra}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", None) or {})
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimiter:
    """At most one event per ``key`` every ``interval_s`` seconds.

    ``allow(key, now)`` says whether to log now; the events it refused since
    the last allowed one are counted, and ``take_suppressed(key)`` returns
    that count (to log it as ``suppressed=N`` on the next line).  ``now``
    comes from the caller (sans-I/O code) or from ``clock``.
    """

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic, max_keys: int = 4096):
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict = {}
        self._suppressed: dict = {}

    def allow(self, key, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        if now - self._last.get(key, -1e18) >= self.interval_s:
            if key not in self._last and len(self._last) >= self._max_keys:
                self._forget(now)
            self._last[key] = now
            return True
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return False

    def take_suppressed(self, key) -> int:
        return self._suppressed.pop(key, 0)

    def _forget(self, now: float) -> None:
        """Bound the memory: drop keys quiet for a whole interval."""
        for key in [k for k, t in self._last.items() if now - t >= self.interval_s]:
            del self._last[key]
            self._suppressed.pop(key, None)
