"""Group commit on a real keyserverd process and a real SQLite file: it is
killed (SIGKILL) while groups of new pair keys and rotations are in flight,
then every answer a client got is checked against the store after a restart:
each acknowledged key is there, under the PW_ID answered, so nothing was
answered before its commit was durable.  keyserverd runs with its default
``workers`` (one per core), so on a machine with several cores its workers
take turns writing the same file."""

import asyncio
import os
import random
import signal
import time

from keyserverd.store import open_store
from keyserverd.store.kek import DEFAULT_KEK_FILE, load_kek
from l2crypt.lab.ks_hosts import KsConnection, client_context, free_port, host_id, mac_of, prepare, start_keyserverd

HOSTS = 12
#: Requests each connection keeps outstanding, so the server always has a group in hand.
IN_FLIGHT = 8


async def _load(port: int, state, acknowledged: list, killed: asyncio.Event, rng: random.Random) -> int:
    """Every host asks for new pairs and rotations until the server dies; returns requests sent."""
    conns = [await KsConnection.open(port, client_context(state, n)) for n in range(HOSTS)]
    for n, conn in enumerate(conns):
        assert (await conn.call({"t": "hello", "mac": mac_of(n)}))["t"] == "welcome"
    held: dict[tuple[int, int], int] = {}  # (me, peer) -> newest pw_id I was answered
    sent = 0

    async def one(n: int, conn: KsConnection) -> None:
        nonlocal sent
        while not killed.is_set():
            peer = rng.choice([p for p in range(HOSTS) if p != n])
            pw_id = held.get((n, peer))
            msg = ({"t": "rekey_req", "peer_mac": mac_of(peer), "pw_id": pw_id} if pw_id and rng.random() < 0.5
                   else {"t": "key_req", "peer_mac": mac_of(peer)})
            sent += 1
            try:
                answer = await conn.call(msg, timeout=10)
            except (EOFError, OSError, asyncio.TimeoutError):
                return
            assert answer["t"] == "key", answer
            held[(n, peer)] = max(held.get((n, peer), 0), answer["pw_id"])
            acknowledged.append((host_id(n), host_id(peer), answer["pw_id"], answer["key"]))

    tasks = [one(n, conn) for n, conn in enumerate(conns) for _ in range(IN_FLIGHT)]
    await asyncio.gather(*tasks)
    for conn in conns:
        conn.close()
    return sent


async def _run_and_kill(proc, port, state, acknowledged, seed) -> int:
    killed = asyncio.Event()
    load = asyncio.ensure_future(_load(port, state, acknowledged, killed, random.Random(seed)))
    started = len(acknowledged)
    deadline = time.monotonic() + 15
    while len(acknowledged) - started < 300 + random.Random(seed).randrange(300):
        assert time.monotonic() < deadline and not load.done(), "the load did not get going"
        await asyncio.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    killed.set()
    return await asyncio.wait_for(load, 20)


def test_every_acknowledged_key_survives_a_kill_mid_group(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    prepare(state, HOSTS)
    acknowledged: list = []
    sent = 0
    for round_ in range(2):  # kill, restart on the same file, kill again
        port = free_port()
        proc = start_keyserverd(state, port)
        try:
            sent += asyncio.run(_run_and_kill(proc, port, state, acknowledged, round_))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
    assert sent > len(acknowledged)  # requests were in flight when the server died
    store = open_store("", state, time.time(), kek=load_kek(state / DEFAULT_KEK_FILE, None))
    try:
        lost = [(a, b, pw_id) for a, b, pw_id, key in acknowledged if store.pair_key(a, b, pw_id) != key]
        assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged keys are not in the store"
        assert any(pw_id > 1 for _, _, pw_id, _ in acknowledged)  # rotations were acknowledged too
    finally:
        store.close()
