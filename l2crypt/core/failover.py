"""Which key server the agent uses: priorities, probes, failover, fail-back.

Sans-I/O: the key client feeds it what happened (with ``now``) and asks it
what to do.  The servers are listed by priority, first = highest.

1. ``order()`` gives the servers to try, in priority order, those last seen
   down at the end.  ``connected(i)`` marks the one in use.
2. While connected, the client pings every ``probe_interval_s``:
   ``pong()`` resets the miss count, ``probe_missed()`` adds one and returns
   True after ``probe_failures`` misses (fail over).  A dropped connection is
   ``lost()``: fail over at once.
3. Servers of higher priority than the one in use are probed in the
   background (``background_targets()``); ``background_result(i, ok, now)``
   records it.  ``failback_due(now)`` names the best one that has answered
   without a miss for ``failback_holddown_s``; the client then ``release()``s
   the one in use and connects to it.

4. ``ReconnectSchedule`` says how long to wait before connecting again:
   after a session ended, a random time up to ``jitter_s`` (when a key
   server restarts, its hosts come back spread out, not all in one
   instant); after a round in which no server took us, an exponential
   backoff from ``min_s`` to ``max_s``, each wait drawn between half and all
   of it, so hosts that failed together drift apart.

Each server's state follows this table (an illegal move raises
``IllegalTransition`` and leaves the state unchanged)::

               connected            lost
    UNTRIED ------------> IN_USE ---------> DOWN
       |  \\  probe_ok    ^  |  release        | ^
       |   `--> ANSWERING-'  `--> ANSWERING    | | probe_failed
       |          |  ^ probe_ok                | |
       |          |  `-------------------------' |
       |          `---------- probe_failed ------'
       `------------- probe_failed ------------->
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Callable

#: Defaults of ``ReconnectSchedule`` (seconds).
RECONNECT_JITTER_S = 1.0
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0


class ServerState(enum.Enum):
    """What the agent knows of one key server."""
    UNTRIED = "untried"
    IN_USE = "in_use"
    ANSWERING = "answering"  # reachable, not in use
    DOWN = "down"


class Event(enum.Enum):
    """What can happen to one key server (the inputs of ``TRANSITIONS``)."""
    CONNECTED = "connected"
    LOST = "lost"            # connection dropped, probes missed, or connect failed
    RELEASED = "released"    # we left it on purpose (fail-back)
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"


S, E = ServerState, Event
TRANSITIONS: dict[tuple[ServerState, Event], ServerState] = {
    (S.UNTRIED, E.CONNECTED): S.IN_USE,
    (S.UNTRIED, E.LOST): S.DOWN,
    (S.UNTRIED, E.PROBE_OK): S.ANSWERING,
    (S.UNTRIED, E.PROBE_FAILED): S.DOWN,
    (S.ANSWERING, E.CONNECTED): S.IN_USE,
    (S.ANSWERING, E.LOST): S.DOWN,
    (S.ANSWERING, E.PROBE_OK): S.ANSWERING,
    (S.ANSWERING, E.PROBE_FAILED): S.DOWN,
    (S.DOWN, E.CONNECTED): S.IN_USE,
    (S.DOWN, E.LOST): S.DOWN,
    (S.DOWN, E.PROBE_OK): S.ANSWERING,
    (S.DOWN, E.PROBE_FAILED): S.DOWN,
    (S.IN_USE, E.LOST): S.DOWN,
    (S.IN_USE, E.RELEASED): S.ANSWERING,
    (S.IN_USE, E.PROBE_OK): S.IN_USE,
}


class IllegalTransition(Exception):
    """Our own misuse: an event that the server's state does not allow."""


@dataclass
class ServerEntry:
    """One configured key server.  Owned by ``FailoverSelector``."""

    address: str
    priority: int                     # 1 = highest
    state: ServerState = ServerState.UNTRIED
    answering_since: float | None = None  # first of the current run of good probes

    def apply(self, event: Event, now: float) -> ServerState:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalTransition(f"{self.address}: {event.value} in state {self.state.value}")
        if new == ServerState.ANSWERING and self.state != ServerState.ANSWERING:
            self.answering_since = now
        elif new != ServerState.ANSWERING:
            self.answering_since = None
        self.state = new
        return new


class FailoverSelector:
    """Server selection for one key client; see the module docstring."""

    def __init__(self, servers: tuple[str, ...], probe_failures: int = 3, failback_holddown_s: float = 30.0):
        if not servers:
            raise ValueError("at least one key server")
        self.servers = [ServerEntry(a, i + 1) for i, a in enumerate(servers)]
        self.probe_failures = probe_failures
        self.failback_holddown_s = failback_holddown_s
        self.current: int | None = None
        self.previous: int | None = None  # the last one in use, to count failovers
        self.missed = 0
        self.failovers = 0
        self.failbacks = 0
        self._releasing = False     # release() called, lost() not yet
        self._failing_back = False  # lost() after a release: the next connect is a fail-back

    # --- 1. choosing -----------------------------------------------------------
    def order(self) -> list[int]:
        """Indices to try now: by priority, servers seen down last."""
        up = [i for i, s in enumerate(self.servers) if s.state != ServerState.DOWN]
        down = [i for i, s in enumerate(self.servers) if s.state == ServerState.DOWN]
        return up + down

    def connected(self, index: int, now: float) -> None:
        self.servers[index].apply(Event.CONNECTED, now)
        if self.previous is not None and self.previous != index:
            if self._failing_back:
                self.failbacks += 1
            else:
                self.failovers += 1
        self._failing_back = False
        self.current = self.previous = index
        self.missed = 0

    def connect_failed(self, index: int, now: float) -> None:
        self.servers[index].apply(Event.LOST, now)

    # --- 2. probing the server in use ----------------------------------------------
    def pong(self, now: float) -> None:
        self.missed = 0
        if self.current is not None:
            self.servers[self.current].apply(Event.PROBE_OK, now)

    def probe_missed(self, now: float) -> bool:
        """One probe went unanswered; True when it is time to fail over."""
        self.missed += 1
        return self.missed >= self.probe_failures

    def lost(self, now: float) -> None:
        """The connection in use is gone (dropped, or too many missed probes)."""
        if self.current is None:
            return
        if self._releasing:
            self.servers[self.current].apply(Event.RELEASED, now)
        else:
            self.servers[self.current].apply(Event.LOST, now)
        self._failing_back, self._releasing = self._releasing, False
        self.current = None
        self.missed = 0

    # --- 3. background probes and fail-back ----------------------------------------
    def background_targets(self) -> list[int]:
        """Servers of higher priority than the one in use (none when disconnected)."""
        if self.current is None:
            return []
        return list(range(self.current))

    def background_result(self, index: int, ok: bool, now: float) -> None:
        if index == self.current:
            return
        self.servers[index].apply(Event.PROBE_OK if ok else Event.PROBE_FAILED, now)

    def failback_due(self, now: float) -> int | None:
        """The best higher-priority server that has answered for the hold-down, or None."""
        for index in self.background_targets():
            s = self.servers[index]
            if (s.state == ServerState.ANSWERING and s.answering_since is not None
                    and now - s.answering_since >= self.failback_holddown_s):
                return index
        return None

    def release(self) -> None:
        """We are about to close the server in use to fail back; ``lost`` follows."""
        self._releasing = True

    # --- status --------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "keyserver": self.servers[self.current].address if self.current is not None else None,
            "keyservers": [{"server": s.address, "priority": s.priority, "state": s.state.value}
                           for s in self.servers],
            "failovers": self.failovers,
            "failbacks": self.failbacks,
        }


class ReconnectSchedule:
    """The waits of a key client between connection attempts (see the module
    docstring, 4).  ``rand`` returns a float in [0, 1) (tests pass their own)."""

    def __init__(self, jitter_s: float = RECONNECT_JITTER_S, min_s: float = RECONNECT_MIN_S,
                 max_s: float = RECONNECT_MAX_S, rand: Callable[[], float] = random.random):
        if not (jitter_s >= 0 and 0 < min_s <= max_s):
            raise ValueError("want jitter_s >= 0 and 0 < min_s <= max_s")
        self.jitter_s, self.min_s, self.max_s = jitter_s, min_s, max_s
        self._rand = rand
        self.failures = 0

    def after_session(self) -> float:
        """A session ended: wait up to ``jitter_s``, then try from the top."""
        self.failures = 0
        return self._rand() * self.jitter_s

    def after_failure(self) -> float:
        """No server took us this round: back off (``min_s`` doubling up to ``max_s``, jittered)."""
        ceiling = min(self.max_s, self.min_s * 2 ** min(self.failures, 32))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._rand())

    def fixed(self, wait_s: float) -> float:
        """A wait the caller chose (``session_replaced``); the backoff starts again after it."""
        self.failures = 0
        return wait_s
