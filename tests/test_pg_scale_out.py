"""Scale-out on PostgreSQL: three keyserverd instances share one throwaway
PostgreSQL; hosts (real key clients) are spread over them by priority.  One
instance is killed: its hosts fail over and are served again within 10 s, and
every key a host held is still the pair's key everywhere (no established flow
loses its key, nothing acknowledged is lost)."""

import asyncio
import shutil
import signal
import time

from keyserverd.store import open_store
from keyserverd.store.kek import DEFAULT_KEK_FILE, load_kek
from l2crypt.agent.keyclient import KeyClient
from l2crypt.lab.ks_hosts import client_context, free_port, host_id, mac_of, prepare, start_keyserverd

HOSTS = 9
INSTANCES = 3
SHARED = ("ca.key", "ca.crt", "server.key", "server.crt", DEFAULT_KEK_FILE)


class Keys:
    """A host's side of its key client: the keys it holds, by peer MAC."""

    def __init__(self):
        self.held: dict[bytes, tuple[bytes, int]] = {}

    def on_key(self, peer_mac, peer_id, key, pw_id, age_s=0, older=()):
        self.held[peer_mac] = (key, pw_id)

    def __getattr__(self, name):  # on_welcome, on_disconnect, ...: nothing to do here
        return lambda *args, **kwargs: None


async def _until(what, predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic()


def test_three_instances_one_killed_hosts_fail_over_and_keep_their_keys(tmp_path, pg_url):
    states = [tmp_path / f"ks{k}" for k in range(INSTANCES)]
    for state in states:
        state.mkdir(mode=0o700)
    prepare(states[0], HOSTS, pg_url)
    for state in states[1:]:
        for name in SHARED:
            shutil.copy2(states[0] / name, state / name)
    ports = [free_port() for _ in states]
    procs = [start_keyserverd(state, port, pg_url, ("--workers", "1")) for state, port in zip(states, ports)]
    addresses = [f"127.0.0.1:{port}" for port in ports]

    async def body():
        events = [Keys() for _ in range(HOSTS)]
        clients = [KeyClient(tuple(addresses[(n + k) % INSTANCES] for k in range(INSTANCES)),
                             client_context(states[0], n), mac_of(n), events[n], probe_interval_s=0.5,
                             probe_failures=2, failback_holddown_s=3600, reconnect_jitter_s=0.5)
                   for n in range(HOSTS)]
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(c.run(stop)) for c in clients]
        peers = {n: [mac_of((n + 1) % HOSTS), mac_of((n + 3) % HOSTS)] for n in range(HOSTS)}
        try:
            await _until("every host connected", lambda: all(c.connected for c in clients), 15)
            assert {c.server for c in clients} == set(addresses)  # spread by priority
            for n, client in enumerate(clients):
                for peer in peers[n]:
                    assert client.request_key(peer)
            await _until("every key", lambda: all(set(peers[n]) <= set(events[n].held) for n in range(HOSTS)), 10)
            held = {n: dict(events[n].held) for n in range(HOSTS)}

            procs[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            orphans = [c for c in clients if c.server == addresses[0]]
            assert len(orphans) == HOSTS // INSTANCES
            served = await _until("the hosts of the killed instance served again",
                                  lambda: all(c.connected and c.server != addresses[0] for c in orphans), 10)
            assert served - killed < 10
            for n, client in enumerate(clients):
                events[n].held.clear()
                for peer in peers[n]:
                    assert client.request_key(peer)
            await _until("every key again", lambda: all(set(peers[n]) <= set(events[n].held)
                                                        for n in range(HOSTS)), 10)
            for n in range(HOSTS):
                for peer in peers[n]:
                    assert events[n].held[peer] == held[n][peer], f"host {n} got another key for {peer.hex()}"
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return held

    try:
        held = asyncio.run(body())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
    store = open_store(pg_url, states[0], time.time(), kek=load_kek(states[0] / DEFAULT_KEK_FILE, None))
    try:
        for n, keys in held.items():
            for peer_mac, (key, pw_id) in keys.items():
                peer = int.from_bytes(peer_mac[3:], "big")
                assert store.pair_key(host_id(n), host_id(peer), pw_id) == key
    finally:
        store.close()

