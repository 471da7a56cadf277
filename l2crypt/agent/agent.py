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
3. On the asyncio loop: TAP readable -> seal -> wire; wire readable -> open
   -> TAP; each wakeup drains up to ``BATCH_FRAMES`` frames, and the frames
   sealed in one wakeup go to the wire in one ``write_frames``.  With
   ``datapath = "batched"`` the TAP has offloads and both directions go
   through ``tap_path.BatchedTapPath`` (segment super-frames before sealing,
   join segments after opening); if the kernel refuses the offloads the
   agent runs the simple path and ``datapath_reason`` says why.
4. The key client runs beside it; every key request the engine raises is
   sent at once, answers and pushes install keys and release held frames.
5. A tick every ``TICK_S`` saves the replay floors (every
   ``replay_floor.SAVE_INTERVAL_S``; while they cannot be saved the engine
   refuses frames), reserves packet numbers (every
   ``packet_clock.PERSIST_INTERVAL_S``), retries requests, runs the engine's
   timers and logs drops (once per reason per ``DROP_LOG_S``).
6. SIGINT/SIGTERM stop it; the floors and the clock are saved a last time.
   The TAP stays, with the host's addresses and without carrier (nothing
   read from it: nothing leaves); the port guard stays.  A restart attaches
   to the same TAP with the same MAC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

from l2crypt.core import engine as engine_mod
from l2crypt.core.constants import FRAME_OVERHEAD
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import format_mac, parse_mac
from l2crypt.core.ks_messages import revoked_macs
from l2crypt.core.replay_floor import FloorBook
from l2crypt.io.linux_tap import LinuxTap, existing_tap
from l2crypt.io.ports import WirePort
from l2crypt.io.packet_clock import PERSIST_INTERVAL_S, PacketClock
from l2crypt.io.port_guard import PortGuard, guard_port
from l2crypt.io.state_file import FloorFile
from l2crypt.io.tap_mac import choose_mac, read_stored_mac, store_mac
from l2crypt.io.wire_ring import TPACKET_V2, TPACKET_V3, open_wire
from l2crypt.ops.control import serve_control
from l2crypt.ops.logs import fields
from l2crypt.ops.metrics import FunctionCollector, agent_metrics, new_registry, serve_metrics

from .config import AgentConfig
from .keyclient import KeyClient
from .tap_path import BATCHED_COUNTERS, BatchedTapPath
from .host_key import load_credentials

log = logging.getLogger("l2crypt.agent")

BATCH_FRAMES = 64
TICK_S = 0.1
DROP_LOG_S = 10.0
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
    """The host agent: its TAP and wire ports, the frame engine, the key-server session,
    control socket and metrics, on one event loop."""

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
        self.client: KeyClient | None = None
        self.clock = PacketClock(self.state_dir)
        self.floors = FloorBook()
        self.floor_file = FloorFile(self.state_dir)
        self.guard = PortGuard(config.port, config.ethertype)
        self.started_at = time.monotonic()
        self._logged_drops: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batched: BatchedTapPath | None = None
        #: The path that runs ("simple" or "batched") and why, if not the one asked for.
        self.datapath = "simple"
        self.datapath_reason = "configured"

    # ------------------------------------------------------------- data path

    def _on_tap_readable(self) -> None:
        frames = self.tap.read_frames(BATCH_FRAMES)
        if not frames:
            return
        now = self._loop.time()
        if self.batched is not None:
            self.batched.seal_batch(frames, now)
            if self.engine.holds.pending:
                self._send_key_requests(now)
            return
        seal = self.engine.seal_from_tap
        sealed = [s for s in (seal(frame, now) for frame in frames) if s is not None]
        if sealed:
            self._send_to_wire(sealed)
        if self.engine.holds.pending:
            self._send_key_requests(now)

    def _on_wire_readable(self) -> None:
        frames = self.wire.read_frames(BATCH_FRAMES)
        if not frames:
            return
        now = self._loop.time()
        if self.batched is not None:
            self.batched.open_batch(frames, now)
            if self.engine.holds.pending:
                self._send_key_requests(now)
            return
        open_ = self.engine.open_from_wire
        write = self.tap.write_frame
        for frame in frames:
            plain = open_(frame, now)
            if plain is not None and not write(plain):
                self.engine.drops["tap_write_error"] += 1
        if self.engine.holds.pending:
            self._send_key_requests(now)

    def _send_to_wire(self, frames: list[bytes]) -> None:
        """The whole batch in one call (one system call on the ring)."""
        sent = self.wire.write_frames(frames)
        if sent < len(frames):
            self.engine.drops["tx_error"] += len(frames) - sent

    def _deliver(self, delivered: engine_mod.Delivered) -> None:
        if delivered.to_wire:
            self._send_to_wire(delivered.to_wire)
        for frame in delivered.to_tap:
            if not self.tap.write_frame(frame):
                self.engine.drops["tap_write_error"] += 1

    # ------------------------------------------------------------ key events

    def _send_key_requests(self, now: float) -> None:
        for mac in self.engine.take_key_requests(now):
            if mac == engine_mod.GROUP_MAC:
                self.client.request_multicast()
            elif self.client.request_key(mac):
                log.debug("key_requested", extra=fields(peer_mac=format_mac(mac)))

    def _send_notices(self) -> None:
        for kind, mac, pw_id in self.engine.take_notices():
            log.info("key_notice", extra=fields(kind=kind, peer_mac=format_mac(mac), pw_id=pw_id))
            self.client.send_notice(kind, mac, pw_id)

    def on_welcome(self, msg: dict) -> None:
        if engine_mod.use_cipher(self.engine, msg["cipher"]):
            log.info("cipher_selected", extra=fields(cipher=msg["cipher"]))
        max_age = min(self.config.key_max_age_s, msg.get("key_max_age_s") or self.config.key_max_age_s)
        if max_age != self.engine.key_max_age_s:
            self.engine.set_key_max_age(max_age)
            log.info("key_max_age", extra=fields(seconds=max_age))
        # Revocations pushed while we were not connected (or never pushed).
        for mac in revoked_macs(msg):
            if mac != self.engine.my_mac and mac not in self.engine.revoked:
                self.on_peer_revoked(mac)
        self._deliver(self.engine.install_multicast_key(
            msg["multicast_key"], msg["multicast_pw_id"], self._loop.time()))
        # Anything pending gets asked again right away on the new connection.
        for entry in self.engine.holds.pending.values():
            entry.next_request_at = 0.0
        self._send_key_requests(self._loop.time())

    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int,
               age_s: int = 0, older: list = ()) -> None:
        peer = self.engine.peers.get(peer_mac)
        held = peer.keys.newest_pw_id() if peer is not None else 0
        if peer is not None and peer.peer_id != peer_id:
            log.warning("peer_replaced", extra=fields(peer_mac=format_mac(peer_mac), was=peer.peer_id, now=peer_id))
            held = 0
        delivered = self.engine.install_pair_key(peer_mac, peer_id, key, pw_id, self._loop.time(),
                                                 age_s=age_s, older=older)
        if pw_id > held:
            now_held = self.engine.peers.get(peer_mac)
            log.info("key_installed", extra=fields(
                peer_mac=format_mac(peer_mac), peer_id=peer_id, pw_id=pw_id, age_s=age_s,
                held=",".join(str(s.pw_id) for s in now_held.keys.slots()) if now_held else "-",
                released=len(delivered.to_wire) + len(delivered.to_tap)))
        self._deliver(delivered)

    def on_unknown(self, peer_mac: bytes) -> None:
        log.info("peer_unknown", extra=fields(peer_mac=format_mac(peer_mac)))
        self.engine.mark_unknown(peer_mac, self._loop.time())

    def on_key_refused(self, peer_mac: bytes, code: str, text: str) -> None:
        log.warning("key_refused", extra=fields(peer_mac=format_mac(peer_mac), code=code, reason=text))
        self.engine.mark_unknown(peer_mac, self._loop.time())

    def on_multicast(self, key: bytes, pw_id: int) -> None:
        held = self.engine.group.newest_pw_id()
        self._deliver(self.engine.install_multicast_key(key, pw_id, self._loop.time()))
        if pw_id > held:
            log.info("multicast_key_installed", extra=fields(pw_id=pw_id))

    def on_peer_revoked(self, peer_mac: bytes) -> None:
        log.warning("peer_revoked", extra=fields(peer_mac=format_mac(peer_mac)))
        self.engine.revoke_peer(peer_mac)

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
            "connected": self.client.connected,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        })
        doc.update(self.credentials.describe())  # host_key: file or token
        doc.update(self.guard_reading())  # port_guard, inbound_refused, egress_blocked
        doc.update(self.client.selector.snapshot())  # keyserver, keyservers, failovers, failbacks
        return doc

    def datapath_text(self) -> str:
        """``batched``, or ``simple (why)``."""
        return self.datapath if not self.datapath_reason else f"{self.datapath} ({self.datapath_reason})"

    def guard_reading(self) -> dict:
        """The port guard as the kernel has it now (``PortGuard.reading``)."""
        return self.guard.read()

    # ------------------------------------------------------------- lifecycle

    def _tick(self, now: float) -> None:
        if self.floor_file.save_due(now):
            self.floor_file.save(self.floors, self.engine.replay_highest(), now)
        self._send_key_requests(now)
        self.engine.on_timer(now)
        if self.engine.notices:
            self._send_notices()

    def _reserve(self) -> None:
        """Reserve packet numbers ahead of the engine (see ``packet_clock``)."""
        self.engine.pn_limit = self.clock.reserve(self.engine.send_pn)

    def _log_drops(self) -> None:
        new = self.engine.drops - self._logged_drops
        if new:
            log.warning("frames_dropped", extra=fields(**dict(new)))
            self._logged_drops = Counter(self.engine.drops)

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
        try:
            settings = EngineSettings(
                ethertype=cfg.ethertype,
                replay_window_frames=cfg.replay_window_frames,
                hold_frames=cfg.hold_frames,
                hold_age_s=cfg.hold_age_s,
                key_retry_s=cfg.key_retry_s,
                key_retry_max_s=cfg.key_retry_max_s,
                unknown_cache_s=cfg.unknown_cache_s,
                switch_after_s=cfg.switch_after_s,
                retire_after_s=cfg.retire_after_s,
                rekey_after_frames=cfg.rekey_after_frames,
                max_pending_keys=cfg.max_pending_keys,
                key_requests_per_s=cfg.key_requests_per_s,
                key_max_age_s=cfg.key_max_age_s,
                complete_checksums=not self.tap.vnet_hdr_len,
            )
            now = self._loop.time()
            restored = self.floor_file.load(self.floors, now)
            if not self.floor_file.save(self.floors, (), now):
                raise LocalError(f"cannot write the replay floors {self.floor_file.path}")
            log.info("replay_floors_loaded", extra=fields(senders=restored))
            self.engine = FrameEngine(self.tap.mac, settings, pn_start=self.clock.pn_start(),
                                      floors=self.floors, now0=now)
            self.engine.pn_limit = self.clock.reserved
            ring = cfg.wire_ring  # "off", or the PACKET_MMAP receive ring: "v2" (a slot per frame), "v3" (blocks)
            self.wire, self.wire_path = open_wire(cfg.port, cfg.ethertype, batched=ring != "off",
                                                  tpacket_version=TPACKET_V2 if ring == "v2" else TPACKET_V3)
            log.info("wire_opened", extra=fields(port=cfg.port, path=self.wire_path))
            if self.datapath == "batched":
                self.batched = BatchedTapPath(self.engine, self.tap, self.wire, self.tap_mtu)
            self.client = KeyClient(cfg.servers, self.ssl_ctx, self.tap.mac, self,
                                    probe_interval_s=cfg.probe_interval_s, probe_failures=cfg.probe_failures,
                                    failback_holddown_s=cfg.failback_holddown_s,
                                    token_auth=self.credentials.token_auth)
            await self._serve()
        finally:
            if self.wire is not None:
                self.wire.close()
            self.tap.close()

    async def _serve(self) -> None:
        loop = self._loop
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        registry = new_registry()
        registry.register(FunctionCollector(lambda: agent_metrics(self, loop.time())))
        metrics = await serve_metrics(self.config.metrics_listen, registry)
        control = await serve_control(self.config.socket_path, self.snapshot)
        loop.add_reader(self.tap.fileno(), self._on_tap_readable)
        loop.add_reader(self.wire.fileno(), self._on_wire_readable)
        client_task = asyncio.ensure_future(self.client.run(stop))
        log.info("agent_started", extra=fields(
            id=self.host_id, mac=format_mac(self.tap.mac), tap=self.tap.name, port=self.config.port,
            mtu=self.tap_mtu, datapath=self.datapath_text(), servers=",".join(self.config.servers),
            metrics=self.config.metrics_listen or "off"))
        last_persist = last_drop_log = loop.time()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
                now = loop.time()
                self._tick(now)
                if now - last_persist >= PERSIST_INTERVAL_S:
                    self._reserve()
                    last_persist = now
                if now - last_drop_log >= DROP_LOG_S:
                    self._log_drops()
                    last_drop_log = now
                if client_task.done() and not stop.is_set():
                    client_task.result()  # surface a bug in the client
        finally:
            loop.remove_reader(self.tap.fileno())
            loop.remove_reader(self.wire.fileno())
            stop.set()
            client_task.cancel()
            control.close()
            if metrics is not None:
                metrics.close()
            # The readers are gone and the key client is stopped: no frame is
            # opened after this save, so the next start needs no lead.
            self.floor_file.save(self.floors, self.engine.replay_highest(), loop.time(), stopped=True)
            self._reserve()
            try:
                self.config.socket_path.unlink()
            except OSError:
                pass
            log.info("agent_stopped", extra=fields(**{k: v for k, v in self.engine.counters.items()}))
