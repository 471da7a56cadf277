"""The host agent: TAP <-> frame engine <-> wire port, with the key client.

1. Read the host identity from the state directory (``l2crypt enroll``) and
   the packet clock (``packet_clock``: refuses to start if it cannot be kept).
2. Guard the wire port (only l2crypt frames may arrive or leave: the host
   stack never sees a plain frame from the switch).  Attach to the
   persistent TAP (or create it), with the host's MAC (``tap_mac``: kept in
   the state directory) and MTU = wire MTU - 32; load the replay floors of
   the previous life (``state_file.FloorFile``; refuses to start if they
   cannot be read or written), then open the packet socket (``open_wire``:
   PACKET_MMAP rings when ``wire_ring`` is ``v2`` or ``v3`` and the kernel allows them,
   else one ``send``/``recv`` per frame; logged as ``wire_opened``).
3. The frame path, TAP -> seal -> wire and wire -> open -> TAP, is
   ``frame_pump.FramePump`` (read it first).  With ``datapath = "batched"``
   the TAP has offloads and both directions go through
   ``tap_path.BatchedTapPath``; if the kernel refuses the offloads the agent
   runs the simple path and ``datapath_reason`` says why.
4. The key client runs beside it; every key request the engine raises is
   sent at once, answers and pushes install keys and release held frames
   (``engine_driver.EngineDriver``: what each key event does to the engine).
   With ``datapath_process = true`` the engine, the pump and both ports move
   to a process of their own once started (``datapath_link``,
   ``datapath_proc``): the key events become messages to it, its key
   requests, notices and Stats come back, and it saves the floors and
   reserves packet numbers itself.  If it dies the agent stops with one
   line (fail closed: nothing reads the ports, the port guard stays).
5. The loop is ``ops.daemon_shell.DaemonShell``: it ticks at the engine's
   next deadline (every ``daemon_shell.TICK_CAP_S`` at most) to save the
   replay floors (while they cannot be saved the engine refuses frames),
   retry key requests and run the engine's timers (``tick``), reserve packet
   numbers every ``packet_clock.PERSIST_INTERVAL_S`` and log drops.
6. SIGINT/SIGTERM stop it; the floors and the clock are saved a last time.
   The TAP stays, with the host's addresses and without carrier (nothing
   read from it: nothing leaves); the port guard stays.  A restart attaches
   to the same TAP with the same MAC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from l2crypt.core import engine as engine_mod
from l2crypt.core.constants import FRAME_OVERHEAD
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import format_mac, parse_mac
from l2crypt.core.ks_messages import revoked_macs
from l2crypt.core.replay_floor import FloorBook
from l2crypt.io.linux_tap import LinuxTap, existing_tap
from l2crypt.io.packet_clock import PacketClock
from l2crypt.io.port_guard import PortGuard, guard_port
from l2crypt.io.ports import FramePort, WirePort
from l2crypt.io.state_file import FloorFile
from l2crypt.io.tap_mac import choose_mac, read_stored_mac, store_mac
from l2crypt.io.wire_ring import open_wire_ring
from l2crypt.ops.daemon_shell import DaemonShell, FloorSave
from l2crypt.ops.logs import fields
from l2crypt.ops.metrics import agent_metrics

from .config import AgentConfig, key_client_options, tuning_values
from .datapath_link import ProcessDatapath
from .engine_driver import EngineDriver
from .frame_pump import FramePump
from .keyclient import KeyClient
from .tap_path import BATCHED_COUNTERS, BatchedTapPath
from .host_key import load_credentials

log = logging.getLogger("l2crypt.agent")

MIN_TAP_MTU = 576


def wire_mtu_of(port: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{port}/mtu").read_text())
    except (OSError, ValueError):
        raise LocalError(f"wire port {port!r} does not exist") from None


def attach_tap(name: str, mtu: int, state_dir: Path, tap_mac: str | None, offload: bool = False) -> LinuxTap:
    """Attach to (or create) the persistent TAP with the host's MAC (see
    ``tap_mac``), and keep that MAC in the state directory."""
    configured = parse_mac(tap_mac) if tap_mac else None
    stored = read_stored_mac(state_dir)
    existing = existing_tap(name)
    mac, source = choose_mac(configured, stored, existing.mac if existing else None)
    if configured is not None and stored not in (None, configured):
        log.warning("tap_mac_replaced", extra=fields(stored=format_mac(stored), configured=format_mac(configured),
                                                      note="the key server may have bound the stored MAC"))
    tap = LinuxTap(name, mtu, mac, offload=offload)
    try:
        if tap.mac != stored:
            store_mac(state_dir, tap.mac)
    except LocalError:
        tap.close()
        raise
    log.info("tap_attached", extra=fields(
        tap=tap.name, created=tap.created, mac=format_mac(tap.mac), mac_from=source,
        old_mac=format_mac(tap.old_mac) if tap.old_mac not in (None, tap.mac) else "-",
        mtu=tap.mtu, old_mtu=tap.old_mtu if tap.old_mtu not in (None, tap.mtu) else "-",
        vnet_hdr=bool(tap.vnet_hdr_len)))
    return tap


class Agent:
    """The host agent: its TAP and wire ports, the frame engine and frame pump,
    the key-server session, on the daemon shell's loop (see the module docstring)."""

    name = "agent"
    unit = "frames"
    log = log

    def __init__(self, config: AgentConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        #: The host key: a file (mutual TLS) or a token (a challenge), see ``host_key``.
        self.credentials = load_credentials(self.state_dir, config.pkcs11_pin_file)
        self.host_id = self.credentials.host_id
        self.ssl_ctx = self.credentials.ssl_ctx
        self.wire_mtu = config.wire_mtu or wire_mtu_of(config.port)
        self.tap_mtu = self.wire_mtu - FRAME_OVERHEAD
        if self.tap_mtu < MIN_TAP_MTU:
            raise LocalError(f"wire_mtu: {self.wire_mtu} leaves a TAP MTU of {self.tap_mtu}, below {MIN_TAP_MTU}")
        self.tap: LinuxTap | None = None
        self.wire: WirePort | None = None
        self.wire_path = "simple: not opened yet"  # which wire port runs, and why (open_wire)
        self.engine: FrameEngine | None = None
        self.pump: FramePump | None = None
        #: Where key events go: the engine's EngineDriver, or the ProcessDatapath.
        self.driver: EngineDriver | ProcessDatapath | None = None
        #: The datapath process (``datapath_process = true``), or None: the frames pass here.
        self.process: ProcessDatapath | None = None
        self.client: KeyClient | None = None
        self.clock = PacketClock(self.state_dir)
        self.floors = FloorBook()
        self.floor_file = FloorFile(self.state_dir)
        self.guard = PortGuard(config.port, config.ethertype)
        self.started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batched: BatchedTapPath | None = None
        #: The path that runs ("simple" or "batched") and why, if not the one asked for.
        self.datapath = "simple"
        self.datapath_reason = "configured"

    # ------------------------------------------------------------ key events
    # Each goes to ``self.driver``: the EngineDriver of the engine in this
    # process, or the ProcessDatapath that sends it to the datapath process.

    def request_key(self, mac: bytes) -> None:
        """Send one key request the engine raised (``GROUP_MAC``: the multicast key)."""
        if mac == engine_mod.GROUP_MAC:
            self.client.request_multicast()
        elif self.client.request_key(mac):
            log.debug("key_requested", extra=fields(peer_mac=format_mac(mac)))

    def send_notice(self, kind: str, mac: bytes, pw_id: int) -> None:
        self.client.send_notice(kind, mac, pw_id)

    def on_welcome(self, msg: dict) -> None:
        driver, now = self.driver, self._loop.time()
        driver.use_cipher(msg["cipher"])
        driver.set_key_max_age(min(self.config.key_max_age_s, msg.get("key_max_age_s") or self.config.key_max_age_s))
        # Revocations pushed while we were not connected (or never pushed).
        for mac in revoked_macs(msg):
            driver.revoke_peer(mac)
        driver.install_multicast_key(msg["multicast_key"], msg["multicast_pw_id"], now)
        # Anything pending gets asked again right away on the new connection.
        driver.retry_pending(now)

    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int,
               age_s: int = 0, older: list = ()) -> None:
        self.driver.install_pair_key(peer_mac, peer_id, key, pw_id, self._loop.time(), age_s=age_s, older=older)

    def on_unknown(self, peer_mac: bytes) -> None:
        log.info("peer_unknown", extra=fields(peer_mac=format_mac(peer_mac)))
        self.driver.mark_unknown(peer_mac, self._loop.time())

    def on_key_refused(self, peer_mac: bytes, code: str, text: str) -> None:
        log.warning("key_refused", extra=fields(peer_mac=format_mac(peer_mac), code=code, reason=text))
        self.driver.mark_unknown(peer_mac, self._loop.time())

    def on_multicast(self, key: bytes, pw_id: int) -> None:
        self.driver.install_multicast_key(key, pw_id, self._loop.time())

    def on_peer_revoked(self, peer_mac: bytes) -> None:
        self.driver.revoke_peer(peer_mac)

    def on_disconnect(self) -> None:
        log.warning("keyserver_disconnected", extra=fields(keys_kept=len(self.engine.peers)))

    # --------------------------------------------------------------- status

    def snapshot(self) -> dict:
        now = self._loop.time()
        doc = self.engine.snapshot(now)
        doc.update({
            "id": self.host_id,
            "mac": format_mac(self.engine.my_mac),
            "tap": self.tap.name,
            "port": self.config.port,
            "mtu": self.tap.live_mtu(),
            "mtu_expected": self.tap_mtu,
            "wire_mtu": self.wire_mtu,
            "datapath": self.datapath,
            "datapath_reason": self.datapath_reason,
            "datapath_counters": {k: self.engine.counters.get(k, 0) for k in BATCHED_COUNTERS}
                                 if self.batched is not None else {},
            "wire_path": self.wire_path,
            "wire_read_errors": (self.engine.doc.get("wire_read_errors", 0) if self.process is not None
                                 else getattr(self.wire, "read_errors", 0)),
            "datapath_process": self.process_text(),
            "connected": self.client.connected,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        })
        doc.update(self.credentials.describe())  # host_key: file or token
        doc.update(self.guard_reading())  # port_guard, inbound_refused, egress_blocked
        doc.update(self.client.selector.snapshot())  # keyserver, keyservers, failovers, failbacks
        return doc

    def process_text(self) -> str:
        """``off``, or ``pid N`` of the datapath process."""
        return "off" if self.process is None else f"pid {self.process.pid}"

    def datapath_text(self) -> str:
        """``batched``, or ``simple (why)``."""
        return self.datapath if not self.datapath_reason else f"{self.datapath} ({self.datapath_reason})"

    def guard_reading(self) -> dict:
        """The port guard as the kernel has it now (``PortGuard.reading``)."""
        return self.guard.read()

    # ------------------------------------------------- the shell's hooks (Daemon)

    # With a datapath process, the floors, the packet clock and the engine's
    # timers are the datapath's (``datapath_proc``); the tick here checks it.

    def readers(self) -> list:
        if self.process is not None:
            return [(self.process.channel.fileno(), self.process.on_readable)]
        return [(self.tap.fileno(), self.pump.on_tap_readable), (self.wire.fileno(), self.pump.on_wire_readable)]

    def floor_saves(self) -> list[FloorSave]:
        return self.local_floor_saves() if self.process is None else []

    def local_floor_saves(self) -> list[FloorSave]:
        return [FloorSave(self.floor_file, self.floors, self.engine.replay_highest)]

    def tick(self, now: float) -> None:
        self.driver.tick(now)

    def next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def reserve(self) -> None:
        if self.process is None:
            self.local_reserve()

    def local_reserve(self) -> None:
        """Reserve packet numbers ahead of the engine (see ``packet_clock``)."""
        self.engine.pn_limit = self.clock.reserve(self.engine.send_pn)

    def all_drops(self) -> Counter:
        return self.engine.drops

    def metrics(self, now: float) -> list:
        return agent_metrics(self, now)

    def started_fields(self) -> dict:
        return dict(id=self.host_id, mac=format_mac(self.tap.mac), tap=self.tap.name, port=self.config.port,
                    mtu=self.tap_mtu, datapath=self.datapath_text(), datapath_process=self.process_text(), servers=",".join(self.config.servers),
                    metrics=self.config.metrics_listen or "off")

    def stopped_fields(self) -> dict:
        return dict(self.engine.counters)

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        self.guard = await asyncio.to_thread(guard_port, cfg.port, cfg.ethertype)
        self.tap = attach_tap(cfg.tap, self.tap_mtu, self.state_dir, cfg.tap_mac, offload=cfg.datapath == "batched")
        if self.tap.vnet_hdr_len:
            self.datapath, self.datapath_reason = "batched", ""
        elif cfg.datapath == "batched":
            self.datapath_reason = self.tap.offload_refused
            log.warning("datapath_fallback", extra=fields(datapath="simple", reason=self.datapath_reason))

        def open_wire_port() -> tuple[WirePort, str]:
            return open_wire_ring(cfg.port, cfg.ethertype, cfg.wire_ring)

        try:
            self.start(self.tap, open_wire_port, self._loop.time())
            if cfg.datapath_process:
                self.process = self.driver = ProcessDatapath.start(self)
                self.engine, self.pump = self.process.view, None  # the datapath's now, not touched here
            await DaemonShell(self, cfg.socket_path, cfg.metrics_listen).serve()
        finally:
            if self.process is not None:
                self.process.stop()
            if self.wire is not None:
                self.wire.close()
            self.tap.close()

    def start(self, tap: FramePort, open_wire_port: Callable[[], tuple[WirePort, str]], now: float) -> None:
        """Everything between the TAP and the loop: the replay floors of the
        previous life, the engine on them, the wire port (``open_wire_port``:
        after the floors, so a start that cannot keep them opens nothing),
        the frame pump and the key client.  Raises LocalError."""
        cfg = self.config
        self.tap = tap
        settings = EngineSettings(**tuning_values(cfg), ethertype=cfg.ethertype,
                                  complete_checksums=not getattr(tap, "vnet_hdr_len", 0))
        restored = self.floor_file.load(self.floors, now)
        if not self.floor_file.save(self.floors, (), now):
            raise LocalError(f"cannot write the replay floors {self.floor_file.path}")
        log.info("replay_floors_loaded", extra=fields(senders=restored))
        self.engine = FrameEngine(tap.mac, settings, pn_start=self.clock.pn_start(), floors=self.floors, now0=now)
        self.engine.pn_limit = self.clock.reserved
        self.wire, self.wire_path = open_wire_port()
        log.info("wire_opened", extra=fields(port=cfg.port, path=self.wire_path))
        if self.datapath == "batched":
            self.batched = BatchedTapPath(self.engine, tap, self.wire, self.tap_mtu)
        self.pump = FramePump(self.engine, tap, self.wire, self._now, self._keys_wanted, self.batched)
        self.driver = EngineDriver(self.engine, self.pump, self.request_key, self.send_notice)
        self.client = KeyClient(cfg.servers, self.ssl_ctx, tap.mac, self,
                                token_auth=self.credentials.token_auth, **key_client_options(cfg))

    def _now(self) -> float:
        return self._loop.time()

    def _keys_wanted(self, now: float) -> None:
        self.driver.send_key_requests(now)
