"""``scripts/bench keyserver``: key requests per second and latency of keyserverd.

1. Make a temporary state directory with a CA, ``--agents`` hosts (200) with
   fixed MACs and a client certificate each, in the store under test: SQLite
   (the default) and PostgreSQL (a throwaway server, ``l2crypt.lab.pg_throwaway``).
2. Start ``keyserverd`` as its own process on 127.0.0.1 (loopback only).
3. Open one TLS 1.3 connection per simulated agent, say hello, then each agent
   sends ``key_req`` for random peers one after another for ``--seconds``.
   Every request's latency is measured from send to answer.
4. Print requests/s, p50 and p99 latency for each store; write JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyserverd.ca import CertificateAuthority
from keyserverd.store import open_store
from keyserverd.store.kek import DEFAULT_KEK_FILE, create_kek_file
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.ks_messages import FrameReader, encode_message


def _mac(n: int) -> bytes:
    return bytes([0x02, 0x4C, 0x42, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


def _prepare(state: Path, agents: int, store_url: str) -> list[ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca = CertificateAuthority.open(state, ())
    kek = create_kek_file(state / DEFAULT_KEK_FILE)  # keyserverd gets it with --kek-file
    store = open_store(store_url, state, time.time(), kek=kek)
    contexts = []
    for n in range(agents):
        host_id = f"b{n}"
        store.add_host(host_id, _mac(n), "host", b"x" * 32, time.time() + 3600, time.time())
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)])).sign(key, hashes.SHA256()))
        (state / f"{host_id}.crt").write_bytes(ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), host_id))
        (state / f"{host_id}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=ca.ca_cert_pem.decode())
        ctx.load_cert_chain(state / f"{host_id}.crt", state / f"{host_id}.key")
        contexts.append(ctx)
    store.close()
    return contexts


async def _agent(n: int, port: int, ctx: ssl.SSLContext, agents: int, go: asyncio.Event, ready: list,
                 latencies: list[float]):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=KEYSERVER_TLS_NAME), 60)
    frames, pending = FrameReader(), []

    async def call(msg: dict) -> dict:
        writer.write(encode_message(msg))
        while True:
            for m in pending:
                if m.get("rid") == msg["rid"]:
                    pending.remove(m)
                    return m
            data = await asyncio.wait_for(reader.read(65536), 60)
            if not data:
                raise EOFError("keyserverd closed the connection")
            pending.extend(m for m in frames.feed(data) if m.get("rid"))

    assert (await call({"t": "hello", "rid": 1, "mac": _mac(n)}))["t"] == "welcome"
    ready.append(n)
    await go.wait()
    rng, rid = random.Random(n), 1
    loop = asyncio.get_running_loop()
    while loop.time() < go.until:
        peer = rng.randrange(agents - 1)
        peer += peer >= n
        rid += 1
        t0 = time.perf_counter()
        answer = await call({"t": "key_req", "rid": rid, "peer_mac": _mac(peer)})
        latencies.append(time.perf_counter() - t0)
        assert answer["t"] == "key", answer
    writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(store_name: str, store_url: str, agents: int, seconds: float) -> dict:
    state = Path(tempfile.mkdtemp(prefix="l2c-ksbench-"))
    proc = None
    try:
        contexts = _prepare(state, agents, store_url)
        port = _free_port()
        argv = [str(Path(sys.executable).parent / "keyserverd"), "--state-dir", str(state),
                "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
                "--kek-file", str(state / DEFAULT_KEK_FILE)]
        proc = subprocess.Popen(argv + (["--store", store_url] if store_url else []),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"keyserverd did not start: {line}")

        async def main() -> tuple[list[float], float]:
            latencies: list[float] = []
            loop = asyncio.get_running_loop()
            ready, go = [], asyncio.Event()
            # connections first (TLS handshakes are not what is measured), then all at once
            tasks = [asyncio.ensure_future(_agent(n, port, ctx, agents, go, ready, latencies))
                     for n, ctx in enumerate(contexts)]
            deadline = loop.time() + 120
            while len(ready) < agents:
                if loop.time() > deadline or any(t.done() for t in tasks):
                    for t in tasks:
                        t.cancel()
                    raise RuntimeError(f"only {len(ready)} of {agents} agents connected")
                await asyncio.sleep(0.05)
            start = loop.time()
            go.until = start + seconds
            go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
            return latencies, loop.time() - start

        latencies, elapsed = asyncio.run(main())
        latencies.sort()
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
        return {"store": store_name, "agents": agents, "requests": len(latencies),
                "requests_per_s": round(len(latencies) / elapsed, 1),
                "p50_ms": round(pick(0.50), 2), "p99_ms": round(pick(0.99), 2)}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench keyserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200, help="simulated agents (200)")
    parser.add_argument("--seconds", type=float, default=10, help="measuring time per store (10)")
    parser.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error("--agents: at least 2")
    results = []
    if args.store in ("sqlite", "both"):
        results.append(measure("sqlite", "", args.agents, args.seconds))
    if args.store in ("postgresql", "both"):
        from .pg_throwaway import PgServer, unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"bench keyserver: skipping PostgreSQL: {reason}", file=sys.stderr)
        else:
            pg = PgServer.from_env()
            try:
                url = pg.create_database()
                results.append(measure("postgresql", url, args.agents, args.seconds))
            finally:
                pg.stop()
    print(f"{'store':<12}{'agents':>8}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for r in results:
        print(f"{r['store']:<12}{r['agents']:>8}{r['requests']:>10}{r['requests_per_s']:>10}"
              f"{r['p50_ms']:>9}{r['p99_ms']:>9}")
    out = args.out or Path("bench-results") / f"bench-keyserver-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=2))
    print(f"wrote {out}")
    return 0
