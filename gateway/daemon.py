"""The gateway daemon: ports <-> ``GatewayCore`` <-> key server.

1. Read the gateway identity (enrolled like a host, role gateway) from the
   state directory; guard the encrypted port (only l2crypt frames arrive or
   leave); keep the gateway's own stack off the plain port and turn its GRO
   and LRO off (it must see frames as they were on the wire), or with
   ``datapath = "batched"`` open it with PACKET_VNET_HDR and GRO on: each
   super-frame read is cut into segments that fit the encrypted port
   (``tap_path.cut_buffer``, checksums completed), and the frames sent in one
   batch are joined into GSO super-frames (``tap_path.write_coalesced``)
   whose checksums the kernel completes; if the kernel refuses
   PACKET_VNET_HDR it runs ``simple`` and status ``datapath_reason`` says
   why; bind the tunnel socket.
2. The encrypted port is a packet socket (``wire_ring = "off"``: one
   ``send``/``recv`` per frame) or PACKET_MMAP rings (``"v2"``/``"v3"``),
   opened as the agent opens its wire port (``wire_ring.open_wire_ring``:
   the same fallback to ``off`` if the kernel refuses the rings; status
   ``wire_path`` and the log ``wire_opened`` say which and why).  On the
   asyncio loop every readable port drains up to ``BATCH`` frames through
   the core; what the core gives for the batch is queued per port and
   leaves in one ``write_frames`` per port at its end (one system call on a
   ring).
3. The key client says hello with the encrypted port's MAC, then asks for
   the MACs mapped to this gateway (``map_list``, so a restart resumes at
   once) and for the keys of each tunnel link (``netkey_req peer_id``); it
   announces every learned MAC again after a reconnect; key requests, map
   requests, map releases (MACs aged out) and notices go out as the core
   raises them.
4. The loop is ``ops.daemon_shell.DaemonShell``: at the core's next
   deadline (every ``daemon_shell.TICK_CAP_S`` at most) it saves the replay
   floors of the gateway's frame engines (``replay_floors``: one book for
   all of them, a sender has one counter; loaded before the encrypted port
   opens) and of the tunnel (``tunnel_replay_floors``) when due, then
   ``tick`` runs the core's timers and sends what it raised; the shell
   reserves packet numbers ahead of every engine and the tunnel, logs new
   drops, and saves both books as a clean stop at the end.
   ``l2crypt-gateway status`` reads the control socket; Prometheus scrapes
   ``metrics_listen`` (``gateway.metrics``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from pathlib import Path

from l2crypt.agent.config import key_client_options, tuning_values
from l2crypt.agent.keyclient import KeyClient
from l2crypt.agent.tap_path import cut_buffer, write_coalesced
from l2crypt.agent.host_key import load_credentials
from l2crypt.core import engine as engine_mod
from l2crypt.core.constants import FRAME_OVERHEAD
from l2crypt.core.engine import EngineSettings
from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import format_mac, parse_mac
from l2crypt.core.gro import Coalescer
from l2crypt.core.ks_messages import revoked_macs
from l2crypt.core.replay_floor import FloorBook
from l2crypt.io.packet_clock import PacketClock
from l2crypt.io.port_guard import PortGuard, guard_port
from l2crypt.io.ports import WirePort
from l2crypt.io.state_file import FloorFile
from l2crypt.io.wire_ring import open_wire_ring
from l2crypt.ops.daemon_shell import DaemonShell, FloorSave
from l2crypt.ops.logs import fields

from .config import GatewayConfig
from .core import TOO_BIG, GatewayCore, GatewaySettings, Output
from .multipath import MultipathSettings
from .metrics import gateway_metrics
from .ports import ETH_HEADER_BYTES, PlainPort, TunnelPorts, port_mtu, quiet_port, receive_offloads_off, set_receive_offloads

log = logging.getLogger("l2crypt.gateway")

BATCH = 64
TUNNEL_FLOORS_FILE = "tunnel_replay_floors"


class GatewayKeyClient(KeyClient):
    """The agent's key client plus the gateway messages (map_req, map_release, map_list, netkey_req)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._map_rids: dict[int, bytes] = {}

    def request_map(self, mac: bytes, side: str) -> bool:
        rid = self._next_rid()
        self._map_rids[rid] = mac
        return self._send({"t": "map_req", "rid": rid, "mac": mac, "side": side})

    def release_map(self, mac: bytes) -> bool:
        return self._send({"t": "map_release", "rid": self._next_rid(), "mac": mac})

    def request_map_list(self) -> bool:
        return self._send({"t": "map_list", "rid": self._next_rid()})

    def request_netkey(self, peer_id: str, path: int = 0) -> bool:
        msg = {"t": "netkey_req", "rid": self._next_rid(), "peer_id": peer_id}
        return self._send(msg | {"path": path} if path else msg)

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t == "mapped":
            self._map_rids.pop(msg["rid"], None)
            self.events.on_mapped(msg["mac"], msg["side"])
        elif t == "unmapped":
            if msg["rid"] == 0:  # a push: an enrolled host took the MAC (else: a map_release answer)
                self.events.on_unmapped(msg["mac"])
        elif t == "netkey":
            self.events.on_netkey(msg["peer_id"], msg["pw_id"], msg["send_key"], msg["recv_key"],
                                  msg.get("path", 0))
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
    """The gateway daemon: its two ports, the tunnel, the key-server session and the core, on
    the daemon shell's loop."""

    name = "gateway"
    unit = "frames"
    log = log

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.credentials = load_credentials(self.state_dir, config.pkcs11_pin_file)  # a key file or a token
        self.gw_id = self.credentials.host_id
        self.ssl_ctx = self.credentials.ssl_ctx
        self.clock = PacketClock(self.state_dir)
        self.floors = FloorBook()
        self.floor_file = FloorFile(self.state_dir)
        self.tunnel_floors = FloorBook()
        self.tunnel_floor_file = FloorFile(self.state_dir, name=TUNNEL_FLOORS_FILE)
        self.started_at = time.monotonic()
        self.guards = {"encrypted": PortGuard(config.encrypted_port, config.ethertype)}
        if config.plain_port:
            self.guards["plain"] = PortGuard(config.plain_port, None, egress=False)
        self.enc: WirePort | None = None     # the encrypted port (sealed frames)
        self.wire_path = "simple: not opened yet"  # which encrypted port runs, and why (open_wire)
        self._to_enc: list[bytes] = []    # frames queued for the encrypted port (_collect, _flush)
        self._to_plain: list[bytes] = []  # and for the plain port
        self._to_tunnel: list[tuple[str, int, bytes]] = []  # and (peer, path, datagram) for the tunnel
        #: The plain port's path ("simple" or "batched", ``datapath``) and why, if not the one asked for.
        self.datapath, self.datapath_reason = "simple", "configured"
        self.coalescer: Coalescer | None = None  # batched: joins the segments sent to the plain port
        self.plain: WirePort | None = None  # the plain port (clear frames), if any
        self.tunnel: TunnelPorts | None = None
        self.enc_max_frame = 0  # bytes, from the encrypted port's MTU at start (0: not read yet, no check)
        self.core: GatewayCore | None = None
        self.client: GatewayKeyClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ data path

    def _send(self, out: Output) -> None:
        """What one call of the core gave, sent now (key events)."""
        self._collect(out)
        self._flush(self._loop.time())

    def _collect(self, out: Output) -> None:
        """Queue the core's output; ``_flush`` sends it (one batch per port)."""
        for frame in out.to_enc:
            if self.enc_max_frame and len(frame) > self.enc_max_frame:
                # A plain frame as large as the plain side's MTU no longer fits once sealed;
                # a layer-2 gateway sends no ICMP answer, it counts the frame.
                self.core.drops[TOO_BIG] += 1
            else:
                self._to_enc.append(frame)
        if self.plain is not None:
            self._to_plain += out.to_plain
        if self.tunnel is not None:
            self._to_tunnel += out.to_tunnel

    def _flush(self, now: float) -> None:
        """The queued frames, each port's in one ``write_frames`` (one system call on a ring)."""
        drops = self.core.drops
        if self._to_plain and self.coalescer is not None:  # batched: segments joined into super-frames
            add = self.coalescer.add
            for frame in self._to_plain:
                add(frame)
            self._to_plain.clear()
            write_coalesced(self.coalescer, self.plain.write_vnet, drops, self.core.counters, "plain_tx_error")
        if self._to_tunnel:
            self._send_tunnel()
        for frames, port, reason in ((self._to_enc, self.enc, "tx_error"),
                                     (self._to_plain, self.plain, "plain_tx_error")):
            if frames:
                sent = port.write_frames(frames)
                if sent < len(frames):
                    drops[reason] += len(frames) - sent
                frames.clear()
        self._to_server(now)

    def _send_tunnel(self) -> None:
        """The queued datagrams, each peer's consecutive run in one ``send_batch``."""
        queued, run, route = self._to_tunnel, [], None
        for to, path, datagram in [*queued, (None, 0, b"")]:  # a sentinel ends the last run
            if (to, path) != route and run:
                sent = self.tunnel.send_batch(*route, run)
                if sent < len(run):
                    self.core.drops["tunnel_tx_error"] += len(run) - sent
                run = []
            route = (to, path)
            run.append(datagram)
        queued.clear()

    def _on_enc(self) -> None:
        now, collect, from_encrypted = self._loop.time(), self._collect, self.core.from_encrypted
        for frame in self.enc.read_frames(BATCH):
            collect(from_encrypted(frame, now))
        self._flush(now)

    def _on_plain(self) -> None:
        now, collect, from_plain = self._loop.time(), self._collect, self.core.from_plain
        if self.coalescer is None:
            for frame in self.plain.read_frames(BATCH):
                collect(from_plain(frame, now))
        else:  # batched: GRO super-frames cut into segments that fit the encrypted port
            core, mtu = self.core, self.enc_max_frame - ETH_HEADER_BYTES - FRAME_OVERHEAD
            for buffer in self.plain.read_frames(BATCH):
                cut = cut_buffer(buffer, mtu, True, core.drops, core.counters)
                if cut is not None:
                    for frame in cut[0]:
                        collect(from_plain(frame, now))
        self._flush(now)

    def _on_tunnel(self, sock) -> None:
        now, collect, from_tunnel = self._loop.time(), self._collect, self.core.from_tunnel
        for (peer, path), datagram in sock.read(BATCH):
            collect(from_tunnel(peer, datagram, now, path))
        self._flush(now)

    def _to_server(self, now: float) -> None:
        if not self.client.connected:
            return
        for mac in self.core.take_map_releases():
            self.client.release_map(mac)
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
            self._request_tunnel_keys()

    def _request_tunnel_keys(self) -> None:
        for peer, link in self.core.tunnel.links.items():
            for path in link.paths:
                self.client.request_netkey(peer, path)

    # ----------------------------------------------------------- key events

    def on_welcome(self, msg: dict) -> None:
        now = self._loop.time()
        if self.core.use_cipher(msg["cipher"]):
            log.info("cipher_selected", extra=fields(cipher=msg["cipher"]))
        if msg.get("key_max_age_s"):  # the server's maximum key lifetime, if lower
            max_age = min(float(msg["key_max_age_s"]), self.core.engine_settings.key_max_age_s)
            self.core.engine_settings = dataclasses.replace(self.core.engine_settings, key_max_age_s=max_age)
            for engine in self.core.engines():
                engine.set_key_max_age(max_age)
        # Revocations pushed while we were not connected (or never pushed).
        for mac in revoked_macs(msg):
            if mac != self.core.main.my_mac and mac not in self.core.main.revoked:
                self.on_peer_revoked(mac)
        self._send(self.core.install_multicast_key(msg["multicast_key"], msg["multicast_pw_id"], now))
        self.client.request_map_list()
        for mac, side in self.core.learned():
            self.client.request_map(mac, side)
        if self.tunnel is not None:
            self._request_tunnel_keys()
        for engine in self.core.engines():
            for entry in engine.holds.pending.values():
                entry.next_request_at = 0.0
        self._to_server(now)

    def on_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int,
               age_s: int = 0, older: list = ()) -> None:
        self._send(self.core.install_pair_key(peer_mac, peer_id, key, pw_id, self._loop.time(), age_s, older))

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

    def on_unmapped(self, mac: bytes) -> None:
        log.warning("mac_unmapped", extra=fields(mac=format_mac(mac), reason="an enrolled host said hello with it"))
        self.core.on_unmapped(mac)

    def on_netkey(self, peer_id: str, pw_id: int, send_key: bytes, recv_key: bytes, path: int = 0) -> None:
        if self.core.install_tunnel_keys(peer_id, pw_id, send_key, recv_key, self._loop.time(), path):
            log.info("netkey_installed", extra=fields(peer=peer_id, path=path, pw_id=pw_id))

    # ------------------------------------------------ floors and packet clock

    def _replay_highest(self):
        for engine in self.core.engines():
            yield from engine.replay_highest()

    def reserve(self) -> None:
        """Reserve packet numbers ahead of every frame engine and the tunnel (``packet_clock``)."""
        senders = [*self.core.engines(), self.core.tunnel]
        limit = self.clock.reserve(max(e.send_pn for e in senders))
        for sender in senders:
            sender.pn_limit = limit

    # --------------------------------------------------------------- status

    def snapshot(self) -> dict:
        doc = self.core.snapshot(self._loop.time())
        doc.update({
            "id": self.gw_id,
            "role": "gateway",
            **self.credentials.describe(),
            "mac": format_mac(self.core.gw_mac),
            "encrypted_port": self.config.encrypted_port,
            "plain_port": self.config.plain_port,
            "wire_path": self.wire_path,
            "datapath": self.datapath if self.config.plain_port else None,
            "datapath_reason": self.datapath_reason if self.config.plain_port else None,
            "tunnel_listen": self.config.tunnel_listen or None,
            "tunnel_unknown_sender": self.tunnel.unknown_sender if self.tunnel else 0,
            "tunnel_path": self.tunnel.path if self.tunnel else None,
            "port_read_errors": {name: getattr(port, "read_errors", 0)
                                 for name, port in (("encrypted", self.enc), ("plain", self.plain)) if port},
            "keyserver": self.client.server,
            "connected": self.client.connected,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        })
        readings = self.guard_readings()
        doc.update(readings["encrypted"])  # port_guard, inbound_refused, egress_blocked
        if "plain" in readings:
            doc.update({"plain_port_guard": readings["plain"]["port_guard"],
                        "plain_inbound_refused": readings["plain"]["inbound_refused"]})
        return doc

    def guard_readings(self) -> dict[str, dict]:
        """Port ("encrypted", "plain") -> its guard as the kernel has it now."""
        return {name: guard.read() for name, guard in self.guards.items()}

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        gw_mac = _port_mac(cfg.encrypted_port)
        if cfg.path_specs():
            restored = self.tunnel_floor_file.load(self.tunnel_floors, self._loop.time())
            log.info("tunnel_replay_floors_restored", extra=fields(peers=restored))
        self.guards["encrypted"] = await asyncio.to_thread(guard_port, cfg.encrypted_port, cfg.ethertype)
        now = self._loop.time()
        restored = self.floor_file.load(self.floors, now)
        if not self.floor_file.save(self.floors, (), now):
            raise LocalError(f"cannot write the replay floors {self.floor_file.path}")
        log.info("replay_floors_loaded", extra=fields(senders=restored))
        try:
            self.enc, self.wire_path = open_wire_ring(cfg.encrypted_port, cfg.ethertype, cfg.wire_ring)
            log.info("wire_opened", extra=fields(port=cfg.encrypted_port, path=self.wire_path))
            self.enc_max_frame = ETH_HEADER_BYTES + port_mtu(cfg.encrypted_port)
            if cfg.plain_port:
                self.guards["plain"] = await asyncio.to_thread(quiet_port, cfg.plain_port)
                self.open_plain(cfg.plain_port, cfg.datapath == "batched")
            specs = cfg.path_specs()
            if specs:
                self.tunnel = TunnelPorts(specs, offload=cfg.tunnel_offload)
                log.info("tunnel_opened", extra=fields(
                    listen=",".join(f"{h}:{p}" for h, p in dict.fromkeys(s.local for s in specs)),
                    paths=len(specs), mode=cfg.tunnel_mode, path=self.tunnel.path))
            self.start(gw_mac, now)
            await DaemonShell(self, cfg.socket_path, cfg.metrics_listen).serve()
        finally:
            for port in (self.enc, self.plain, self.tunnel):
                if port is not None:
                    port.close()

    def open_plain(self, port: str, batched: bool) -> None:
        """The plain port: with PACKET_VNET_HDR and GRO on (``batched``) if the kernel
        allows it, else one frame per read and write with GRO and LRO off."""
        self.plain = PlainPort(port, vnet=batched)
        if self.plain.vnet_hdr_len:
            self.datapath, self.datapath_reason = "batched", ""
            self.coalescer = Coalescer()
            changed = set_receive_offloads(port, gro=True)
            log.info("plain_port_offloads_on", extra=fields(port=port, changed=",".join(changed) or "-"))
            return
        self.datapath_reason = self.plain.offload_refused
        if batched:
            log.warning("datapath_fallback", extra=fields(datapath="simple", reason=self.datapath_reason))
        turned_off = receive_offloads_off(port)
        log.info("plain_port_offloads_off", extra=fields(port=port, turned_off=",".join(turned_off) or "-"))

    def start(self, gw_mac: bytes, now: float) -> None:
        """The core (its engines on the replay floors loaded, every tuning key
        of the config) and the key client, once the ports are open."""
        cfg = self.config
        settings = EngineSettings(**tuning_values(cfg), ethertype=cfg.ethertype)
        self.core = GatewayCore(
            gw_mac, self.clock.pn_start, tunnel_peers=cfg.tunnel_peer_names(),
            tunnel_paths=cfg.tunnel_path_ids(), path_weights={(s.peer, s.path): s.weight for s in cfg.path_specs()},
            multipath=MultipathSettings(
                mode=cfg.tunnel_mode, spray=cfg.tunnel_spray, fec_k=cfg.tunnel_fec_k,
                probe_interval_s=cfg.tunnel_probe_interval_s, probe_misses=cfg.tunnel_probe_misses,
                weight_interval_s=cfg.tunnel_weight_interval_s, holddown_s=cfg.tunnel_path_holddown_s,
                reorder_ms=cfg.tunnel_reorder_ms),
            has_plain=self.plain is not None,
            settings=GatewaySettings(group_crossing=cfg.group_crossing, max_learned_macs=cfg.max_learned_macs,
                                     learn_hold_frames=max(1, cfg.hold_frames), learn_hold_age_s=cfg.hold_age_s,
                                     refused_cache_s=cfg.refused_cache_s, mac_ageing_s=cfg.mac_ageing_s),
            engine_settings=settings, gw_id=self.gw_id, floors=self.floors,
            tunnel_floors=self.tunnel_floors, now=now)
        self.reserve()
        self.client = GatewayKeyClient(cfg.servers, self.ssl_ctx, gw_mac, self,
                                       token_auth=self.credentials.token_auth, **key_client_options(cfg))

    # ------------------------------------------------- the shell's hooks (Daemon)

    def readers(self) -> list:
        readers = [(port.fileno(), on_readable)
                   for port, on_readable in ((self.enc, self._on_enc), (self.plain, self._on_plain))
                   if port is not None]
        for sock in self.tunnel.sockets if self.tunnel is not None else ():
            readers.append((sock.fileno(), functools.partial(self._on_tunnel, sock)))
        return readers

    def floor_saves(self) -> list[FloorSave]:
        saves = [FloorSave(self.floor_file, self.floors, self._replay_highest)]
        if self.tunnel is not None:
            saves.append(FloorSave(self.tunnel_floor_file, self.tunnel_floors, self.core.tunnel.highest))
        return saves

    def tick(self, now: float) -> None:
        self._collect(self.core.on_timer(now))
        self._flush(now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def all_drops(self) -> Counter:
        return self.core.all_drops()

    def metrics(self, now: float) -> list:
        return gateway_metrics(self, now)

    def started_fields(self) -> dict:
        cfg = self.config
        return dict(id=self.gw_id, mac=format_mac(self.core.gw_mac), encrypted_port=cfg.encrypted_port,
                    plain_port=cfg.plain_port or "-", wire_path=self.wire_path,
                    datapath=(self.datapath + (f" ({self.datapath_reason})" if self.datapath_reason else "")
                              if self.config.plain_port else "-"),
                    tunnel_peers=",".join(self.core.peers) or "-",
                    metrics=cfg.metrics_listen or "off")

    def stopped_fields(self) -> dict:
        return {}
