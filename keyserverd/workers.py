"""keyserverd worker processes: ``workers = N`` processes serve one listening
port and one store.

1. ``workers_for(config)`` is how many: ``workers`` from the config, where 0
   (the default) means one per core.  It is 1 whatever the config says when
   the listening port is 0 (each worker would get another port), and 0 means
   1 with peering, NETKEY or a PKCS#11 token (CA key or KEK), which run in one process
   (``config`` refuses an explicit ``workers`` > 1 with them).
2. ``Workers.start(count)`` runs before any event loop or store connection
   exists: it makes a Unix datagram socket pair between every two workers
   (unnamed: nobody else can send on them), then forks workers 1..N-1.  The process that
   called it is worker 0: it prints the ``listening`` line and serves the
   admin socket and the metrics endpoint; each worker has its own store
   connection and its own event cursor (``event_cursor.N``).  A worker dies
   with worker 0 (``PR_SET_PDEATHSIG``); worker 0 stops the others
   (SIGTERM) when it stops, and logs a worker that exits on its own.  The
   TLS server context is made before the fork, so every worker takes the
   session tickets any of them issued (a reconnect resumes wherever it lands).
3. Every worker listens on the port with ``SO_REUSEPORT``, so the kernel
   spreads the connections over them.
4. Pushes reach every connection of a host, whichever worker holds it:
   rotations and revocations come from the store's event log, which every
   worker reads (``KeyServer.run_events``); a push a request causes (the
   new pair key to its peer, ``unmapped`` to a gateway) goes to the local
   connections and to every other worker (``relay``), which delivers it to
   its own (``KeyServer.deliver``).  The pushes relayed in one turn of the
   event loop travel together, in as few datagrams as fit.
5. Every ``REPORT_S`` each worker sends worker 0 its connection counts, so
   ``keyserverd status`` and the metrics count every worker's connections
   (``KeyServer.siblings``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time

import msgpack

from l2crypt.ops.logs import fields

log = logging.getLogger("keyserverd")

#: How often a worker reports its connections to worker 0, seconds.
REPORT_S = 1.0
#: A report older than this is not counted (its worker is gone).
REPORT_STALE_S = 5.0
#: Largest datagram received (a push is far smaller).
MAX_DATAGRAM = 1 << 16
#: Relayed pushes are sent in datagrams of at most this many bytes (unless one push is larger).
RELAY_DATAGRAM = 48 * 1024
PR_SET_PDEATHSIG = 1


def workers_for(config) -> int:
    """How many worker processes to run (see the module docstring, 1)."""
    if config.listen_port == 0:
        return 1
    if config.workers:
        return config.workers
    if config.peers or config.peer_listen or config.netkey_listen or config.ca_token() is not None \
            or config.kek_token() is not None:
        return 1
    return os.cpu_count() or 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: worker 0 still stops the others when it stops


class Workers:
    """This process's place among the workers: its index, its relay socket,
    the others' addresses and (worker 0) their PIDs."""

    def __init__(self, index: int, count: int, links: dict[int, socket.socket], children: list[int]):
        self.index, self.count = index, count
        #: other worker's index -> our end of the datagram socket pair to it.
        self._links = links
        self.children = children
        #: index -> (time received, report), in worker 0.
        self._reports: dict[int, tuple[float, dict]] = {}
        self.relay_failures = 0
        #: Pushes relayed in this turn of the event loop, sent by ``_flush``.
        self._relayed: list[tuple[str, dict]] = []
        self._loop = None

    @classmethod
    def single(cls) -> "Workers":
        return cls(0, 1, {}, [])

    @classmethod
    def start(cls, count: int) -> "Workers":
        """Make the socket pairs and fork workers 1..count-1 (see the module docstring, 2)."""
        if count <= 1:
            return cls.single()
        ends: dict[tuple[int, int], socket.socket] = {}  # (mine, theirs) -> my end
        for a in range(count):
            for b in range(a + 1, count):
                ends[a, b], ends[b, a] = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in ends.values():
            sock.setblocking(False)
        children = []
        for index in range(1, count):
            pid = os.fork()
            if pid == 0:
                _die_with_parent()
                return cls(index, count, cls._keep(ends, index), [])
            children.append(pid)
        return cls(0, count, cls._keep(ends, 0), children)

    @staticmethod
    def _keep(ends: dict, index: int) -> dict[int, socket.socket]:
        """Close every socket end that is not ``index``'s; its ends by the other index."""
        mine = {}
        for (a, b), sock in ends.items():
            if a == index:
                mine[b] = sock
            else:
                sock.close()
        return mine

    # --- relaying pushes -------------------------------------------------------
    def attach(self, loop, server) -> None:
        """Deliver what other workers relay to ``server``; relay its request pushes."""
        if not self._links:
            return
        server.relay = self.relay
        server.siblings = self.sibling_reports
        self._loop = loop
        for sock in self._links.values():
            loop.add_reader(sock.fileno(), self._receive, sock, server)

    def relay(self, host_id: str, msg: dict) -> None:
        """Send a push for ``host_id`` to every other worker, with the others
        relayed in this turn of the event loop (one datagram, ``_flush``)."""
        if not self._relayed:
            self._loop.call_soon(self._flush)
        self._relayed.append((host_id, msg))

    def _flush(self) -> None:
        """Send the pushes relayed in this loop turn, as few datagrams as fit ``RELAY_DATAGRAM``."""
        relayed, self._relayed = self._relayed, []
        batches = [relayed]
        while batches:
            batch = batches.pop()
            data = msgpack.packb({"pushes": batch}, use_bin_type=True)
            if len(data) > RELAY_DATAGRAM and len(batch) > 1:
                half = len(batch) // 2
                batches += [batch[half:], batch[:half]]  # the first half is sent first
                continue
            for index in range(self.count):
                if index != self.index:
                    self._send(index, data)

    def report(self, server) -> None:
        """Tell worker 0 this worker's connections (workers 1..N-1)."""
        if self._links and self.index != 0:
            self._send(0, msgpack.packb({"report": self.index, "connections": server.local_connections,
                                         "hosts": server.local_hosts(), "counters": server.local_counters()},
                                        use_bin_type=True))

    def sibling_reports(self) -> list[dict]:
        """The fresh reports of the other workers (worker 0)."""
        now = time.monotonic()
        return [r for at, r in self._reports.values() if now - at < REPORT_STALE_S]

    def _send(self, index: int, data: bytes) -> None:
        try:
            self._links[index].send(data)
        except OSError as exc:  # a full queue or a worker gone: the agent asks again when it needs the key
            self.relay_failures += 1
            if self.relay_failures in (1, 10, 100) or self.relay_failures % 1000 == 0:
                log.warning("worker_relay_failed", extra=fields(worker=index, reason=str(exc),
                                                                failures=self.relay_failures))

    def _receive(self, sock: socket.socket, server) -> None:
        while True:
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                doc = msgpack.unpackb(data, raw=False)
                if "pushes" in doc:
                    for host_id, msg in doc["pushes"]:
                        server.deliver(host_id, msg)
                elif "report" in doc:
                    self._reports[int(doc["report"])] = (time.monotonic(), doc)
            except Exception:  # one bad datagram must not stop the others
                log.exception("worker_relay_unreadable")

    # --- stopping ----------------------------------------------------------------
    def reap(self) -> None:
        """Log workers that exited on their own (worker 0; call now and then)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.remove(pid)
                log.error("worker_exited", extra=fields(pid=pid, status=status,
                                                        note="its connections come back to the other workers"))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the other workers (worker 0)."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for pid in self.children:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.05)
        self.children = []
