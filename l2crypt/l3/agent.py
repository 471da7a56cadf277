"""The layer-3 agent: NFQUEUE <-> L3 engine, with the key client.

1. Read the host identity from the state directory (``l2crypt enroll``);
   restore the replay floors of the previous life (``l3_replay_floors``) and
   write them at once (a state directory that cannot take them is an error).
2. Bind the NFQUEUE (netfilterqueue), then install this instance's rules
   (``nft_rules``, IPv4 and IPv6): they replace stale rules of a crashed run
   at once, queue the policy's traffic and drop plain packets from a peer
   address.  In nat mode, also hold the UDP port (sockets that are never
   read) so nothing else takes it.
3. On the asyncio loop: the queue's netlink socket readable -> every queued
   packet goes through the engine (OUTPUT: seal; PREROUTING: open); the
   verdict carries the rewritten packet, so the kernel reinjects it in place.
   A packet waiting for a key is kept (no verdict yet) and gets its verdict
   when the key arrives, the server says "unknown", or its hold age passes.
   Packets the engine makes itself (nat keepalives) leave through raw
   sockets.
4. The key client runs beside it: ``l3_hello`` + ``ip_bind`` of the host's
   addresses, key requests by IP and by sender ID, pushes of new versions.
5. The loop is ``ops.daemon_shell.DaemonShell``: at the engine's next
   deadline (every ``daemon_shell.TICK_CAP_S`` at most) it saves the replay
   floors when due (the engine refuses packets while they are unsaved), then
   ``tick`` retries requests, ages held packets and key versions, moves the
   packet counter to the clock, sends keepalives and reads the inbound
   rule's counter (every ``REFUSED_READ_S``, in a thread: it runs
   iptables-save or nft); the shell persists the packet clock and logs drops.
6. SIGINT/SIGTERM stop it: the floors are saved as a clean stop; held packets are dropped; with ``fail_closed`` the
   rules are replaced by ones that drop the policy's traffic, else removed.
   After a crash the queue rules stay, and a queue with no listener drops.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from pathlib import Path

from l2crypt.agent.host_key import load_credentials
from l2crypt.agent.config import key_client_options, tuning_values
from l2crypt.core import l3_engine, l3_wire
from l2crypt.core.errors import LocalError
from l2crypt.core.l3_engine import L3Engine, L3Settings, Verdict
from l2crypt.core.replay_floor import FloorBook
from l2crypt.io import nft_rules
from l2crypt.io.packet_clock import PacketClock
from l2crypt.io.state_file import FloorFile
from l2crypt.ops.daemon_shell import DaemonShell, FloorSave
from l2crypt.ops.logs import fields

from .config import L3AgentConfig
from .keyclient import L3KeyClient
from .status import engine_snapshot, l3_metrics

log = logging.getLogger("l2crypt.l3agent")

QUEUE_MAX_PACKETS = 4096
NF_INET_LOCAL_OUT = 3
#: The replay floors file in the state directory (the layer-2 agent has its own).
FLOORS_FILE = "l3_replay_floors"
#: How often the inbound rule's counter is read (seconds).
REFUSED_READ_S = 1.0


class LocalSender:
    """Raw IPv4 and IPv6 sockets (IPPROTO_RAW: the packet carries its own
    header) for the packets the engine makes itself.  ``send`` never raises."""

    def __init__(self, versions):
        self._socks: dict[int, socket.socket] = {}
        for version in versions:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            try:
                self._socks[version] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as exc:
                self.close()
                raise LocalError(f"cannot open a raw IPv{version} socket (CAP_NET_RAW?): {exc.strerror}") from None
        self.errors = 0

    def send(self, packet: bytes) -> None:
        version = packet[0] >> 4
        sock = self._socks.get(version)
        try:
            dst = l3_wire.format_ip(packet[16:20] if version == 4 else packet[24:40])
            sock.sendto(packet, (dst, 0))
        except (OSError, AttributeError, ValueError):
            self.errors += 1

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()


class L3Agent:
    """One layer-3 agent on the daemon shell's loop (see the module docstring)."""

    name = "l3_agent"
    unit = "packets"
    log = log

    def __init__(self, config: L3AgentConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.credentials = load_credentials(self.state_dir, config.pkcs11_pin_file)  # a key file or a token
        self.host_id = self.credentials.host_id
        self.ssl_ctx = self.credentials.ssl_ctx
        self.my_ips = [l3_wire.parse_ip(a) for a in config.addresses]
        self.versions = sorted({6 if len(ip) == 16 else 4 for ip in self.my_ips})
        self.overhead = {v: l3_wire.overhead(config.mode, len(self.host_id.encode()), v) for v in (4, 6)}
        self.clock = PacketClock(self.state_dir)
        self.floors = FloorBook()
        self.floor_file = FloorFile(self.state_dir, FLOORS_FILE)
        self.started_at = time.monotonic()
        self.engine: L3Engine | None = None
        self.client: L3KeyClient | None = None
        self.queue = None
        self.rules = None  # the nft_rules backend holding this instance's rules
        self.local: LocalSender | None = None
        #: Plain packets from a peer address the kernel dropped (the rules' counter).
        self.refused_inbound = 0
        self._refused_read: asyncio.Future | None = None
        self._udp: list[socket.socket] = []
        self._refused_read_at = float("-inf")
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------- data path

    def _on_packet(self, pkt) -> None:
        """netfilterqueue callback: never raises (a failure drops the packet)."""
        try:
            data = pkt.get_payload()
            now = self._loop.time()
            if pkt.hook == NF_INET_LOCAL_OUT:
                verdict = self.engine.outbound(pkt, data, now)
            else:
                verdict = self.engine.inbound(pkt, data, now)
            if verdict is not None:
                self._give(verdict)
        except Exception:  # noqa: BLE001 - the packet path must not stop
            log.exception("packet_failed")
            self.engine.drops["internal_error"] += 1
            try:
                pkt.drop()
            except Exception:  # noqa: BLE001
                pass

    def _give(self, verdict: Verdict) -> None:
        pkt = verdict.tag
        try:
            if verdict.payload is None:
                pkt.drop()
            else:
                pkt.set_payload(verdict.payload)
                pkt.accept()
        except (RuntimeError, OSError):
            self.engine.drops["verdict_error"] += 1

    def _give_all(self, verdicts: list[Verdict]) -> None:
        for v in verdicts:
            self._give(v)

    def _after_batch(self, now: float) -> None:
        """What a batch of packets (or a tick) left to do: late verdicts, the
        engine's own packets, key requests."""
        self._give_all(self.engine.take_late_verdicts())
        for packet in self.engine.take_packets_to_send():  # only in nat mode
            self.local.send(packet)
        if self.engine.holds.pending:
            self._send_key_requests(now)

    def _on_queue_readable(self) -> None:
        try:
            self.queue.run(block=False)
        except OSError as exc:
            log.warning("queue_read_failed", extra=fields(reason=str(exc)))
        self._after_batch(self._loop.time())

    # ------------------------------------------------------------ key events

    def _send_key_requests(self, now: float) -> None:
        for lookup in self.engine.take_key_requests(now):
            self.client.request(lookup)

    def on_welcome(self, msg: dict) -> None:
        if l3_engine.use_cipher(self.engine, msg["cipher"]):
            log.info("cipher_selected", extra=fields(cipher=msg["cipher"]))
        for entry in self.engine.holds.pending.values():
            entry.next_request_at = 0.0
        self._send_key_requests(self._loop.time())

    def on_l3_key(self, peer_id: str, key: bytes, pw_id: int, peer_ips: list[bytes]) -> None:
        peer = self.engine.peers.get(peer_id)
        held = peer.keys.newest_pw_id() if peer is not None else 0
        verdicts = self.engine.install_key(peer_id, key, pw_id, peer_ips, self._loop.time())
        if pw_id > held:
            log.info("key_installed", extra=fields(peer_id=peer_id, pw_id=pw_id, released=len(verdicts),
                                                   peer_ips=",".join(map(l3_wire.format_ip, peer_ips))))
        self._give_all(verdicts)
        self._after_batch(self._loop.time())

    def on_l3_unknown(self, lookup: tuple) -> None:
        kind, value = lookup
        log.info("peer_unknown", extra=fields(by=kind, peer=l3_wire.format_ip(value) if kind == "ip" else value))
        self._give_all(self.engine.mark_unknown(lookup, self._loop.time()))

    def on_l3_peer_revoked(self, peer_id: str) -> None:
        log.warning("peer_revoked", extra=fields(peer_id=peer_id))
        self._give_all(self.engine.revoke_peer(peer_id))

    def on_disconnect(self) -> None:
        log.warning("keyserver_disconnected", extra=fields(keys_kept=len(self.engine.peers)))

    # --------------------------------------------------------------- status

    def snapshot(self) -> dict:
        doc = engine_snapshot(self.engine, self._loop.time())
        cfg = self.config
        doc.update({
            "id": self.host_id,
            **self.credentials.describe(),
            "addresses": list(cfg.addresses),
            "prefixes": list(cfg.prefixes),
            "table": cfg.table,
            "rules_backend": self.rules.name if self.rules is not None else None,
            "queue_num": cfg.queue_num,
            "udp_port": cfg.udp_port if cfg.mode == "nat" else None,
            "fail_closed": cfg.fail_closed,
            "packets_refused_inbound": self.refused_inbound,
            "overhead_bytes": self.overhead[4],
            "overhead_bytes_ipv6": self.overhead[6],
            "path_mtu": cfg.path_mtu,
            "tcp_mss_ipv4": self.engine.max_mss[4],
            "tcp_mss_ipv6": self.engine.max_mss[6],
            "nat_keepalive_s": cfg.nat_keepalive_s if cfg.mode == "nat" else None,
            "replay_floor_senders": len(self.floors),
            "keyserver": self.client.server,
            "keyservers": list(cfg.servers),
            "connected": self.client.connected,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        })
        return doc

    def _read_refused(self) -> None:
        """Start or collect the threaded read of the inbound rule's counter."""
        job = self._refused_read
        if job is not None and job.done():
            self._refused_read = None
            if not job.cancelled() and job.exception() is None and job.result() is not None:
                self.refused_inbound = job.result()
        elif job is None and self.rules is not None:
            self._refused_read = self._loop.run_in_executor(None, self.rules.refused_inbound)

    # ------------------------------------------------------------- lifecycle

    def _rules_on(self) -> None:
        cfg = self.config
        self.rules = nft_rules.choose_backend(cfg.rules_backend, cfg.table, cfg.prefixes, cfg.queue_num,
                                              cfg.mode, cfg.udp_port)

    def _rules_off(self) -> None:
        cfg = self.config
        if self.rules is None:
            return
        if cfg.fail_closed:
            self.rules.apply(cfg.prefixes, None, cfg.mode, cfg.udp_port)
        else:
            self.rules.remove()

    def _bind_queue(self) -> None:
        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError:
            raise LocalError("the netfilterqueue package is missing (pip install 'l2crypt[l3]')") from None
        try:
            self.queue = NetfilterQueue()
            self.queue.bind(self.config.queue_num, self._on_packet, max_len=QUEUE_MAX_PACKETS,
                            mode=COPY_PACKET, range=65535)
        except OSError as exc:
            raise LocalError(f"cannot bind NFQUEUE {self.config.queue_num} (in use, or not root?): {exc}") from None

    def _hold_udp_port(self) -> None:
        for version in self.versions:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_DGRAM)
            self._udp.append(sock)
            try:
                if version == 6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("0.0.0.0" if version == 4 else "::", self.config.udp_port))
            except OSError as exc:
                raise LocalError(f"UDP port {self.config.udp_port} (IPv{version}) is taken: {exc.strerror}") from None

    def _start_floors(self, now: float) -> None:
        restored = self.floor_file.load(self.floors, now)
        if not self.floor_file.save(self.floors, [], now):
            raise LocalError(f"cannot write {self.floor_file.path}: the replay floors must survive a restart")
        log.info("replay_floors_loaded", extra=fields(senders=restored, path=str(self.floor_file.path)))

    def start(self, now: float) -> None:
        """The replay floors of the previous life, the engine on them and the
        key client (no queue, no rules yet).  Raises LocalError."""
        cfg = self.config
        settings = L3Settings(**tuning_values(cfg), mode=cfg.mode, udp_port=cfg.udp_port,
                              max_held_packets=QUEUE_MAX_PACKETS // 2, path_mtu=cfg.path_mtu,
                              nat_keepalive_s=cfg.nat_keepalive_s)
        self._start_floors(now)
        self.engine = L3Engine(self.host_id, self.my_ips, settings, pn_start=self.clock.pn_start(), now=now,
                               floors=self.floors)
        self.client = L3KeyClient(cfg.servers, self.ssl_ctx, self.my_ips, self,
                                  token_auth=self.credentials.token_auth, **key_client_options(cfg))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        self.start(self._loop.time())
        try:
            if cfg.mode == "nat":
                self.local = LocalSender(self.versions)
                self._hold_udp_port()
            self._bind_queue()
            self._rules_on()
            try:
                await DaemonShell(self, cfg.socket_path, cfg.metrics_listen).serve()
            finally:
                self._rules_off()
                self._give_all(self.engine.drain_all())
        finally:
            if self.queue is not None:
                self.queue.unbind()
            for sock in self._udp:
                sock.close()
            if self.local is not None:
                self.local.close()

    # ------------------------------------------------- the shell's hooks (Daemon)

    def readers(self) -> list:
        return [(self.queue.get_fd(), self._on_queue_readable)]

    def floor_saves(self) -> list[FloorSave]:
        return [FloorSave(self.floor_file, self.floors, self.engine.highest_verified)]

    def tick(self, now: float) -> None:
        self._give_all(self.engine.on_timer(now))
        self._after_batch(now)
        for kind, peer_id, pw_id in self.engine.take_notices():
            log.info("key_notice", extra=fields(kind=kind, peer_id=peer_id, pw_id=pw_id))
            self.client.send_l3_notice(kind, peer_id, pw_id)
        if now - self._refused_read_at >= REFUSED_READ_S or self._refused_read is not None:
            self._read_refused()
            self._refused_read_at = now

    def next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def reserve(self) -> None:
        """Persist the packet clock (the engine's counter follows it, see ``packet_clock``)."""
        self.clock.persist()

    def all_drops(self) -> Counter:
        return self.engine.drops

    def metrics(self, now: float) -> list:
        return l3_metrics(self, now)

    def started_fields(self) -> dict:
        cfg = self.config
        return dict(id=self.host_id, mode=cfg.mode, addresses=",".join(cfg.addresses),
                    prefixes=",".join(cfg.prefixes), queue=cfg.queue_num, table=cfg.table,
                    rules=self.rules.name if self.rules is not None else "-", overhead=self.overhead[4],
                    path_mtu=cfg.path_mtu, servers=",".join(cfg.servers), metrics=cfg.metrics_listen or "off")

    def stopped_fields(self) -> dict:
        return dict(fail_closed=self.config.fail_closed, **dict(self.engine.counters))
