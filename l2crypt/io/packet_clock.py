"""Where a daemon's packet counters start, safe across restarts and clock steps.

A (key, nonce) pair must never repeat, and the nonce is the packet number, so
a restarted sender must start above every number it used before it stopped,
whatever its wall clock says.

1. **Start.**  ``PacketClock(state_dir)`` reads ``state_dir/clock``: the packet
   number the previous life had *reserved* (see 3).  A missing file is a first
   start; a file it cannot read, parse or write back stops the start with one
   clear line (``LocalError``): starting blind could reuse numbers.  (The file
   of earlier versions, the wall clock in seconds, is read as that second's
   number plus their safety margin.)
2. ``pn_start()`` = max(wall clock * 2**30, reserved + 1), and reserves ahead
   of it: above everything used before, in this life or the previous one,
   even if the wall clock went back.  The engines then follow their own
   clock from there (``replay_floor.raise_to_clock``).
3. **Reserve ahead.**  ``reserve(highest_used)`` durably writes
   ``highest_used + RESERVE_S * 2**30`` (never less than what was reserved
   before) and returns it: the engines never seal above it (their
   ``pn_limit``; ``pn_unreserved`` counts what they refuse).  The daemon calls
   it every ``PERSIST_INTERVAL_S`` with the highest number its engines have
   reached.  Numbers follow the clock (2**30 a second), so a reserve of a few
   intervals is enough; if a write fails, the limit stays where the file is
   and sealing stops when it is reached (fail closed), with one log line.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from l2crypt.core import aead
from l2crypt.core.errors import LocalError
from l2crypt.ops.logs import fields

from .state_file import write_atomic

log = logging.getLogger("l2crypt.clock")

#: How often the daemon reserves packet numbers (seconds).  Tuning.
PERSIST_INTERVAL_S = 1.0
#: How far ahead of the highest number used each reservation reaches, in
#: seconds of the packet clock: one missed write plus margin.  Tuning.
RESERVE_S = 3 * PERSIST_INTERVAL_S
#: Margin the clock files of earlier versions (wall seconds) were read with.
LEGACY_MARGIN_S = 6.0
FORMAT_VERSION = 2
CLOCK_FILE = "clock"


class PacketClock:
    """The packet-number reservation kept in ``state_dir``: numbers up to ``reserved`` may have
    been used, so a restart starts above them."""

    def __init__(self, state_dir: str | Path, wall=time.time):
        self.path = Path(state_dir) / CLOCK_FILE
        self._wall = wall
        #: Every number up to this one may have been used (the engines' ``pn_limit``).
        self.reserved = self._read()
        self._failing = False
        try:
            self._write(self.reserved)  # can we write it at all?  Better to know now.
        except OSError as exc:
            raise LocalError(f"cannot write the packet clock {self.path}: {exc.strerror or exc}") from None

    @staticmethod
    def _reserve_pn() -> int:
        return int(RESERVE_S * aead.PN_PER_SECOND)

    def _read(self) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalError(f"cannot read the packet clock {self.path}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        try:
            doc = json.loads(text)
            if isinstance(doc, dict) and doc.get("version") == FORMAT_VERSION:
                value = doc["reserved_pn"]
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64:
                    return value
            elif isinstance(doc, (int, float)) and not isinstance(doc, bool) and 0 <= doc < 2**33:
                return aead.initial_packet_number(float(doc) + LEGACY_MARGIN_S)  # an earlier version's file
        except (ValueError, KeyError):
            pass
        raise LocalError(f"{self.path} is not a packet clock file; move it away only if the wall clock "
                         "is known to be past every packet number this host has sent")

    def _write(self, reserved: int) -> None:
        doc = {"version": FORMAT_VERSION, "reserved_pn": reserved}
        write_atomic(self.path, json.dumps(doc).encode() + b"\n")
        self.reserved = reserved

    def pn_start(self) -> int:
        """The first packet number for an engine started now (reserved ahead)."""
        start = max(aead.initial_packet_number(self._wall()), self.reserved + 1)
        self.reserve(start)
        return start

    def reserve(self, highest_used: int) -> int:
        """Reserve numbers ahead of ``highest_used`` on disk; returns the highest
        number the engines may use (the old one if the write failed)."""
        wanted = max(self.reserved, highest_used + self._reserve_pn())
        if wanted > self.reserved:
            try:
                self._write(wanted)
            except OSError as exc:
                if not self._failing:
                    log.error("packet_clock_unsaved", extra=fields(path=str(self.path),
                                                                   reason=exc.strerror or str(exc)))
                self._failing = True
                return self.reserved
            if self._failing:
                log.info("packet_clock_saved_again", extra=fields(path=str(self.path)))
            self._failing = False
        return self.reserved

    def persist(self) -> int:
        """``reserve`` for a daemon whose counters do not follow the clock (they
        start at ``pn_start()`` and grow by one per packet): reserves ahead of
        the wall clock.  Call every ``PERSIST_INTERVAL_S``."""
        return self.reserve(aead.initial_packet_number(self._wall()))
