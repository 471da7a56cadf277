"""The control process's side of the datapath process (``datapath_process = true``).

1. ``ProcessDatapath.start(agent)``: after ``Agent.start`` built the engine,
   the pump and the ports, fork the datapath (``datapath_proc``); from then
   on the agent's copies of them are never touched again in this process.
2. The key events (``on_key``, ``on_welcome``, ...) call the same methods as
   on an ``EngineDriver``; here each becomes one message
   (``core.datapath_msgs``) on the socketpair, the only place keys go.
3. ``on_readable`` (a loop reader): ``KeyRequest`` and ``Notice`` go to the
   key client; ``Stats`` replace what ``RemoteEngine`` shows status and
   metrics (at most ``datapath_proc.STATS_INTERVAL_S`` old).
4. ``tick`` (every tick of the daemon shell) sends what the socket could not
   take yet and checks the child.  A datapath process that died (or closed
   its end) raises LocalError: the agent stops with that one line, failing
   closed (nothing reads the TAP or the wire port, the port guard stays);
   the service manager starts it again, as after any crash.
5. ``stop``: ``Stop``, then up to ``STOP_WAIT_S`` for the child to save its
   floors and exit; SIGKILL after that.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from typing import Callable

from l2crypt.core import datapath_msgs as msgs
from l2crypt.core.errors import LocalError
from l2crypt.io.msg_channel import MessageChannel
from l2crypt.ops.logs import fields

from .datapath_proc import BATCH_MESSAGES, fork_datapath

log = logging.getLogger("l2crypt.agent")

#: How long a stop waits for the datapath process to save and exit, seconds.
STOP_WAIT_S = 5.0


class RemoteEngine:
    """The datapath's engine as the control process sees it: the last ``Stats``.
    Status and metrics read it like an engine (``snapshot``, ``counters``,
    ``drops``, ``my_mac``); nothing else may use it."""

    def __init__(self, my_mac: bytes, doc: dict):
        self.my_mac = my_mac
        self.doc = doc
        self.received_at: float | None = None

    def update(self, doc: dict, now: float) -> None:
        self.doc = doc
        self.received_at = now

    def snapshot(self, now: float) -> dict:
        return dict(self.doc["snapshot"])

    @property
    def counters(self) -> Counter:
        return Counter(self.doc["counters"])

    @property
    def drops(self) -> Counter:
        return Counter(self.doc["snapshot"]["drops"])

    @property
    def peers(self) -> list:
        return self.doc["snapshot"]["peers"]

    @property
    def cipher(self) -> str:
        return self.doc["snapshot"]["cipher"]

    def next_deadline(self) -> float | None:
        return None  # the datapath keeps its own timers


def exit_text(status: int) -> str:
    """'exited with code 1', 'was killed by SIGKILL' (a waitpid status)."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class ProcessDatapath:
    """Key events as messages to the datapath process, and its messages back
    (see the module docstring).  Owned by the agent's asyncio loop."""

    def __init__(self, pid: int, channel: MessageChannel, view: RemoteEngine,
                 request_key: Callable[[bytes], None], send_notice: Callable[[str, bytes, int], None]):
        self.pid = pid
        self.channel = channel
        self.view = view
        self.request_key = request_key
        self.send_notice = send_notice
        self.exit_status: int | None = None

    @classmethod
    def start(cls, agent) -> "ProcessDatapath":
        """Fork the datapath of a started agent (1)."""
        view = RemoteEngine(agent.engine.my_mac, {
            "snapshot": agent.engine.snapshot(agent._now()), "counters": dict(agent.engine.counters)})
        pid, channel = fork_datapath(agent.engine, agent.pump, agent.local_floor_saves(), agent.local_reserve)
        log.info("datapath_process_started", extra=fields(pid=pid))
        return cls(pid, channel, view, agent.request_key, agent.send_notice)

    # 2: the key events, as messages
    def _send(self, msg) -> None:
        self.channel.send(msgs.encode_message(msg))

    def use_cipher(self, cipher: str) -> None:
        self._send(msgs.UseCipher(cipher))

    def set_key_max_age(self, seconds: float) -> None:
        self._send(msgs.KeyMaxAge(float(seconds)))

    def install_pair_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int, now: float,
                         age_s: float = 0, older=()) -> None:
        self._send(msgs.PairKey(peer_mac, pw_id, float(age_s), peer_id, key,
                                tuple((v, k, float(a)) for v, k, a in older)))

    def install_multicast_key(self, key: bytes, pw_id: int, now: float) -> None:
        self._send(msgs.MulticastKey(pw_id, 0.0, key))

    def revoke_peer(self, mac: bytes) -> None:
        self._send(msgs.RevokePeer(mac))

    def mark_unknown(self, mac: bytes, now: float) -> None:
        self._send(msgs.PeerUnknown(mac))

    def retry_pending(self, now: float) -> None:
        self._send(msgs.RetryPending())

    # 3
    def on_readable(self) -> None:
        for data in self.channel.receive(BATCH_MESSAGES):
            try:
                msg = msgs.decode_message(data)
            except msgs.DatapathMessageError as exc:
                log.error("datapath_message_refused", extra=fields(code=exc.code, reason=str(exc)))
                continue
            kind = type(msg)
            if kind is msgs.KeyRequest:
                self.request_key(msg.mac)
            elif kind is msgs.Notice:
                self.send_notice(msg.kind, msg.mac, msg.pw_id)
            elif kind is msgs.Stats:
                self.view.update(msg.doc, time.monotonic())

    # 4
    def died(self) -> str | None:
        """None while the datapath process runs; else what happened to it."""
        if self.exit_status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == 0:
                return None if not self.channel.closed else "closed its channel"
            self.exit_status = status
        return exit_text(self.exit_status)

    def tick(self, now: float) -> None:
        self.channel.flush()
        what = self.died()
        if what is not None:
            raise LocalError(f"the datapath process (pid {self.pid}) {what}: the agent stops, "
                             "frames stay blocked until it starts again")

    # 5
    def stop(self) -> None:
        self.died()
        if self.exit_status is None:
            self._send(msgs.Stop())
            deadline = time.monotonic() + STOP_WAIT_S
            while self.exit_status is None and time.monotonic() < deadline:
                self.channel.flush()
                time.sleep(0.02)
                self.died()
            if self.exit_status is None:
                log.warning("datapath_killed", extra=fields(pid=self.pid, waited_s=STOP_WAIT_S))
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        self.channel.close()
