"""The gateway daemon: ports <-> ``GatewayCore`` <-> key server.

1. Read the gateway identity (enrolled like a host, role gateway) from the
   state directory; guard the encrypted port (only l2crypt frames leave);
   quiet the plain port; bind the tunnel socket.
2. On the asyncio loop every readable port drains up to ``BATCH`` frames
   through the core; the core's output goes to the ports.
3. The key client says hello with the encrypted port's MAC, then asks for
   the MACs mapped to this gateway (``map_list``, so a restart resumes at
   once) and for NETKEY; it announces every learned MAC again after a
   reconnect; key requests, map requests and notices go out as the core
   raises them.
4. A tick every ``TICK_S`` runs the core's timers, persists the packet
   clock and logs new drops.  ``l2crypt-gateway status`` reads the control
   socket; Prometheus scrapes ``metrics_listen`` (``gateway.metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from pathlib import Path

from l2crypt import engine as engine_mod
from l2crypt.control import serve_control
from l2crypt.engine import EngineSettings
from l2crypt.errors import LocalError
from l2crypt.frame_wire import format_mac, parse_mac
from l2crypt.keyclient import KeyClient
from l2crypt.ks_messages import revoked_macs
from l2crypt.linux_wire import LinuxWire
from l2crypt.logs import fields
from l2crypt.metrics import FunctionCollector, new_registry, serve_metrics
from l2crypt.packet_clock import PERSIST_INTERVAL_S, PacketClock
from l2crypt.port_guard import egress_drops, guard_port
from l2crypt.tls_files import client_context, host_identity

from .config import GatewayConfig, parse_hostport
from .core import GatewayCore, GatewaySettings, Output
from .metrics import gateway_metrics
from .ports import PlainPort, TunnelSocket, quiet_port

log = logging.getLogger("l2crypt.gateway")

BATCH = 64
TICK_S = 0.1
DROP_LOG_S = 10.0


class GatewayKeyClient(KeyClient):
    """The agent's key client plus the gateway messages (map_req, map_list, netkey_req)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._map_rids: dict[int, bytes] = {}

    def request_map(self, mac: bytes, side: str) -> bool:
        rid = self._next_rid()
        self._map_rids[rid] = mac
        return self._send({"t": "map_req", "rid": rid, "mac": mac, "side": side})

    def request_map_list(self) -> bool:
        return self._send({"t": "map_list", "rid": self._next_rid()})

    def request_netkey(self) -> bool:
        return self._send({"t": "netkey_req", "rid": self._next_rid()})

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t == "mapped":
            self._map_rids.pop(msg["rid"], None)
            self.events.on_mapped(msg["mac"], msg["side"])
        elif t == "netkey":
            self.events.on_netkey(msg["key"], msg["pw_id"])
        elif t == "error" and msg["rid"] in self._map_rids:
            self.events.on_map_refused(self._map_rids.pop(msg["rid"]), msg["code"], msg["msg"])
        elif t == "error" and msg["code"] == "no_netkey":
            log.warning("no_netkey", extra=fields(reason=msg["msg"]))
        else:
            super()._dispatch(msg)


def _port_mac(port: str) -> bytes:
    try:
        return parse_mac(Path(f"/sys/class/net/{port}/address").read_text().strip())
    except (OSError, ValueError):
        raise LocalError(f"encrypted_port: {port!r} does not exist") from None


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.gw_id = host_identity(self.state_dir)
        self.ssl_ctx = client_context(self.state_dir)
        self.clock = PacketClock(self.state_dir)
        self.started_at = time.monotonic()
        self.enc = self.plain = self.tunnel = None
        self.core: GatewayCore | None = None
        self.client: GatewayKeyClient | None = None
        self._logged: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ data path

    def _send(self, out: Output) -> None:
        for frame in out.to_enc:
            if not self.enc.write_frame(frame):
                self.core.drops["tx_error"] += 1
        if self.plain is not None:
            for frame in out.to_plain:
                if not self.plain.write_frame(frame):
                    self.core.drops["plain_tx_error"] += 1
        if self.tunnel is not None:
            for peer, datagram in out.to_tunnel:
                if not self.tunnel.send(peer, datagram):
                    self.core.drops["tunnel_tx_error"] += 1
        self._to_server(self._loop.time())

    def _on_enc(self) -> None:
        now = self._loop.time()
        for frame in self.enc.read_frames(BATCH):
            self._send(self.core.from_encrypted(frame, now))

    def _on_plain(self) -> None:
        now = self._loop.time()
        for frame in self.plain.read_frames(BATCH):
            self._send(self.core.from_plain(frame, now))

    def _on_tunnel(self) -> None:
        now = self._loop.time()
        for peer, datagram in self.tunnel.read(BATCH):
            self._send(self.core.from_tunnel(peer, datagram, now))

    def _to_server(self, now: float) -> None:
        if not self.client.connected:
            return
        for mac, side in self.core.take_map_requests():
            self.client.request_map(mac, side)
        for mac in self.core.take_key_requests(now):
            if mac == engine_mod.GROUP_MAC:
                self.client.request_multicast()
            else:
                self.client.request_key(mac)
        for kind, mac, pw_id in self.core.take_notices():
            self.client.send_notice(kind, mac, pw_id)
        if self.core.tunnel.wants_key and self.tunnel is not None:
            self.core.tunnel.wants_key = False
            self.client.request_netkey()

    # ----------------------------------------------------------- key events

    def on_welcome(self, msg: dict) -> None:
        now = self._loop.time()
        if self.core.use_cipher(msg["cipher"]):
            log.info("cipher_selected", extra=fields(cipher=msg["cipher"]))
        # Revocations pushed while we were not connected (or never pushed).
        for mac in revoked_macs(msg):
            if mac != self.core.main.my_mac and mac not in self.core.main.revoked:
                self.on_peer_revoked(mac)
        self._send(self.core.install_multicast_key(msg["multicast_key"], msg["multicast_pw_id"], now))
        self.client.request_map_list()
        for mac, side in self.core.learned():
            self.client.request_map(mac, side)
        if self.tunnel is not None:
            self.client.request_netkey()
        for engine in self.core._engines():
            for entry in engine.holds.pending.values():
                entry.next_request_at = 0.0
        self._to_server(now)

    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int) -> None:
        self._send(self.core.install_pair_key(peer_mac, peer_id, key, pw_id, self._loop.time()))

    def on_unknown(self, peer_mac: bytes) -> None:
        self.core.mark_unknown(peer_mac, self._loop.time())

    def on_key_refused(self, peer_mac: bytes, code: str, text: str) -> None:
        log.warning("key_refused", extra=fields(peer_mac=format_mac(peer_mac), code=code, reason=text))
        self.core.mark_unknown(peer_mac, self._loop.time())

    def on_multicast(self, key: bytes, pw_id: int) -> None:
        self._send(self.core.install_multicast_key(key, pw_id, self._loop.time()))

    def on_peer_revoked(self, peer_mac: bytes) -> None:
        log.warning("peer_revoked", extra=fields(peer_mac=format_mac(peer_mac)))
        self.core.revoke_peer(peer_mac)

    def on_disconnect(self) -> None:
        log.warning("keyserver_disconnected", extra=fields(learned=len(self.core.table)))

    def on_mapped(self, mac: bytes, side: str) -> None:
        log.info("mac_mapped", extra=fields(mac=format_mac(mac), side=side))
        self._send(self.core.on_mapped(mac, side, self._loop.time()))

    def on_map_refused(self, mac: bytes, code: str, text: str) -> None:
        log.warning("mac_refused", extra=fields(mac=format_mac(mac), code=code, reason=text))
        self.core.on_map_refused(mac, self._loop.time())

    def on_netkey(self, key: bytes, pw_id: int) -> None:
        if self.core.install_netkey(key, pw_id, self._loop.time()):
            log.info("netkey_installed", extra=fields(pw_id=pw_id))

    # --------------------------------------------------------------- status

    def snapshot(self) -> dict:
        doc = self.core.snapshot(self._loop.time())
        doc.update({
            "id": self.gw_id,
            "role": "gateway",
            "mac": format_mac(self.core.gw_mac),
            "encrypted_port": self.config.encrypted_port,
            "plain_port": self.config.plain_port,
            "tunnel_listen": self.config.tunnel_listen or None,
            "tunnel_unknown_sender": self.tunnel.unknown_sender if self.tunnel else 0,
            "keyserver": self.client.server,
            "connected": self.client.connected,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "egress_blocked": egress_drops(self.config.encrypted_port),
        })
        return doc

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        gw_mac = _port_mac(cfg.encrypted_port)
        guard_port(cfg.encrypted_port, cfg.ethertype)
        try:
            self.enc = LinuxWire(cfg.encrypted_port, cfg.ethertype)
            if cfg.plain_port:
                quiet_port(cfg.plain_port)
                self.plain = PlainPort(cfg.plain_port)
            if cfg.tunnel_listen:
                self.tunnel = TunnelSocket(parse_hostport(cfg.tunnel_listen, default_port=0), cfg.peer_addresses())
            settings = EngineSettings(
                ethertype=cfg.ethertype, replay_window_frames=cfg.replay_window_frames,
                hold_frames=cfg.hold_frames, hold_age_s=cfg.hold_age_s, key_retry_s=cfg.key_retry_s,
                key_retry_max_s=cfg.key_retry_max_s, unknown_cache_s=cfg.unknown_cache_s,
                switch_after_s=cfg.switch_after_s, retire_after_s=cfg.retire_after_s)
            self.core = GatewayCore(
                gw_mac, self.clock.pn_start, tunnel_peers=tuple(cfg.peer_addresses()),
                has_plain=self.plain is not None,
                settings=GatewaySettings(group_crossing=cfg.group_crossing, max_learned_macs=cfg.max_learned_macs,
                                         learn_hold_frames=max(1, cfg.hold_frames), learn_hold_age_s=cfg.hold_age_s,
                                         refused_cache_s=cfg.refused_cache_s),
                engine_settings=settings)
            self.client = GatewayKeyClient(cfg.servers, self.ssl_ctx, gw_mac, self)
            await self._serve()
        finally:
            for port in (self.enc, self.plain, self.tunnel):
                if port is not None:
                    port.close()

    async def _serve(self) -> None:
        loop = self._loop
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        control = await serve_control(self.config.socket_path, self.snapshot)
        registry = new_registry()
        registry.register(FunctionCollector(lambda: gateway_metrics(self, loop.time())))
        try:
            metrics = await serve_metrics(self.config.metrics_listen, registry)
        except LocalError:
            control.close()
            raise
        readers = [(self.enc, self._on_enc), (self.plain, self._on_plain), (self.tunnel, self._on_tunnel)]
        for port, cb in readers:
            if port is not None:
                loop.add_reader(port.fileno(), cb)
        client_task = asyncio.ensure_future(self.client.run(stop))
        log.info("gateway_started", extra=fields(
            id=self.gw_id, mac=format_mac(self.core.gw_mac), encrypted_port=self.config.encrypted_port,
            plain_port=self.config.plain_port or "-", tunnel_peers=",".join(self.core.peers) or "-",
            metrics=self.config.metrics_listen or "off"))
        last_persist = last_log = loop.time()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
                now = loop.time()
                self.core.on_timer(now)
                self._to_server(now)
                if now - last_persist >= PERSIST_INTERVAL_S:
                    self.clock.persist()
                    last_persist = now
                if now - last_log >= DROP_LOG_S:
                    new = self.core.all_drops() - self._logged
                    if new:
                        log.warning("frames_dropped", extra=fields(**dict(new)))
                        self._logged = self.core.all_drops()
                    last_log = now
                if client_task.done() and not stop.is_set():
                    client_task.result()
        finally:
            for port, _ in readers:
                if port is not None:
                    loop.remove_reader(port.fileno())
            stop.set()
            client_task.cancel()
            control.close()
            if metrics is not None:
                metrics.close()
            self.clock.persist()
            try:
                self.config.socket_path.unlink()
            except OSError:
                pass
            log.info("gateway_stopped")
