"""The one main loop of every l2crypt daemon: host agent, layer-3 agent, gateway.

A daemon opens its ports, builds its engine and its key client, then hands
itself to ``DaemonShell.serve`` (it implements ``Daemon``).  The shell does
the rest the same way for all of them:

1. ``run_daemon`` (the daemons' commands): load the config (a bad one: one
   line, exit 2), set up logging, lock the state directory, run the daemon.
2. ``serve``: SIGINT/SIGTERM set the stop event; the control socket
   (``status``) and the Prometheus endpoint start (either failing stops the
   start); each port the daemon reads (``readers``) gets a loop reader; the
   key client runs beside them as a task; ``NAME_started`` is logged.
3. The tick loop: sleep until the daemon's ``next_deadline()`` (the next
   timer of its engines), at most ``TICK_CAP_S`` (the packet clock needs a
   tick at least every ``replay_floor.CLOCK_TICK_S``) and at least
   ``MIN_SLEEP_S`` (a deadline already past does not spin the loop), then
   ``tick(now)``:
   a. every replay-floor book that is due is saved (``FloorFile.save_due``;
      while one cannot be saved its engine refuses frames);
   b. ``daemon.tick(now)``: the engines' timers, key requests, notices;
   c. every ``PERSIST_INTERVAL_S``: ``daemon.reserve()`` (the packet clock
      onto disk, ahead of every engine);
   d. every ``DROP_LOG_S``: one ``UNIT_dropped`` line with the new drops;
   e. a key client task that ended without a stop raises (a bug surfaces).
4. On stop: the readers go, the key client is cancelled, the control socket
   and the metrics endpoint close, every floor book is saved a last time as
   a clean stop (no frame is opened after it: the next start needs no
   lead), the packet clock is reserved, the socket file is removed and
   ``NAME_stopped`` is logged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from l2crypt.core.errors import L2cryptError, LocalError
from l2crypt.core.replay_floor import CLOCK_TICK_S, FloorBook
from l2crypt.io.packet_clock import PERSIST_INTERVAL_S
from l2crypt.io.state_file import FloorFile
from l2crypt.io.state_lock import lock_state_dir
from l2crypt.ops.control import serve_control
from l2crypt.ops.logs import fields, setup_logging
from l2crypt.ops.metrics import FunctionCollector, new_registry, serve_metrics
from l2crypt.io.aio_timeout import wait_for

#: The longest sleep between two ticks, seconds.
TICK_CAP_S = CLOCK_TICK_S
#: The shortest one, seconds: a deadline the engine cannot act on yet (key
#: requests over their rate) wakes the loop at most this often.
MIN_SLEEP_S = 0.01
#: New drops are logged at most this often, seconds.
DROP_LOG_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class FloorSave:
    """One book of replay floors, the file it is saved to, and where the
    highest verified numbers come from (read at each save)."""

    file: FloorFile
    book: FloorBook
    highest: Callable[[], Iterable[tuple[bytes, int]]]

    def save(self, now: float, stopped: bool = False) -> bool:
        return self.file.save(self.book, self.highest(), now, stopped=stopped)


class Daemon(Protocol):
    """What one daemon gives the shell.  Each member says when the shell uses it."""

    #: "agent", "l3_agent", "gateway": the events NAME_started and NAME_stopped.
    name: str
    #: "frames" or "packets": the event UNIT_dropped.
    unit: str
    log: logging.Logger
    #: The key client: ``await client.run(stop)`` runs beside the loop until ``stop`` is set.
    client: object

    def readers(self) -> list[tuple[int, Callable[[], None]]]:
        """At start: (file descriptor, callback when it polls readable) of each port."""

    def floor_saves(self) -> list[FloorSave]:
        """At every tick (those due) and at stop: the replay-floor books to save."""

    def tick(self, now: float) -> None:
        """Every tick, after the floors: run the engines' timers, send what they raised."""

    def next_deadline(self) -> float | None:
        """Before each sleep: when the engines next have timer work (loop time); None: none."""

    def reserve(self) -> None:
        """Every ``PERSIST_INTERVAL_S`` and at stop: reserve packet numbers on disk."""

    def all_drops(self) -> Counter:
        """Every ``DROP_LOG_S``: every drop so far, by reason."""

    def snapshot(self) -> dict:
        """On a status request: the status document."""

    def metrics(self, now: float) -> list:
        """On a scrape: the metric families."""

    def started_fields(self) -> dict:
        """Once started: the fields of NAME_started."""

    def stopped_fields(self) -> dict:
        """Once stopped: the fields of NAME_stopped."""


class DaemonShell:
    """Runs one daemon's loop (see the module docstring).  ``tick`` is one
    turn of it, callable without the loop (tests drive it)."""

    def __init__(self, daemon: Daemon, socket_path: Path, metrics_listen: str):
        self.daemon = daemon
        self.socket_path = Path(socket_path)
        self.metrics_listen = metrics_listen
        self.stop = asyncio.Event()
        self.ticks = 0
        self._last_persist: float | None = None
        self._last_drop_log = 0.0
        self._logged_drops: Counter = Counter()

    def sleep_s(self, now: float) -> float:
        """How long to wait before the next tick (see the module docstring, 3)."""
        deadline = self.daemon.next_deadline()
        if deadline is None:
            return TICK_CAP_S
        return min(TICK_CAP_S, max(MIN_SLEEP_S, deadline - now))

    def tick(self, now: float) -> None:
        """One tick (see the module docstring, 3a-d)."""
        daemon = self.daemon
        for floors in daemon.floor_saves():
            if floors.file.save_due(now):
                floors.save(now)
        daemon.tick(now)
        if self._last_persist is None:
            self._last_persist = self._last_drop_log = now
        if now - self._last_persist >= PERSIST_INTERVAL_S:
            daemon.reserve()
            self._last_persist = now
        if now - self._last_drop_log >= DROP_LOG_S:
            self.log_drops()
            self._last_drop_log = now
        self.ticks += 1

    def log_drops(self) -> None:
        drops = self.daemon.all_drops()
        new = drops - self._logged_drops
        if new:
            self.daemon.log.warning(f"{self.daemon.unit}_dropped", extra=fields(**dict(new)))
            self._logged_drops = Counter(drops)

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM (or ``stop``), then clean up (module docstring, 2-4)."""
        loop = asyncio.get_running_loop()
        daemon = self.daemon
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop.set)
        control = await serve_control(self.socket_path, daemon.snapshot)
        registry = new_registry()
        registry.register(FunctionCollector(lambda: daemon.metrics(loop.time())))
        try:
            metrics = await serve_metrics(self.metrics_listen, registry)
        except LocalError:
            control.close()
            raise
        fds: list[int] = []
        client_task = None
        try:
            for fd, on_readable in daemon.readers():
                loop.add_reader(fd, on_readable)
                fds.append(fd)
            client_task = asyncio.ensure_future(daemon.client.run(self.stop))
            daemon.log.info(f"{daemon.name}_started", extra=fields(**daemon.started_fields()))
            self._last_persist = self._last_drop_log = loop.time()
            while not self.stop.is_set():
                try:
                    await wait_for(self.stop.wait(), self.sleep_s(loop.time()))
                except asyncio.TimeoutError:
                    pass
                self.tick(loop.time())
                if client_task.done() and not self.stop.is_set():
                    client_task.result()  # surface a bug in the client
        finally:
            for fd in fds:
                loop.remove_reader(fd)
            self.stop.set()
            if client_task is not None:
                client_task.cancel()
            control.close()
            if metrics is not None:
                metrics.close()
            # The readers are gone and the key client is stopped: no frame is
            # opened after this save, so the next start needs no lead.
            now = loop.time()
            for floors in daemon.floor_saves():
                floors.save(now, stopped=True)
            daemon.reserve()
            try:
                self.socket_path.unlink()
            except OSError:
                pass
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            daemon.log.info(f"{daemon.name}_stopped", extra=fields(**daemon.stopped_fields()))


def run_daemon(load_config, daemon_class, fail) -> None:
    """Load a daemon's config (a bad one: one line, exit 2), set up logging, lock
    the state directory (``state_lock``) and run the daemon in the foreground
    until SIGTERM or Ctrl-C.  Shared by the agent, the layer-3 agent and the gateway."""
    try:
        config = load_config()
    except L2cryptError as exc:
        fail(str(exc), 2)
    setup_logging(config.log_level, config.log_format)
    try:
        lock = lock_state_dir(config.state_dir)  # noqa: F841 - held until the daemon returns
        asyncio.run(daemon_class(config).run())
    except L2cryptError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
