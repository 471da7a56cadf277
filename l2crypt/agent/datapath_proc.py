"""The datapath process (``datapath_process = true``): the frame path on a core of its own.

The agent builds its engine, frame pump and ports as always (``Agent.start``),
then forks (``fork_datapath``); the child runs this loop and never returns to
the agent's asyncio loop.  The parent keeps the key client, the control
socket, the metrics endpoint and its timers (``datapath_link``), so none of
them ever delays a frame.

1. ``DatapathWorker.run``: a blocking ``poll`` on the TAP, the wire port and
   the control channel (``io.msg_channel``), no asyncio.  A readable TAP or
   wire port goes to the frame pump (``frame_pump``), as in the agent's loop.
2. A message from the control process (``core.datapath_msgs``: key
   installs, revocations, the cipher, retries) is applied by the
   ``EngineDriver``, the same code the agent runs without this process.
3. The datapath's own timers, through ``DaemonShell.tick``: the replay
   floors saved when due (the engine refuses frames while they cannot be),
   the engine's timers, key requests and notices (sent to the control
   process as ``KeyRequest``/``Notice``), the packet clock reserved on disk.
   Every ``STATS_INTERVAL_S`` a ``Stats`` message carries the engine's
   status snapshot, counters and drops (status and metrics read it).
4. ``Stop``, or the control process gone (EOF): the floors are saved a
   last time as a clean stop, the clock reserved, exit 0.  An exception:
   exit 1.  SIGTERM and SIGINT are ignored (they reach the whole process
   group; the control process stops the datapath).  The child always
   leaves by ``os._exit``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from l2crypt.core import datapath_msgs as msgs
from l2crypt.core.engine import FrameEngine
from l2crypt.io.msg_channel import MessageChannel, channel_pair
from l2crypt.ops.daemon_shell import STOP_SIGNALS, DaemonShell, FloorSave
from l2crypt.ops.logs import fields

from .engine_driver import EngineDriver
from .frame_pump import FramePump

log = logging.getLogger("l2crypt.datapath")

#: How often the datapath sends its Stats, seconds.
STATS_INTERVAL_S = 0.25
#: Messages handled per wakeup, at most.
BATCH_MESSAGES = 64
POLL_IN = select.POLLIN | select.POLLPRI
POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class DatapathWorker:
    """The datapath process's loop (see the module docstring).  ``step`` is one
    turn of it, callable over fakes; ``run`` is the blocking loop.

    The engine, the pump, the floor books and the channel are all its own."""

    name = "datapath"
    unit = "frames"
    log = log
    client = None

    def __init__(self, engine: FrameEngine, pump: FramePump, channel: MessageChannel,
                 floor_saves: list[FloorSave], reserve: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.pump = pump
        self.channel = channel
        self._floor_saves = floor_saves
        self._reserve = reserve
        self.clock = clock
        self.driver = EngineDriver(engine, pump, self._request_key, self._send_notice)
        pump.on_keys_wanted = self.driver.send_key_requests
        pump.clock = clock
        self.shell = DaemonShell(self, Path(os.devnull), "")  # its tick and sleep_s only
        self.stopping = False
        self.next_tick_at = 0.0
        self.stats_due = 0.0
        self.tick_late_max_s = 0.0

    # --------------------------------------------------- 2: control messages

    def on_message(self, data: bytes, now: float) -> None:
        """Apply one message from the control process; a bad one raises (the
        control process is broken: the datapath stops)."""
        msg = msgs.decode_message(data)
        driver = self.driver
        kind = type(msg)
        if kind is msgs.PairKey:
            driver.install_pair_key(msg.peer_mac, msg.peer_id, msg.key, msg.pw_id, now,
                                    age_s=msg.age_s, older=list(msg.older))
        elif kind is msgs.MulticastKey:
            driver.install_multicast_key(msg.key, msg.pw_id, now)
        elif kind is msgs.UseCipher:
            driver.use_cipher(msg.cipher)
        elif kind is msgs.KeyMaxAge:
            driver.set_key_max_age(msg.seconds)
        elif kind is msgs.RevokePeer:
            driver.revoke_peer(msg.mac)
        elif kind is msgs.PeerUnknown:
            driver.mark_unknown(msg.mac, now)
        elif kind is msgs.RetryPending:
            driver.retry_pending(now)
        elif kind is msgs.Stop:
            self.stopping = True
        else:
            raise msgs.DatapathMessageError(f"{kind.__name__} goes from the datapath, not to it", "unknown_type")

    def _request_key(self, mac: bytes) -> None:
        self.channel.send(msgs.encode_message(msgs.KeyRequest(mac)))

    def _send_notice(self, kind: str, mac: bytes, pw_id: int) -> None:
        self.channel.send(msgs.encode_message(msgs.Notice(kind, mac, pw_id)))

    # ----------------------------------------- 3: the shell's hooks (Daemon)

    def floor_saves(self) -> list[FloorSave]:
        return self._floor_saves

    def tick(self, now: float) -> None:
        self.driver.tick(now)
        if now >= self.stats_due:
            self.send_stats(now)

    def next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def reserve(self) -> None:
        self._reserve()

    def all_drops(self) -> Counter:
        """Nothing: the control process logs the drops (from the Stats)."""
        return Counter()

    def send_stats(self, now: float) -> None:
        engine = self.engine
        doc = {"snapshot": engine.snapshot(now), "counters": dict(engine.counters),
               "wire_read_errors": getattr(self.pump.wire, "read_errors", 0),
               "tick_late_max_ms": round(self.tick_late_max_s * 1000, 1), "pid": os.getpid()}
        try:
            data = msgs.encode_message(msgs.Stats(doc))
        except ValueError:  # too many peers for one message: the totals still go
            doc["snapshot"]["peers"], doc["peers_omitted"] = [], True
            data = msgs.encode_message(msgs.Stats(doc))
        self.channel.send(data)
        self.stats_due = now + STATS_INTERVAL_S
        self.tick_late_max_s = 0.0

    # ------------------------------------------------------------ 1: the loop

    def step(self, tap_ready: bool, wire_ready: bool, channel_ready: bool, now: float) -> None:
        """One turn: the ports that polled readable, the messages, the tick when due."""
        if tap_ready:
            self.pump.on_tap_readable()
        if wire_ready:
            self.pump.on_wire_readable()
        if channel_ready:
            for data in self.channel.receive(BATCH_MESSAGES):
                self.on_message(data, now)
            if self.channel.closed:
                self.stopping = True
        if now >= self.next_tick_at:
            self.tick_late_max_s = max(self.tick_late_max_s, now - self.next_tick_at if self.next_tick_at else 0.0)
            self.shell.tick(now)
            self.next_tick_at = now + self.shell.sleep_s(now)
        self.channel.flush()

    def run(self) -> int:
        """Until stopped (module docstring, 4); the exit code."""
        tap_fd, wire_fd, chan_fd = self.pump.tap.fileno(), self.pump.wire.fileno(), self.channel.fileno()
        poller = select.poll()
        poller.register(tap_fd, POLL_IN)
        poller.register(wire_fd, POLL_IN)
        poller.register(chan_fd, POLL_IN)
        writing = False
        self.send_stats(self.clock())
        log.info("datapath_started", extra=fields(pid=os.getpid()))
        while not self.stopping:
            if writing != bool(self.channel.outbox):
                writing = not writing
                poller.modify(chan_fd, POLL_IN | (select.POLLOUT if writing else 0))
            timeout_ms = max(0.0, self.next_tick_at - self.clock()) * 1000
            ready = dict(poller.poll(timeout_ms))
            if ready.get(chan_fd, 0) & POLL_GONE and not ready.get(chan_fd, 0) & select.POLLIN:
                self.stopping = True  # the control process is gone
                break
            self.step(tap_fd in ready, wire_fd in ready, chan_fd in ready, self.clock())
        now = self.clock()
        for floors in self._floor_saves:
            floors.save(now, stopped=True)
        self.reserve()
        if not self.channel.closed:
            self.send_stats(now)
            self.channel.flush()
        log.info("datapath_stopped", extra=fields(pid=os.getpid(), **dict(self.engine.counters)))
        return 0


def fork_datapath(engine: FrameEngine, pump: FramePump, floor_saves: list[FloorSave],
                  reserve: Callable[[], None]) -> tuple[int, MessageChannel]:
    """Fork the datapath process; in the parent: (its PID, the control end of the channel).
    Call before the loop serves anything else (the child inherits only the ports)."""
    control_end, datapath_end = channel_pair()
    pid = os.fork()
    if pid == 0:  # the datapath process: never returns
        code = 1
        try:
            control_end.sock.close()
            signal.set_wakeup_fd(-1)  # the parent's asyncio loop owns that pipe
            # SIGTERM/SIGINT reach the whole group (Ctrl-C, systemd's stop): only
            # the control process acts on them, it sends Stop (or closes the channel).
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            code = DatapathWorker(engine, pump, datapath_end, floor_saves, reserve).run()
        except BaseException:  # noqa: BLE001 - the child must leave by os._exit, whatever happened
            log.exception("datapath_failed")
        finally:
            logging.shutdown()
            os._exit(code)
    datapath_end.sock.close()
    return pid, control_end
