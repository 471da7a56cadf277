"""Where the agent's packet counter starts, safe across restarts.

The counter starts at ``aead.initial_packet_number(wall_s)``.  For
that to be above every number used before a crash, the wall clock must not
have gone back.  The agent therefore writes the wall clock to
``state_dir/clock`` every ``PERSIST_INTERVAL_S`` and, after a restart, never
uses a time below (stored value + interval + margin).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import aead

PERSIST_INTERVAL_S = 5.0
MARGIN_S = 1.0


class PacketClock:
    def __init__(self, state_dir: str | Path, wall=time.time):
        self.path = Path(state_dir) / "clock"
        self._wall = wall
        self.floor_s = 0.0
        try:
            stored = float(self.path.read_text().strip())
            self.floor_s = stored + PERSIST_INTERVAL_S + MARGIN_S
        except (OSError, ValueError):
            pass
        self.persist()

    def now_s(self) -> float:
        return max(self._wall(), self.floor_s)

    def pn_start(self) -> int:
        """The first packet number for an engine started now."""
        return aead.initial_packet_number(self.now_s())

    def persist(self) -> None:
        """Record the clock; call at least every PERSIST_INTERVAL_S."""
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(f"{self.now_s():.6f}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError:
            pass
