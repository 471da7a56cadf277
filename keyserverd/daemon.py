"""The running key server: what ``keyserverd [serve]`` starts and stops.

1. ``serve_forever`` opens the KEK (a token KEK now), the CA and the store,
   forks the workers (``workers``) and builds the ``KeyService``.
2. ``_run`` (every worker): the TLS server on the shared port, signals; worker
   0 also runs the metrics endpoint, the admin socket (``keyserverd status``),
   peering with other key servers (resolve, revocations, the multicast key)
   and the NETKEY peering of gateways, and reaps the other workers.
3. ``_run_worker`` (workers 1..N-1): serve, read the event log, report to
   worker 0.
On a signal every part is closed in the reverse order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import sys
import time

import click

from keyserverd.store.kek import load_kek
from keyserverd.store.protocol import StoreUnavailable
from l2crypt.io.aio_timeout import wait_for
from l2crypt.ops.control import serve_control
from l2crypt.ops.logs import fields, setup_logging
from l2crypt.ops.metrics import serve_metrics

from .ca import CertificateAuthority
from .config import ADMIN_SOCKET, KeyServerConfig, parse_hostport
from .event_cursor import CURSOR_FILE, EventCursor
from .metrics import KeyServerMetrics
from .revocations import BOOK_FILE as REVOCATION_BOOK_FILE
from .revocations import RevocationBook
from .client_port import ConnectionLimits, make_server_ssl_context, shrink_tls_buffers
from .server import KeyServer
from .service import KeyService
from .status import snapshot as status_snapshot
from .store import open_configured_store
from .workers import REPORT_S, Workers, workers_for

PROG = "keyserverd"
#: Full garbage collections (CPython's oldest generation) run on this timer in
#: each worker, instead of whenever a quarter more objects have survived: with
#: 10,000 hosts connected one took 50-130 ms on the 2-core machine, several a
#: minute, and no request was answered meanwhile.
FULL_GC_S = 600.0
#: Open files kept free beyond ``max_connections`` (store, sockets, logs).
FD_HEADROOM = 256

log = logging.getLogger("keyserverd")


def serve_forever(config: KeyServerConfig) -> None:
    """Run the key server of ``config`` until SIGTERM or SIGINT (workers, peering and all)."""
    setup_logging(config.log_level, config.log_format)
    kek = load_kek(config.kek_file, config.kek_credential, token=config.kek_token())  # a token KEK: opened now
    ca = CertificateAuthority.open(config.state_dir, config.server_names, config.ca_token())
    ca.check_token()
    count = workers_for(config)
    if count > 1:
        open_configured_store(config, time.time(), kek=kek).close()  # migrate once, before the workers open it
    ssl_context = make_server_ssl_context(ca)  # before the fork: every worker takes every TLS ticket
    gc.freeze()  # what the start made lives on: no collection walks it again (nor copies it in a worker)
    workers = Workers.start(count)
    store = open_configured_store(config, time.time(), kek=kek)
    checkpoints = getattr(store, "checkpoint_in_background", None)  # SQLite: not in the event loops
    stop_checkpoints = checkpoints(run=workers.index == 0) if checkpoints is not None else None
    try:
        server_name = config.server_names[0] if config.server_names else socket.gethostname()
        service = KeyService(store, config.cipher, server_name, ca, cert_days=config.cert_days,
                             rekey_after_s=config.rekey_after_s,
                             multicast_rekey_after_s=config.multicast_rekey_after_s,
                             retire_after_s=config.retire_after_s,
                             key_requests_per_s=config.key_requests_per_s,
                             key_request_burst=config.key_request_burst,
                             require_pinned_macs=config.require_pinned_macs,
                             require_pinned_ips=config.require_pinned_ips,
                             revocation_book=RevocationBook(config.state_dir / REVOCATION_BOOK_FILE))
        asyncio.run(_run(config, service, ca, workers, ssl_context))
    finally:
        if stop_checkpoints is not None:
            stop_checkpoints()
        store.close()
        workers.stop()


def _full_gc_on_timer(loop: asyncio.AbstractEventLoop) -> None:
    """Full collections every ``FULL_GC_S`` only (the young generations are left as they are)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 2**31 - 1)

    def collect() -> None:
        gc.collect()
        loop.call_later(FULL_GC_S, collect)

    loop.call_later(FULL_GC_S, collect)


async def _run(config: KeyServerConfig, service: KeyService, ca: CertificateAuthority,
               workers: Workers, ssl_context) -> None:
    limits = ConnectionLimits(max_connections=config.max_connections,
                              max_connections_per_host=config.max_connections_per_host,
                              max_unauthenticated_connections=config.max_unauthenticated_connections,
                              unauth_deadline_s=config.unauth_deadline_s)
    _raise_fd_limit(config.max_connections + FD_HEADROOM)
    shrink_tls_buffers()
    cursor = CURSOR_FILE if workers.index == 0 else f"{CURSOR_FILE}.{workers.index}"
    server = KeyServer(service, ssl_context, config.listen_host, config.listen_port,
                       unauth_idle_s=config.unauth_idle_s, limits=limits,
                       event_cursor=EventCursor(config.state_dir / cursor), reuse_port=workers.count > 1)
    server.runs_timers = workers.index == 0
    loop = asyncio.get_running_loop()
    _full_gc_on_timer(loop)
    workers.attach(loop, server)
    host, port = await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if workers.index != 0:
        await _run_worker(server, workers, stop)
        return
    metrics = await serve_metrics(config.metrics_listen, KeyServerMetrics(server).registry)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    line = f"{PROG}: listening on {shown} ca-fingerprint {ca.ca_fingerprint()} cipher {config.cipher}"
    if workers.count > 1:
        line += f" workers {workers.count}"
    click.echo(line)
    sys.stdout.flush()
    log.info("keyserverd_started", extra=fields(listen=shown, ca_fingerprint=ca.ca_fingerprint(),
                                                 cipher=config.cipher, metrics=config.metrics_listen or "off"))
    admin_path = config.state_dir / ADMIN_SOCKET
    admin = await serve_control(admin_path, lambda: status_snapshot(server, config, shown))
    peering = multicast = revocations = None
    if config.peer_listen or config.peers:
        from keyserverd.peering.channel import Peering, PeerSpec
        from keyserverd.peering.revocations import RevocationSync
        peering = Peering(ca, tuple(PeerSpec.parse(p) for p in config.peers), config.peer_listen or None)
        peering.register("resolve", lambda msg, peer: service.resolve_for_peer(msg["mac"], msg["from_id"], peer,
                                                                               time.time()))
        # Hosts revoked at a peer are dropped by ours too (it answers our polls, we answer its).
        revocations = RevocationSync(peering, service, act=lambda actions: server._act(None, actions))
        if config.peers:  # peered servers agree on one multicast key (ARP/ND across switches)
            from keyserverd.peering.multicast import MulticastAgreement
            multicast = MulticastAgreement(peering, service)
        bound = await peering.start()
        server.peering, service.peering_enabled = peering, bool(config.peers)
        log.info("peering_started", extra=fields(listen=bound, peers=len(config.peers)))
        revocations.start()
        if multicast is not None:
            multicast.start()
    events = asyncio.ensure_future(server.run_events())
    netkey_peering = netkey_task = None
    if config.netkey_listen:
        from keyserverd.peering.netkey import NetkeyPeering

        def push_netkey(pw_id: int, key: bytes) -> None:
            try:
                server._act(None, service.netkey_pushes(pw_id, key))
            except StoreUnavailable as exc:  # the gateways ask again (netkey_req) when they reconnect
                log.warning("netkey_push_failed", extra=fields(pw_id=pw_id, reason=str(exc)))

        netkey_peering = NetkeyPeering(
            ca, config.state_dir, parse_hostport(config.netkey_listen), parse_hostport(config.netkey_peer),
            config.netkey_peer_ca, config.netkey_rekey_after_s, push_netkey, kek=service.store.kek)
        service.netkeys, service.netkey_peer_ca = netkey_peering.book, config.netkey_peer_ca
        netkey_task = asyncio.ensure_future(netkey_peering.run())
    try:
        while not stop.is_set():
            workers.reap()
            try:
                await wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        log.info("keyserverd_stopping")
        events.cancel()
        admin.close()
        if metrics is not None:
            metrics.close()
        try:
            admin_path.unlink()
        except OSError:
            pass
        if multicast is not None:
            await multicast.close()
        if revocations is not None:
            await revocations.close()
        if peering is not None:
            await peering.close()
        if netkey_peering is not None:
            netkey_task.cancel()
            await netkey_peering.close()
        await server.close()


async def _run_worker(server: KeyServer, workers: Workers, stop: asyncio.Event) -> None:
    """Workers 1..N-1: serve and read the event log; report to worker 0 until stopped."""
    events = asyncio.ensure_future(server.run_events())
    try:
        while not stop.is_set():
            workers.report(server)
            try:
                await wait_for(stop.wait(), REPORT_S)
            except asyncio.TimeoutError:
                pass
    finally:
        events.cancel()
        await server.close()



def _raise_fd_limit(want: int) -> None:
    """Raise the soft limit on open files toward ``want`` (up to the hard limit); warn if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("fd_limit_low", extra=fields(open_files=soft, wanted=want,
                                                 hint="raise LimitNOFILE or lower max_connections"))
